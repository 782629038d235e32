-- A sample holds one row per consumer group, and a process kind may read as several groups.
SELECT $__timeInterval(sampled_at) AS time, process AS series, max(lag) AS lag
FROM
(
    SELECT sampled_at, process, sum(lag) AS lag
    FROM $__db.consumer_lag
    WHERE $__timeFilter(sampled_at)
    GROUP BY sampled_at, process
)
GROUP BY time, series
ORDER BY time, series

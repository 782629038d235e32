SELECT if(count() > 0, sum(lag), NULL) AS lag
FROM $__db.consumer_lag
WHERE sampled_at = (
    SELECT max(sampled_at) FROM $__db.consumer_lag WHERE $__timeFilter(sampled_at)
)

SELECT
    $__timeInterval(minute) AS time,
    concat(source_topic, ' · ', error_code) AS series,
    sum(dead_letters) AS dead_letters
FROM $__db.dead_letters_per_minute
WHERE $__timeFilter(minute)
  AND $__tenantFilter(tenant_id)
GROUP BY time, series
ORDER BY time, series

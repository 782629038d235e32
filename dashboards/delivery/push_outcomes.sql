SELECT
    $__timeInterval(attempted_at) AS time,
    concat(if(provider = '', 'no device', provider), ' ', outcome) AS series,
    count() AS attempts
FROM $__db.push_outcomes FINAL
WHERE $__timeFilter(attempted_at)
  AND $__tenantFilter(tenant_id)
GROUP BY time, series
ORDER BY time, series

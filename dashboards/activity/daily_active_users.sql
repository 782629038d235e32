SELECT toDateTime(day, 'UTC') AS time, sum(active_users) AS active_users
FROM $__db.daily_active_users
WHERE $__dateFilter(day) AND $__tenantFilter(tenant_id)
GROUP BY time
ORDER BY time

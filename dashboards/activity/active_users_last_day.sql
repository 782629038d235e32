SELECT sum(active_users) AS active_users
FROM $__db.daily_active_users
WHERE day = toDate($__toTime)
  AND $__tenantFilter(tenant_id)

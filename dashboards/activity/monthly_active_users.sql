SELECT sum(active_users) AS active_users
FROM $__db.monthly_active_users
WHERE month = toStartOfMonth($__toTime)
  AND $__tenantFilter(tenant_id)

SELECT sum(dead_letters) AS dead_letters
FROM $__db.dead_letters_per_minute
WHERE $__timeFilter(minute)
  AND $__tenantFilter(tenant_id)

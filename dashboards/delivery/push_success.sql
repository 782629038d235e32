SELECT countIf(outcome = 'sent') / nullIf(countIf(outcome != 'skipped'), 0) AS sent_ratio
FROM $__db.push_outcomes FINAL
WHERE $__timeFilter(attempted_at)
  AND $__tenantFilter(tenant_id)

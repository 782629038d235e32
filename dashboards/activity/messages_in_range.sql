SELECT count() AS messages
FROM $__db.sequenced_events
WHERE event_type = 'message.sent'
  AND $__timeFilter(occurred_at)
  AND $__tenantFilter(tenant_id)

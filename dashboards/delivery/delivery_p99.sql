SELECT if(count() > 0, quantileExact(0.99)(latency_ms), NULL) AS p99_ms
FROM
(
    SELECT toUnixTimestamp64Milli(queued_at) - toUnixTimestamp64Milli(occurred_at) AS latency_ms
    FROM $__db.sync_entries
    WHERE event_type = 'message.sent'
      AND user_id != actor_id
      AND $__timeFilter(occurred_at)
      AND $__tenantFilter(tenant_id)
)

SELECT
    $__timeInterval(occurred_at) AS time,
    uniqExact(tenant_id, conversation_id) AS active_conversations
FROM $__db.sequenced_events
WHERE event_type = 'message.sent'
  AND $__timeFilter(occurred_at)
  AND $__tenantFilter(tenant_id)
GROUP BY time
ORDER BY time WITH FILL
    FROM toStartOfInterval($__fromTime, INTERVAL $__interval_s SECOND)
    TO $__toTime
    STEP $__interval_s

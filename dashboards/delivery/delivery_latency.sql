-- quantileExact: a value of the set, no sampling (the same rows always give the same answer).
SELECT
    $__timeInterval(occurred_at) AS time,
    quantileExact(0.5)(latency_ms) AS p50,
    quantileExact(0.9)(latency_ms) AS p90,
    quantileExact(0.99)(latency_ms) AS p99
FROM
(
    SELECT
        occurred_at,
        toUnixTimestamp64Milli(queued_at) - toUnixTimestamp64Milli(occurred_at) AS latency_ms
    FROM $__db.sync_entries
    WHERE event_type = 'message.sent'
      AND user_id != actor_id
      AND $__timeFilter(occurred_at)
      AND $__tenantFilter(tenant_id)
)
GROUP BY time
ORDER BY time

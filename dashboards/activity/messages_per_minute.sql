-- Messages sequenced per bucket, divided by the bucket's minutes: a rate per minute whatever the
-- bucket. The kind as the messages_per_minute view decides it (the conversation's creation, else
-- the id: direct conversation ids start with dm-), computed from the rows in range in one pass.
-- The 5 busiest tenants of the range are shown apart, the others summed.
SELECT
    time,
    concat(if(tenant_rank <= 5, tenant_id, 'other tenants'), ' · ', kind) AS series,
    sum(messages) / ($__interval_s / 60) AS messages_per_minute
FROM
(
    SELECT *, dense_rank() OVER (ORDER BY tenant_total DESC, tenant_id) AS tenant_rank
    FROM
    (
        SELECT *, sum(messages) OVER (PARTITION BY tenant_id) AS tenant_total
        FROM
        (
            SELECT
                $__timeInterval(sent.occurred_at) AS time,
                sent.tenant_id AS tenant_id,
                if(kinds.kind != '', kinds.kind,
                   if(startsWith(sent.conversation_id, 'dm-'), 'direct', 'group')) AS kind,
                count() AS messages
            FROM
            (
                SELECT tenant_id, conversation_id, occurred_at
                FROM $__db.sequenced_events
                WHERE event_type = 'message.sent'
                  AND $__timeFilter(occurred_at)
                  AND $__tenantFilter(tenant_id)
            ) AS sent
            LEFT JOIN
            (
                SELECT tenant_id, conversation_id,
                       any(JSONExtractString(raw, 'payload', 'kind')) AS kind
                FROM $__db.sequenced_events
                WHERE event_type = 'conversation.created'
                  AND occurred_at < $__toTime
                  AND $__tenantFilter(tenant_id)
                GROUP BY tenant_id, conversation_id
            ) AS kinds
            ON sent.tenant_id = kinds.tenant_id AND sent.conversation_id = kinds.conversation_id
            GROUP BY time, tenant_id, kind
        )
    )
)
GROUP BY time, series
ORDER BY time, series

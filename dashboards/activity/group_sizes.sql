-- Each group's size from its membership events up to the range's end.
SELECT category, conversations
FROM
(
    SELECT
        multiIf(members <= 2, '1-2', members <= 5, '3-5', members <= 10, '6-10',
                members <= 50, '11-50', members <= 100, '51-100', members <= 500, '101-500',
                '> 500') AS category,
        min(members) AS smallest,
        count() AS conversations
    FROM
    (
        SELECT
            tenant_id,
            conversation_id,
            sumIf(JSONLength(raw, 'payload', 'members'), event_type = 'conversation.created')
                + countIf(event_type = 'conversation.member_added')
                - countIf(event_type IN ('conversation.member_removed', 'conversation.left'))
                AS members,
            anyIf(JSONExtractString(raw, 'payload', 'kind'), event_type = 'conversation.created')
                AS kind,
            countIf(event_type = 'conversation.deleted') AS deletions
        FROM $__db.sequenced_events
        WHERE event_type IN ('conversation.created', 'conversation.member_added',
                             'conversation.member_removed', 'conversation.left',
                             'conversation.deleted')
          AND occurred_at < $__toTime
          AND $__tenantFilter(tenant_id)
        GROUP BY tenant_id, conversation_id
        HAVING kind = 'group' AND deletions = 0 AND members > 0
    )
    GROUP BY category
)
ORDER BY smallest

-- Average DAU over the month's days so far (days with any activity), over the month's MAU.
SELECT
    (
        SELECT sum(active_users) / greatest(uniqExact(day), 1)
        FROM $__db.daily_active_users
        WHERE day >= toStartOfMonth($__toTime) AND day <= toDate($__toTime)
          AND $__tenantFilter(tenant_id)
    )
    / nullIf(
        (
            SELECT sum(active_users)
            FROM $__db.monthly_active_users
            WHERE month = toStartOfMonth($__toTime) AND $__tenantFilter(tenant_id)
        ),
        0
    ) AS dau_over_mau

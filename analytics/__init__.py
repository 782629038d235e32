"""The ClickHouse owner's HTTP API: analytics, search, quality datasets, operator jobs and
the dashboards page (docs/analytics.md)."""

"""The ClickHouse sink: the audit log of every topic, the analytics on it, and the analytics
endpoint of the process that owns the chDB data path (docs/analytics.md)."""

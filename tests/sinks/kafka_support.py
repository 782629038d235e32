"""Kafka helpers that the CQL and the ClickHouse sink tests both need."""

from __future__ import annotations

from confluent_kafka.admin import AdminClient


def delete_prefixed_topics(admin: AdminClient, prefix: str) -> None:
    """Delete every topic whose name starts with ``prefix`` (a test's own topics), waiting."""
    names = [name for name in admin.list_topics(timeout=30).topics if name.startswith(prefix)]
    if names:
        for future in admin.delete_topics(names).values():
            future.result(timeout=60)

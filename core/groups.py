"""Every consumer group an imstream process joins, named in one place.

A group's name is part of the deployment's state (its committed offsets live under it), so a
name never changes once released. The process table (``pipelines.processes``) says which
process joins which group and reads which topics; the ACLs (``pipelines.kafka_acls``) grant
them; the processes take their default group from here.
"""

from __future__ import annotations

from core.settings import Settings

CQL_SINK = "imstream-cql-sink"
PUSH_SINK = "imstream-push-sink"
CLICKHOUSE_SINK = "imstream-clickhouse-sink"
CLICKHOUSE_REBUILD = "imstream-clickhouse-rebuild"


def stream_group(settings: Settings, processor: str) -> str:
    """The group (and transactional-id stem) of one stream processor: ``conversations`` or
    ``users``."""
    return f"{settings.kafka.topic_prefix}{settings.streams.app_id}-{processor}"


def stream_group_prefix(settings: Settings) -> str:
    """What every stream processor's group and transactional id starts with."""
    return f"{settings.kafka.topic_prefix}{settings.streams.app_id}-"


def cql_sink_group(settings: Settings, keyspace: str | None = None) -> str:
    """The CQL sink's group for ``keyspace``: the historical name for the anchor keyspace, the
    keyspace appended for any other (``imstream rebuild cql`` builds one beside it)."""
    base = f"{settings.kafka.topic_prefix}{CQL_SINK}"
    return base if keyspace in {None, settings.cql.keyspace} else f"{base}.{keyspace}"


def push_sink_group(settings: Settings) -> str:
    return f"{settings.kafka.topic_prefix}{PUSH_SINK}"


def clickhouse_sink_group(settings: Settings) -> str:
    return f"{settings.kafka.topic_prefix}{CLICKHOUSE_SINK}"


def clickhouse_group_prefix(settings: Settings) -> str:
    """What the ClickHouse sink's group and its operator jobs' groups (rebuilds) start with."""
    return f"{settings.kafka.topic_prefix}imstream-clickhouse-"


def clickhouse_rebuild_group(settings: Settings, run_id: str) -> str:
    """The group of one ClickHouse rebuild (an operator job):
    ``<prefix>imstream-clickhouse-rebuild.<run id>``."""
    return f"{settings.kafka.topic_prefix}{CLICKHOUSE_REBUILD}.{run_id}"

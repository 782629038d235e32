"""The process topology: every process imstream runs, in ONE table.

Each row names a process kind (``imstream run <name>``), the function that runs it (a module
of this package, imported only when that process starts: the gateway's FastAPI and uvicorn
would add half a second to every other command), the consumer groups it joins with the topics
each reads, and whether it is a sink (``imstream up`` runs sinks at a lower CPU priority).
``imstream run``/``up``/``status``, the consumer-lag sampler, the benchmarks and the compose
test all read this table; docs/architecture.md's process table is checked against it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from confluent_kafka import ConsumerGroupState, KafkaException
from confluent_kafka.admin import AdminClient

from core.connections import kafka_config
from core.groups import (
    clickhouse_sink_group,
    cql_sink_group,
    push_sink_group,
    stream_group,
)
from core.settings import Settings
from schemas.topics import topic_catalog
from sinks.clickhouse.schema import audited_topics

#: Per consumer group: the topics it reads.
Groups = dict[str, list[str]]


@dataclass(frozen=True, slots=True)
class ProcessKind:
    #: ``imstream run <name>``; also the compose service and the supervisor's child kind.
    name: str
    #: What it does, in one line (``imstream run --help``, docs/architecture.md).
    summary: str
    #: ``module:function`` taking the settings and returning the exit code.
    entry: str
    #: Its consumer groups and the topics each reads.
    groups: Callable[[Settings], Groups]
    #: A sink: ``imstream up`` lowers its CPU priority (live delivery first).
    sink: bool = False

    def main(self) -> Callable[..., int]:
        """The process's entry function, imported now."""
        module, function = self.entry.split(":")
        entry: Callable[..., int] = getattr(importlib.import_module(module), function)
        return entry


def _stream_worker_groups(settings: Settings) -> Groups:
    catalog = topic_catalog(settings)
    return {
        stream_group(settings, "conversations"): [
            catalog.messages_in.name,
            catalog.typing_in.name,
        ],
        stream_group(settings, "users"): [
            catalog.user_inbox.name,
            catalog.user_state_in.name,
            catalog.presence.name,
        ],
    }


def _cql_sink_groups(settings: Settings) -> Groups:
    catalog = topic_catalog(settings)
    return {
        cql_sink_group(settings): [
            catalog.messages_sequenced.name,
            catalog.sync_events.name,
            catalog.push_tokens.name,
        ]
    }


def _push_sink_groups(settings: Settings) -> Groups:
    # Its token table follows im.push.tokens without a group (every replica reads it all): only
    # the jobs have a lag to show.
    return {push_sink_group(settings): [topic_catalog(settings).push_jobs.name]}


def _clickhouse_sink_groups(settings: Settings) -> Groups:
    audited = audited_topics(topic_catalog(settings))
    return {clickhouse_sink_group(settings): [topic.name for topic in audited]}


def _no_groups(_settings: Settings) -> Groups:
    """The ingress joins no consumer group: each node reads its own live-delivery partition
    and every group-delivery partition by assignment."""
    return {}


PROCESSES: Final[tuple[ProcessKind, ...]] = (
    ProcessKind(
        name="stream-worker",
        summary="The stream processors: sequencing, fan-out, sync ids, routing, push jobs "
        "(transactional).",
        entry="pipelines.processes.stream_worker:main",
        groups=_stream_worker_groups,
    ),
    ProcessKind(
        name="ingress",
        summary="The WebSocket/REST gateway: accepts client frames into Kafka, delivers live "
        "events, answers reads.",
        entry="pipelines.processes.ingress:main",
        groups=_no_groups,
    ),
    ProcessKind(
        name="cql-sink",
        summary="The CQL sink: timelines, sync queues, conversation lists, members, devices, "
        "who-read.",
        entry="pipelines.processes.cql_sink:main",
        groups=_cql_sink_groups,
        sink=True,
    ),
    ProcessKind(
        name="clickhouse-sink",
        summary="The ClickHouse sink: the audit log of every topic, and the analytics API on "
        "IM_SINKS__ANALYTICS_PORT.",
        entry="pipelines.processes.clickhouse_sink:main",
        groups=_clickhouse_sink_groups,
        sink=True,
    ),
    ProcessKind(
        name="push-sink",
        summary="The push sink: APNs/FCM notifications for offline devices, the token table, "
        "an outcome per attempt.",
        entry="pipelines.processes.push_sink:main",
        groups=_push_sink_groups,
        sink=True,
    ),
)

BY_NAME: Final[dict[str, ProcessKind]] = {kind.name: kind for kind in PROCESSES}


def consumer_groups(settings: Settings, *, live: bool = True) -> dict[str, Groups]:
    """Per process kind with consumer groups: the groups and the topics each reads. ``live``:
    the CQL sink's group is the one running now (another keyspace's after a rebuild's swap,
    asked of Kafka); else the names as configured."""
    groups = {kind.name: kind.groups(settings) for kind in PROCESSES}
    if live:
        ((anchor, topics),) = groups["cql-sink"].items()
        active = active_cql_sink_group(settings)
        if active != anchor:
            groups["cql-sink"] = {active: topics}
    return {name: kinds for name, kinds in groups.items() if kinds}


def active_cql_sink_group(settings: Settings) -> str:
    """The CQL sink's consumer group: ``<prefix>imstream-cql-sink`` for the anchor keyspace,
    ``….<keyspace>`` once ``imstream rebuild cql --swap`` swapped another in
    (``core.groups.cql_sink_group``) — the one of these with members, when exactly one has."""
    base = cql_sink_group(settings)
    admin = AdminClient(kafka_config(settings))  # held: a collected client fails its futures
    try:
        groups = admin.list_consumer_groups(request_timeout=10).result(timeout=10).valid
    except (KafkaException, TimeoutError):  # Kafka unreachable: the callers report it
        return base
    active = [
        group.group_id
        for group in groups
        if (group.group_id == base or group.group_id.startswith(f"{base}."))
        and group.state == ConsumerGroupState.STABLE
    ]
    return active[0] if len(active) == 1 else base

"""``imstream status``: every process ``imstream up`` runs, with its consumer lag and last error.

Reads the supervisor's state file (``<run dir>/processes.json``), tells each process ready,
starting or down from its pid and its ready file (``core/readiness.py``), reads the
committed offsets of each process kind's consumer groups against the topics' end offsets, and
takes the last ERROR/CRITICAL line of each process's log. Lag is in records; a partition one
record behind counts as caught up (the one is a transaction's commit marker, which consumers never
receive), so a real lag of exactly one record per partition is not shown.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import (
    Consumer,
    ConsumerGroupState,
    ConsumerGroupTopicPartitions,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from pipelines.connections import kafka_config
from pipelines.settings import Settings
from pipelines.supervisor import ProcessState, child_state, load_state
from schemas.topics import topic_catalog
from sinks.clickhouse.schema import audited_topics

_ERROR_LINE = re.compile(r" (ERROR|CRITICAL) ")


@dataclass(frozen=True)
class ProcessStatus:
    name: str
    pid: int | None
    state: ProcessState
    restarts: int
    lag: int | None
    last_error: str | None
    log: str


def consumer_groups(settings: Settings) -> dict[str, dict[str, list[str]]]:
    """Per process kind: its consumer groups and the topics each reads."""
    catalog = topic_catalog(settings)
    prefix = settings.kafka.topic_prefix
    app = settings.streams.app_id
    return {
        "stream-worker": {
            f"{prefix}{app}-conversations": [catalog.messages_in.name, catalog.typing_in.name],
            f"{prefix}{app}-users": [
                catalog.user_inbox.name,
                catalog.user_state_in.name,
                catalog.presence.name,
            ],
        },
        "cql-sink": {
            cql_sink_group(settings): [
                catalog.messages_sequenced.name,
                catalog.sync_events.name,
                catalog.push_tokens.name,
            ]
        },
        # Its token table follows im.push.tokens without a group (every replica reads it all):
        # only the jobs have a lag to show.
        "push-sink": {f"{prefix}imstream-push-sink": [catalog.push_jobs.name]},
        "clickhouse-sink": {
            f"{prefix}imstream-clickhouse-sink": [topic.name for topic in audited_topics(catalog)]
        },
    }


def cql_sink_group(settings: Settings) -> str:
    """The CQL sink's consumer group: ``<prefix>imstream-cql-sink`` for the anchor keyspace,
    ``….<keyspace>`` once ``imstream rebuild cql --swap`` swapped another in
    (``sinks.cql.serving.sink_group``) — the one of these with members, when exactly one has."""
    base = f"{settings.kafka.topic_prefix}imstream-cql-sink"
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


def group_lag(settings: Settings, group: str, topics: list[str]) -> int | None:
    """End offsets minus committed offsets over ``topics`` (uncommitted partitions count whole)."""
    admin = AdminClient(kafka_config(settings))
    probe = Consumer(kafka_config(settings, **{"group.id": f"{group}-status-probe"}))
    try:
        partitions = []
        for topic in topics:
            metadata = probe.list_topics(topic, timeout=10).topics.get(topic)
            if metadata is None or metadata.error is not None:
                continue
            partitions += [TopicPartition(topic, p) for p in metadata.partitions]
        request = [ConsumerGroupTopicPartitions(group, partitions)]
        committed = admin.list_consumer_group_offsets(request)[group].result(timeout=10)
        offsets = {(tp.topic, tp.partition): tp.offset for tp in committed.topic_partitions}
        lag = 0
        for tp in partitions:
            low, high = probe.get_watermark_offsets(tp, timeout=10, cached=False)
            done = offsets.get((tp.topic, tp.partition), -1)
            behind = max(0, high - (done if done >= 0 else low))
            # On a topic written in transactions the last offset is usually a commit marker,
            # which a consumer never receives, so its committed offset stays one short of it.
            lag += 0 if behind == 1 else behind
        return lag
    except (KafkaException, TimeoutError):  # unknown lag, shown as such
        return None
    finally:
        probe.close()


def last_error(log: Path) -> str | None:
    try:
        lines = log.read_text(errors="replace").splitlines()[-2000:]
    except FileNotFoundError:
        return None
    errors = [line for line in lines if _ERROR_LINE.search(line)]
    return errors[-1][:200] if errors else None


def statuses(settings: Settings) -> list[ProcessStatus]:
    groups = consumer_groups(settings)
    result = []
    for entry in load_state(settings.stack.run_dir):
        pid = entry.get("pid")
        pid = pid if isinstance(pid, int) else None
        kind = str(entry.get("kind"))
        lags = [group_lag(settings, g, t) for g, t in groups.get(kind, {}).items()]
        known = [lag for lag in lags if lag is not None]
        log = Path(str(entry.get("log")))
        restarts = entry.get("restarts")
        ready_file = entry.get("ready_file")
        result.append(
            ProcessStatus(
                name=str(entry.get("name")),
                pid=pid,
                state=child_state(pid, Path(ready_file) if isinstance(ready_file, str) else None),
                restarts=restarts if isinstance(restarts, int) else 0,
                lag=sum(known) if known and len(known) == len(lags) else None,
                last_error=last_error(log),
                log=str(log),
            )
        )
    return result


def status_command(settings: Settings, echo: Callable[[str], None]) -> int:
    """Print a line per process; 1 when ``imstream up`` is not running or a process is not ready
    (down, or still starting)."""
    found = statuses(settings)
    if not found:
        echo("imstream up is not running here (no processes.json in the state dir)")
        return 1
    echo(f"{'PROCESS':16} {'STATE':8} {'PID':>7} {'RESTARTS':>8} {'LAG':>8}  LAST ERROR")
    for item in found:
        lag = "-" if item.lag is None else str(item.lag)
        echo(
            f"{item.name:16} {item.state:8} {item.pid or '-':>7} "
            f"{item.restarts:>8} {lag:>8}  {item.last_error or '-'}"
        )
    others = {
        state: [item.name for item in found if item.state is state]
        for state in (ProcessState.STARTING, ProcessState.DOWN)
    }
    ready = len(found) - sum(map(len, others.values()))
    echo(
        f"{ready} of {len(found)} processes ready"
        + "".join(f"; {', '.join(names)} {state}" for state, names in others.items() if names)
        + f"; consumer lag {sum(item.lag or 0 for item in found)} records"
    )
    return 0 if ready == len(found) else 1

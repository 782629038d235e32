"""``imstream replay`` and ``imstream rebuild cql`` on the real Kafka and Cassandra: replays into
the CQL tables change nothing, an interrupted replay resumes, the same command twice replays
once, a rebuild reproduces the live tables and its swap hands the sink over without a gap."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cassandra.cluster import Session
from confluent_kafka import Consumer
from typer.testing import CliRunner

from core.connections import kafka_consumer_config
from core.groups import cql_sink_group
from core.replay import ReplayProgress, group_for, replay, resolve_ranges
from core.settings import Settings
from pipelines.cli import app
from pipelines.replay_targets import REPLAYED_FROM_HEADER, CqlTarget, TopicTarget
from schemas.events import OperatorAction, parse_event
from schemas.topics import TopicCatalog, topic_catalog
from sinks.cql.serving import serving_keyspace
from sinks.cql.sink import CqlSink
from tests.sinks.cql_support import (
    Row,
    committed_lag,
    cql_local_stack,  # noqa: F401 - the local_stack fixture: Kafka and Cassandra only
    migrated_topics,
    produce,
    snapshot,
)
from tests.sinks.test_cql_sink import build

pytestmark = pytest.mark.stack


@dataclass
class World:
    settings: Settings
    catalog: TopicCatalog
    keyspace: str
    tables: dict[str, set[Row]]
    records: dict[str, int]
    """Records produced per input topic of the CQL sink."""


@pytest.fixture(scope="module")
def world(settings: Settings, cql_session: Session) -> Iterator[World]:
    """The CQL sink tests' scenario on a prefix of its own, written once by the live sink."""
    with migrated_topics(settings, cql_session, "replay") as configured:
        keyspace = configured.cql.keyspace
        catalog = topic_catalog(configured)
        s = build(catalog).scenario
        produce(configured, [*s.sequenced, *s.sync, *s.tokens])
        stop = threading.Event()
        timer = threading.Timer(60, stop.set)
        timer.start()
        CqlSink(configured, cql_session).run(stop, until_caught_up=True)
        timer.cancel()
        assert not stop.is_set(), "the live sink did not catch up"
        records = Counter(topic for topic, _, _ in [*s.sequenced, *s.sync, *s.tokens])
        yield World(configured, catalog, keyspace, snapshot(cql_session, keyspace), dict(records))


def test_replaying_every_input_into_cql_twice_leaves_every_table_as_it_was(
    world: World, cql_session: Session
) -> None:
    for run in ("first", "second"):
        for topic in CqlTarget.reads(world.catalog):
            ranges = resolve_ranges(world.settings, topic.name)
            target = CqlTarget(
                world.settings, cql_session, world.catalog, world.keyspace, threading.Event()
            )
            result = replay(world.settings, ranges, target, run_id=f"{run}{uuid.uuid4().hex[:6]}")
            target.close()
            assert result.finished
            assert result.replayed == world.records[topic.name]
        assert snapshot(cql_session, world.keyspace) == world.tables


def test_the_same_run_again_replays_nothing(world: World) -> None:
    topic = world.catalog.sync_events
    ranges = resolve_ranges(world.settings, topic.name)
    target = TopicTarget(world.settings, world.catalog.user_state_in, "once")
    run_id = f"once{uuid.uuid4().hex[:6]}"
    first = replay(world.settings, ranges, target, run_id=run_id)
    second = replay(world.settings, ranges, target, run_id=run_id)
    assert (first.replayed, first.finished) == (world.records[topic.name], True)
    assert (second.replayed, second.finished) == (0, True)
    assert second.already_done == first.total


def read_all(settings: Settings, topic: str, expected: int, timeout: float = 30.0) -> list[str]:
    """The replayed-from header of every record of ``topic``, once ``expected`` are there (and
    a moment more, to see a copy too many)."""
    consumer = Consumer(kafka_consumer_config(settings, f"t-read-{uuid.uuid4().hex[:8]}"))
    consumer.subscribe([topic])
    found: list[str] = []
    deadline = time.monotonic() + timeout
    quiet_until = None
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.3)
            if message is not None and message.error() is None:
                headers = dict(message.headers() or [])
                source = headers[REPLAYED_FROM_HEADER]
                assert isinstance(source, bytes)
                found.append(source.decode())
                continue
            if len(found) >= expected:
                quiet_until = quiet_until or time.monotonic() + 2.0
                if time.monotonic() > quiet_until:
                    break
    finally:
        consumer.close()
    return found


def test_an_interrupted_replay_resumes_after_its_last_chunk(world: World) -> None:
    source = world.catalog.messages_sequenced
    target_topic = world.catalog.messages_in
    ranges = resolve_ranges(world.settings, source.name)
    total = world.records[source.name]
    run_id = f"resume{uuid.uuid4().hex[:6]}"
    stop = threading.Event()

    def stop_after_first_chunk(state: ReplayProgress) -> None:
        if state.records > 0:
            stop.set()

    target = TopicTarget(world.settings, target_topic, run_id)
    first = replay(
        world.settings,
        ranges,
        target,
        run_id=run_id,
        stop=stop,
        progress=stop_after_first_chunk,
        chunk_records=3,
    )
    assert not first.finished
    assert 0 < first.replayed <= 3
    second = replay(world.settings, ranges, target, run_id=run_id)
    target.close()
    assert second.finished
    assert first.replayed + second.replayed == total
    # Every source record exactly once in the target topic.
    copies = read_all(world.settings, target_topic.name, total)
    assert len(copies) == total
    assert len(set(copies)) == total
    assert {c.split("/")[0] for c in copies} == {source.name}


def test_the_rate_limit_holds(world: World) -> None:
    topic = world.catalog.sync_events
    ranges = resolve_ranges(world.settings, topic.name)
    total = world.records[topic.name]
    rate = 20.0
    target = TopicTarget(world.settings, world.catalog.presence, "rate")
    result = replay(world.settings, ranges, target, run_id=f"rate{uuid.uuid4().hex[:6]}", rate=rate)
    target.close()
    assert result.replayed == total > 10
    # The last chunk goes out once the rate allows it: no faster than (total - step) / rate.
    assert result.elapsed >= (total - rate / 5) / rate * 0.9


def cli_env(world: World) -> dict[str, str]:
    return {
        "IM_KAFKA__TOPIC_PREFIX": world.settings.kafka.topic_prefix,
        "IM_CQL__KEYSPACE": world.keyspace,
    }


def operator_actions(settings: Settings, catalog: TopicCatalog) -> list[OperatorAction]:
    consumer = Consumer(kafka_consumer_config(settings, f"t-ops-{uuid.uuid4().hex[:8]}"))
    consumer.subscribe([catalog.operator_actions.name])
    actions: list[OperatorAction] = []
    deadline = time.monotonic() + 5.0
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.3)
            if message is not None and message.error() is None and message.value():
                event = parse_event(message.value() or b"")
                assert isinstance(event, OperatorAction)
                actions.append(event)
    finally:
        consumer.close()
    return actions


def test_the_replay_command_resumes_by_its_arguments_and_is_audited(
    world: World, cql_session: Session
) -> None:
    runner = CliRunner()
    topic = world.catalog.sync_events.logical_name
    command = ["replay", topic, "--into", "cql", "--rate", "0", "--operator", "ops-jo"]
    dry = runner.invoke(app, [*command, "--dry-run"], env=cli_env(world))
    assert dry.exit_code == 0, dry.output
    assert "dry run" in dry.output
    first = runner.invoke(app, command, env=cli_env(world))
    assert first.exit_code == 0, first.output
    total = world.records[world.catalog.sync_events.name]
    assert f"replayed {total} records" in first.output
    second = runner.invoke(app, command, env=cli_env(world))
    assert second.exit_code == 0, second.output
    assert "replayed 0 records" in second.output
    again = runner.invoke(app, [*command, "--again"], env=cli_env(world))
    assert f"replayed {total} records" in again.output
    assert snapshot(cql_session, world.keyspace) == world.tables
    typing = world.catalog.typing_in.logical_name
    wrong = runner.invoke(app, ["replay", typing, "--into", "cql"], env=cli_env(world))
    assert wrong.exit_code == 1
    assert "[topic-not-read-by-target]" in wrong.output
    actions = operator_actions(world.settings, world.catalog)
    replays = [a.payload for a in actions if a.payload.operator == "ops-jo"]
    assert [p.counts["replayed"] for p in replays] == [total, 0, total]
    assert all(p.command == "replay" and p.outcome == "succeeded" for p in replays)


def test_a_cql_rebuild_reproduces_the_live_tables_and_the_swap_hands_over_to_the_sink(
    world: World, cql_session: Session
) -> None:
    fresh = f"{world.keyspace}_r1"
    runner = CliRunner()
    try:
        result = runner.invoke(
            app,
            ["rebuild", "cql", "--keyspace", fresh, "--swap", "--operator", "ops-jo"],
            env=cli_env(world),
        )
        assert result.exit_code == 0, result.output
        assert "DIFFERENT" not in result.output
        assert snapshot(cql_session, fresh) == world.tables
        assert serving_keyspace(cql_session, world.keyspace) == fresh
        # The rebuild read as the group the sink uses for the new keyspace: nothing left to do.
        group = cql_sink_group(world.settings, fresh)
        inputs = [t.name for t in CqlTarget.reads(world.catalog)]
        assert committed_lag(world.settings, group, inputs) == 0
        assert CqlSink(world.settings, cql_session, keyspace=fresh).group_id == group
        assert group != group_for(world.settings, "x")
    finally:
        cql_session.execute(
            f"DELETE FROM {world.keyspace}.serving_keyspace WHERE anchor = %s", (world.keyspace,)
        )
        cql_session.execute(f"DROP KEYSPACE IF EXISTS {fresh}", timeout=60)
    assert serving_keyspace(cql_session, world.keyspace) == world.keyspace

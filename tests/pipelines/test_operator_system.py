"""Operator tools on the running system, through the CLI an operator uses: replays and rebuilds
keep the audit and the serving store exact, a CQL rebuild swapped in takes over without losing a
message, and a dead-lettered message redriven after its fix lands exactly once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from cassandra.cluster import Session
from confluent_kafka import Producer
from typer.testing import CliRunner

from core.connections import kafka_producer_config
from core.groups import cql_sink_group
from core.records import PROCESSING_FAILED, InputRecord, dead_letter
from pipelines.cli import app
from pipelines.processes import consumer_groups
from schemas.events import (
    Actor,
    MessageSent,
    MessageSentPayload,
    TextBody,
    encode_event,
    message_event_id,
)
from schemas.topics import conversation_key, partition_for_key, topic_catalog
from sinks.cql.serving import serving_keyspace
from tests.ingress.support import unique
from tests.pipelines.support import Device, Running, assert_audited_exactly_once


def imstream(system: Running, *arguments: str) -> str:
    """Run an ``imstream`` command against ``system``; its output (exit 0 asserted)."""
    env = {
        "IM_KAFKA__TOPIC_PREFIX": system.settings.kafka.topic_prefix,
        "IM_CQL__KEYSPACE": system.child("cql-sink").env["IM_CQL__KEYSPACE"],
        "IM_SINKS__ANALYTICS_PORT": str(system.analytics_port),
    }
    system.wait_ready()  # the audit check stops and restarts the ClickHouse sink
    result = CliRunner().invoke(app, [*arguments, "--operator", "ops-kim"], env=env)
    assert result.exit_code == 0, result.output
    return result.output


async def send(
    system: Running, tenant: str, users: tuple[str, str], count: int
) -> tuple[str, list[str]]:
    """``count`` messages from the first user to the second (their direct conversation), read
    live by the second; the conversation and the message ids."""
    ann, ben = users
    async with (
        Device(system, ann, "phone", 0, tenant=tenant) as sender,
        Device(system, ben, "tablet", 1, tenant=tenant) as reader,
    ):
        conversation = await sender.client.create_conversation([ben], kind="direct")
        accepted = [
            (await sender.client.send(conversation, f"m{i}")).event_id for i in range(count)
        ]
        # A new device of the reader: its sync brings the earlier messages too, in any
        # interleaving with the live ones; each of these must be there once.
        await reader.wait(
            lambda d: set(accepted) <= set(d.message_ids(conversation)), 60, "the messages"
        )
        received = reader.message_ids(conversation)
        assert [received.count(event_id) for event_id in accepted] == [1] * count
    return conversation, accepted


async def history_ids(system: Running, tenant: str, user: str, conversation: str) -> list[str]:
    async with Device(system, user, "laptop", 0, tenant=tenant) as device:
        page = await device.client.history(conversation, limit=100)
    return [entry.event.event_id for entry in page.entries]


async def test_replays_and_rebuilds_on_the_running_system_keep_the_stores_exact(
    system: Running, cql_session: Session
) -> None:
    tenant = unique("ops")
    users = (unique("ann"), unique("ben"))
    conversation, accepted = await send(system, tenant, users, 20)

    def run(*arguments: str) -> Any:
        return asyncio.to_thread(imstream, system, *arguments)

    # Replay the conversation log into the audit, twice: the second run has nothing to do.
    sequenced = topic_catalog(system.settings).messages_sequenced.logical_name
    command = ("replay", sequenced, "--into", "clickhouse", "--rate", "0")
    first = await run(*command)
    assert "finished" in first
    second = await run(*command)
    assert "replayed 0 records" in second

    # Rebuild the audit and swap it in while the sink runs; then it goes on with new records.
    rebuilt = await run("rebuild", "clickhouse")
    assert "rebuilt and swapped" in rebuilt

    # Rebuild the serving store into a fresh keyspace, swap, restart its users: nothing lost.
    anchor = system.child("cql-sink").env["IM_CQL__KEYSPACE"]
    fresh = f"{anchor}_r{unique('x')[-6:]}"
    swapped = await run("rebuild", "cql", "--keyspace", fresh, "--swap")
    assert "DIFFERENT" not in swapped
    assert f"swapped: keyspace {fresh} serves" in swapped
    assert serving_keyspace(cql_session, anchor) == fresh
    for name in ("cql-sink", "ingress-1", "ingress-2"):
        with system.stopped(name):
            pass
    await asyncio.to_thread(system.wait_ready)
    again, more = await send(system, tenant, users, 5)
    assert again == conversation
    # History is read from the swapped-in keyspace, as the restarted sink writes it.
    deadline = asyncio.get_running_loop().time() + 30
    while (history := await history_ids(system, tenant, users[1], conversation)) != [
        *accepted,
        *more,
    ]:
        assert history == [*accepted, *more][: len(history)], history
        assert asyncio.get_running_loop().time() < deadline, f"{len(history)} in history"
        await asyncio.sleep(0.5)
    # The new messages are in the swapped-in keyspace, written by the restarted sink.
    stored = {
        row.event_id
        for row in cql_session.execute(
            f"SELECT event_id FROM {fresh}.timeline WHERE tenant_id = %s AND "
            "conversation_id = %s AND bucket = 0",
            (tenant, conversation),
        )
    }
    assert set(more) <= stored
    # `imstream status` (and the dashboards' lag) follow the sink to its new group.
    assert set(consumer_groups(system.settings)["cql-sink"]) == {
        cql_sink_group(system.settings, fresh)
    }
    # The audit (replayed into, rebuilt and swapped meanwhile) holds each message once.
    await assert_audited_exactly_once(system, tenant, [*accepted, *more], queues=2)


async def test_a_message_dead_lettered_then_redriven_after_the_fix_lands_exactly_once(
    system: Running,
) -> None:
    """A send the conversation processor failed on (say, a bug since fixed) sits in
    ``im.messages.in.dlq``; the operator redrives it: the recipient gets it once, live and in
    history, the audit has it once as sequenced, and a second redrive sends nothing."""
    tenant = unique("dlq")
    ann, ben = unique("ann"), unique("ben")
    catalog = topic_catalog(system.settings)
    async with (
        Device(system, ann, "phone", 0, tenant=tenant) as sender,
        Device(system, ben, "tablet", 1, tenant=tenant) as reader,
    ):
        conversation = await sender.client.create_conversation([ben], kind="direct")
        before = (await sender.client.send(conversation, "before")).event_id
        await reader.wait(lambda d: len(d.messages(conversation)) == 1, 30, "the first message")
        # The failed send, as the ingress published it and the processor dead-lettered it.
        failed = MessageSent.new(
            tenant_id=tenant,
            actor=Actor(user_id=ann, device_id="phone"),
            event_id=message_event_id(tenant, ann, "fixed-since"),
            occurred_at=datetime.now(UTC),
            payload=MessageSentPayload(
                conversation_id=conversation,
                client_msg_id="fixed-since",
                body=TextBody(text="the message a bug held back"),
            ),
        )
        key = conversation_key(tenant, conversation)
        source = catalog.messages_in
        record = InputRecord(
            source.name, partition_for_key(key, source.partitions), 0, key, encode_event(failed)
        )
        poisoned = dead_letter(catalog, source, record, PROCESSING_FAILED, "RuntimeError('bug')")
        producer = Producer(kafka_producer_config(system.settings))
        producer.produce(
            poisoned.topic,
            key=poisoned.key,
            value=poisoned.value,
            headers=list(poisoned.headers or []),
        )
        assert producer.flush(30) == 0

        dlq = catalog.dead_letter_of(source).logical_name
        redrive = ("dlq", "redrive", dlq, "--code", PROCESSING_FAILED, "--rate", "0")
        output = await asyncio.to_thread(imstream, system, *redrive)
        assert "redriven 1 of 1 matching" in output
        await reader.wait(lambda d: len(d.messages(conversation)) == 2, 30, "the redriven one")
        assert reader.message_ids(conversation) == [before, failed.event_id]
        again = await asyncio.to_thread(imstream, system, *redrive)
        assert "redriven 0 of 0 matching" in again
    deadline = asyncio.get_running_loop().time() + 30
    while (history := await history_ids(system, tenant, ben, conversation)) != [
        before,
        failed.event_id,
    ]:
        assert len(history) <= 2, history
        assert asyncio.get_running_loop().time() < deadline, history
        await asyncio.sleep(0.5)
    await assert_audited_exactly_once(system, tenant, [before, failed.event_id], queues=2)

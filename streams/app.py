"""The stream worker: a faust app running the conversation and user processors.

``imstream run stream-worker`` starts it. Both agents consume in batches, hand each batch to a
processor (``streams.processors``), send the outputs, wait until Kafka has acknowledged every one,
and only then write the new state to the changelog-backed tables — the order docs/streams.md
depends on. A failed send ends the process (exit code 70) rather than let faust commit offsets
past outputs that are not in Kafka; the supervisor restarts it and processing resumes from the
last committed offset.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, cast

import faust
from faust.serializers import codecs
from faust.types import StreamT

from pipelines.settings import Settings
from schemas.topics import TopicCatalog, topic_catalog
from streams.processors import (
    CONVERSATIONS_TABLE,
    MESSAGES_TABLE,
    USERS_TABLE,
    BatchResult,
    ConversationProcessor,
    ConversationSettings,
    UserProcessor,
    UserSettings,
)
from streams.records import InputRecord, OutputRecord
from streams.transport import StreamApp
from streams.users import PushPolicy

log = logging.getLogger(__name__)

#: Exit code of a worker that stopped because Kafka refused an output (EX_SOFTWARE).
EXIT_SEND_FAILED = 70


def create_app(settings: Settings, *, catalog: TopicCatalog | None = None) -> faust.App:
    """The stream worker's faust app; ``faust.Worker(app).execute_from_commandline()`` runs it."""
    catalog = catalog or topic_catalog(settings)
    streams = settings.streams
    brokers = [f"kafka://{server}" for server in settings.kafka.bootstrap_servers.split(",")]
    app = StreamApp(
        f"{settings.kafka.topic_prefix}{streams.app_id}",
        broker=brokers,
        processing_guarantee="at_least_once",
        store="memory://",
        topic_replication_factor=settings.kafka.replication_factor,
        topic_allow_declare=True,
        topic_disable_leader=True,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=streams.commit_interval_seconds,
        broker_session_timeout=streams.session_timeout_seconds,
        broker_heartbeat_interval=min(3.0, streams.session_timeout_seconds / 3),
        broker_rebalance_timeout=streams.session_timeout_seconds * 2,
        producer_linger=streams.producer_linger_seconds,
        stream_wait_empty=True,
        consumer_group_instance_id=streams.instance_id,
    )
    raw: dict[str, Any] = {
        "key_type": bytes,
        "value_type": bytes,
        "key_serializer": "raw",
        "value_serializer": "raw",
    }
    conversation_topics = app.topic(catalog.messages_in.name, catalog.typing_in.name, **raw)
    user_topics = app.topic(
        catalog.user_inbox.name, catalog.user_state_in.name, catalog.presence.name, **raw
    )
    tables = {
        name: app.Table(
            name,
            partitions=partitions,
            key_type=str,
        )
        for name, partitions in (
            (CONVERSATIONS_TABLE, catalog.messages_in.partitions),
            (MESSAGES_TABLE, catalog.messages_in.partitions),
            (USERS_TABLE, catalog.user_inbox.partitions),
        )
    }
    conversations = ConversationProcessor(
        catalog,
        ConversationSettings(
            large_group_threshold=streams.large_group_threshold,
            max_members=streams.max_members,
            message_retention=timedelta(days=streams.message_retention_days),
        ),
    )
    users = UserProcessor(
        catalog,
        UserSettings(
            push=PushPolicy(collapse_window=timedelta(seconds=streams.push_collapse_seconds))
        ),
    )

    def read(table: str, key: str) -> dict[str, Any] | None:
        value = tables[table].data.get(key)
        return value if isinstance(value, dict) else None

    async def run(stream: StreamT[Any], processor: ConversationProcessor | UserProcessor) -> None:
        # StreamT does not declare take_events; the faust.Stream behind it has it.
        batches = cast(faust.Stream[Any], stream).take_events(
            streams.batch_size, within=streams.batch_window_seconds
        )
        async for events in batches:
            batch = [
                InputRecord(
                    topic=event.message.topic,
                    partition=event.message.partition,
                    offset=event.message.offset,
                    key=event.message.key,
                    value=event.message.value,
                )
                for event in events
            ]
            result = processor.process(batch, read)
            await _send_all(app, result.outputs)
            await _write_state(app, tables, result)

    @app.agent(conversation_topics, name="conversation-processor")
    async def conversation_processor(stream: StreamT[Any]) -> None:
        await run(stream, conversations)

    @app.agent(user_topics, name="user-processor")
    async def user_processor(stream: StreamT[Any]) -> None:
        await run(stream, users)

    return app


async def _send_all(app: faust.App, outputs: Sequence[OutputRecord]) -> None:
    """Send every output and wait for every acknowledgement; on any failure end the process."""
    try:
        pending = [
            await app.producer.send(
                output.topic, output.key, output.value, output.partition, None, output.headers
            )
            for output in outputs
        ]
        await asyncio.gather(*pending)
    except Exception:
        log.critical(
            "Kafka refused an output; stopping so that no offset is committed past it",
            exc_info=True,
        )
        logging.shutdown()
        os._exit(EXIT_SEND_FAILED)


async def _write_state(app: faust.App, tables: dict[str, Any], result: BatchResult) -> None:
    """Write the batch's state to the tables' changelogs, wait for Kafka, then update memory.

    The records are produced and acknowledged here, inside the agent's loop body, so faust cannot
    commit the batch's input offsets before its state is durable. (faust's own ``send_soon``
    buffer can hand its last record to the client after a flush has already returned.)
    """
    changelog = []
    for write in result.writes:
        table = tables[write.table]
        # Encoded exactly as faust encodes its own changelog records, which recovery decodes.
        value = None if write.value is None else codecs.dumps(table.value_serializer, write.value)
        changelog.append(
            OutputRecord(
                topic=table.changelog_topic.get_topic_name(),
                key=codecs.dumps(table.key_serializer, write.key),
                value=value,
                partition=write.partition,
            )
        )
    await _send_all(app, changelog)
    for write in result.writes:
        table = tables[write.table]
        if write.value is None:
            table.data.pop(write.key, None)
        else:
            table.data[write.key] = write.value

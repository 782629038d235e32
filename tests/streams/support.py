"""Helpers for the stream worker tests (and the crash soak in bench/): the worker as a real
process, producing commands, reading topics back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from confluent_kafka import Consumer, Message, Producer

from core.connections import kafka_config, kafka_producer_config
from core.records import InputRecord
from core.settings import Settings
from schemas.events import (
    Actor,
    ConversationCreated,
    ConversationCreatedPayload,
    ConversationKind,
    Event,
    MessageSent,
    MessageSentPayload,
    SyncRecord,
    TextBody,
    direct_conversation_id,
    encode_event,
    message_event_id,
)
from schemas.topics import TopicCatalog, conversation_key, topic_catalog

TENANT = "acme"
READY_LINE = "stream worker ready"


def worker_environment(settings: Settings, **streams: str) -> dict[str, str]:
    """The environment of a stream worker on ``settings``' Kafka and topics, with a 6 s session
    timeout (a killed worker's partitions move on quickly) and ``streams`` settings
    (``IM_STREAMS__<NAME>``) added."""
    return {
        **os.environ,
        "IM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "IM_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
        "IM_STREAMS__SESSION_TIMEOUT_SECONDS": "6",
        **{f"IM_STREAMS__{name.upper()}": value for name, value in streams.items()},
    }


class Worker:
    """``imstream run stream-worker`` as a child process with its own log file."""

    def __init__(self, environment: dict[str, str], log_path: Path) -> None:
        self.environment = environment
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, ready_timeout: float = 90.0) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipelines", "run", "stream-worker"],
                env=self.environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.starts += 1
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                if READY_LINE.encode() in log.read():
                    return
            assert self.process.poll() is None, self.tail()
            time.sleep(0.2)
        raise AssertionError(f"worker not ready in {ready_timeout}s:\n{self.tail()}")

    def restart_if_exited(self) -> bool:
        """Start the worker again if it exited on its own (as a supervisor would)."""
        if self.process is not None and self.process.poll() is not None:
            self.start()
            return True
        return False

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def produce(settings: Settings, catalog: TopicCatalog, events: Sequence[Event]) -> None:
    producer = Producer(kafka_producer_config(settings, **{"enable.idempotence": True}))
    for event in events:
        conversation_id = str(getattr(event.payload, "conversation_id", ""))
        producer.produce(
            catalog.messages_in.name,
            key=conversation_key(event.tenant_id, conversation_id),
            value=encode_event(event),
        )
        producer.poll(0)
    assert producer.flush(60) == 0


def feeding(
    settings: Settings, catalog: TopicCatalog, events: Sequence[Event], *, batch: int, pause: float
) -> threading.Thread:
    """A thread (not started yet) producing ``events`` ``batch`` at a time, ``pause`` seconds
    apart: input that keeps arriving while a worker is killed and restarted."""

    def feed() -> None:
        for start in range(0, len(events), batch):
            produce(settings, catalog, events[start : start + batch])
            time.sleep(pause)

    return threading.Thread(target=feed)


def produce_routed(settings: Settings, events: Sequence[Event]) -> None:
    """Each event where the ingress would publish it."""
    catalog = topic_catalog(settings)
    producer = Producer(kafka_producer_config(settings, **{"enable.idempotence": True}))
    for event in events:
        topic, key = catalog.route(event)
        while True:
            try:
                producer.produce(topic.name, key=key, value=encode_event(event))
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    assert producer.flush(60) == 0


def read_messages(settings: Settings, topic: str, *, idle_seconds: float = 5.0) -> list[Message]:
    """Every record of ``topic`` from the beginning, in partition order, until nothing new
    arrives for a while; read committed (as every imstream consumer reads)."""
    consumer = Consumer(
        kafka_config(
            settings,
            **{
                "group.id": f"t-read-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            },
        )
    )
    consumer.subscribe([topic])
    messages: list[Message] = []
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_seconds:
            message = consumer.poll(0.5)
            if message is None or message.error() is not None:
                continue
            messages.append(message)
            last = time.monotonic()
    finally:
        consumer.close()
    return messages


def read_records(settings: Settings, topic: str, *, idle_seconds: float = 5.0) -> list[InputRecord]:
    """The records of ``topic`` as :func:`read_messages` reads them, as processor inputs."""
    return [
        InputRecord(
            topic=topic,
            partition=message.partition() or 0,
            offset=message.offset() or 0,
            key=message.key(),
            value=message.value(),
        )
        for message in read_messages(settings, topic, idle_seconds=idle_seconds)
    ]


def read_topic(settings: Settings, topic: str, *, idle_seconds: float = 5.0) -> list[bytes]:
    """The values of every record of ``topic`` (see :func:`read_records`)."""
    return [r.value or b"" for r in read_records(settings, topic, idle_seconds=idle_seconds)]


def wait_for_sync(
    settings: Settings, catalog: TopicCatalog, expected_distinct: int, timeout: float
) -> dict[str, dict[int, SyncRecord]]:
    """The sync queues once ``expected_distinct`` distinct (user, sync_id) entries exist."""
    deadline = time.monotonic() + timeout
    queues: dict[str, dict[int, SyncRecord]] = defaultdict(dict)
    while True:
        queues.clear()
        for value in read_topic(settings, catalog.sync_events.name, idle_seconds=3.0):
            record = SyncRecord.model_validate_json(value)
            previous = queues[record.user_id].get(record.sync_id)
            assert previous is None or previous == record, "one sync id, two events"
            queues[record.user_id][record.sync_id] = record
        if sum(len(queue) for queue in queues.values()) >= expected_distinct:
            return queues
        assert time.monotonic() < deadline, "the sync queues did not fill up in time"


def direct_pairs(count: int) -> list[tuple[str, str, str]]:
    return [
        (f"u{index}", f"u{index + 1}", direct_conversation_id(TENANT, f"u{index}", f"u{index + 1}"))
        for index in range(0, 2 * count, 2)
    ]


def conversation_created(
    conversation_id: str, members: list[str], kind: ConversationKind
) -> ConversationCreated:
    """The command creating ``conversation_id``, sent by its first member."""
    return ConversationCreated.new(
        tenant_id=TENANT,
        actor=Actor(user_id=members[0]),
        event_id=message_event_id(TENANT, members[0], f"create-{conversation_id}"),
        payload=ConversationCreatedPayload(
            conversation_id=conversation_id, kind=kind, members=members
        ),
    )


def created(sender: str, other: str, conversation_id: str) -> ConversationCreated:
    return conversation_created(conversation_id, [sender, other], ConversationKind.DIRECT)


def message(
    sender: str, conversation_id: str, client_msg_id: str, *, text: str | None = None
) -> MessageSent:
    """A text message from the sender's phone; ``text`` defaults to one naming the message."""
    return MessageSent.new(
        tenant_id=TENANT,
        actor=Actor(user_id=sender, device_id=f"{sender}-phone"),
        event_id=message_event_id(TENANT, sender, client_msg_id),
        payload=MessageSentPayload(
            conversation_id=conversation_id,
            client_msg_id=client_msg_id,
            body=TextBody(text=f"message {client_msg_id}" if text is None else text),
        ),
    )

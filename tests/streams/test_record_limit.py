"""A record Kafka would refuse never stops the stream stage, and a user's frames cannot grow a
state record toward it (issue 15, items 4 and 5).

Before, one user muting ~5,000 invented conversations grew their state record past Kafka's
record limit: the transaction failed (MSG_SIZE_TOO_LARGE), the worker exited 70 and every
restart replayed the same batch — delivery stopped for every tenant. Now such a mute is refused
(``command.rejected``, ``not-a-member``) and leaves the state as it was; and whatever input would
still produce a record over ``IM_STREAMS__MAX_RECORD_BYTES`` is dead-lettered
(``output-too-large``) while the rest of its batch commits.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)

from pipelines.connections import kafka_config, kafka_producer_config
from pipelines.settings import Settings
from schemas.events import (
    Actor,
    CommandRejected,
    ConversationMuteChanged,
    ConversationMuteChangedPayload,
    Event,
    MessageSent,
    MessageSentPayload,
    SyncRecord,
    TextBody,
    direct_conversation_id,
    encode_event,
    message_event_id,
)
from schemas.topics import topic_catalog, user_key
from streams.processors import OUTPUT_REFUSED, OUTPUT_TOO_LARGE
from tests.streams.support import (
    TENANT,
    Worker,
    created,
    direct_pairs,
    message,
    produce,
    read_records,
    wait_for_sync,
)

#: About 4,400 such mutes fill the state record to the limit (900,000 bytes).
MUTES = 5_000


def mute(user: str, index: int) -> ConversationMuteChanged:
    # The longest conversation ids there are: the fewest frames to reach the limit.
    conversation = f"invented-{index:06d}-".ljust(64, "x")
    return ConversationMuteChanged.new(
        tenant_id=TENANT,
        actor=Actor(user_id=user, device_id=f"{user}-phone"),
        event_id=message_event_id(TENANT, user, f"mute-{index}"),
        payload=ConversationMuteChangedPayload(conversation_id=conversation, muted=True),
    )


def produce_routed(settings: Settings, events: list[Event]) -> None:
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


def dead_letter_codes(settings: Settings, topic: str) -> list[str]:
    """The ``imstream.error.code`` header of every record of a dead-letter topic, read
    committed, until nothing new arrives for a few seconds."""
    consumer = Consumer(
        kafka_config(
            settings,
            **{
                "group.id": f"t-codes-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            },
        )
    )
    consumer.subscribe([topic])
    codes: list[str] = []
    idle = time.monotonic()
    try:
        while time.monotonic() - idle < 3:
            found = consumer.poll(0.5)
            if found is None or found.error() is not None:
                continue
            idle = time.monotonic()
            code = dict(found.headers() or [])["imstream.error.code"]
            codes.append(code.decode() if isinstance(code, bytes) else str(code))
    finally:
        consumer.close()
    return codes


def wait_for(
    settings: Settings, worker: Worker, users: dict[str, int], dead_letters: tuple[str, int]
) -> dict[str, dict[int, SyncRecord]]:
    """The sync queues once each user in ``users`` has that many entries and the dead-letter
    topic that many records; fails at once if the worker exits."""
    catalog = topic_catalog(settings)
    deadline = time.monotonic() + 240
    topic, expected = dead_letters
    while True:
        queues = wait_for_sync(settings, catalog, sum(users.values()), timeout=240)
        codes = dead_letter_codes(settings, topic) if expected else []
        if all(len(queues[user]) >= count for user, count in users.items()) and (
            len(codes) >= expected
        ):
            return {user: dict(queue) for user, queue in queues.items()}
        assert worker.process is not None and worker.process.poll() is None, worker.tail()
        assert time.monotonic() < deadline, (users, len(codes), worker.tail())


def test_mutes_of_invented_conversations_are_refused_and_delivery_goes_on(
    worker: Worker, stream_settings: Settings
) -> None:
    catalog = topic_catalog(stream_settings)
    worker.start()
    produce_routed(stream_settings, [mute("mallory", index) for index in range(MUTES)])
    # Others' conversation, produced behind the flood.
    ((sender, other, conversation),) = direct_pairs(1)
    sends = [message(sender, conversation, f"after-{index}") for index in range(20)]
    produce(stream_settings, catalog, [created(sender, other, conversation), *sends])

    queues = wait_for(stream_settings, worker, {"mallory": MUTES, sender: 21, other: 21}, ("", 0))
    for user in (sender, other):
        delivered = [
            record.event.event_id
            for _, record in sorted(queues[user].items())
            if isinstance(record.event, MessageSent)
        ]
        assert delivered == [send.event_id for send in sends], user
    # Each mute was refused, once, and told to mallory's devices.
    refusals = [record.event for _, record in sorted(queues["mallory"].items())]
    assert len(refusals) == MUTES
    assert all(
        isinstance(event, CommandRejected) and event.payload.reason == "not-a-member"
        for event in refusals
    )
    # Mallory's state record stayed small: the flood left nothing in it.
    key = user_key(TENANT, "mallory")
    states = [r for r in read_records(stream_settings, catalog.user_state.name) if r.key == key]
    assert states and max(len(r.value or b"") for r in states) < 2_000
    assert worker.process is not None and worker.process.poll() is None
    assert worker.starts == 1


def test_an_input_whose_outputs_exceed_the_record_limit_is_dead_lettered(
    stream_settings: Settings, tmp_path: Path
) -> None:
    # A limit under the largest body a client may send (32 KiB): such a message's sequenced
    # record is over it, as a record over the broker's limit would be.
    limit = 16_384
    catalog = topic_catalog(stream_settings)
    worker = Worker(
        {
            **os.environ,
            "IM_KAFKA__BOOTSTRAP_SERVERS": stream_settings.kafka.bootstrap_servers,
            "IM_KAFKA__TOPIC_PREFIX": stream_settings.kafka.topic_prefix,
            "IM_STREAMS__SESSION_TIMEOUT_SECONDS": "6",
            "IM_STREAMS__MAX_RECORD_BYTES": str(limit),
        },
        tmp_path / "stream-worker.log",
    )
    try:
        worker.start()
        ann, ben = "ann-big", "ben-big"
        conversation = direct_conversation_id(TENANT, ann, ben)
        sends = [message(ann, conversation, f"m{index}") for index in range(10)]
        huge = MessageSent.new(
            tenant_id=TENANT,
            actor=Actor(user_id=ann, device_id=f"{ann}-phone"),
            event_id=message_event_id(TENANT, ann, "huge"),
            payload=MessageSentPayload(
                conversation_id=conversation, client_msg_id="huge", body=TextBody(text="x" * 20_000)
            ),
        )
        produce(
            stream_settings,
            catalog,
            [created(ann, ben, conversation), *sends[:5], huge, *sends[5:]],
        )
        dead_letters = catalog.dead_letter_of(catalog.messages_in).name
        queues = wait_for(stream_settings, worker, {ann: 11, ben: 11}, (dead_letters, 1))
        for user in (ann, ben):
            delivered = [
                record.event
                for _, record in sorted(queues[user].items())
                if isinstance(record.event, MessageSent)
            ]
            assert [event.event_id for event in delivered] == [s.event_id for s in sends], user
            assert [event.payload.conversation_seq for event in delivered] == list(range(1, 11))
        assert dead_letter_codes(stream_settings, dead_letters) == [OUTPUT_TOO_LARGE]
        assert worker.process is not None and worker.process.poll() is None
        assert worker.starts == 1
        assert f"over the record limit of {limit} bytes, dead-lettered" in worker.tail(200)
    finally:
        worker.stop()


def test_an_input_whose_outputs_kafka_refuses_is_dead_lettered_alone(
    worker: Worker, stream_settings: Settings
) -> None:
    # The conversation log configured with a smaller record limit than the worker's: a message
    # under the worker's limit is refused by the broker when the transaction commits.
    catalog = topic_catalog(stream_settings)
    admin = AdminClient(kafka_config(stream_settings))

    def topic_limit(operation: AlterConfigOpType, value: str | None) -> None:
        entry = ConfigEntry("max.message.bytes", value, incremental_operation=operation)
        log_topic = ConfigResource(
            ResourceType.TOPIC, catalog.messages_sequenced.name, incremental_configs=[entry]
        )
        for future in admin.incremental_alter_configs([log_topic]).values():
            future.result(timeout=30)

    topic_limit(AlterConfigOpType.SET, "20000")
    try:
        worker.start()
        cat, dog = "cat-refused", "dog-refused"
        conversation = direct_conversation_id(TENANT, cat, dog)
        sends = [message(cat, conversation, f"r{index}") for index in range(10)]
        huge = MessageSent.new(
            tenant_id=TENANT,
            actor=Actor(user_id=cat, device_id=f"{cat}-phone"),
            event_id=message_event_id(TENANT, cat, "refused"),
            payload=MessageSentPayload(
                conversation_id=conversation,
                client_msg_id="refused",
                body=TextBody(text="y" * 30_000),
            ),
        )
        produce(
            stream_settings,
            catalog,
            [created(cat, dog, conversation), *sends[:5], huge, *sends[5:]],
        )
        dead_letters = catalog.dead_letter_of(catalog.messages_in).name
        queues = wait_for(stream_settings, worker, {cat: 11, dog: 11}, (dead_letters, 1))
    finally:
        topic_limit(AlterConfigOpType.DELETE, None)
    for user in (cat, dog):
        delivered = [
            record.event
            for _, record in sorted(queues[user].items())
            if isinstance(record.event, MessageSent)
        ]
        assert [event.event_id for event in delivered] == [s.event_id for s in sends], user
        assert [event.payload.conversation_seq for event in delivered] == list(range(1, 11))
    assert OUTPUT_REFUSED in dead_letter_codes(stream_settings, dead_letters)
    assert worker.process is not None and worker.process.poll() is None
    assert worker.starts == 1
    assert "Kafka refused its outputs (MSG_SIZE_TOO_LARGE)" in worker.tail(200)

"""A record Kafka would refuse never stops the stream stage (issue 15, item 5).

One user mutes thousands of invented conversations: each mute adds an entry to the user's state
record until it would pass the record limit. The mute that would take it past is dead-lettered
(``output-too-large``) with none of its effects, the rest of its batch commits, and other users'
messages keep flowing — with no restart of the worker. (Before, the transaction failed on the
oversized state record, the worker exited 70, and every restart replayed the same batch.)
"""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, Producer

from pipelines.connections import kafka_config, kafka_producer_config
from pipelines.settings import Settings
from schemas.events import (
    Actor,
    ConversationMuteChanged,
    ConversationMuteChangedPayload,
    Event,
    MessageSent,
    encode_event,
    message_event_id,
)
from schemas.topics import topic_catalog
from streams.processors import OUTPUT_TOO_LARGE
from tests.streams.support import (
    TENANT,
    Worker,
    created,
    direct_pairs,
    message,
    produce,
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


def test_a_state_record_past_the_limit_is_dead_lettered_and_delivery_goes_on(
    worker: Worker, stream_settings: Settings
) -> None:
    catalog = topic_catalog(stream_settings)
    dead_letters = catalog.dead_letter_of(catalog.user_state_in).name
    worker.start()
    produce_routed(stream_settings, [mute("mallory", index) for index in range(MUTES)])
    # Others' conversation, produced behind the flood.
    ((sender, other, conversation),) = direct_pairs(1)
    sends = [message(sender, conversation, f"after-{index}") for index in range(20)]
    produce(stream_settings, catalog, [created(sender, other, conversation), *sends])

    deadline = time.monotonic() + 240
    while True:
        queues = wait_for_sync(stream_settings, catalog, 2 * 21, timeout=240)
        codes = dead_letter_codes(stream_settings, dead_letters)
        accepted = len(queues["mallory"])
        if accepted + len(codes) >= MUTES and all(len(queues[u]) >= 21 for u in (sender, other)):
            break
        assert worker.process is not None and worker.process.poll() is None, worker.tail()
        assert time.monotonic() < deadline, (accepted, len(codes), worker.tail())
    # Both members got the conversation and every message, in order.
    for user in (sender, other):
        delivered = [
            record.event.event_id
            for _, record in sorted(queues[user].items())
            if isinstance(record.event, MessageSent)
        ]
        assert delivered == [send.event_id for send in sends], user
    # Mallory's mutes went through up to the limit; each one after it was refused, once.
    assert accepted + len(codes) == MUTES
    assert 1_000 < accepted < MUTES, accepted
    assert set(codes) == {OUTPUT_TOO_LARGE}
    # No restart: the same process did all of it.
    assert worker.process is not None and worker.process.poll() is None
    assert worker.starts == 1
    assert "over the record limit of 900000 bytes, dead-lettered" in worker.tail(400)

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

import time
from pathlib import Path

from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)

from core.connections import kafka_config
from core.settings import Settings
from schemas.events import (
    Actor,
    CommandRejected,
    ConversationMuteChanged,
    ConversationMuteChangedPayload,
    MessageSent,
    SyncRecord,
    direct_conversation_id,
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
    produce_routed,
    read_messages,
    read_records,
    wait_for_sync,
    worker_environment,
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


def dead_letter_codes(settings: Settings, topic: str) -> list[str]:
    """The ``imstream.error.code`` header of every record of a dead-letter topic."""
    codes = []
    for found in read_messages(settings, topic, idle_seconds=3.0):
        code = dict(found.headers() or [])["imstream.error.code"]
        codes.append(code.decode() if isinstance(code, bytes) else str(code))
    return codes


def huge_message(sender: str, conversation: str, client_msg_id: str, size: int) -> MessageSent:
    """A message whose text is ``size`` bytes (under the 32 KiB a client may send)."""
    return message(sender, conversation, client_msg_id, text="x" * size)


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


def ten_around_a_huge_one(
    settings: Settings, worker: Worker, users: tuple[str, str], size: int
) -> str:
    """A direct conversation: five messages, one of ``size`` bytes, five more. Waits until both
    users have the ten others — in order, seqs 1 to 10 — and the conversation input's
    dead-letter topic has a record; returns that topic's name."""
    catalog = topic_catalog(settings)
    sender, receiver = users
    conversation = direct_conversation_id(TENANT, sender, receiver)
    sends = [message(sender, conversation, f"{sender}-{index}") for index in range(10)]
    huge = huge_message(sender, conversation, f"{sender}-huge", size)
    produce(
        settings, catalog, [created(sender, receiver, conversation), *sends[:5], huge, *sends[5:]]
    )
    dead_letters = catalog.dead_letter_of(catalog.messages_in).name
    queues = wait_for(settings, worker, {sender: 11, receiver: 11}, (dead_letters, 1))
    for user in users:
        delivered = [
            record.event
            for _, record in sorted(queues[user].items())
            if isinstance(record.event, MessageSent)
        ]
        assert [event.event_id for event in delivered] == [s.event_id for s in sends], user
        assert [event.payload.conversation_seq for event in delivered] == list(range(1, 11))
    return dead_letters


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
    worker = Worker(
        worker_environment(stream_settings, max_record_bytes=str(limit)),
        tmp_path / "stream-worker.log",
    )
    try:
        worker.start()
        dead_letters = ten_around_a_huge_one(
            stream_settings, worker, ("ann-big", "ben-big"), 20_000
        )
        assert dead_letter_codes(stream_settings, dead_letters) == [OUTPUT_TOO_LARGE]
        assert worker.process is not None and worker.process.poll() is None
        assert worker.starts == 1
        assert (
            f"as output-too-large: its outputs or state would exceed the record limit of {limit}"
            in worker.tail(200)
        )
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
        users = ("cat-refused", "dog-refused")
        dead_letters = ten_around_a_huge_one(stream_settings, worker, users, 30_000)
    finally:
        topic_limit(AlterConfigOpType.DELETE, None)
    assert OUTPUT_REFUSED in dead_letter_codes(stream_settings, dead_letters)
    assert worker.process is not None and worker.process.poll() is None
    assert worker.starts == 1
    assert "as output-refused: Kafka refused its outputs (MSG_SIZE_TOO_LARGE)" in worker.tail(200)

"""The fast codec's helpers make exactly what the pydantic models make, and read what they wrote.

The ingress splices a stored event's JSON into the ``event`` frame instead of parsing and
re-encoding it, and the SDK routes frames by a light head before parsing what it hands on: a
field dropped or re-ordered by either would change the bytes compared here.
"""

from __future__ import annotations

import json

import msgspec
import pytest
from pydantic_core import to_json

from schemas import events as ev
from schemas import frames as fr
from tests.schemas.samples import sample_events, sample_server_frames

EVENTS = sample_events()


@pytest.mark.parametrize("event_type", sorted(EVENTS))
@pytest.mark.parametrize("sync_id", [None, 1, 42, ev.MAX_INT64])
def test_the_spliced_event_frame_is_the_models_frame(event_type: str, sync_id: int | None) -> None:
    event = EVENTS[event_type]
    spliced = fr.encode_event_frame(sync_id, ev.encode_event(event))
    model = fr.encode_server_frame(fr.EventFrame(sync_id=sync_id, event=event)).encode()
    assert spliced == model
    # And it is a valid event frame of the protocol, with the event unchanged.
    parsed = fr.parse_server_frame(spliced)
    assert isinstance(parsed, fr.EventFrame)
    assert (parsed.sync_id, parsed.event) == (sync_id, event)


@pytest.mark.parametrize("event_type", sorted(EVENTS))
def test_a_live_record_is_read_as_the_worker_wrote_it(event_type: str) -> None:
    event = EVENTS[event_type]
    delivery = ev.LiveDelivery(
        node_id="ingress-1",
        tenant_id="acme",
        user_id="bob",
        device_ids=["phone", "tablet"],
        sync_id=7,
        event=event,
    )
    head = ev.read_live_delivery(ev.encode_live_delivery(delivery))
    assert (head.node_id, head.tenant_id, head.user_id) == ("ingress-1", "acme", "bob")
    assert (head.device_ids, head.sync_id, head.groups) == (["phone", "tablet"], 7, None)
    # The event's JSON as it is in the record: byte for byte what encode_event makes.
    assert bytes(head.event_json) == ev.encode_event(event)
    # The ingress's live frame from it equals the frame built from the parsed record.
    parsed = ev.parse_live_delivery(ev.encode_live_delivery(delivery))
    assert fr.encode_event_frame(head.sync_id, head.event_json) == (
        fr.encode_server_frame(fr.EventFrame(sync_id=parsed.sync_id, event=parsed.event)).encode()
    )


def test_a_connect_answer_and_an_ephemeral_record_are_read() -> None:
    connected = EVENTS["device.connected"]
    answer = ev.LiveDelivery(
        node_id="n", tenant_id="acme", user_id="bob", event=connected, groups={"g-1": 3}
    )
    head = ev.read_live_delivery(ev.encode_live_delivery(answer))
    assert (head.groups, head.sync_id, head.device_ids) == ({"g-1": 3}, None, None)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00 not json",
        b"[]",
        b'{"node_id": "x", "event": {"type": "message.sent"}}',  # no tenant or user
        b'{"node_id": "x", "tenant_id": "t", "user_id": "u"}',  # no event
        b'{"node_id": 1, "tenant_id": "t", "user_id": "u", "event": {}}',
    ],
)
def test_a_record_without_its_addressing_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        ev.read_live_delivery(raw)


@pytest.mark.parametrize("frame_type", sorted(fr.SERVER_FRAME_TYPES))
def test_the_head_of_every_server_frame(frame_type: str) -> None:
    frame = sample_server_frames()[frame_type]
    raw = fr.encode_server_frame(frame)
    head = fr.read_server_frame_head(raw)
    assert head.type == frame_type
    assert head.id == getattr(frame, "id", None)
    if isinstance(frame, fr.EventFrame):
        assert head.sync_id == frame.sync_id
        assert ev.parse_event(bytes(head.event_json)) == frame.event
    else:
        assert not head.event_json


def test_the_head_refuses_what_is_not_a_frame() -> None:
    for raw in ("[]", "{}", '{"type": 5}', '{"type": "event", "sync_id": 0, "event": {}}'):
        with pytest.raises(ValueError):
            fr.read_server_frame_head(raw)


def test_plain_frames_encode_like_pydantic() -> None:
    frame = {
        "type": "send",
        "id": "r-1",
        "conversation_id": "c-1",
        "client_msg_id": "m-1",
        "body": {"type": "text", "text": 'hello 👋 "quoted" \\ \n\t\x01 \u2028 é'},
        "nothing": None,
        "count": 2**62,
        "flag": True,
    }
    encoded = fr.encode_json(frame)
    assert encoded == to_json(frame)
    assert json.loads(encoded) == frame
    assert msgspec.json.decode(encoded) == frame

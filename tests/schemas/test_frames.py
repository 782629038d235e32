"""WebSocket frames: every type round-trips; bad frames get a code, a field path and their id."""

from __future__ import annotations

import json

import pytest

from schemas import frames as fr
from schemas.errors import CloseCode, ErrorCode, SchemaError
from schemas.events import MAX_BODY_BYTES
from tests.schemas.samples import sample_client_frames, sample_server_frames, send_frame


def test_samples_cover_every_frame_type() -> None:
    assert list(sample_client_frames()) == list(fr.CLIENT_FRAME_TYPES)
    assert list(sample_server_frames()) == list(fr.SERVER_FRAME_TYPES)


@pytest.mark.parametrize("frame_type", fr.CLIENT_FRAME_TYPES)
def test_client_frames_round_trip(frame_type: str) -> None:
    frame = sample_client_frames()[frame_type]
    text = fr.encode_client_frame(frame)
    parsed = fr.parse_client_frame(text)
    assert type(parsed) is fr.CLIENT_FRAME_MODELS[frame_type]
    assert parsed == frame
    assert fr.parse_client_frame(text.encode()) == frame


@pytest.mark.parametrize("frame_type", fr.SERVER_FRAME_TYPES)
def test_server_frames_round_trip(frame_type: str) -> None:
    frame = sample_server_frames()[frame_type]
    text = fr.encode_server_frame(frame)
    assert json.loads(text)["type"] == frame_type
    assert fr.parse_server_frame(text) == frame


def test_defaults_keep_frames_short() -> None:
    sync = fr.parse_client_frame('{"type": "sync", "id": "s", "cursor": 5}')
    assert isinstance(sync, fr.Sync)
    assert sync.limit == fr.DEFAULT_SYNC_LIMIT
    hello = fr.parse_client_frame(
        '{"type": "hello", "id": "h", "token": "t", "tenant_id": "acme", "device_id": "d",'
        ' "platform": "web"}'
    )
    assert isinstance(hello, fr.Hello)
    assert hello.sync_cursor == 0


def test_unknown_fields_in_a_frame_are_ignored() -> None:
    frame = fr.parse_client_frame('{"type": "ping", "id": "p1", "sent_at": 12345}')
    assert frame == fr.Ping(id="p1")


def send_text(**changes: object) -> str:
    return json.dumps(send_frame(**changes))


BAD_FRAMES: list[tuple[str, str | bytes, ErrorCode, str | None, str | None]] = [
    ("malformed json", '{"type": "send", "id": ', ErrorCode.MALFORMED_JSON, None, None),
    ("invalid utf-8", b'{"type": "ping", "id": "\xc3\x28"}', ErrorCode.INVALID_UTF8, None, None),
    ("array", "[]", ErrorCode.SCHEMA_INVALID, None, None),
    ("unknown type", '{"type": "teleport", "id": "r9"}', ErrorCode.UNKNOWN_TYPE, "type", "r9"),
    ("missing type", '{"id": "r9"}', ErrorCode.SCHEMA_INVALID, "type", "r9"),
    ("missing id", '{"type": "ping"}', ErrorCode.SCHEMA_INVALID, "id", None),
    (
        "invalid id is not echoed",
        '{"type": "ping", "id": "has space"}',
        ErrorCode.SCHEMA_INVALID,
        "id",
        None,
    ),
    (
        "body text not a string",
        send_text(body={"type": "text", "text": ["x"]}),
        ErrorCode.SCHEMA_INVALID,
        "body.text",
        "req-1",
    ),
    (
        "missing media url",
        send_text(body={"type": "media", "mime": "image/png", "size_bytes": 1}),
        ErrorCode.SCHEMA_INVALID,
        "body.url",
        "req-1",
    ),
    (
        "body over the limit",
        send_text(body={"type": "text", "text": "x" * (MAX_BODY_BYTES + 1)}),
        ErrorCode.BODY_TOO_LARGE,
        "body.text",
        "req-1",
    ),
    (
        "sync limit over 500",
        '{"type": "sync", "id": "s1", "cursor": 0, "limit": 501}',
        ErrorCode.SCHEMA_INVALID,
        "limit",
        "s1",
    ),
    (
        "direct conversation with two others",
        '{"type": "conversation.create", "id": "c", "kind": "direct", "members": ["a", "b"]}',
        ErrorCode.SCHEMA_INVALID,
        "members",
        "c",
    ),
    (
        "unknown role",
        '{"type": "conversation.change_role", "id": "c", "conversation_id": "g",'
        ' "user_id": "u", "role": "emperor"}',
        ErrorCode.SCHEMA_INVALID,
        "role",
        "c",
    ),
    (
        "mute until without muting",
        '{"type": "mute", "id": "m", "conversation_id": "g", "muted": false,'
        ' "muted_until": "2030-01-01T00:00:00Z"}',
        ErrorCode.SCHEMA_INVALID,
        "muted_until",
        "m",
    ),
    (
        "push settings in an unknown time zone",
        '{"type": "push_settings", "id": "p", "quiet_hours":'
        ' {"start": "22:00", "end": "07:00", "time_zone": "Mars/Olympus_Mons"}}',
        ErrorCode.SCHEMA_INVALID,
        "quiet_hours.time_zone",
        "p",
    ),
    (
        "push settings with a time that is not HH:MM",
        '{"type": "push_settings", "id": "p", "quiet_hours":'
        ' {"start": "10pm", "end": "07:00", "time_zone": "Europe/Berlin"}}',
        ErrorCode.SCHEMA_INVALID,
        "quiet_hours.start",
        "p",
    ),
    (
        "push settings with a malformed locale",
        '{"type": "push_settings", "id": "p", "locale": "german"}',
        ErrorCode.SCHEMA_INVALID,
        "locale",
        "p",
    ),
    (
        "a send with the body only the read side serves",
        '{"type": "send", "id": "s", "conversation_id": "c", "client_msg_id": "m",'
        ' "body": {"type": "withheld"}}',
        ErrorCode.SCHEMA_INVALID,
        "body.type",
        "s",
    ),
    (
        "an edit to the body only the read side serves",
        '{"type": "edit", "id": "e", "conversation_id": "c",'
        ' "message_id": "00000000-0000-4000-8000-000000000000", "body": {"type": "withheld"}}',
        ErrorCode.SCHEMA_INVALID,
        "body.type",
        "e",
    ),
]


@pytest.mark.parametrize(
    ("raw", "code", "field", "request_id"),
    [case[1:] for case in BAD_FRAMES],
    ids=[case[0] for case in BAD_FRAMES],
)
def test_bad_frames(
    raw: str | bytes, code: ErrorCode, field: str | None, request_id: str | None
) -> None:
    with pytest.raises(SchemaError) as caught:
        fr.parse_client_frame(raw)
    assert caught.value.code is code
    assert caught.value.field == field
    assert caught.value.request_id == request_id
    reply = fr.ErrorFrame.from_schema_error(caught.value)
    assert json.loads(fr.encode_server_frame(reply)) == {
        "type": "error",
        "id": request_id,
        "code": code.value,
        "message": caught.value.message,
        "retry_after_ms": None,
        "field": field,
    }


def test_unknown_type_error_lists_the_known_types() -> None:
    with pytest.raises(SchemaError) as caught:
        fr.parse_client_frame('{"type": "teleport", "id": "r9"}')
    assert "'teleport'" in caught.value.message
    assert all(frame_type in caught.value.message for frame_type in fr.CLIENT_FRAME_TYPES)


def test_every_error_code_and_close_code_is_described() -> None:
    for error_code in ErrorCode:
        assert error_code.description.endswith(".")
        assert 400 <= error_code.http_status < 600
    for close_code in CloseCode:
        assert close_code.description.endswith(".")
        assert close_code == 1009 or 4000 <= close_code <= 4999
    assert ErrorCode("rate-limited").http_status == 429
    assert CloseCode(4009) is CloseCode.SLOW_CONSUMER
    assert CloseCode(4010) is CloseCode.SERVER_DRAINING


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_hostile_nesting_is_malformed_json_not_a_recursion_error(depth: int) -> None:
    raw = '{"type": "ping", "id": "p", "x": ' + "[" * depth + "]" * depth + "}"
    with pytest.raises(SchemaError) as refused:
        fr.parse_client_frame(raw)
    assert refused.value.code is ErrorCode.MALFORMED_JSON
    assert fr.request_id_of(raw) is None


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"type": "sync", "id": "s", "cursor": ' + "9" * 4300 + "}", "cursor"),
        ('{"type": "sync", "id": "s", "cursor": 9223372036854775808}', "cursor"),
        (
            '{"type": "history", "id": "h", "conversation_id": "c", "after_seq": 2147483648}',
            "after_seq",
        ),
        (
            '{"type": "read", "id": "r", "conversation_id": "c", "conversation_seq": 2147483648}',
            "conversation_seq",
        ),
    ],
)
def test_integers_past_what_the_stores_keep_are_refused(raw: str, field: str) -> None:
    with pytest.raises(SchemaError) as refused:
        fr.parse_client_frame(raw)
    assert (refused.value.code, refused.value.field) == (ErrorCode.SCHEMA_INVALID, field)


def test_the_largest_values_the_stores_keep_are_accepted() -> None:
    history = fr.parse_client_frame(
        '{"type": "history", "id": "h", "conversation_id": "c", "before_seq": 2147483647}'
    )
    assert history.before_seq == 2**31 - 1  # type: ignore[union-attr]
    sync = fr.parse_client_frame('{"type": "sync", "id": "s", "cursor": 9223372036854775807}')
    assert sync.cursor == 2**63 - 1  # type: ignore[union-attr]

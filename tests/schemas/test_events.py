"""Events: every type round-trips; bad input gets a stable code and the field path."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from schemas import events as ev
from schemas.errors import ErrorCode, SchemaError
from tests.schemas.samples import ALICE, TENANT, sample_events


def sent_json(**payload_changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ev.encode_event(sample_events()["message.sent"]))
    data["payload"].update(payload_changes)
    return data


def test_samples_cover_every_event_type() -> None:
    assert list(sample_events()) == list(ev.EVENT_TYPES)
    assert len(ev.EVENT_TYPES) == len(set(ev.EVENT_TYPES)) == 24
    # The events the stream processors write come after everything clients cause, then the
    # operator tools' own.
    assert ev.EVENT_TYPES[-4:] == (
        "conversation.advanced",
        "command.rejected",
        "operator.action",
        "tokens.revoked",
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({"token_id": "t-1"}, "exactly user_id, device_id", id="device-and-jti"),
        pytest.param({"device_id": None}, "exactly user_id, device_id", id="device-without-one"),
        pytest.param({"scope": "user"}, "exactly user_id, issued_before", id="user-with-device"),
        pytest.param({"scope": "token"}, "exactly token_id", id="token-without-jti"),
    ],
)
def test_a_revocation_names_exactly_its_subject(changes: dict[str, Any], message: str) -> None:
    data: dict[str, Any] = json.loads(ev.encode_event(sample_events()["tokens.revoked"]))
    data["payload"].update(changes)
    with pytest.raises(SchemaError, match=message):
        ev.parse_event(json.dumps(data))


@pytest.mark.parametrize("event_type", ev.EVENT_TYPES)
def test_every_event_type_round_trips(event_type: str) -> None:
    event = sample_events()[event_type]
    raw = ev.encode_event(event)
    decoded = ev.parse_event(raw)
    assert type(decoded) is ev.EVENT_MODELS[event_type]
    assert decoded == event
    assert ev.encode_event(decoded) == raw
    assert json.loads(raw)["schema_version"] == ev.SCHEMA_VERSION


def test_new_fills_id_version_and_time() -> None:
    before = datetime.now(UTC)
    event = ev.ReceiptRead.new(
        tenant_id=TENANT,
        actor=ALICE,
        payload=ev.ReceiptReadPayload(conversation_id="c-1", conversation_seq=3),
    )
    other = ev.ReceiptRead.new(tenant_id=TENANT, actor=ALICE, payload=event.payload)
    assert event.type == "receipt.read"
    assert event.event_id != other.event_id
    assert event.schema_version == ev.SCHEMA_VERSION
    assert before <= event.occurred_at <= datetime.now(UTC)


def test_message_event_id_is_stable_per_send_and_distinct_across_sends() -> None:
    first = ev.message_event_id(TENANT, "alice", "m-1")
    assert first == ev.message_event_id(TENANT, "alice", "m-1")
    assert first != ev.message_event_id(TENANT, "bob", "m-1")
    assert first != ev.message_event_id(TENANT, "alice", "m-2")
    assert first != ev.message_event_id("other", "alice", "m-1")
    assert json.loads(json.dumps({"id": first}))["id"] == first


def test_derived_event_id_is_stable_per_source_and_role() -> None:
    source = ev.message_event_id(TENANT, "alice", "m-1")
    first = ev.derived_event_id(source, "rejected")
    assert first == ev.derived_event_id(source, "rejected")
    assert first != ev.derived_event_id(source, "advanced")
    assert first != ev.derived_event_id(ev.message_event_id(TENANT, "alice", "m-2"), "rejected")
    assert first != source
    assert uuid.UUID(first).version == 5
    assert str(uuid.UUID(first)) == first
    # A derived id is a valid event id.
    rejected = sample_events()["command.rejected"]
    derived = rejected.model_copy(update={"event_id": first})
    assert ev.parse_event(ev.encode_event(derived)).event_id == first


def test_conversation_advanced_names_a_timeline_entry_only() -> None:
    data = json.loads(ev.encode_event(sample_events()["conversation.advanced"]))
    for entry_type in ("message.recalled", "message.edited"):
        data["payload"]["entry_type"] = entry_type
        assert ev.parse_event(json.dumps(data)).payload.entry_type == entry_type  # type: ignore[union-attr]
    data["payload"]["entry_type"] = "typing.changed"
    with pytest.raises(SchemaError) as caught:
        ev.parse_event(json.dumps(data))
    assert caught.value.field == "payload.entry_type"
    data["payload"]["entry_type"] = "message.sent"
    data["payload"]["conversation_seq"] = 0
    with pytest.raises(SchemaError) as caught:
        ev.parse_event(json.dumps(data))
    assert caught.value.field == "payload.conversation_seq"


def test_command_rejected_needs_a_reason_and_may_omit_the_conversation() -> None:
    data = json.loads(ev.encode_event(sample_events()["command.rejected"]))
    data["payload"].pop("conversation_id")
    event = ev.parse_event(json.dumps(data))
    assert isinstance(event, ev.CommandRejected)
    assert event.payload.conversation_id is None
    data["payload"]["reason"] = ""
    with pytest.raises(SchemaError) as caught:
        ev.parse_event(json.dumps(data))
    assert caught.value.field == "payload.reason"


def test_unknown_fields_are_accepted_and_not_written_back() -> None:
    data = sent_json(added_in_1_1="x")
    data["schema_version"] = "1.7"
    data["trace"] = {"span": 1}
    data["payload"]["body"]["format"] = "markdown"
    event = ev.parse_event(json.dumps(data))
    written = json.loads(ev.encode_event(event))
    assert "trace" not in written
    assert "added_in_1_1" not in written["payload"]
    assert "format" not in written["payload"]["body"]
    assert written["schema_version"] == "1.7"


def test_another_major_version_is_refused() -> None:
    data = sent_json()
    data["schema_version"] = "2.0"
    with pytest.raises(SchemaError) as caught:
        ev.parse_event(json.dumps(data))
    assert caught.value.code is ErrorCode.SCHEMA_INVALID
    assert caught.value.field == "schema_version"
    assert "major version 2" in caught.value.message


def test_occurred_at_is_normalised_to_utc_and_needs_an_offset() -> None:
    data = sent_json()
    data["occurred_at"] = "2025-03-01T14:30:15+02:00"
    event = ev.parse_event(json.dumps(data))
    assert event.occurred_at == datetime(2025, 3, 1, 12, 30, 15, tzinfo=UTC)
    assert json.loads(ev.encode_event(event))["occurred_at"] == "2025-03-01T12:30:15Z"
    data["occurred_at"] = "2025-03-01T14:30:15"
    with pytest.raises(SchemaError) as caught:
        ev.parse_event(json.dumps(data))
    assert caught.value.field == "occurred_at"


def _mutate(change: Any) -> bytes:
    data = sent_json()
    change(data)
    return json.dumps(data).encode()


BAD_EVENTS: list[tuple[str, bytes, ErrorCode, str | None]] = [
    ("not json", b'{"type": "message.sent",', ErrorCode.MALFORMED_JSON, None),
    ("not utf-8", b'{"type": "\xff\xfe"}', ErrorCode.INVALID_UTF8, None),
    ("not an object", b"[1, 2]", ErrorCode.SCHEMA_INVALID, None),
    ("no type", b'{"event_id": "x"}', ErrorCode.SCHEMA_INVALID, "type"),
    ("unknown type", b'{"type": "message.exploded"}', ErrorCode.UNKNOWN_TYPE, "type"),
    (
        "text not a string",
        _mutate(lambda d: d["payload"]["body"].update(text=5)),
        ErrorCode.SCHEMA_INVALID,
        "payload.body.text",
    ),
    (
        "text missing",
        _mutate(lambda d: d["payload"]["body"].pop("text")),
        ErrorCode.SCHEMA_INVALID,
        "payload.body.text",
    ),
    (
        "unknown body type",
        _mutate(lambda d: d["payload"].update(body={"type": "hologram"})),
        ErrorCode.SCHEMA_INVALID,
        "payload.body.type",
    ),
    (
        "media size negative",
        _mutate(
            lambda d: d["payload"].update(
                body={"type": "media", "url": "https://x/y", "mime": "a/b", "size_bytes": -1}
            )
        ),
        ErrorCode.SCHEMA_INVALID,
        "payload.body.size_bytes",
    ),
    (
        "client_msg_id too long",
        _mutate(lambda d: d["payload"].update(client_msg_id="m" * 65)),
        ErrorCode.SCHEMA_INVALID,
        "payload.client_msg_id",
    ),
    (
        "id with a slash",
        _mutate(lambda d: d["payload"].update(conversation_id="a/b")),
        ErrorCode.SCHEMA_INVALID,
        "payload.conversation_id",
    ),
    (
        "actor required",
        _mutate(lambda d: d.update(actor=None)),
        ErrorCode.SCHEMA_INVALID,
        "actor",
    ),
    (
        "event id not a uuid",
        _mutate(lambda d: d.update(event_id="123")),
        ErrorCode.SCHEMA_INVALID,
        "event_id",
    ),
    (
        "text body over the limit",
        _mutate(lambda d: d["payload"]["body"].update(text="é" * ev.MAX_BODY_BYTES)),
        ErrorCode.BODY_TOO_LARGE,
        "payload.body.text",
    ),
    (
        "custom body over the limit",
        _mutate(
            lambda d: d["payload"].update(
                body={"type": "custom", "kind": "blob", "data": {"x": "y" * ev.MAX_BODY_BYTES}}
            )
        ),
        ErrorCode.BODY_TOO_LARGE,
        "payload.body.data",
    ),
]


@pytest.mark.parametrize(
    ("raw", "code", "field"),
    [case[1:] for case in BAD_EVENTS],
    ids=[case[0] for case in BAD_EVENTS],
)
def test_bad_events_name_the_code_and_field(raw: bytes, code: ErrorCode, field: str | None) -> None:
    with pytest.raises(SchemaError) as caught:
        ev.parse_event(raw)
    assert caught.value.code is code
    assert caught.value.field == field
    assert caught.value.message


def test_text_body_limit_counts_utf8_bytes_not_characters() -> None:
    fits = "é" * (ev.MAX_BODY_BYTES // 2)
    assert ev.TextBody(text=fits).text == fits
    with pytest.raises(ValidationError, match=f"the limit is {ev.MAX_BODY_BYTES} bytes"):
        ev.TextBody(text=fits + "é")


@pytest.mark.parametrize(
    ("payload", "field", "message"),
    [
        (
            {"kind": "direct", "members": ["a", "b", "c"]},
            "payload.members",
            "exactly two members",
        ),
        ({"kind": "group", "members": ["a", "a"]}, "payload.members", "repeat"),
        (
            {"kind": "group", "members": ["a", "b"], "owner_id": "z"},
            "payload.owner_id",
            "one of the members",
        ),
        (
            {"kind": "direct", "members": ["a", "b"], "owner_id": "a"},
            "payload.owner_id",
            "no owner",
        ),
    ],
)
def test_conversation_created_rules(payload: dict[str, Any], field: str, message: str) -> None:
    data = json.loads(ev.encode_event(sample_events()["conversation.created"]))
    data["payload"] = {"conversation_id": "c-9", **payload}
    with pytest.raises(SchemaError) as caught:
        ev.parse_event(json.dumps(data))
    assert caught.value.field == field
    assert message in caught.value.message


def test_muted_until_needs_muted() -> None:
    data = json.loads(ev.encode_event(sample_events()["conversation.mute_changed"]))
    data["payload"]["muted"] = False
    with pytest.raises(SchemaError) as caught:
        ev.parse_event(json.dumps(data))
    assert caught.value.field == "payload.muted_until"


def test_live_delivery_round_trips_and_reports_paths_inside_the_event() -> None:
    delivery = ev.LiveDelivery(
        node_id="ingress-2",
        tenant_id=TENANT,
        user_id="bob",
        device_ids=["bob-web"],
        sync_id=12,
        event=sample_events()["message.sent"],
    )
    raw = ev.encode_live_delivery(delivery)
    assert ev.parse_live_delivery(raw) == delivery
    data = json.loads(raw)
    data["event"]["payload"]["body"]["text"] = ""
    with pytest.raises(SchemaError) as caught:
        ev.parse_live_delivery(json.dumps(data))
    assert caught.value.field == "event.payload.body.text"


def test_inbox_and_sync_records_round_trip_and_report_paths_inside_the_event() -> None:
    events = sample_events()
    inbox = ev.InboxRecord(
        tenant_id=TENANT,
        user_id="bob",
        conversation_id="c-1",
        position=3,
        event=events["message.sent"],
    )
    assert inbox.ephemeral is False
    assert ev.InboxRecord.model_validate_json(inbox.model_dump_json()) == inbox
    typing = ev.InboxRecord(
        tenant_id=TENANT,
        user_id="bob",
        conversation_id="c-1",
        position=0,
        ephemeral=True,
        event=events["typing.changed"],
    )
    assert ev.InboxRecord.model_validate_json(typing.model_dump_json()) == typing
    sync = ev.SyncRecord(
        tenant_id=TENANT, user_id="bob", sync_id=12, event=events["command.rejected"]
    )
    assert ev.SyncRecord.model_validate_json(sync.model_dump_json()) == sync

    data = json.loads(inbox.model_dump_json())
    data["position"] = -1
    data["event"]["payload"]["body"]["text"] = ""
    with pytest.raises(ValidationError) as caught:
        ev.InboxRecord.model_validate_json(json.dumps(data))
    assert [error["loc"] for error in caught.value.errors()] == [
        ("position",),
        ("event", "message.sent", "payload", "body", "text", "text"),
    ]
    with pytest.raises(ValidationError, match="sync_id"):
        ev.SyncRecord.model_validate({**json.loads(sync.model_dump_json()), "sync_id": 0})


def test_push_job_round_trips_with_and_without_a_preview() -> None:
    message = sample_events()["message.sent"]
    assert isinstance(message, ev.MessageSent)
    job = ev.PushJob(
        job_id=ev.derived_event_id(message.event_id, "push/bob"),
        tenant_id=TENANT,
        user_id="bob",
        conversation_id="c-1",
        conversation_seq=7,
        message_id=message.event_id,
        sender_id="alice",
        body=message.payload.body,
        merged_count=2,
        unread_total=5,
        occurred_at=message.occurred_at,
    )
    assert ev.PushJob.model_validate_json(job.model_dump_json()) == job
    large_group = job.model_copy(update={"body": None})
    assert json.loads(large_group.model_dump_json())["body"] is None
    assert ev.PushJob.model_validate_json(large_group.model_dump_json()) == large_group
    for field, bad in (("merged_count", 0), ("unread_total", -1), ("job_id", "job-1")):
        with pytest.raises(ValidationError, match=field):
            ev.PushJob.model_validate({**json.loads(job.model_dump_json()), field: bad})


def test_push_job_carries_quiet_hours_and_locale_and_reads_jobs_written_without_them() -> None:
    message = sample_events()["message.sent"]
    settings = sample_events()["user.push_settings_changed"]
    assert isinstance(message, ev.MessageSent)
    assert isinstance(settings, ev.UserPushSettingsChanged)
    old = {
        "job_id": ev.derived_event_id(message.event_id, "push/bob"),
        "tenant_id": TENANT,
        "user_id": "bob",
        "conversation_id": "c-1",
        "conversation_seq": 7,
        "message_id": message.event_id,
        "sender_id": "alice",
        "merged_count": 1,
        "unread_total": 1,
        "occurred_at": "2025-03-01T12:00:00Z",
    }
    job = ev.PushJob.model_validate_json(json.dumps(old))
    assert (job.quiet_hours, job.locale) == (None, "en")
    with_preferences = job.model_copy(
        update={"quiet_hours": settings.payload.quiet_hours, "locale": "de-AT"}
    )
    written = json.loads(with_preferences.model_dump_json())
    assert written["quiet_hours"] == {
        "start": "22:00",
        "end": "07:00",
        "time_zone": "Europe/Berlin",
    }
    assert ev.PushJob.model_validate_json(with_preferences.model_dump_json()) == with_preferences


@pytest.mark.parametrize(
    ("payload", "field", "message"),
    [
        (
            {"quiet_hours": {"start": "7:00", "end": "08:00", "time_zone": "UTC"}},
            "payload.quiet_hours.start",
            "HH:MM",
        ),
        (
            {"quiet_hours": {"start": "22:00", "end": "24:00", "time_zone": "UTC"}},
            "payload.quiet_hours.end",
            "HH:MM",
        ),
        (
            {"quiet_hours": {"start": "22:00", "end": "22:00", "time_zone": "UTC"}},
            "payload.quiet_hours.end",
            "empty",
        ),
        (
            {"quiet_hours": {"start": "22:00", "end": "07:00", "time_zone": "/etc/passwd"}},
            "payload.quiet_hours.time_zone",
            "IANA",
        ),
        ({"locale": "de_DE.UTF-8"}, "payload.locale", "BCP 47"),
        ({"muted": False, "muted_until": "2030-01-01T00:00:00Z"}, "payload.muted_until", "muted"),
    ],
)
def test_push_settings_refuse_bad_times_zones_and_locales(
    payload: dict[str, Any], field: str, message: str
) -> None:
    data = json.loads(ev.encode_event(sample_events()["user.push_settings_changed"]))
    data["payload"] = payload
    with pytest.raises(SchemaError) as caught:
        ev.parse_event(json.dumps(data))
    assert (caught.value.code, caught.value.field) == (ErrorCode.SCHEMA_INVALID, field)
    assert message in caught.value.message


def test_push_settings_event_takes_any_well_formed_zone_name() -> None:
    """Whether a zone exists is the ingress's check: a recorded event with a zone this reader's
    database lacks still reads (the push sink then ignores the quiet hours)."""
    data = json.loads(ev.encode_event(sample_events()["user.push_settings_changed"]))
    data["payload"]["quiet_hours"]["time_zone"] = "Mars/Olympus_Mons"
    event = ev.parse_event(json.dumps(data))
    assert isinstance(event, ev.UserPushSettingsChanged)
    assert event.payload.quiet_hours is not None
    assert event.payload.quiet_hours.time_zone == "Mars/Olympus_Mons"


def test_push_outcome_record_round_trips_with_and_without_a_device() -> None:
    message = sample_events()["message.sent"]
    outcome = ev.PushOutcomeRecord(
        job_id=ev.derived_event_id(message.event_id, "push/bob"),
        tenant_id=TENANT,
        user_id="bob",
        conversation_id="c-1",
        message_id=message.event_id,
        job_occurred_at=message.occurred_at,
        device_id="bob-phone",
        provider=ev.PushProvider.APNS,
        attempt=2,
        outcome=ev.PushAttemptOutcome.INVALID_TOKEN,
        status_code=410,
        reason="Unregistered",
        attempted_at=message.occurred_at,
    )
    assert ev.PushOutcomeRecord.model_validate_json(outcome.model_dump_json()) == outcome
    nowhere = outcome.model_copy(
        update={
            "device_id": None,
            "provider": None,
            "attempt": 0,
            "outcome": ev.PushAttemptOutcome.SKIPPED,
            "status_code": None,
            "reason": "no-device-token",
        }
    )
    assert ev.PushOutcomeRecord.model_validate_json(nowhere.model_dump_json()) == nowhere
    for field, bad in (("attempt", -1), ("outcome", "delivered"), ("status_code", 99)):
        with pytest.raises(ValidationError, match=field):
            ev.PushOutcomeRecord.model_validate(
                {**json.loads(outcome.model_dump_json()), field: bad}
            )


@pytest.mark.parametrize("event_type", sorted(sample_events()))
@pytest.mark.parametrize("ephemeral", [False, True])
def test_encode_inbox_is_byte_identical_to_the_model(event_type: str, ephemeral: bool) -> None:
    event = sample_events()[event_type]
    fields: dict[str, Any] = {
        "tenant_id": "acme",
        "user_id": "zoe.1@x",
        "conversation_id": "c-1:x",
        "position": 0 if ephemeral else 42,
        "ephemeral": ephemeral,
    }
    model = ev.InboxRecord(**fields, event=event).model_dump_json().encode()
    assert ev.encode_inbox(**fields, event_json=ev.encode_event(event)) == model
    assert ev.InboxRecord.model_validate_json(model).event == event

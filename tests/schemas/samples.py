"""One valid instance of every event and frame type, for round trips and other packages' tests."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas import events as ev
from schemas import frames as fr
from schemas.errors import ErrorCode

TENANT = "acme"
OCCURRED_AT = datetime(2025, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
ALICE = ev.Actor(user_id="alice", device_id="alice-phone")
#: Event types the stream processors write into users' sync queues (through the user inbox
#: topic); the ingress never publishes them, so they have no inbound topic.
PROCESSOR_EVENT_TYPES = ("conversation.advanced", "command.rejected")
#: Event types the operator tools write (on the operator-actions topic, never through the
#: ingress).
OPERATOR_EVENT_TYPES = ("operator.action",)
#: Event types ``imstream revoke`` writes (on the revocation topic, never through the ingress).
REVOCATION_EVENT_TYPES = ("tokens.revoked",)
#: Event types no client command produces: they have no inbound topic.
UNROUTED_EVENT_TYPES = PROCESSOR_EVENT_TYPES + OPERATOR_EVENT_TYPES + REVOCATION_EVENT_TYPES


def _event(model: type[ev.EventEnvelope[ev.P]], payload: ev.P, actor: ev.Actor | None) -> ev.Event:
    event: ev.Event = model.new(  # type: ignore[assignment]
        tenant_id=TENANT, payload=payload, actor=actor, occurred_at=OCCURRED_AT
    )
    return event


def sample_events() -> dict[str, ev.Event]:
    """Every event type, with most optional fields set so that a round trip covers them."""
    message_id = ev.message_event_id(TENANT, "alice", "m-1")
    presence = ev.DevicePresencePayload(
        user_id="alice",
        device_id="alice-phone",
        platform=ev.Platform.IOS,
        node_id="ingress-1",
        connection_id="conn-1",
    )
    token = ev.PushTokenRegisteredPayload(
        user_id="alice",
        device_id="alice-phone",
        provider=ev.PushProvider.APNS,
        token="a" * 64,
        app_id="dev.imstream.app",
    )
    samples = [
        _event(
            ev.MessageSent,
            ev.MessageSentPayload(
                conversation_id="c-1",
                client_msg_id="m-1",
                body=ev.TextBody(text="hello 👋"),
                conversation_seq=7,
            ),
            ALICE,
        ),
        _event(
            ev.MessageRecalled,
            ev.MessageRecalledPayload(conversation_id="c-1", message_id=message_id),
            ALICE,
        ),
        _event(
            ev.MessageEdited,
            ev.MessageEditedPayload(
                conversation_id="c-1",
                message_id=message_id,
                body=ev.MediaBody(
                    url="https://cdn.example/p/1.jpg",
                    mime="image/jpeg",
                    size_bytes=123_456,
                    width=800,
                    height=600,
                    thumbnail_url="https://cdn.example/p/1.thumb.jpg",
                ),
            ),
            ALICE,
        ),
        _event(
            ev.ConversationCreated,
            ev.ConversationCreatedPayload(
                conversation_id="c-2",
                kind=ev.ConversationKind.GROUP,
                members=["alice", "bob", "carol"],
                owner_id="alice",
                name="Team",
            ),
            ALICE,
        ),
        _event(
            ev.ConversationRenamed,
            ev.ConversationRenamedPayload(conversation_id="c-2", name="Team ✨"),
            ALICE,
        ),
        _event(
            ev.ConversationMemberAdded,
            ev.ConversationMemberAddedPayload(
                conversation_id="c-2", user_id="dave", role=ev.Role.ADMIN
            ),
            ALICE,
        ),
        _event(
            ev.ConversationMemberRemoved,
            ev.ConversationMemberRemovedPayload(conversation_id="c-2", user_id="dave"),
            ALICE,
        ),
        _event(
            ev.ConversationMemberRoleChanged,
            ev.ConversationMemberRoleChangedPayload(
                conversation_id="c-2", user_id="bob", role=ev.Role.OWNER
            ),
            ALICE,
        ),
        _event(
            ev.ConversationLeft,
            ev.ConversationLeftPayload(conversation_id="c-2", user_id="carol"),
            ev.Actor(user_id="carol"),
        ),
        _event(ev.ConversationDeleted, ev.ConversationDeletedPayload(conversation_id="c-2"), None),
        _event(
            ev.ReceiptRead,
            ev.ReceiptReadPayload(conversation_id="c-1", conversation_seq=7),
            ALICE,
        ),
        _event(
            ev.ConversationMuteChanged,
            ev.ConversationMuteChangedPayload(
                conversation_id="c-1", muted=True, muted_until=datetime(2025, 4, 1, tzinfo=UTC)
            ),
            ALICE,
        ),
        _event(ev.BadgeCleared, ev.BadgeClearedPayload(conversation_id=None), ALICE),
        _event(
            ev.UserPushSettingsChanged,
            ev.UserPushSettingsChangedPayload(
                muted=True,
                muted_until=datetime(2025, 4, 1, tzinfo=UTC),
                quiet_hours=ev.QuietHoursSetting(
                    start="22:00", end="07:00", time_zone="Europe/Berlin"
                ),
                locale="de-AT",
            ),
            ALICE,
        ),
        _event(
            ev.TypingChanged,
            ev.TypingChangedPayload(conversation_id="c-1", active=True),
            ALICE,
        ),
        _event(ev.DeviceConnected, presence, ALICE),
        _event(ev.DeviceDisconnected, presence, None),
        ev.NodeLeaseRenewed.new(
            tenant_id=ev.SYSTEM_TENANT,
            occurred_at=OCCURRED_AT,
            payload=ev.NodeLeasePayload(
                node_id="ingress-1", started_at=OCCURRED_AT, lease_ms=20_000
            ),
        ),
        _event(ev.PushTokenRegistered, token, ALICE),
        _event(
            ev.PushTokenRemoved,
            ev.PushTokenRemovedPayload(
                **token.model_dump(), reason=ev.PushTokenRemovalReason.PROVIDER_REJECTED
            ),
            None,
        ),
        _event(
            ev.ConversationAdvanced,
            ev.ConversationAdvancedPayload(
                conversation_id="c-big",
                conversation_seq=9,
                message_id=message_id,
                sender_id="alice",
                entry_type="message.sent",
            ),
            ALICE,
        ),
        _event(
            ev.CommandRejected,
            ev.CommandRejectedPayload(
                command_event_id=message_id,
                command_type="message.sent",
                conversation_id="c-1",
                reason="not-a-member",
            ),
            ALICE,
        ),
        ev.OperatorAction.new(
            tenant_id=ev.SYSTEM_TENANT,
            occurred_at=OCCURRED_AT,
            payload=ev.OperatorActionPayload(
                operator="ops-erin",
                command="dlq redrive",
                arguments={"code": "processing-failed", "rate": 50.0, "dry_run": False},
                counts={"redriven": 2, "skipped": 1},
                outcome=ev.OperatorOutcome.FAILED,
                error="kafka unreachable",
            ),
        ),
        _event(
            ev.TokensRevoked,
            ev.TokensRevokedPayload(
                scope=ev.RevocationScope.DEVICE,
                user_id="alice",
                device_id="alice-phone",
                issued_before=OCCURRED_AT,
                operator="ops-erin",
                reason="phone reported stolen",
            ),
            None,
        ),
    ]
    return {event.type: event for event in samples}


def send_frame(**changes: object) -> dict[str, object]:
    """A client's ``send`` frame as JSON data (text "hi" to c-1), with ``changes`` applied."""
    frame: dict[str, object] = {
        "type": "send",
        "id": "req-1",
        "conversation_id": "c-1",
        "client_msg_id": "m-1",
        "body": {"type": "text", "text": "hi"},
    }
    frame.update(changes)
    return frame


def sample_client_frames() -> dict[str, fr.ClientFrame]:
    body = ev.CustomBody(kind="location", data={"lat": 52.5, "lon": 13.4, "tags": ["x", None]})
    frames: list[fr.ClientFrame] = [
        fr.Hello(
            id="r1",
            token="header.payload.signature",
            tenant_id=TENANT,
            device_id="alice-phone",
            platform=ev.Platform.ANDROID,
            sync_cursor=41,
        ),
        fr.Send(id="r2", conversation_id="c-1", client_msg_id="m-1", body=body),
        fr.Recall(id="r3", conversation_id="c-1", message_id=ev.message_event_id(TENANT, "a", "m")),
        fr.Edit(
            id="r4",
            conversation_id="c-1",
            message_id=ev.message_event_id(TENANT, "a", "m"),
            body=ev.TextBody(text="fixed"),
        ),
        fr.Read(id="r5", conversation_id="c-1", conversation_seq=9),
        fr.Typing(id="r6", conversation_id="c-1", active=False),
        fr.Mute(id="r7", conversation_id="c-1", muted=True, muted_until=OCCURRED_AT),
        fr.PushSettings(
            id="r22",
            muted=True,
            muted_until=OCCURRED_AT,
            quiet_hours=fr.ClientQuietHours(start="22:30", end="06:45", time_zone="Asia/Tokyo"),
            locale="ja",
        ),
        fr.ClearBadge(id="r8", conversation_id="c-1"),
        fr.CreateConversation(
            id="r9", conversation_id="c-3", kind=ev.ConversationKind.DIRECT, members=["bob"]
        ),
        fr.RenameConversation(id="r10", conversation_id="c-2", name="Renamed"),
        fr.AddMember(id="r11", conversation_id="c-2", user_id="erin"),
        fr.RemoveMember(id="r12", conversation_id="c-2", user_id="erin"),
        fr.ChangeRole(id="r13", conversation_id="c-2", user_id="bob", role=ev.Role.ADMIN),
        fr.LeaveConversation(id="r14", conversation_id="c-2"),
        fr.DeleteConversation(id="r15", conversation_id="c-2"),
        fr.Ack(id="r16", sync_id=42),
        fr.Sync(id="r17", cursor=40, limit=fr.MAX_SYNC_LIMIT),
        fr.History(id="r19", conversation_id="c-1", before_seq=120, limit=fr.MAX_HISTORY_LIMIT),
        fr.Conversations(id="r20", limit=20),
        fr.WhoRead(id="r21", conversation_id="c-1", seq=7),
        fr.Ping(id="r18"),
        fr.RefreshToken(id="r22", token="eyJhbGciOiJIUzI1NiJ9.e30.c2ln"),
    ]
    return {frame.type: frame for frame in frames}


def sample_server_frames() -> dict[str, fr.ServerFrame]:
    events = sample_events()
    frames: list[fr.ServerFrame] = [
        fr.HelloOk(
            id="r1",
            tenant_id=TENANT,
            user_id="alice",
            device_id="alice-phone",
            node_id="ingress-1",
            idle_timeout_ms=60_000,
            max_frame_bytes=65_536,
            token_expires_at=datetime(2026, 12, 7, 15, 0, tzinfo=UTC),
        ),
        fr.Accepted(
            id="r2",
            conversation_id="c-1",
            client_msg_id="m-1",
            event_id=events["message.sent"].event_id,
        ),
        fr.Ok(id="r9", conversation_id="c-3"),
        fr.EventFrame(sync_id=None, event=events["typing.changed"]),
        fr.SyncPage(
            id="r17",
            events=[
                fr.SyncedEvent(sync_id=41, event=events["message.sent"]),
                fr.SyncedEvent(sync_id=44, event=events["receipt.read"]),
            ],
            has_more=True,
            next_cursor=44,
        ),
        fr.HistoryPage(
            id="r19",
            conversation_id="c-1",
            entries=[
                fr.TimelineEntry(
                    seq=7,
                    event=events["message.sent"],
                    recalled=False,
                    edited=events["message.edited"],
                ),
                fr.TimelineEntry(seq=8, event=events["message.recalled"]),
            ],
            has_more=True,
        ),
        fr.ConversationList(
            id="r20",
            conversations=[
                fr.ConversationItem(
                    conversation_id="c-1",
                    kind=ev.ConversationKind.GROUP,
                    name="Team",
                    role=ev.Role.ADMIN,
                    last_seq=9,
                    read_seq=7,
                    unread=2,
                    muted=True,
                    muted_until=OCCURRED_AT,
                    last_message_id=events["message.sent"].event_id,
                    last_sender_id="bob",
                    last_preview="hello",
                    last_activity_at=OCCURRED_AT,
                )
            ],
        ),
        fr.ReadBy(
            id="r21",
            conversation_id="c-1",
            seq=7,
            readers=[fr.Reader(user_id="bob", read_seq=9, read_at=OCCURRED_AT)],
        ),
        fr.ErrorFrame(
            id="r2",
            code=ErrorCode.RATE_LIMITED,
            message="slow down",
            retry_after_ms=250,
            field=None,
        ),
        fr.Pong(id="r18"),
    ]
    return {frame.type: frame for frame in frames}

"""Every frame that crosses the WebSocket, in both directions, and their parsers.

A frame is one JSON text message with a ``type``. Every client command carries a request ``id``
(chosen by the client, unique among its outstanding commands) and gets exactly one reply that
echoes it: ``hello_ok`` for ``hello``, ``accepted`` for ``send``, ``sync_page`` for ``sync``,
``history_page`` for ``history``, ``conversation_list`` for ``conversations``, ``read_by`` for
``who_read``, ``pong`` for ``ping``, ``ok`` for the rest, or ``error`` for any of them. Frames
follow the same versioning rule as events (schemas/events.py): unknown fields are ignored,
changes within protocol version 1 are additive.
"""

from __future__ import annotations

import zoneinfo
from datetime import datetime
from functools import cache
from typing import Annotated, Any, Literal, get_args

import msgspec
from pydantic import (
    AfterValidator,
    Field,
    NonNegativeInt,
    PositiveInt,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import from_json

from schemas.errors import ErrorCode, SchemaError, schema_error
from schemas.events import (
    MAX_INT64,
    MAX_MEMBERS_PER_EVENT,
    MAX_SEQ,
    ClientBody,
    ClientMsgId,
    ConversationId,
    ConversationKind,
    DeviceId,
    Event,
    EventId,
    Id,
    Locale,
    MutedUntil,
    Name,
    NodeId,
    Platform,
    QuietHoursSetting,
    Role,
    Seq,
    TaggedModel,
    TenantId,
    TimeZoneName,
    UserId,
    UtcDatetime,
    WireModel,
)

#: The most events one ``sync`` may ask for; a client pages with ``next_cursor``.
MAX_SYNC_LIMIT = 500
DEFAULT_SYNC_LIMIT = 100
#: The most timeline entries one ``history`` may ask for.
MAX_HISTORY_LIMIT = 200
DEFAULT_HISTORY_LIMIT = 50
MAX_CONVERSATIONS_LIMIT = 1000
DEFAULT_CONVERSATIONS_LIMIT = 100
MAX_TOKEN_CHARS = 8192

RequestId = Annotated[Id, Field(description="Chosen by the client; echoed by the reply")]
SyncId = Annotated[
    int, Field(ge=0, le=MAX_INT64, description="A position in the user's sync queue")
]


class Frame(TaggedModel):
    """Base of every frame; subclasses fix ``type``."""


# ---------------------------------------------------------------------------------------------
# Client → server
# ---------------------------------------------------------------------------------------------


class ClientCommand(Frame):
    id: RequestId


class Hello(ClientCommand):
    """The first frame of a connection: who is connecting and from where it resumes."""

    type: Literal["hello"] = "hello"
    token: Annotated[str, StringConstraints(min_length=1, max_length=MAX_TOKEN_CHARS)]
    tenant_id: TenantId
    device_id: DeviceId
    platform: Platform
    sync_cursor: SyncId = Field(
        default=0, description="The highest sync id the device holds; 0 for a new device"
    )


class Send(ClientCommand):
    type: Literal["send"] = "send"
    conversation_id: ConversationId
    client_msg_id: Annotated[
        ClientMsgId, Field(description="Chosen by the client; a retry reuses it")
    ]
    body: ClientBody


class Recall(ClientCommand):
    type: Literal["recall"] = "recall"
    conversation_id: ConversationId
    message_id: EventId


class Edit(ClientCommand):
    type: Literal["edit"] = "edit"
    conversation_id: ConversationId
    message_id: EventId
    body: ClientBody


class Read(ClientCommand):
    type: Literal["read"] = "read"
    conversation_id: ConversationId
    conversation_seq: Annotated[
        Seq, Field(description="Every message up to this one has been read")
    ]


class Typing(ClientCommand):
    """Ephemeral: routed to the other members' online devices, never stored."""

    type: Literal["typing"] = "typing"
    conversation_id: ConversationId
    active: bool = True


class Mute(ClientCommand):
    type: Literal["mute"] = "mute"
    conversation_id: ConversationId
    muted: bool
    muted_until: MutedUntil = None


@cache
def _known_time_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _known_time_zone(name: str) -> str:
    if name not in _known_time_zones():
        raise ValueError(f"unknown time zone {name!r}: give an IANA name such as Europe/Berlin")
    return name


class ClientQuietHours(QuietHoursSetting):
    """Quiet hours as a client sets them: the time zone must be one this server knows."""

    time_zone: Annotated[TimeZoneName, AfterValidator(_known_time_zone)]


class PushSettings(ClientCommand):
    """Set all of the user's push preferences at once (every device gets the change)."""

    type: Literal["push_settings"] = "push_settings"
    muted: bool = Field(default=False, description="No push at all while muted")
    muted_until: MutedUntil = None
    quiet_hours: ClientQuietHours | None = Field(
        default=None, description="Pushes arrive silently inside this window; null for none"
    )
    locale: Locale | None = Field(
        default=None, description="The notifications' language; null for English"
    )


class ClearBadge(ClientCommand):
    type: Literal["clear_badge"] = "clear_badge"
    conversation_id: ConversationId | None = Field(
        default=None, description="The conversation to clear; null for all"
    )


class CreateConversation(ClientCommand):
    type: Literal["conversation.create"] = "conversation.create"
    conversation_id: ConversationId | None = Field(
        default=None,
        description="Chosen by the client to make a retry harmless; assigned by the server if null",
    )
    kind: ConversationKind
    members: Annotated[
        list[UserId],
        Field(
            min_length=1,
            max_length=MAX_MEMBERS_PER_EVENT - 1,
            description="The other members; the creator is implied",
        ),
    ]
    name: Name | None = None

    @field_validator("members")
    @classmethod
    def _members_fit_kind(cls, members: list[str], info: ValidationInfo) -> list[str]:
        if len(set(members)) != len(members):
            raise ValueError("members must not repeat a user")
        if info.data.get("kind") is ConversationKind.DIRECT and len(members) != 1:
            raise ValueError("a direct conversation names exactly one other member")
        return members


class RenameConversation(ClientCommand):
    type: Literal["conversation.rename"] = "conversation.rename"
    conversation_id: ConversationId
    name: Name


class AddMember(ClientCommand):
    type: Literal["conversation.add_member"] = "conversation.add_member"
    conversation_id: ConversationId
    user_id: UserId
    role: Role = Role.MEMBER


class RemoveMember(ClientCommand):
    type: Literal["conversation.remove_member"] = "conversation.remove_member"
    conversation_id: ConversationId
    user_id: UserId


class ChangeRole(ClientCommand):
    type: Literal["conversation.change_role"] = "conversation.change_role"
    conversation_id: ConversationId
    user_id: UserId
    role: Role


class LeaveConversation(ClientCommand):
    type: Literal["conversation.leave"] = "conversation.leave"
    conversation_id: ConversationId


class DeleteConversation(ClientCommand):
    type: Literal["conversation.delete"] = "conversation.delete"
    conversation_id: ConversationId


class Ack(ClientCommand):
    """The device holds every event up to ``sync_id``; the server stops re-sending them."""

    type: Literal["ack"] = "ack"
    sync_id: SyncId


class Sync(ClientCommand):
    """Ask for the events after ``cursor``, oldest first."""

    type: Literal["sync"] = "sync"
    cursor: SyncId
    limit: Annotated[int, Field(ge=1, le=MAX_SYNC_LIMIT)] = DEFAULT_SYNC_LIMIT


class History(ClientCommand):
    """A page of a conversation's timeline, for members: the ``limit`` entries before
    ``before_seq`` (the newest first chosen), or after ``after_seq``; the latest without either.
    Entries come in ascending seq order."""

    type: Literal["history"] = "history"
    conversation_id: ConversationId
    before_seq: Seq | None = None
    after_seq: Annotated[int, Field(ge=0, le=MAX_SEQ)] | None = None
    limit: Annotated[int, Field(ge=1, le=MAX_HISTORY_LIMIT)] = DEFAULT_HISTORY_LIMIT

    @field_validator("after_seq")
    @classmethod
    def _one_direction(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("before_seq") is not None:
            raise ValueError("give before_seq or after_seq, not both")
        return value


class Conversations(ClientCommand):
    """The user's conversation list, latest activity first, with unread counts."""

    type: Literal["conversations"] = "conversations"
    limit: Annotated[int, Field(ge=1, le=MAX_CONVERSATIONS_LIMIT)] = DEFAULT_CONVERSATIONS_LIMIT


class WhoRead(ClientCommand):
    """Who has read a message: members whose read position is at or past ``seq`` (1:1 and
    groups up to the large-group threshold; larger groups keep no receipts)."""

    type: Literal["who_read"] = "who_read"
    conversation_id: ConversationId
    seq: PositiveInt


class Ping(ClientCommand):
    type: Literal["ping"] = "ping"


class RefreshToken(ClientCommand):
    """A fresh token for the open socket, before the one it was opened with expires (the socket
    is closed with token-expired at that token's ``exp`` otherwise). Same tenant, user and
    device binding as the first."""

    type: Literal["refresh_token"] = "refresh_token"
    token: Annotated[str, StringConstraints(min_length=1, max_length=MAX_TOKEN_CHARS)]


ClientFrame = Annotated[
    Hello
    | Send
    | Recall
    | Edit
    | Read
    | Typing
    | Mute
    | PushSettings
    | ClearBadge
    | CreateConversation
    | RenameConversation
    | AddMember
    | RemoveMember
    | ChangeRole
    | LeaveConversation
    | DeleteConversation
    | Ack
    | Sync
    | History
    | Conversations
    | WhoRead
    | Ping
    | RefreshToken,
    Field(discriminator="type"),
]

# ---------------------------------------------------------------------------------------------
# Server → client
# ---------------------------------------------------------------------------------------------


class HelloOk(Frame):
    type: Literal["hello_ok"] = "hello_ok"
    id: RequestId
    tenant_id: TenantId
    user_id: UserId
    device_id: DeviceId
    node_id: NodeId
    idle_timeout_ms: PositiveInt
    max_frame_bytes: PositiveInt
    token_expires_at: UtcDatetime | None = Field(
        default=None,
        description="When the socket's token expires: the socket is closed with token-expired "
        "then, unless a refresh_token frame brought a later one",
    )


class Accepted(Frame):
    """Sent only once Kafka has durably written the message (``acks=all``)."""

    type: Literal["accepted"] = "accepted"
    id: RequestId
    conversation_id: ConversationId
    client_msg_id: ClientMsgId
    event_id: Annotated[EventId, Field(description="The message's id")]


class Ok(Frame):
    type: Literal["ok"] = "ok"
    id: RequestId
    conversation_id: ConversationId | None = Field(
        default=None, description="Set in reply to conversation.create"
    )


class SyncedEvent(WireModel):
    """An event at its place in the user's sync queue."""

    sync_id: PositiveInt
    event: Event


class EventFrame(Frame):
    """An event pushed to the device as it happens; the device acks it by ``sync_id``."""

    type: Literal["event"] = "event"
    sync_id: PositiveInt | None = Field(
        description="Null for ephemeral events (typing), which are neither stored nor acked"
    )
    event: Event


class SyncPage(Frame):
    type: Literal["sync_page"] = "sync_page"
    id: RequestId
    events: list[SyncedEvent]
    has_more: bool
    next_cursor: Annotated[SyncId, Field(description="The cursor of the next sync")]
    expired: bool = Field(
        default=False,
        description="The queue no longer holds the entries after the cursor (older than the "
        "retention): rebuild from `conversations` and `history`, then sync from `next_cursor`, "
        "the queue's head",
    )


class TimelineEntry(WireModel):
    """One entry of a conversation's timeline, with what later entries did to it."""

    seq: PositiveInt
    event: Event = Field(description="The sequenced entry: a message, a recall or an edit")
    recalled: bool = Field(default=False, description="A later entry recalled this message")
    edited: Event | None = Field(
        default=None, description="The latest edit of this message (a message.edited event)"
    )


class HistoryPage(Frame):
    type: Literal["history_page"] = "history_page"
    id: RequestId
    conversation_id: ConversationId
    entries: list[TimelineEntry] = Field(description="Ascending by seq")
    has_more: bool = Field(description="More entries lie further in the page's direction")


class ConversationItem(WireModel):
    """One conversation in the user's list."""

    conversation_id: ConversationId
    kind: ConversationKind | None = None
    name: str | None = None
    role: Role | None = None
    last_seq: NonNegativeInt = 0
    read_seq: NonNegativeInt = 0
    unread: NonNegativeInt = 0
    muted: bool = False
    muted_until: MutedUntil = None
    pinned: bool = False
    last_message_id: EventId | None = None
    last_sender_id: UserId | None = None
    last_preview: str | None = None
    last_activity_at: datetime | None = None
    large: bool = Field(
        default=False,
        description="A large group (read diffusion): its messages reach devices live as event "
        "frames without a sync_id and are read from history, not synced (docs/protocol.md, "
        '"Large groups")',
    )


class ConversationList(Frame):
    type: Literal["conversation_list"] = "conversation_list"
    id: RequestId
    conversations: list[ConversationItem] = Field(description="Latest activity first")


class Reader(WireModel):
    user_id: UserId
    read_seq: PositiveInt = Field(description="The reader's read position (at or past the seq)")
    read_at: datetime | None = None


class ReadBy(Frame):
    type: Literal["read_by"] = "read_by"
    id: RequestId
    conversation_id: ConversationId
    seq: PositiveInt
    readers: list[Reader] = Field(description="In the order they read it")


class ErrorFrame(Frame):
    type: Literal["error"] = "error"
    id: RequestId | None = Field(description="The request's id; null if it could not be read")
    code: ErrorCode
    message: str
    retry_after_ms: NonNegativeInt | None = None
    field: str | None = Field(default=None, description="The path of the offending field")

    @classmethod
    def from_schema_error(cls, error: SchemaError) -> ErrorFrame:
        """The reply to a frame that could not be parsed."""
        return cls(id=error.request_id, code=error.code, message=error.message, field=error.field)


class Pong(Frame):
    type: Literal["pong"] = "pong"
    id: RequestId


ServerFrame = Annotated[
    HelloOk
    | Accepted
    | Ok
    | EventFrame
    | SyncPage
    | HistoryPage
    | ConversationList
    | ReadBy
    | ErrorFrame
    | Pong,
    Field(discriminator="type"),
]

CLIENT_FRAME_MODELS: dict[str, type[ClientCommand]] = {
    model.model_fields["type"].default: model for model in get_args(get_args(ClientFrame)[0])
}
SERVER_FRAME_MODELS: dict[str, type[Frame]] = {
    model.model_fields["type"].default: model for model in get_args(get_args(ServerFrame)[0])
}

CLIENT_FRAME_TYPES: tuple[str, ...] = tuple(CLIENT_FRAME_MODELS)
SERVER_FRAME_TYPES: tuple[str, ...] = tuple(SERVER_FRAME_MODELS)

_CLIENT_FRAME = TypeAdapter[ClientFrame](ClientFrame)
_SERVER_FRAME = TypeAdapter[ServerFrame](ServerFrame)
_REQUEST_ID = TypeAdapter[str](RequestId)


def parse_client_frame(raw: str | bytes) -> ClientFrame:
    """Decode a client frame; raises ``SchemaError`` with the code, field path and request id."""
    try:
        return _CLIENT_FRAME.validate_json(raw)
    except ValidationError as error:
        problem = schema_error(error, raw, what="frame", known_types=CLIENT_FRAME_TYPES)
        problem.request_id = _request_id(raw)
        raise problem from None


def request_id_of(raw: str | bytes) -> str | None:
    """The ``id`` of a frame refused before parsing (too large, rate-limited), if it has a valid
    one, so that the ``error`` reply can echo it."""
    return _request_id(raw)


def _request_id(raw: str | bytes) -> str | None:
    """The ``id`` of a frame that failed to parse, if it has a valid one, to echo in the error."""
    try:
        # pydantic's parser, not json.loads: it refuses hostile nesting with a ValueError where
        # json.loads raises RecursionError (a traceback per frame, before authentication).
        data = from_json(raw)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    try:
        return _REQUEST_ID.validate_python(data.get("id"))
    except ValidationError:
        return None


def encode_client_frame(frame: ClientFrame) -> str:
    return _CLIENT_FRAME.dump_json(frame).decode()


def parse_server_frame(raw: str | bytes) -> ServerFrame:
    """Decode a server frame (for clients, tests and benchmarks)."""
    try:
        return _SERVER_FRAME.validate_json(raw)
    except ValidationError as error:
        raise schema_error(error, raw, what="frame", known_types=SERVER_FRAME_TYPES) from None


def encode_server_frame(frame: ServerFrame) -> str:
    """The frame as the text of one WebSocket message."""
    return _SERVER_FRAME.dump_json(frame).decode()


def encode_event_frame(sync_id: int | None, event_json: bytes | memoryview) -> bytes:
    """``EventFrame(sync_id=sync_id, event=event)`` as JSON, with the event already encoded.

    The ingress passes a stored event's JSON through as it is (``LiveDeliveryHead``): byte for
    byte what ``encode_server_frame`` makes of the parsed event (tested), without parsing it.
    """
    position = b"null" if sync_id is None else str(int(sync_id)).encode()
    return b"".join((b'{"type":"event","sync_id":', position, b',"event":', event_json, b"}"))


class ServerFrameHead(msgspec.Struct, frozen=True):
    """What a client needs to route a server frame before (or instead of) parsing it: its
    ``type``, the ``id`` it answers, and an ``event`` frame's ``sync_id`` and event JSON.

    The SDK parses an ``event`` frame's event alone (``parse_event``), a reply in full only
    when a request waits for it, and nothing more of a reply nobody waits for (the ``ok`` to
    an ``ack``): frames from the server are trusted, the full validation is for what a caller
    is handed.
    """

    type: str
    id: str | None = None
    sync_id: Annotated[int, msgspec.Meta(ge=1)] | None = None
    #: Empty (false) for every frame but ``event`` (msgspec takes no ``Raw | None``).
    event_json: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw, name="event")


_SERVER_FRAME_HEAD = msgspec.json.Decoder(ServerFrameHead)
_ENCODER = msgspec.json.Encoder()


def read_server_frame_head(raw: str | bytes) -> ServerFrameHead:
    """A server frame's head (:class:`ServerFrameHead`); raises ``ValueError`` for a frame
    that is not a JSON object with a string ``type``."""
    return _SERVER_FRAME_HEAD.decode(raw)


def encode_json(frame: dict[str, Any]) -> bytes:
    """A frame built as plain data, as compact JSON bytes (UTF-8 as it is, like pydantic's)."""
    return _ENCODER.encode(frame)

"""Every event that crosses Kafka: one envelope, a typed payload per ``type``, one parser.

An event is a fact that happened (a message was sent, a member was added), written once by the
ingress (or a processor) and read by any number of processors and sinks, possibly years apart
during a replay. Hence the versioning rule, which docs/events.md states for users of the schemas:

* ``schema_version`` is ``"MAJOR.MINOR"``. Within a major version changes are additive only: a new
  optional field, a new event type, a new enum value a reader may ignore. Renaming, removing or
  re-typing a field, or tightening a limit, needs a new major version (and new topics).
* Readers accept unknown fields (``extra="ignore"``) and serialize only the fields they know, so an
  older reader passes a newer event on without the fields it does not understand. A reader refuses
  an event of another major version (a ``SchemaError``; processors dead-letter it).

Identifiers are bounded strings of a safe character set (no ``/``, no spaces): they become Kafka
keys, CQL partition keys and log fields, and the ``/`` separates the parts of a composite key.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Generic, Literal, Self, TypeVar, get_args

import msgspec
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    NonNegativeInt,
    PositiveInt,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, to_json

from schemas.errors import schema_error

#: The version every event written by this code carries.
SCHEMA_VERSION = "1.0"
#: The major version this code reads; an event of another major version is refused.
SCHEMA_MAJOR = 1

MAX_ID_CHARS = 64
MAX_NAME_CHARS = 256
MAX_URL_CHARS = 2048
MAX_PUSH_TOKEN_CHARS = 4096
MAX_PUSH_PROOF_CHARS = 128
#: Upper bound of a message body in UTF-8 bytes: the text of a text body, the compact JSON of a
#: custom body's ``data``. Well inside the default 64 KiB frame limit, so that a body over the
#: limit gets ``body-too-large`` rather than ``frame-too-large``.
MAX_BODY_BYTES = 32 * 1024
#: Integers in a client's input are int64 at most, as every store downstream keeps them (a JSON
#: integer has no bound of its own: 4,300 digits parse).
MIN_INT64 = -(2**63)
MAX_INT64 = 2**63 - 1
#: A conversation's seq: the serving store keeps seqs as CQL ``int`` (32-bit signed), so a seq
#: past it is refused as input rather than failing in the store.
MAX_SEQ = 2**31 - 1
#: How deep a custom body's ``data`` may nest (the frame around it adds three levels).
MAX_CUSTOM_DATA_DEPTH = 32
#: How many users one event may name (a conversation created with its first members).
MAX_MEMBERS_PER_EVENT = 1000
#: Large groups a connect snapshot lists per user (``LiveDelivery.groups``); a user in more gets
#: the others' events from their history only (docs/streams.md, "Large groups").
MAX_LARGE_GROUPS_PER_USER = 1000
#: Members named in a group event's ``synced`` list: the requester and the users it changes.
MAX_SYNCED_PER_GROUP_EVENT = 4
#: The member list a group-delivery record may carry at the switch to read diffusion (the
#: conversation processor writes at most 5,000 per record, more records for a larger group).
MAX_GROUP_SWITCH_MEMBERS = 10_000

_ID_PATTERN = r"^[A-Za-z0-9._:@+=-]+$"
#: Namespace of the deterministic message event ids, fixed forever: changing it changes every id.
_MESSAGE_ID_NAMESPACE = uuid.UUID("9f36bda4-9861-4cc5-b3ba-a49e2f633296")
#: Namespace of direct conversation ids (fixed forever) and their prefix.
_DIRECT_CONVERSATION_NAMESPACE = uuid.UUID("0d6f5a0e-3c1b-4a57-9a55-3f4c2b1e7d90")
DIRECT_CONVERSATION_PREFIX = "dm-"
#: Namespace of the ids processors derive from an input event's id, fixed forever likewise.
_DERIVED_ID_NAMESPACE = uuid.UUID("0b6f1f4e-5b0e-4f6a-9d7c-2f3c1a8e4d55")

Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS, pattern=_ID_PATTERN)]
TenantId = Id
UserId = Id
DeviceId = Id
ConversationId = Id
NodeId = Id
ClientMsgId = Id
EventId = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"),
    Field(description="A UUID in canonical lower-case form (random, or derived: see message ids)"),
]
Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS)]
Url = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_URL_CHARS, pattern=r"^https?://\S+$")
]
#: A position in a conversation (1 for its first entry).
Seq = Annotated[int, Field(ge=1, le=MAX_SEQ)]
#: A count or size a client may state.
Count = Annotated[int, Field(ge=0, le=MAX_INT64)]


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]


def _needs_muted(muted_until: datetime | None, info: ValidationInfo) -> datetime | None:
    if muted_until is not None and info.data.get("muted") is False:
        raise ValueError("muted_until is only meaningful with muted=true")
    return muted_until


#: The end of a mute, shared by the event and the ``mute`` frame (both declare ``muted`` first).
MutedUntil = Annotated[
    UtcDatetime | None,
    AfterValidator(_needs_muted),
    Field(description="When the mute ends; null while muted means until unmuted"),
]


def _readable_version(value: str) -> str:
    major = int(value.split(".", 1)[0])
    if major != SCHEMA_MAJOR:
        raise ValueError(
            f"schema major version {major} cannot be read by this code, which reads "
            f"{SCHEMA_MAJOR}.x"
        )
    return value


SchemaVersion = Annotated[
    str, StringConstraints(pattern=r"^[0-9]{1,4}\.[0-9]{1,4}$"), AfterValidator(_readable_version)
]


def _require_type(schema: dict[str, Any]) -> None:
    """``type`` has a default for Python callers, but on the wire it is always present."""
    required = schema.setdefault("required", [])
    if "type" not in required:
        required.insert(0, "type")


class WireModel(BaseModel):
    """Base of everything on the wire: unknown fields are ignored on read, never written."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class TaggedModel(WireModel):
    """A wire model that is one member of a union discriminated by ``type``."""

    model_config = ConfigDict(json_schema_extra=_require_type)

    type: str


class Platform(StrEnum):
    ANDROID = "android"
    IOS = "ios"
    WEB = "web"
    DESKTOP = "desktop"


class ConversationKind(StrEnum):
    DIRECT = "direct"
    GROUP = "group"


class Role(StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"


class PushProvider(StrEnum):
    APNS = "apns"
    FCM = "fcm"


class PushTokenRemovalReason(StrEnum):
    CLIENT = "client"
    """The device unregistered (logout, uninstall reported by the app)."""
    PROVIDER_REJECTED = "provider-rejected"
    """APNs or FCM answered that the token is no longer valid."""
    MOVED = "moved"
    """Another device of the same user registered the same token (the app was reinstalled
    under a new device id): the token no longer reaches this one."""
    CLAIM_REFUSED = "claim-refused"
    """This device registered a token that a device of another user of the tenant holds: the
    token stays with that device (the registration proves no ownership), this one gets none."""


def _body_too_large(size: int) -> PydanticCustomError:
    return PydanticCustomError(
        "body_too_large",
        "the body is {size} bytes; the limit is {limit} bytes",
        {"size": size, "limit": MAX_BODY_BYTES},
    )


class TextBody(TaggedModel):
    type: Literal["text"] = "text"
    text: Annotated[
        str,
        Field(min_length=1, description=f"At most {MAX_BODY_BYTES} bytes once encoded as UTF-8"),
    ]

    @field_validator("text")
    @classmethod
    def _bounded(cls, text: str) -> str:
        # A character is at most 4 bytes in UTF-8: only long texts need encoding to be measured.
        if len(text) * 4 > MAX_BODY_BYTES and (size := len(text.encode())) > MAX_BODY_BYTES:
            raise _body_too_large(size)
        return text


class CustomBody(TaggedModel):
    """Structured content the server does not interpret (cards, locations, stickers …)."""

    type: Literal["custom"] = "custom"
    kind: Annotated[
        str,
        StringConstraints(min_length=1, max_length=MAX_ID_CHARS, pattern=_ID_PATTERN),
        Field(description="Application-defined kind, e.g. `location` or `card`"),
    ]
    data: Annotated[
        dict[str, JsonValue],
        Field(description=f"At most {MAX_BODY_BYTES} bytes as compact JSON"),
    ]

    @field_validator("data")
    @classmethod
    def _bounded(cls, data: dict[str, JsonValue]) -> dict[str, JsonValue]:
        if (size := len(to_json(data))) > MAX_BODY_BYTES:
            raise _body_too_large(size)
        _check_json_bounds(data)
        return data


def _check_json_bounds(data: JsonValue) -> None:
    """Refuse nesting past ``MAX_CUSTOM_DATA_DEPTH`` and integers outside int64 (iteratively:
    the check itself must not recurse on a hostile depth)."""
    pending: list[tuple[JsonValue, int]] = [(data, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict | list):
            if depth > MAX_CUSTOM_DATA_DEPTH:
                raise ValueError(f"nested deeper than {MAX_CUSTOM_DATA_DEPTH} levels")
            children = value.values() if isinstance(value, dict) else value
            pending.extend((child, depth + 1) for child in children)
        elif isinstance(value, int) and not MIN_INT64 <= value <= MAX_INT64:
            raise ValueError("an integer outside the 64-bit range")


class MediaBody(TaggedModel):
    """A reference to media the client uploaded elsewhere; Kafka never carries the bytes."""

    type: Literal["media"] = "media"
    url: Url
    mime: Annotated[
        str, StringConstraints(max_length=127, pattern=r"^[A-Za-z0-9.+_-]+/[A-Za-z0-9.+_-]+$")
    ]
    size_bytes: Count
    width: Annotated[int, Field(ge=1, le=MAX_INT64)] | None = None
    height: Annotated[int, Field(ge=1, le=MAX_INT64)] | None = None
    duration_ms: Count | None = None
    thumbnail_url: Url | None = None


class WithheldBody(TaggedModel):
    """What the read side serves instead of a body it no longer gives out: the message was
    recalled, or its conversation deleted. Never sent by a client (a ``send`` or ``edit`` with it
    is ``schema-invalid``) and never on a topic: the serving store holds it in place of a
    recalled message's body, and the reads put it in place of every body they withhold."""

    type: Literal["withheld"] = "withheld"


#: The bodies a client sends.
ClientBody = Annotated[TextBody | CustomBody | MediaBody, Field(discriminator="type")]
#: The bodies an event may carry: a client's, or withheld by the read side.
MessageBody = Annotated[
    TextBody | CustomBody | MediaBody | WithheldBody, Field(discriminator="type")
]


class Actor(WireModel):
    """Who caused an event; absent for system events (an operator tool, a processor)."""

    user_id: UserId
    device_id: DeviceId | None = None


P = TypeVar("P", bound=WireModel)


class EventEnvelope(TaggedModel, Generic[P]):
    """The envelope every event shares; subclasses fix ``type`` and the payload model."""

    event_id: EventId
    schema_version: SchemaVersion
    tenant_id: TenantId
    occurred_at: UtcDatetime
    actor: Actor | None = None
    payload: P

    @classmethod
    def new(
        cls,
        *,
        tenant_id: str,
        payload: P,
        actor: Actor | None = None,
        event_id: str | None = None,
        occurred_at: datetime | None = None,
    ) -> Self:
        """A new event of the current schema version, with a random id unless one is given."""
        return cls(
            type=cls.model_fields["type"].default,
            event_id=event_id or str(uuid.uuid4()),
            schema_version=SCHEMA_VERSION,
            tenant_id=tenant_id,
            occurred_at=occurred_at or datetime.now(UTC),
            actor=actor,
            payload=payload,
        )


def direct_conversation_id(tenant_id: str, user_a: str, user_b: str) -> str:
    """The one id of the direct conversation between two users of a tenant, whoever creates it:
    creating it twice (or from both sides at once) names the same conversation."""
    first, second = sorted((user_a, user_b))
    derived = uuid.uuid5(_DIRECT_CONVERSATION_NAMESPACE, f"{tenant_id}/{first}/{second}")
    return f"{DIRECT_CONVERSATION_PREFIX}{derived.hex}"


def message_event_id(tenant_id: str, sender_id: str, client_msg_id: str) -> str:
    """The event id of a ``message.sent``, derived from what makes a send unique.

    A client retries a send with the same ``client_msg_id``; deriving the id (UUID v5) gives every
    retry the same id, so the id the ingress reports in ``accepted`` is the message's id whichever
    attempt the sequencer keeps.
    """
    return str(uuid.uuid5(_MESSAGE_ID_NAMESPACE, f"{tenant_id}/{sender_id}/{client_msg_id}"))


# ---------------------------------------------------------------------------------------------
# Messages: conversation-keyed, sequenced, then re-published with conversation_seq set
# ---------------------------------------------------------------------------------------------

ConversationSeq = Annotated[
    Seq | None,
    Field(description="Position in the conversation; null until the sequencer assigns it"),
]


class MessageSentPayload(WireModel):
    conversation_id: ConversationId
    client_msg_id: ClientMsgId
    body: MessageBody
    conversation_seq: ConversationSeq = None


class MessageSent(EventEnvelope[MessageSentPayload]):
    """A user sent a message. The message's id is this event's ``event_id``."""

    type: Literal["message.sent"] = "message.sent"
    actor: Actor


class MessageRecalledPayload(WireModel):
    conversation_id: ConversationId
    message_id: EventId
    conversation_seq: ConversationSeq = None


class MessageRecalled(EventEnvelope[MessageRecalledPayload]):
    """The sender (or a conversation admin) withdrew a message."""

    type: Literal["message.recalled"] = "message.recalled"
    actor: Actor


class MessageEditedPayload(WireModel):
    conversation_id: ConversationId
    message_id: EventId
    body: MessageBody
    conversation_seq: ConversationSeq = None


class MessageEdited(EventEnvelope[MessageEditedPayload]):
    """The sender replaced the body of a message."""

    type: Literal["message.edited"] = "message.edited"
    actor: Actor


# ---------------------------------------------------------------------------------------------
# Conversations: lifecycle and membership, conversation-keyed
# ---------------------------------------------------------------------------------------------


class ConversationCreatedPayload(WireModel):
    conversation_id: ConversationId
    kind: ConversationKind
    members: Annotated[
        list[UserId],
        Field(
            min_length=1,
            max_length=MAX_MEMBERS_PER_EVENT,
            description="Every member, the creator included; a direct conversation has two",
        ),
    ]
    owner_id: UserId | None = Field(
        default=None, description="The group's first owner (a member); null for direct"
    )
    name: Name | None = None

    @field_validator("members")
    @classmethod
    def _members_fit_kind(cls, members: list[str], info: ValidationInfo) -> list[str]:
        if len(set(members)) != len(members):
            raise ValueError("members must not repeat a user")
        if info.data.get("kind") is ConversationKind.DIRECT and len(members) != 2:
            raise ValueError("a direct conversation has exactly two members")
        return members

    @field_validator("owner_id")
    @classmethod
    def _owner_is_member(cls, owner_id: str | None, info: ValidationInfo) -> str | None:
        if owner_id is None:
            return None
        if info.data.get("kind") is ConversationKind.DIRECT:
            raise ValueError("a direct conversation has no owner")
        if owner_id not in info.data.get("members", [owner_id]):
            raise ValueError("the owner must be one of the members")
        return owner_id


class ConversationCreated(EventEnvelope[ConversationCreatedPayload]):
    type: Literal["conversation.created"] = "conversation.created"


class ConversationRenamedPayload(WireModel):
    conversation_id: ConversationId
    name: Name


class ConversationRenamed(EventEnvelope[ConversationRenamedPayload]):
    type: Literal["conversation.renamed"] = "conversation.renamed"


class ConversationMemberAddedPayload(WireModel):
    conversation_id: ConversationId
    user_id: UserId
    role: Role = Role.MEMBER
    name: Name | None = Field(
        default=None,
        description="The group's name when the member joined (null if it has none); set by the "
        "sequencer, so that the new member's conversation list can show it",
    )
    last_seq: NonNegativeInt | None = Field(
        default=None,
        description="The conversation's last seq when the member joined; set by the sequencer: "
        "the new member's read position starts there (what came before is history, not unread)",
    )


class ConversationMemberAdded(EventEnvelope[ConversationMemberAddedPayload]):
    type: Literal["conversation.member_added"] = "conversation.member_added"


class ConversationMemberRemovedPayload(WireModel):
    conversation_id: ConversationId
    user_id: UserId
    last_seq: NonNegativeInt | None = Field(
        default=None,
        description="The conversation's last seq when the member went; set by the sequencer: "
        "the former member still reads the history up to it, and nothing after it",
    )


class ConversationMemberRemoved(EventEnvelope[ConversationMemberRemovedPayload]):
    """A member was removed by someone else (leaving is ``conversation.left``)."""

    type: Literal["conversation.member_removed"] = "conversation.member_removed"


class ConversationMemberRoleChangedPayload(WireModel):
    conversation_id: ConversationId
    user_id: UserId
    role: Role


class ConversationMemberRoleChanged(EventEnvelope[ConversationMemberRoleChangedPayload]):
    type: Literal["conversation.member_role_changed"] = "conversation.member_role_changed"


class ConversationLeftPayload(WireModel):
    conversation_id: ConversationId
    user_id: UserId
    last_seq: NonNegativeInt | None = Field(
        default=None,
        description="The conversation's last seq when the member went; set by the sequencer: "
        "the former member still reads the history up to it, and nothing after it",
    )


class ConversationLeft(EventEnvelope[ConversationLeftPayload]):
    type: Literal["conversation.left"] = "conversation.left"


class ConversationDeletedPayload(WireModel):
    conversation_id: ConversationId


class ConversationDeleted(EventEnvelope[ConversationDeletedPayload]):
    type: Literal["conversation.deleted"] = "conversation.deleted"


# ---------------------------------------------------------------------------------------------
# Read receipts (conversation-keyed) and a user's own state (user-keyed by the actor)
# ---------------------------------------------------------------------------------------------


class ReceiptReadPayload(WireModel):
    conversation_id: ConversationId
    conversation_seq: Annotated[
        Seq, Field(description="The actor has read every message up to this one")
    ]


class ReceiptRead(EventEnvelope[ReceiptReadPayload]):
    type: Literal["receipt.read"] = "receipt.read"
    actor: Actor


class ConversationMuteChangedPayload(WireModel):
    conversation_id: ConversationId
    muted: bool
    muted_until: MutedUntil = None


class ConversationMuteChanged(EventEnvelope[ConversationMuteChangedPayload]):
    type: Literal["conversation.mute_changed"] = "conversation.mute_changed"
    actor: Actor


#: Local wall-clock time of day, 24-hour ``HH:MM``.
_LOCAL_TIME = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
#: The shape of an IANA time zone name (``Europe/Berlin``, ``America/Argentina/Buenos_Aires``,
#: ``UTC``); whether the zone exists is checked where a client sets it (``schemas.frames``), not
#: here: a reader with an older time-zone database must not refuse an event already recorded.
_TIME_ZONE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$")
MAX_TIME_ZONE_CHARS = 64
#: A BCP 47 language tag as far as notifications need one: language, optional script, optional
#: region, optional variants (``en``, ``de-AT``, ``zh-Hant-TW``, ``sr-Latn``, ``es-419``).
_LOCALE = re.compile(
    r"^[A-Za-z]{2,3}(-[A-Za-z]{4})?(-([A-Za-z]{2}|[0-9]{3}))?(-([A-Za-z0-9]{5,8}|[0-9][A-Za-z0-9]{3}))*$"
)
MAX_LOCALE_CHARS = 35
DEFAULT_LOCALE = "en"


def _local_time(value: str) -> str:
    if not _LOCAL_TIME.match(value):
        raise ValueError(f"{value!r} is not a local time of day: give HH:MM, 24-hour (e.g. 22:00)")
    return value


def _time_zone_name(value: str) -> str:
    if len(value) > MAX_TIME_ZONE_CHARS or not _TIME_ZONE_NAME.match(value):
        raise ValueError(f"{value!r} is not an IANA time zone name (e.g. Europe/Berlin)")
    return value


def _locale(value: str) -> str:
    if len(value) > MAX_LOCALE_CHARS or not _LOCALE.match(value):
        raise ValueError(f"{value!r} is not a BCP 47 language tag (e.g. en, de-AT, zh-Hant-TW)")
    return value


LocalTime = Annotated[
    str,
    AfterValidator(_local_time),
    Field(
        description="Local wall-clock time of day, HH:MM (24-hour)",
        json_schema_extra={"pattern": _LOCAL_TIME.pattern},
    ),
]
TimeZoneName = Annotated[
    str,
    AfterValidator(_time_zone_name),
    Field(
        description="An IANA time zone name, e.g. Europe/Berlin",
        json_schema_extra={"pattern": _TIME_ZONE_NAME.pattern, "maxLength": MAX_TIME_ZONE_CHARS},
    ),
]
Locale = Annotated[
    str,
    AfterValidator(_locale),
    Field(
        description="A BCP 47 language tag, e.g. de-AT",
        json_schema_extra={"pattern": _LOCALE.pattern, "maxLength": MAX_LOCALE_CHARS},
    ),
]


class QuietHoursSetting(WireModel):
    """A daily window of the user's local time in which pushes arrive without sound: ``start``
    included, ``end`` excluded; a window whose end is not after its start wraps midnight."""

    start: LocalTime
    end: LocalTime
    time_zone: TimeZoneName

    @field_validator("end")
    @classmethod
    def _not_empty(cls, end: str, info: ValidationInfo) -> str:
        if end == info.data.get("start"):
            raise ValueError("quiet hours that start when they end are empty: send null for none")
        return end


class UserPushSettingsChangedPayload(WireModel):
    """All of the user's push preferences at once: each change replaces the previous ones."""

    muted: bool = Field(default=False, description="No push at all while muted")
    muted_until: MutedUntil = None
    quiet_hours: QuietHoursSetting | None = Field(
        default=None, description="Pushes arrive silently inside this window; null for none"
    )
    locale: Locale | None = Field(
        default=None,
        description=f"The language of the notifications' titles; null for {DEFAULT_LOCALE!r}",
    )


class UserPushSettingsChanged(EventEnvelope[UserPushSettingsChangedPayload]):
    """The actor set their push preferences, for all of their devices."""

    type: Literal["user.push_settings_changed"] = "user.push_settings_changed"
    actor: Actor


class BadgeClearedPayload(WireModel):
    conversation_id: ConversationId | None = Field(
        default=None, description="The conversation whose unread badge is cleared; null for all"
    )


class BadgeCleared(EventEnvelope[BadgeClearedPayload]):
    type: Literal["badge.cleared"] = "badge.cleared"
    actor: Actor


# ---------------------------------------------------------------------------------------------
# Ephemeral: routed to online devices, never stored
# ---------------------------------------------------------------------------------------------


class TypingChangedPayload(WireModel):
    conversation_id: ConversationId
    active: bool


class TypingChanged(EventEnvelope[TypingChangedPayload]):
    type: Literal["typing.changed"] = "typing.changed"
    actor: Actor


# ---------------------------------------------------------------------------------------------
# Devices: presence (user-keyed, in order per user) and push tokens (device-keyed, compacted)
# ---------------------------------------------------------------------------------------------


class DevicePresencePayload(WireModel):
    user_id: UserId
    device_id: DeviceId
    platform: Platform
    node_id: Annotated[NodeId, Field(description="The ingress node holding the connection")]
    connection_id: Annotated[
        Id,
        Field(description="Unique per connection, so a late disconnect of an old one is ignored"),
    ]


class DeviceConnected(EventEnvelope[DevicePresencePayload]):
    type: Literal["device.connected"] = "device.connected"


class DeviceDisconnected(EventEnvelope[DevicePresencePayload]):
    type: Literal["device.disconnected"] = "device.disconnected"


class NodeLeasePayload(WireModel):
    node_id: Annotated[NodeId, Field(description="The ingress node renewing its lease")]
    started_at: Annotated[
        UtcDatetime,
        Field(
            description="When this run of the node started: a device connected before it was "
            "held by an earlier run (one killed before it said goodbye)"
        ),
    ]
    lease_ms: Annotated[
        int,
        Field(
            gt=0,
            le=86_400_000,
            description="How long after `occurred_at` the node's devices count as online "
            "without a newer renewal",
        ),
    ]


class NodeLeaseRenewed(EventEnvelope[NodeLeasePayload]):
    """An ingress node is alive and holds its connections: published every
    ``IM_INGRESS__PRESENCE_RENEW_SECONDS`` to every partition of the presence topic, so that
    every user partition learns it in order with its devices' presence. A device whose node's
    lease lapsed counts as offline (docs/architecture.md, "Presence"). Tenant
    ``SYSTEM_TENANT``, no actor."""

    type: Literal["node.lease_renewed"] = "node.lease_renewed"


class PushTokenPayload(WireModel):
    user_id: UserId
    device_id: DeviceId
    provider: PushProvider
    token: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PUSH_TOKEN_CHARS)]
    app_id: Annotated[
        str,
        StringConstraints(min_length=1, max_length=MAX_NAME_CHARS),
        Field(description="APNs bundle id (topic) or FCM application id: one of the tenant's"),
    ]


class PushTokenRegisteredPayload(PushTokenPayload):
    proof: Annotated[
        str | None,
        StringConstraints(min_length=1, max_length=MAX_PUSH_PROOF_CHARS),
        Field(
            description="The challenge the push sink sent to this token, echoed: proof that the "
            "device receives the token's pushes (needed to take a token another user's device "
            "holds)"
        ),
    ] = None


class PushTokenRegistered(EventEnvelope[PushTokenRegisteredPayload]):
    type: Literal["push_token.registered"] = "push_token.registered"


class PushTokenRemovedPayload(PushTokenPayload):
    reason: PushTokenRemovalReason = PushTokenRemovalReason.CLIENT


class PushTokenRemoved(EventEnvelope[PushTokenRemovedPayload]):
    type: Literal["push_token.removed"] = "push_token.removed"


# ---------------------------------------------------------------------------------------------
# Written by the stream processors into users' sync queues
# ---------------------------------------------------------------------------------------------


class ConversationAdvancedPayload(WireModel):
    """Large groups (read diffusion): the conversation has a new entry; read it from history."""

    conversation_id: ConversationId
    conversation_seq: Seq
    message_id: EventId
    sender_id: UserId
    entry_type: Annotated[
        Literal["message.sent", "message.recalled", "message.edited"],
        Field(description="The type of the timeline entry at conversation_seq"),
    ]


class ConversationAdvanced(EventEnvelope[ConversationAdvancedPayload]):
    """Instead of the whole message, members of a group above the large-group threshold get this
    light event and page the conversation's history for the body."""

    type: Literal["conversation.advanced"] = "conversation.advanced"


class CommandRejectedPayload(WireModel):
    command_event_id: EventId
    command_type: Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]
    conversation_id: ConversationId | None = None
    reason: Annotated[
        str,
        StringConstraints(min_length=1, max_length=MAX_ID_CHARS),
        Field(description="A stable reason code, e.g. not-a-member (see docs/events.md)"),
    ]


class CommandRejected(EventEnvelope[CommandRejectedPayload]):
    """A command the ingress accepted was refused by a processor (authorization, state); it
    reaches the requesting user's devices through the sync queue."""

    type: Literal["command.rejected"] = "command.rejected"


# ---------------------------------------------------------------------------------------------
# Written by the operator tools (``imstream dlq redrive`` …) into the operator-actions topic
# ---------------------------------------------------------------------------------------------

#: The tenant of events that belong to no tenant (operator actions): every envelope names one,
#: and a leading ``_`` keeps it apart from the tenants clients use.
SYSTEM_TENANT = "_system"
MAX_COMMAND_CHARS = 128


class OperatorOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    """The command did all it was asked."""
    INTERRUPTED = "interrupted"
    """Stopped before the end (Ctrl-C, a limit); running it again continues."""
    FAILED = "failed"
    """Stopped by an error; ``error`` says which."""


class OperatorActionPayload(WireModel):
    operator: Annotated[
        Id, Field(description="Who ran the command: `--operator`, else the login name")
    ]
    command: Annotated[
        str,
        StringConstraints(min_length=1, max_length=MAX_COMMAND_CHARS),
        Field(description="The command, e.g. `dlq redrive`"),
    ]
    arguments: Annotated[
        dict[str, JsonValue], Field(description="The command's arguments and options, by name")
    ]
    counts: Annotated[
        dict[str, NonNegativeInt],
        Field(description='What the command did, e.g. `{"redriven": 12, "skipped": 3}`'),
    ]
    outcome: OperatorOutcome
    error: Annotated[
        str | None,
        StringConstraints(max_length=1000),
        Field(description="Why it failed, when it did"),
    ] = None


class OperatorAction(EventEnvelope[OperatorActionPayload]):
    """An operator ran a command that changes data (a redrive, a replay …): the audit trail of
    who did what, when, with which result. Tenant ``SYSTEM_TENANT``, no actor."""

    type: Literal["operator.action"] = "operator.action"


class RevocationScope(StrEnum):
    TOKEN = "token"
    """One token, by its ``jti``."""
    USER = "user"
    """Every token of the user issued before ``issued_before`` (a forced logout everywhere)."""
    DEVICE = "device"
    """Every token of the user issued before ``issued_before`` used by one device."""


#: The longest ``jti`` a revocation can name (tokens with a longer one are refused).
MAX_TOKEN_ID_CHARS = 256
MAX_REASON_CHARS = 500


class TokensRevokedPayload(WireModel):
    scope: RevocationScope
    token_id: Annotated[
        str | None,
        StringConstraints(min_length=1, max_length=MAX_TOKEN_ID_CHARS),
        Field(description="The revoked token's `jti` (scope `token`)"),
    ] = None
    user_id: Annotated[
        UserId | None, Field(description="The user whose tokens are revoked (scopes user, device)")
    ] = None
    device_id: Annotated[
        DeviceId | None, Field(description="The device whose tokens are revoked (scope device)")
    ] = None
    issued_before: Annotated[
        UtcDatetime | None,
        Field(description="Tokens with an earlier `iat` are revoked (scopes user, device)"),
    ] = None
    operator: Annotated[Id, Field(description="Who revoked: `--operator`, else the login name")]
    reason: Annotated[
        str | None,
        StringConstraints(max_length=MAX_REASON_CHARS),
        Field(description="Why, for the audit"),
    ] = None

    @model_validator(mode="after")
    def _names_its_subject(self) -> Self:
        wanted = {
            RevocationScope.TOKEN: ("token_id",),
            RevocationScope.USER: ("user_id", "issued_before"),
            RevocationScope.DEVICE: ("user_id", "device_id", "issued_before"),
        }[self.scope]
        for name in ("token_id", "user_id", "device_id", "issued_before"):
            if (getattr(self, name) is not None) != (name in wanted):
                needs = ", ".join(wanted)
                raise ValueError(f"a revocation of scope {self.scope} names exactly {needs}")
        return self


class TokensRevoked(EventEnvelope[TokensRevokedPayload]):
    """An operator revoked tokens (``imstream revoke``): every ingress node refuses them and
    closes the sockets that use them. Tenant: the user's, or ``SYSTEM_TENANT`` for a token
    revoked by ``jti`` alone (it then matches in every tenant). No actor."""

    type: Literal["tokens.revoked"] = "tokens.revoked"


def derived_event_id(source_event_id: str, role: str) -> str:
    """The id of an event a processor derives from ``source_event_id`` (UUID v5): processing the
    same input again derives the same id, which is what makes re-processing harmless."""
    return str(uuid.uuid5(_DERIVED_ID_NAMESPACE, f"{source_event_id}/{role}"))


# ---------------------------------------------------------------------------------------------
# The union and its parser
# ---------------------------------------------------------------------------------------------

Event = Annotated[
    MessageSent
    | MessageRecalled
    | MessageEdited
    | ConversationCreated
    | ConversationRenamed
    | ConversationMemberAdded
    | ConversationMemberRemoved
    | ConversationMemberRoleChanged
    | ConversationLeft
    | ConversationDeleted
    | ReceiptRead
    | ConversationMuteChanged
    | BadgeCleared
    | UserPushSettingsChanged
    | TypingChanged
    | DeviceConnected
    | DeviceDisconnected
    | NodeLeaseRenewed
    | PushTokenRegistered
    | PushTokenRemoved
    | ConversationAdvanced
    | CommandRejected
    | OperatorAction
    | TokensRevoked,
    Field(discriminator="type"),
]

#: Every event model by its ``type``, in catalog order.
EVENT_MODELS: dict[str, type[EventEnvelope[Any]]] = {
    model.model_fields["type"].default: model for model in get_args(get_args(Event)[0])
}
EVENT_TYPES: tuple[str, ...] = tuple(EVENT_MODELS)

_EVENT = TypeAdapter[Event](Event)


def parse_event(raw: bytes | str) -> Event:
    """Decode any event; raises ``SchemaError`` naming the code and the offending field path."""
    try:
        return _EVENT.validate_json(raw)
    except ValidationError as error:
        raise schema_error(error, raw, what="event", known_types=EVENT_TYPES) from None


def encode_event(event: Event) -> bytes:
    """The event as compact JSON bytes, the value of its Kafka record."""
    return _EVENT.dump_json(event)


# ---------------------------------------------------------------------------------------------
# Records that carry events without being events
# ---------------------------------------------------------------------------------------------


class LiveDelivery(WireModel):
    """A record of the live-delivery topic: hand ``event`` to these devices on ``node_id``.

    Live delivery is an optimisation over the sync queue: a lost record is recovered by the
    device's next sync, so the ingress node consumes it without a dead-letter topic.
    """

    node_id: NodeId
    tenant_id: TenantId
    user_id: UserId
    device_ids: list[DeviceId] | None = Field(
        default=None, description="The devices to reach; null for all of the user's devices"
    )
    sync_id: PositiveInt | None = Field(
        default=None, description="The event's place in the user's sync queue; null if ephemeral"
    )
    event: Event
    groups: dict[ConversationId, NonNegativeInt] | None = Field(
        default=None,
        max_length=MAX_LARGE_GROUPS_PER_USER,
        description="Set on the record answering a device's connect (its event is that "
        "device.connected, not for the device): the user's large groups, each with the "
        "conversation position of the last event the user got from it. The node delivers "
        "those groups' later events (im.delivery.groups) to the user's devices",
    )


def parse_live_delivery(raw: bytes | str) -> LiveDelivery:
    """Decode a live-delivery record; raises ``SchemaError`` like ``parse_event``."""
    try:
        return LiveDelivery.model_validate_json(raw)
    except ValidationError as error:
        raise schema_error(error, raw, what="record", known_types=()) from None


def encode_live_delivery(delivery: LiveDelivery) -> bytes:
    return delivery.model_dump_json().encode()


class LiveDeliveryHead(msgspec.Struct, frozen=True):
    """A live-delivery record as the ingress reads it: the addressing decoded, the event left
    as the JSON the stream worker wrote (``event_json``), to go into the ``event`` frame as it
    is (``schemas.frames.encode_event_frame``).

    The worker validated the event and the record when it built them, so the node does not
    validate them again: decoding and re-encoding the event with pydantic was most of what a
    live frame cost the node. A record that is not JSON or lacks an addressing field still
    fails to decode (``msgspec.DecodeError``, a ``ValueError``).
    """

    node_id: str
    tenant_id: str
    user_id: str
    event_json: msgspec.Raw = msgspec.field(name="event")
    device_ids: list[str] | None = None
    sync_id: int | None = None
    groups: dict[str, int] | None = None


_LIVE_DELIVERY_HEAD = msgspec.json.Decoder(LiveDeliveryHead)


def read_live_delivery(raw: bytes) -> LiveDeliveryHead:
    """A live-delivery record's addressing and its event's JSON, unvalidated (see
    :class:`LiveDeliveryHead`); raises ``ValueError`` if it is not such a record."""
    return _LIVE_DELIVERY_HEAD.decode(raw)


class InboxRecord(WireModel):
    """A record of the user inbox topic: one event the conversation processor addresses to one
    user. ``position`` increases per conversation; the user processor applies each position once."""

    tenant_id: TenantId
    user_id: UserId
    conversation_id: ConversationId
    position: NonNegativeInt = Field(
        description="0 for ephemeral events, which are not deduplicated"
    )
    ephemeral: bool = False
    event: Event
    large: bool | None = Field(
        default=None,
        description="Set while the conversation is a large group (read diffusion: true) and "
        "on the event that switches it back (false); null otherwise",
    )
    last_seq: NonNegativeInt | None = Field(
        default=None,
        description="With large=false: the conversation's last seq at the switch back to "
        "write diffusion, which the user's view catches up to",
    )


def encode_inbox(
    *,
    tenant_id: str,
    user_id: str,
    conversation_id: str,
    position: int,
    ephemeral: bool,
    event_json: bytes,
    large: bool | None = None,
    last_seq: int | None = None,
) -> bytes:
    """``InboxRecord(...).model_dump_json()`` with the event already encoded (``encode_event``).

    Fan-out addresses one event to every member: encoding it once instead of once per member is
    most of the conversation processor's time for groups. The output is byte-identical to the
    model's (tested), and the identifiers are validated where they enter the system.
    """
    return b"".join(
        (
            b'{"tenant_id":',
            to_json(tenant_id),
            b',"user_id":',
            to_json(user_id),
            b',"conversation_id":',
            to_json(conversation_id),
            b',"position":',
            str(int(position)).encode(),
            b',"ephemeral":',
            b"true" if ephemeral else b"false",
            b',"event":',
            event_json,
            b',"large":',
            b"null" if large is None else b"true" if large else b"false",
            b',"last_seq":',
            b"null" if last_seq is None else str(int(last_seq)).encode(),
            b"}",
        )
    )


class GroupDelivery(WireModel):
    """A record of the group-delivery topic: one event of a large group (read diffusion).

    Instead of one sync-queue record per member, a large group's event is written once, keyed by
    conversation; every ingress node reads the whole topic and hands the event to the member
    devices it holds (docs/streams.md, "Large groups"). Like live delivery it is best effort: a
    device recovers what it missed from the conversation's history.
    """

    tenant_id: TenantId
    conversation_id: ConversationId
    position: NonNegativeInt = Field(
        description="The conversation's position after this event (0 for an ephemeral one): "
        "a node compares it with the position a member's snapshot was taken at"
    )
    ephemeral: bool = False
    large: bool = Field(
        default=True,
        description="False on the event that switches the group back to write diffusion: "
        "nodes forget the group, its members get its events in their sync queues again",
    )
    synced: list[UserId] = Field(
        default_factory=list,
        max_length=MAX_SYNCED_PER_GROUP_EVENT,
        description="Members who get this event in their own sync queues (the sender, the "
        "requester, the member added or removed): nodes skip them",
    )
    members: list[UserId] | None = Field(
        default=None,
        max_length=MAX_GROUP_SWITCH_MEMBERS,
        description="The whole member list, on the event that switches the group to read "
        "diffusion (it is just above the threshold then): nodes index their members",
    )
    event: Event


def parse_group_delivery(raw: bytes | str) -> GroupDelivery:
    """Decode a group-delivery record; raises ``SchemaError`` like ``parse_event``."""
    try:
        return GroupDelivery.model_validate_json(raw)
    except ValidationError as error:
        raise schema_error(error, raw, what="record", known_types=()) from None


class ConversationSummary(WireModel):
    """How one conversation stands for one user right after a sync entry was applied: what a
    conversation list shows. The user processor computes it; sinks store the latest one."""

    conversation_id: ConversationId
    last_seq: NonNegativeInt = Field(description="The conversation's last seq the user knows of")
    read_seq: NonNegativeInt = Field(description="The user has read up to this seq")
    unread: NonNegativeInt = Field(description="Messages from others after read_seq")
    muted: bool = False
    muted_until: datetime | None = None
    large: bool = Field(
        default=False,
        description="A large group (read diffusion): its other members' messages are not in "
        "the sync queue; last_seq and unread come from the conversation's head",
    )


class SyncRecord(WireModel):
    """A record of the sync-events topic: the user's queue entry ``sync_id``."""

    tenant_id: TenantId
    user_id: UserId
    sync_id: PositiveInt
    event: Event
    conversation: ConversationSummary | None = Field(
        default=None,
        description="The entry's conversation as the user sees it after this entry; null for "
        "entries that concern no conversation",
    )


class PushJob(WireModel):
    """A record of the push-jobs topic: notify a user with no online device; the push sender
    (APNs/FCM) consumes it. ``job_id`` is derived, so a re-emitted job is recognisable. The
    user's quiet hours and locale travel with the job (optional, additive), so the sender needs
    no store of preferences; a muted user gets no job at all."""

    job_id: EventId
    tenant_id: TenantId
    user_id: UserId
    conversation_id: ConversationId
    conversation_seq: Seq
    message_id: EventId
    sender_id: UserId
    body: MessageBody | None = Field(
        default=None, description="The message, for previews; null in large groups"
    )
    merged_count: PositiveInt = Field(description="Messages this push stands for (collapsed)")
    unread_total: NonNegativeInt = Field(description="The user's unread count: the badge")
    occurred_at: UtcDatetime
    quiet_hours: QuietHoursSetting | None = Field(
        default=None, description="The user's quiet hours: inside them the push is silent"
    )
    locale: Locale = Field(
        default=DEFAULT_LOCALE, description="The user's language for the notification's title"
    )


class PushAttemptOutcome(StrEnum):
    """What one push attempt came to (the push sender's ``OutcomeKind`` values, and ``skipped``)."""

    SENT = "sent"
    INVALID_TOKEN = "invalid_token"
    THROTTLED = "throttled"
    FAILED = "failed"
    SKIPPED = "skipped"
    """Nothing was sent: see ``reason`` (e.g. ``no-device-token``, ``provider-not-configured``,
    ``user-muted``, ``expired``)."""


class PushOutcomeRecord(WireModel):
    """A record of the push-outcomes topic: one attempt to deliver one push job to one device
    (or, with ``attempt`` 0 and ``outcome`` ``skipped``, why nothing was attempted). The
    ClickHouse sink stores it in ``push_outcomes``, keyed by (job, device, attempt)."""

    job_id: EventId
    tenant_id: TenantId
    user_id: UserId
    conversation_id: ConversationId
    message_id: EventId
    job_occurred_at: UtcDatetime = Field(description="The push job's occurred_at")
    device_id: DeviceId | None = Field(
        default=None, description="The device attempted; null when the job reached no device"
    )
    provider: PushProvider | None = Field(
        default=None, description="apns or fcm; null when the job reached no device"
    )
    attempt: NonNegativeInt = Field(
        description="1 for the first attempt to the device; 0 when nothing was attempted"
    )
    outcome: PushAttemptOutcome
    status_code: Annotated[int, Field(ge=100, le=599)] | None = Field(
        default=None, description="The provider's HTTP status; null when it did not answer"
    )
    reason: Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)] | None = Field(
        default=None, description="The provider's reason or the sender's own, if any"
    )
    attempted_at: UtcDatetime

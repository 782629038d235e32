"""The topic catalog: every Kafka topic, its key, partitions, retention and dead-letter topic.

This module is the only place a topic name is spelled; code asks the catalog
(``topic_catalog(settings).messages_in.name``). ``pipelines/topics.py`` applies the catalog to a
cluster and docs/events.md explains it.

Keys and placement
  Keys are UTF-8 strings whose parts are joined by ``/`` (identifiers never contain one, see
  schemas/events.py) and always start with the tenant, so that keys of different tenants never
  merge in a compacted topic. Records are placed with Kafka's murmur2 partitioner (the Java
  client's default): confluent-kafka producers must set
  ``partitioner=KAFKA_PARTITIONER``, or a key would land on a different partition than the one
  other clients (and the processors' state partitions) expect.

Co-partitioning
  All conversation-keyed topics share one partition count, and so do all user-keyed ones: a
  conversation's (or user's) records then sit in partitions with the same number in every topic
  of its group, which is what lets one processor join them with its state (the
  ``im.state.*`` topics, co-partitioned the same way). The catalog refuses
  overrides that break this.

Live delivery
  One topic keyed by the ingress node id. The node that holds the sockets consumes only the
  partition its id hashes to (``partition_for_key(gateway_key(node_id), partitions)``, assigned
  without a consumer group) and skips records keyed for other nodes that share the partition.
  One topic keeps the catalog static as nodes come and go (a topic per node would not), and
  hashing needs no registry of node numbers; give the topic more partitions than nodes to keep
  sharing rare. It is best-effort: a device recovers anything it missed by syncing.

Revocations
  One compacted topic of ``tokens.revoked`` events, keyed by what they revoke
  (``revocation_key``: ``tenant/token/jti``, ``tenant/user/user`` or
  ``tenant/device/user/device``), so a newer revocation of the same subject replaces the older
  one. Every ingress node reads all of it from the beginning at start-up, without a consumer
  group, and keeps following it (ingress/revocations.py). A revocation matters only until every
  token it can match has expired (its moment plus the maximum token lifetime), so the topic also
  deletes records older than that (``compact,delete``, retention the maximum token lifetime plus
  three leeways, rounded up to whole days): nobody needs to write tombstones, and the topic
  stays about as small as the set of revocations in force.

Dead letters
  One dead-letter topic per source topic (``<name>.dlq``), holding the original key and value
  with the reason in headers. Per-source topics keep replay simple (fix the cause, re-publish the
  dead-letter topic into its source) and keep retention and access per source. The two ephemeral
  topics (typing, live delivery) have none: a poison record there is logged and dropped, since
  re-delivering it later would have no meaning. Nor have the push-outcomes and operator-actions
  topics: their only reader is the audit (ClickHouse), which audits a poison record as
  undecodable and never dead-letters; nor has the revocation topic, whose readers (the ingress
  nodes) log and skip a poison record.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from enum import StrEnum
from typing import Protocol

from schemas.events import Event, RevocationScope, TokensRevoked

#: librdkafka's name for Kafka's murmur2 partitioner (null keys spread at random).
KAFKA_PARTITIONER = "murmur2_random"
KEY_SEPARATOR = "/"
DEAD_LETTER_SUFFIX = ".dlq"

#: Partition counts sized for one machine; override per topic through ``topic_catalog``. The
#: conversation-keyed and user-keyed topics take theirs from the settings
#: (``IM_KAFKA__CONVERSATION_PARTITIONS``, ``IM_KAFKA__USER_PARTITIONS``, 6 each).
GATEWAY_PARTITIONS = 4
DEVICE_PARTITIONS = 3
DEAD_LETTER_PARTITIONS = 1
OPERATOR_PARTITIONS = 1
#: Every ingress node reads every partition: one keeps its start-up read a single fetch.
REVOCATION_PARTITIONS = 1
DEAD_LETTER_RETENTION = timedelta(days=30)
#: The topic-level configs the catalog sets; every other config keeps the broker's default.
MANAGED_CONFIGS = frozenset({"cleanup.policy", "retention.ms", "min.insync.replicas", "segment.ms"})


class KeyKind(StrEnum):
    """What a topic's record key is, which decides what is ordered and what is compacted."""

    CONVERSATION = "conversation"
    """``tenant/conversation``: one conversation's records stay in order."""
    USER = "user"
    """``tenant/user``: one user's records stay in order (the sync queue)."""
    DEVICE = "device"
    """``tenant/user/device``: compaction keeps the latest state of each device."""
    GATEWAY = "gateway"
    """``node``: records go to the ingress node that holds the device's socket."""
    MESSAGE = "message"
    """A message id, placed explicitly on its conversation's partition (the message state)."""
    OPERATOR = "operator"
    """The operator's name: one operator's actions stay in order."""
    REVOCATION = "revocation"
    """``tenant/scope/subject``: compaction keeps the latest revocation of each subject."""
    NONE = "none"
    """Dead letters keep the original key, but nothing depends on their placement."""


class CleanupPolicy(StrEnum):
    DELETE = "delete"
    COMPACT = "compact"
    COMPACT_DELETE = "compact,delete"


@dataclass(frozen=True, slots=True)
class Topic:
    """One topic as the catalog wants it on the cluster."""

    logical_name: str
    name: str
    key: KeyKind
    partitions: int
    replication: int
    cleanup: CleanupPolicy
    retention: timedelta | None
    """How long records are kept; ``None`` keeps them forever (compacted state)."""
    dead_letter: str | None
    """The full name of this topic's dead-letter topic, if it has one."""
    description: str
    events: tuple[str, ...] = ()
    """The event types carried, by ``type``."""
    ingress: bool = False
    """Written by the ingress (client commands and device state) rather than by a processor."""
    segment: timedelta | None = None
    """Segment roll time, for short-lived topics: retention only deletes whole, closed segments."""

    @property
    def min_insync_replicas(self) -> int:
        """How many replicas must have a write before ``acks=all`` succeeds: the durable accept
        of the delivery contract survives one broker loss at replication 3."""
        return max(1, min(2, self.replication - 1))

    def configs(self) -> dict[str, str]:
        """This topic's values of ``MANAGED_CONFIGS`` (``segment.ms`` only when it is set)."""
        configs = {
            "cleanup.policy": self.cleanup.value,
            "retention.ms": str(_millis(self.retention)),
            "min.insync.replicas": str(self.min_insync_replicas),
        }
        if self.segment is not None:
            configs["segment.ms"] = str(_millis(self.segment))
        return configs


def _millis(duration: timedelta | None) -> int:
    return -1 if duration is None else int(duration.total_seconds() * 1000)


@dataclass(frozen=True, slots=True)
class TopicCatalog:
    """Every topic of imstream, by role."""

    messages_in: Topic
    user_state_in: Topic
    typing_in: Topic
    presence: Topic
    push_tokens: Topic
    messages_sequenced: Topic
    user_inbox: Topic
    sync_events: Topic
    live_delivery: Topic
    group_delivery: Topic
    push_jobs: Topic
    push_outcomes: Topic
    conversation_state: Topic
    message_state: Topic
    user_state: Topic
    known_users: Topic
    operator_actions: Topic
    revocations: Topic
    dead_letters: tuple[Topic, ...]

    def sources(self) -> tuple[Topic, ...]:
        """Every topic but the dead-letter topics, in catalog order."""
        return tuple(getattr(self, name) for name in _SOURCE_FIELDS)

    def __iter__(self) -> Iterator[Topic]:
        """Every topic: the sources, then their dead-letter topics."""
        yield from self.sources()
        yield from self.dead_letters

    def by_name(self, name: str) -> Topic:
        """The topic with this full name."""
        for topic in self:
            if topic.name == name:
                return topic
        raise KeyError(f"no topic named {name!r} in the catalog")

    def dead_letter_of(self, topic: Topic) -> Topic:
        if topic.dead_letter is None:
            raise ValueError(
                f"{topic.logical_name} has no dead-letter topic (it is ephemeral, or only audited)"
            )
        return self.by_name(topic.dead_letter)

    def route(self, event: Event) -> tuple[Topic, bytes]:
        """Where the ingress publishes ``event``: its inbound topic and the record key."""
        for topic in self.sources():
            if topic.ingress and event.type in topic.events:
                return topic, event_key(event, topic.key)
        raise ValueError(f"no inbound topic carries {event.type}")


#: The catalog's source-topic fields, computed once: ``route`` runs for every client command,
#: and ``dataclasses.fields`` there cost the gateway a tenth of its CPU.
_SOURCE_FIELDS = tuple(field.name for field in fields(TopicCatalog) if field.name != "dead_letters")


def conversation_key(tenant_id: str, conversation_id: str) -> bytes:
    return f"{tenant_id}{KEY_SEPARATOR}{conversation_id}".encode()


def user_key(tenant_id: str, user_id: str) -> bytes:
    return f"{tenant_id}{KEY_SEPARATOR}{user_id}".encode()


def device_key(tenant_id: str, user_id: str, device_id: str) -> bytes:
    return f"{tenant_id}{KEY_SEPARATOR}{user_id}{KEY_SEPARATOR}{device_id}".encode()


def gateway_key(node_id: str) -> bytes:
    return node_id.encode()


def operator_key(operator: str) -> bytes:
    return operator.encode()


def revocation_key(event: TokensRevoked) -> bytes:
    """The subject a revocation is about: a newer revocation of it replaces the older one."""
    payload = event.payload
    parts: tuple[str | None, ...] = {
        RevocationScope.TOKEN: (payload.token_id,),
        RevocationScope.USER: (payload.user_id,),
        RevocationScope.DEVICE: (payload.user_id, payload.device_id),
    }[payload.scope]
    return KEY_SEPARATOR.join((event.tenant_id, payload.scope.value, *map(str, parts))).encode()


def event_key(event: Event, kind: KeyKind) -> bytes:
    """The key of ``event`` in a topic keyed by ``kind``.

    A user-keyed event belongs to its actor (a user's own mute, badge), a device's presence to
    the device's user; a device-keyed one to the device its payload names.
    """
    conversation_id = getattr(event.payload, "conversation_id", None)
    user_id = getattr(event.payload, "user_id", None)
    device_id = getattr(event.payload, "device_id", None)
    if kind is KeyKind.CONVERSATION and conversation_id is not None:
        return conversation_key(event.tenant_id, conversation_id)
    if kind is KeyKind.USER and user_id is not None and device_id is not None:
        # A device's presence belongs to the device's user, whoever (or nothing) caused it.
        return user_key(event.tenant_id, user_id)
    if kind is KeyKind.USER and event.type == "node.lease_renewed":
        # Sent to every partition by number (ingress/presence.py): the key only names the node.
        return user_key(event.tenant_id, str(getattr(event.payload, "node_id", "")))
    if kind is KeyKind.USER and event.actor is not None:
        return user_key(event.tenant_id, event.actor.user_id)
    if kind is KeyKind.DEVICE and user_id is not None and device_id is not None:
        return device_key(event.tenant_id, user_id, device_id)
    raise ValueError(f"a {event.type} event has no {kind} key")


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (``org.apache.kafka.common.utils.Utils.murmur2``), unsigned."""
    multiplier, shift, mask = 0x5BD1E995, 24, 0xFFFFFFFF
    length = len(data)
    hashed = (0x9747B28C ^ length) & mask
    tail_start = length - length % 4
    for offset in range(0, tail_start, 4):
        k = int.from_bytes(data[offset : offset + 4], "little")
        k = (k * multiplier) & mask
        k ^= k >> shift
        k = (k * multiplier) & mask
        hashed = ((hashed * multiplier) & mask) ^ k
    tail = data[tail_start:]
    if len(tail) == 3:
        hashed ^= tail[2] << 16
    if len(tail) >= 2:
        hashed ^= tail[1] << 8
    if tail:
        hashed ^= tail[0]
        hashed = (hashed * multiplier) & mask
    hashed ^= hashed >> 13
    hashed = (hashed * multiplier) & mask
    hashed ^= hashed >> 15
    return hashed


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (``KAFKA_PARTITIONER``) gives ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


# -- what the catalog needs of the deployment's settings (core.settings.Settings has it) -----


class _KafkaSettings(Protocol):
    @property
    def topic_prefix(self) -> str: ...
    @property
    def replication_factor(self) -> int: ...
    @property
    def conversation_partitions(self) -> int: ...
    @property
    def user_partitions(self) -> int: ...


class _AuthSettings(Protocol):
    @property
    def jwt_max_lifetime_seconds(self) -> float: ...
    @property
    def jwt_leeway_seconds(self) -> float: ...


class _StreamsSettings(Protocol):
    @property
    def message_retention_days(self) -> float: ...


class CatalogSettings(Protocol):
    """The settings a catalog is made from: the contract names what it reads, and the settings
    object (one layer up) has it."""

    @property
    def kafka(self) -> _KafkaSettings: ...
    @property
    def auth(self) -> _AuthSettings: ...
    @property
    def streams(self) -> _StreamsSettings: ...


def topic_catalog(
    settings: CatalogSettings, *, partitions: Mapping[str, int] | None = None
) -> TopicCatalog:
    """The catalog for this deployment: names carry ``settings.kafka.topic_prefix`` (prepended as
    is), replication is ``settings.kafka.replication_factor``, the conversation-keyed and
    user-keyed topics have ``settings.kafka.conversation_partitions`` and ``user_partitions``
    partitions, and ``partitions`` overrides the partition count of topics by logical name (e.g.
    ``{"im.presence": 12}``)."""
    prefix = settings.kafka.topic_prefix
    conversation_partitions = settings.kafka.conversation_partitions
    user_partitions = settings.kafka.user_partitions
    replication = settings.kafka.replication_factor
    # Every token a revocation can match has expired by then (see "Revocations" above), in
    # whole days.
    revocation_horizon = (
        settings.auth.jwt_max_lifetime_seconds + 3 * settings.auth.jwt_leeway_seconds
    )
    revocation_retention = timedelta(days=math.ceil(revocation_horizon / 86_400))
    message_retention_days = settings.streams.message_retention_days
    overrides = dict(partitions or {})

    def topic(
        logical_name: str,
        *,
        key: KeyKind,
        partitions: int,
        retention: timedelta | None,
        description: str,
        events: tuple[str, ...] = (),
        ingress: bool = False,
        cleanup: CleanupPolicy = CleanupPolicy.DELETE,
        dead_letter: bool = True,
        segment: timedelta | None = None,
    ) -> Topic:
        return Topic(
            logical_name=logical_name,
            name=f"{prefix}{logical_name}",
            key=key,
            partitions=overrides.pop(logical_name, partitions),
            replication=replication,
            cleanup=cleanup,
            retention=retention,
            dead_letter=f"{prefix}{logical_name}{DEAD_LETTER_SUFFIX}" if dead_letter else None,
            description=description,
            events=events,
            ingress=ingress,
            segment=segment,
        )

    week, month = timedelta(days=7), timedelta(days=30)
    message_events = ("message.sent", "message.recalled", "message.edited")
    conversation_events = (
        "conversation.created",
        "conversation.renamed",
        "conversation.member_added",
        "conversation.member_removed",
        "conversation.member_role_changed",
        "conversation.left",
        "conversation.deleted",
    )
    catalog = TopicCatalog(
        messages_in=topic(
            "im.messages.in",
            key=KeyKind.CONVERSATION,
            partitions=conversation_partitions,
            retention=week,
            events=(*message_events, *conversation_events, "receipt.read"),
            ingress=True,
            description="Every conversation-scoped command as accepted from clients, in the "
            "order the conversation processor applies them: messages, recalls, edits, "
            "lifecycle and membership, read receipts",
        ),
        user_state_in=topic(
            "im.user-state.in",
            key=KeyKind.USER,
            partitions=user_partitions,
            retention=week,
            events=("conversation.mute_changed", "badge.cleared", "user.push_settings_changed"),
            ingress=True,
            description="A user's own state: per-conversation mute, badge cleared, push "
            "preferences",
        ),
        typing_in=topic(
            "im.typing.in",
            key=KeyKind.CONVERSATION,
            partitions=conversation_partitions,
            retention=timedelta(hours=1),
            segment=timedelta(hours=1),
            events=("typing.changed",),
            ingress=True,
            dead_letter=False,
            description="Typing indicators: routed to online devices, never stored",
        ),
        presence=topic(
            "im.presence",
            key=KeyKind.USER,
            partitions=user_partitions,
            retention=week,
            events=("device.connected", "device.disconnected", "node.lease_renewed"),
            ingress=True,
            description="Devices connecting to and leaving ingress nodes, in order per user, and "
            "each node's lease renewals on every partition; the user processor keeps who is "
            "online where",
        ),
        push_tokens=topic(
            "im.push.tokens",
            key=KeyKind.DEVICE,
            partitions=DEVICE_PARTITIONS,
            retention=None,
            cleanup=CleanupPolicy.COMPACT,
            events=("push_token.registered", "push_token.removed"),
            ingress=True,
            description="Each device's APNs/FCM token (latest per device)",
        ),
        messages_sequenced=topic(
            "im.messages.sequenced",
            key=KeyKind.CONVERSATION,
            partitions=conversation_partitions,
            retention=month,
            events=(*message_events, *conversation_events, "receipt.read"),
            description="The conversation log: messages with conversation_seq assigned, the "
            "conversation's state changes and (up to the large-group threshold) read receipts, "
            "once each",
        ),
        user_inbox=topic(
            "im.user.inbox",
            key=KeyKind.USER,
            partitions=user_partitions,
            retention=week,
            description="Inbox records: what the conversation processor addresses to each user, "
            "with the conversation's position, before the user processor assigns sync ids",
        ),
        sync_events=topic(
            "im.sync.events",
            key=KeyKind.USER,
            partitions=user_partitions,
            retention=month,
            description="Each user's sync queue: every event concerning the user, with sync_id",
        ),
        live_delivery=topic(
            "im.delivery.live",
            key=KeyKind.GATEWAY,
            partitions=GATEWAY_PARTITIONS,
            retention=timedelta(hours=1),
            segment=timedelta(hours=1),
            dead_letter=False,
            description="Events to push now to the devices an ingress node holds",
        ),
        group_delivery=topic(
            "im.delivery.groups",
            key=KeyKind.CONVERSATION,
            partitions=conversation_partitions,
            retention=timedelta(hours=1),
            segment=timedelta(hours=1),
            dead_letter=False,
            description="Large groups (read diffusion): one record per group event, which "
            "every ingress node reads and hands to the member devices it holds",
        ),
        push_jobs=topic(
            "im.push.jobs",
            key=KeyKind.USER,
            partitions=user_partitions,
            retention=timedelta(days=1),
            description="Notifications to send through APNs/FCM to users with no online device",
        ),
        push_outcomes=topic(
            "im.push.outcomes",
            key=KeyKind.USER,
            partitions=user_partitions,
            retention=month,
            dead_letter=False,
            description="One record per push attempt to a device (or why nothing was sent), "
            "for the ClickHouse push-outcome table",
        ),
        conversation_state=topic(
            "im.state.conversations",
            key=KeyKind.CONVERSATION,
            partitions=conversation_partitions,
            retention=None,
            cleanup=CleanupPolicy.COMPACT,
            dead_letter=False,
            description="The conversation processor's state per conversation (members, roles, "
            "last seq, position, applied offsets), written in the same transaction as its "
            "outputs; a restarted worker restores from it",
        ),
        message_state=topic(
            "im.state.messages",
            key=KeyKind.MESSAGE,
            partitions=conversation_partitions,
            retention=timedelta(days=message_retention_days),
            cleanup=CleanupPolicy.COMPACT_DELETE,
            dead_letter=False,
            description="One record per sequenced message (sender, seq, recalled): the dedupe "
            "table of (sender, client_msg_id) and the recall/edit rules; kept for the dedupe "
            "window",
        ),
        user_state=topic(
            "im.state.users",
            key=KeyKind.USER,
            partitions=user_partitions,
            retention=None,
            cleanup=CleanupPolicy.COMPACT,
            dead_letter=False,
            description="The user processor's state per user (sync id, read positions, "
            "unread counts, mute, online devices, push collapsing), written in the same "
            "transaction as its outputs",
        ),
        known_users=topic(
            "im.users.known",
            key=KeyKind.USER,
            partitions=user_partitions,
            retention=None,
            cleanup=CleanupPolicy.COMPACT,
            dead_letter=False,
            description="The users each tenant knows: one record per user, written by the "
            "user processor when the user first signs in; the conversation processor reads it "
            "in full to admit members (only known users may be named in a create or an add)",
        ),
        operator_actions=topic(
            "im.operator.actions",
            key=KeyKind.OPERATOR,
            partitions=OPERATOR_PARTITIONS,
            retention=timedelta(days=365),
            events=("operator.action",),
            dead_letter=False,
            description="Every operator action (a redrive, a replay …) as an operator.action "
            "event, for the ClickHouse audit: who ran which command, with what result",
        ),
        revocations=topic(
            "im.auth.revocations",
            key=KeyKind.REVOCATION,
            partitions=REVOCATION_PARTITIONS,
            retention=revocation_retention,
            segment=timedelta(hours=1),
            cleanup=CleanupPolicy.COMPACT_DELETE,
            events=("tokens.revoked",),
            dead_letter=False,
            description="Revoked tokens (by jti) and forced logouts (a user's or a device's "
            "tokens issued before a moment), written by `imstream revoke`; every ingress node "
            "reads all of it and refuses and disconnects what it revokes",
        ),
        dead_letters=(),
    )
    dead_letters = tuple(
        topic(
            source.logical_name + DEAD_LETTER_SUFFIX,
            key=KeyKind.NONE,
            partitions=DEAD_LETTER_PARTITIONS,
            retention=DEAD_LETTER_RETENTION,
            dead_letter=False,
            description=f"Records of {source.logical_name} that could not be processed",
        )
        for source in catalog.sources()
        if source.dead_letter is not None
    )
    if overrides:
        raise ValueError(
            f"partition override for unknown topic(s) {', '.join(sorted(overrides))}; known: "
            + ", ".join(t.logical_name for t in (*catalog.sources(), *dead_letters))
        )
    catalog = replace(catalog, dead_letters=dead_letters)
    _check_co_partitioned(catalog)
    return catalog


def _check_co_partitioned(catalog: TopicCatalog) -> None:
    for kind in (KeyKind.CONVERSATION, KeyKind.USER):
        group = [topic for topic in catalog.sources() if topic.key is kind]
        if kind is KeyKind.CONVERSATION:
            # The message state sits on its conversation's partition.
            group.append(catalog.message_state)
        if len({topic.partitions for topic in group}) > 1:
            counts = ", ".join(f"{topic.logical_name}={topic.partitions}" for topic in group)
            raise ValueError(
                f"{kind}-keyed topics are co-partitioned and need one partition count: {counts}"
            )

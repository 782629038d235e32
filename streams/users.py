"""The user processor's rules: one sync queue per user, read positions, unread counts, presence,
live routing and push triggers — a pure function of (user state, input) → outcome.

Inputs arrive on user-keyed partitions in order: deliveries decided by the conversation
processor, the user's own state commands (mute, badge cleared, push preferences) and presence
changes of the user's devices. The runtime stores :class:`UserState` in the ``im.state.users``
topic and writes each :class:`UserOutcome` in the same Kafka transaction as the new state and
the input's offset, so a sync id is handed out exactly once per event even when a worker dies
mid-batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from schemas.events import (
    BadgeCleared,
    ConversationAdvanced,
    ConversationCreated,
    ConversationDeleted,
    ConversationLeft,
    ConversationMemberAdded,
    ConversationMemberRemoved,
    ConversationMuteChanged,
    DeviceConnected,
    DeviceDisconnected,
    Event,
    MessageEdited,
    MessageRecalled,
    MessageSent,
    NodeLeaseRenewed,
    QuietHoursSetting,
    ReceiptRead,
    UserPushSettingsChanged,
)
from streams.conversations import Delivery, DeliveryKind, RejectReason, command_rejected

#: Runs of unread seqs kept per conversation. Unread messages are the other members' messages
#: after the read position; the seqs between runs are recalls and edits (they take seqs and are
#: not unread) — own messages end every run, as sending reads the conversation. Beyond this many
#: runs the two oldest merge, and the count then includes the recalls and edits between them.
MAX_UNREAD_RANGES = 64
#: Online devices tracked per user; a connect beyond it replaces the device seen longest ago
#: (the ingress caps connections per user well below this).
MAX_DEVICES = 64


@dataclass(slots=True)
class ConversationView:
    """One conversation as one user sees it."""

    last_seq: int = 0
    read_seq: int = 0
    #: Other members' messages after ``read_seq``: ascending, disjoint ``[first, last]`` runs
    #: of seqs, at most ``MAX_UNREAD_RANGES``.
    unread_ranges: list[list[int]] = field(default_factory=list)
    muted: bool = False
    muted_until: datetime | None = None
    last_push_at: datetime | None = None
    merged_since_push: int = 0
    #: A large group (read diffusion): the other members' messages do not reach this view;
    #: the conversation list derives their count from the conversation's head.
    large: bool = False

    @property
    def unread(self) -> int:
        total = 0
        for first, last in self.unread_ranges:
            total += last - first + 1
        return total

    def add_unread(self, seq: int) -> None:
        """Count ``seq`` as unread (once, however often it comes)."""
        runs = self.unread_ranges
        if not runs or seq > runs[-1][1] + 1:
            runs.append([seq, seq])
        elif seq == runs[-1][1] + 1:
            runs[-1][1] = seq
        else:  # older than the newest run (rare: seqs arrive in order): the general case
            if any(first <= seq <= last for first, last in runs):
                return
            runs.append([seq, seq])
            runs.sort()
            merged: list[list[int]] = []
            for first, last in runs:
                if merged and first <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], last)
                else:
                    merged.append([first, last])
            runs[:] = merged
        if len(runs) > MAX_UNREAD_RANGES:
            runs[0:2] = [[runs[0][0], runs[1][1]]]

    def add_unread_run(self, first: int, last: int) -> None:
        """Count ``first..last`` as unread: seqs this view did not follow one by one (the time
        its conversation was a large group). Later than every run (seqs only grow)."""
        if last < first:
            return
        runs = self.unread_ranges
        if runs and first <= runs[-1][1] + 1:
            runs[-1][1] = max(runs[-1][1], last)
        else:
            runs.append([first, last])
        if len(runs) > MAX_UNREAD_RANGES:
            runs[0:2] = [[runs[0][0], runs[1][1]]]

    def switch(self, large: bool, last_seq: int | None) -> None:
        """The conversation's diffusion, as its latest delivery tells. Back to write diffusion,
        the messages of the large-group time after the read position (up to ``last_seq``)
        count as unread — recalls and edits among them too: a view cannot tell them apart."""
        if self.large and not large and last_seq is not None:
            self.add_unread_run(max(self.last_seq, self.read_seq) + 1, last_seq)
            self.last_seq = max(self.last_seq, last_seq)
        self.large = large

    def read_through(self, seq: int) -> None:
        """Everything up to ``seq`` is read."""
        runs = self.unread_ranges
        while runs and runs[0][1] <= seq:
            runs.pop(0)
        if runs and runs[0][0] <= seq:
            runs[0][0] = seq + 1

    def is_muted(self, now: datetime) -> bool:
        return self.muted and (self.muted_until is None or now < self.muted_until)

    def to_json(self) -> dict[str, Any]:
        data = {
            "last_seq": self.last_seq,
            "read_seq": self.read_seq,
            "unread": self.unread_ranges,
            "muted": self.muted,
            "muted_until": self.muted_until.isoformat() if self.muted_until else None,
            "last_push_at": self.last_push_at.isoformat() if self.last_push_at else None,
            "merged_since_push": self.merged_since_push,
        }
        if self.large:
            data["large"] = True
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConversationView:
        # Read once per input for each view it concerns: kept to plain lookups.
        muted_until = data.get("muted_until")
        last_push_at = data.get("last_push_at")
        view = cls(
            int(data.get("last_seq", 0)),
            int(data.get("read_seq", 0)),
            [[int(first), int(last)] for first, last in data.get("unread", ())],
            bool(data.get("muted", False)),
            datetime.fromisoformat(muted_until) if muted_until else None,
            datetime.fromisoformat(last_push_at) if last_push_at else None,
            int(data.get("merged_since_push", 0)),
            bool(data.get("large", False)),
        )
        if "unread_seqs" in data:  # written before runs (one seq each)
            for seq in data["unread_seqs"]:
                view.add_unread(int(seq))
        return view


@dataclass(frozen=True, slots=True)
class PushPreferences:
    """The user's own push preferences (``user.push_settings_changed``): a mute of every push,
    and what the push sender needs for the rest (quiet hours, locale)."""

    muted: bool = False
    muted_until: datetime | None = None
    quiet_hours: QuietHoursSetting | None = None
    locale: str | None = None

    def is_muted(self, now: datetime) -> bool:
        return self.muted and (self.muted_until is None or now < self.muted_until)

    def to_json(self) -> dict[str, Any]:
        return {
            "muted": self.muted,
            "muted_until": self.muted_until.isoformat() if self.muted_until else None,
            "quiet_hours": self.quiet_hours.model_dump() if self.quiet_hours else None,
            "locale": self.locale,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PushPreferences:
        muted_until = data.get("muted_until")
        quiet_hours = data.get("quiet_hours")
        return cls(
            muted=bool(data.get("muted", False)),
            muted_until=datetime.fromisoformat(muted_until) if muted_until else None,
            quiet_hours=QuietHoursSetting.model_validate(quiet_hours) if quiet_hours else None,
            locale=data.get("locale"),
        )


_NO_PUSH_PREFERENCES = PushPreferences()


@dataclass(frozen=True, slots=True)
class OnlineDevice:
    node_id: str
    connection_id: str
    #: When the device connected, by its node's clock; None in state written before leases.
    connected_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class NodeLease:
    """An ingress node's lease as one user partition last heard of it (``node.lease_renewed``):
    the run of the node that renewed it, and until when its devices count as online.

    Times are the records' own (the node's clock), never the processor's: a replay decides
    as the first run did."""

    started_at: datetime
    expires_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeLease:
        return cls(
            started_at=datetime.fromisoformat(data["started_at"]),
            expires_at=datetime.fromisoformat(data["expires_at"]),
        )


def renew_lease(current: NodeLease | None, renewal: NodeLeaseRenewed) -> NodeLease:
    """The node's lease after ``renewal``: a newer run of the node replaces the lease of an
    earlier one, a late renewal of an earlier run changes nothing, and a lease only grows."""
    started_at = renewal.payload.started_at
    expires_at = renewal.occurred_at + timedelta(milliseconds=renewal.payload.lease_ms)
    if current is None or started_at > current.started_at:
        return NodeLease(started_at=started_at, expires_at=expires_at)
    if started_at < current.started_at:
        return current
    return NodeLease(started_at=started_at, expires_at=max(expires_at, current.expires_at))


@dataclass(slots=True)
class UserState:
    """What the user processor knows of one user for one input.

    Stored fine-grained (``streams.state``): the header (sync id, devices, push preferences, the
    unread total) as one value and each conversation's view as another. ``conversations`` holds
    the views the input concerns (every view only for a badge cleared everywhere); the unread of
    the others is ``unread_elsewhere``. Every rule below reads and changes only those.
    """

    last_sync_id: int = 0
    conversations: dict[str, ConversationView] = field(default_factory=dict)
    devices: dict[str, OnlineDevice] = field(default_factory=dict)
    push: PushPreferences = field(default_factory=PushPreferences)
    unread_elsewhere: int = 0
    #: Large groups among the conversations not loaded (their count is in the header).
    large_elsewhere: int = 0
    #: Whether the tenant knows the user (announced on ``im.users.known`` at a first sign-in).
    known: bool = False
    #: Devices whose node's lease had lapsed at the input's time (:func:`apply_leases`): kept,
    #: as their node may renew it yet, but offline for this input. Not stored.
    lapsed: set[str] = field(default_factory=set)

    def online(self) -> dict[str, OnlineDevice]:
        """The devices online for this input: connected, on a node whose lease holds."""
        if not self.lapsed:
            return self.devices
        return {d: online for d, online in self.devices.items() if d not in self.lapsed}

    def view(self, conversation_id: str) -> ConversationView:
        return self.conversations.setdefault(conversation_id, ConversationView())

    def large_groups(self) -> int:
        """How many of the user's conversations are large groups."""
        return self.large_elsewhere + sum(view.large for view in self.conversations.values())

    def unread_total(self) -> int:
        """Unread messages over all the user's conversations (the badge number)."""
        return self.unread_elsewhere + sum(view.unread for view in self.conversations.values())

    def to_json(self) -> dict[str, Any]:
        return {
            **self.header_json(),
            "conversations": {cid: view.to_json() for cid, view in self.conversations.items()},
        }

    def header_json(self) -> dict[str, Any]:
        """Everything but the conversations' views (each stored as a value of its own)."""
        header: dict[str, Any] = {
            "last_sync_id": self.last_sync_id,
            "devices": {device: _device_json(online) for device, online in self.devices.items()},
        }
        if self.push != _NO_PUSH_PREFERENCES:
            # Only once set: the state of a user who never chose is what it was before.
            header["push"] = self.push.to_json()
        if self.known:
            header["known"] = True
        return header

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UserState:
        return cls(
            last_sync_id=int(data.get("last_sync_id", 0)),
            conversations={
                cid: ConversationView.from_json(view)
                for cid, view in data.get("conversations", {}).items()
            },
            devices={
                device: OnlineDevice(
                    node_id=fields[0],
                    connection_id=fields[1],
                    connected_at=datetime.fromisoformat(fields[2]) if len(fields) > 2 else None,
                )
                for device, fields in data.get("devices", {}).items()
            },
            # State written before push preferences existed has none: the defaults.
            push=PushPreferences.from_json(data.get("push") or {}),
            known=bool(data.get("known", False)),
        )


def _device_json(online: OnlineDevice) -> list[str]:
    fields = [online.node_id, online.connection_id]
    if online.connected_at is not None:
        fields.append(online.connected_at.isoformat())
    return fields


@dataclass(frozen=True, slots=True)
class Appended:
    """An event appended to the user's sync queue at ``sync_id``."""

    sync_id: int
    event: Event
    kind: DeliveryKind


@dataclass(frozen=True, slots=True)
class PushJob:
    """Ask the push sender to notify the user's devices about a conversation."""

    conversation_id: str
    conversation_seq: int
    message_id: str
    sender_id: str
    merged_count: int
    unread_total: int
    quiet_hours: QuietHoursSetting | None = None
    locale: str | None = None


@dataclass(slots=True)
class UserOutcome:
    appended: list[Appended] = field(default_factory=list)
    #: Ephemeral events for online devices only.
    ephemeral: list[Event] = field(default_factory=list)
    #: node id → devices there, for everything appended or ephemeral above.
    live_nodes: dict[str, list[str]] = field(default_factory=dict)
    push: PushJob | None = None
    changed: bool = False


@dataclass(frozen=True, slots=True)
class PushPolicy:
    #: At most one push per (user, conversation) per window; the rest are merged into the next.
    collapse_window: timedelta = timedelta(seconds=30)


def _live_nodes(state: UserState) -> dict[str, list[str]]:
    nodes: dict[str, list[str]] = {}
    for device, online in sorted(state.online().items()):
        nodes.setdefault(online.node_id, []).append(device)
    return nodes


def _append(state: UserState, outcome: UserOutcome, event: Event, kind: DeliveryKind) -> None:
    state.last_sync_id += 1
    outcome.appended.append(Appended(sync_id=state.last_sync_id, event=event, kind=kind))
    outcome.changed = True


def apply_delivery(
    state: UserState,
    user_id: str,
    delivery: Delivery,
    *,
    now: datetime,
    policy: PushPolicy = PushPolicy(),
    large: bool | None = None,
    last_seq: int | None = None,
) -> UserOutcome:
    """Append a conversation's event to the user's queue and update what the user sees.

    ``large`` (and ``last_seq``) as the inbox record is stamped: the conversation's diffusion
    after the event (:meth:`ConversationView.switch`)."""
    outcome = UserOutcome()
    event = delivery.event
    if delivery.kind is DeliveryKind.EPHEMERAL:
        if state.online():
            outcome.ephemeral.append(event)
            outcome.live_nodes = _live_nodes(state)
        return outcome
    conversation_id = getattr(event.payload, "conversation_id", None)
    if large is not None and isinstance(conversation_id, str):
        state.view(conversation_id).switch(large, last_seq)
    _append(state, outcome, event, delivery.kind)
    match event:
        case MessageSent():
            message = _Message(
                conversation_id=event.payload.conversation_id,
                seq=event.payload.conversation_seq,
                message_id=event.event_id,
                sender_id=event.actor.user_id,
            )
            _on_message(state, user_id, message, outcome=outcome, now=now, policy=policy)
        case ConversationAdvanced() if event.payload.entry_type == "message.sent":
            message = _Message(
                conversation_id=event.payload.conversation_id,
                seq=event.payload.conversation_seq,
                message_id=event.payload.message_id,
                sender_id=event.payload.sender_id,
            )
            _on_message(state, user_id, message, outcome=outcome, now=now, policy=policy)
        case ConversationAdvanced():
            view = state.view(event.payload.conversation_id)
            view.last_seq = max(view.last_seq, event.payload.conversation_seq)
        case MessageRecalled() | MessageEdited():
            # Recalls and edits take seqs of their own: the conversation's last seq moves on.
            view = state.view(event.payload.conversation_id)
            seq = event.payload.conversation_seq or 0
            view.last_seq = max(view.last_seq, seq)
        case ReceiptRead() if event.actor is not None and event.actor.user_id == user_id:
            _on_own_read(state.view(event.payload.conversation_id), event.payload.conversation_seq)
        case ConversationCreated():
            state.view(event.payload.conversation_id)
        case ConversationMemberAdded() if event.payload.user_id == user_id:
            # A new member's list gets the conversation now, with its summary; what came before
            # the join is history, not unread.
            view = state.view(event.payload.conversation_id)
            joined_at = event.payload.last_seq or 0
            view.last_seq = max(view.last_seq, joined_at)
            view.read_seq = max(view.read_seq, joined_at)
            view.read_through(joined_at)
        case ConversationLeft() | ConversationMemberRemoved() if event.payload.user_id == user_id:
            state.conversations.pop(event.payload.conversation_id, None)
        case ConversationDeleted():
            state.conversations.pop(event.payload.conversation_id, None)
        case _:
            pass
    if state.online():
        outcome.live_nodes = _live_nodes(state)
    return outcome


@dataclass(frozen=True, slots=True)
class _Message:
    conversation_id: str
    seq: int | None
    message_id: str
    sender_id: str


def _on_message(
    state: UserState,
    user_id: str,
    message: _Message,
    *,
    outcome: UserOutcome,
    now: datetime,
    policy: PushPolicy,
) -> None:
    view = state.view(message.conversation_id)
    seq = message.seq or view.last_seq + 1
    view.last_seq = max(view.last_seq, seq)
    if message.sender_id == user_id:
        # A user's own message is read on every device that sent or synced it.
        _on_own_read(view, seq)
        return
    if seq > view.read_seq:
        view.add_unread(seq)
    if state.online():
        return
    # A mute of the conversation or of every push: the message counts as unread (above) but
    # neither pushes nor merges into the next push.
    if view.is_muted(now) or state.push.is_muted(now):
        return
    view.merged_since_push += 1
    if view.last_push_at is not None and now - view.last_push_at < policy.collapse_window:
        return
    outcome.push = PushJob(
        conversation_id=message.conversation_id,
        conversation_seq=seq,
        message_id=message.message_id,
        sender_id=message.sender_id,
        merged_count=view.merged_since_push,
        unread_total=state.unread_total(),
        quiet_hours=state.push.quiet_hours,
        locale=state.push.locale,
    )
    view.last_push_at = now
    view.merged_since_push = 0


def _on_own_read(view: ConversationView, seq: int) -> None:
    """Read positions only move forward."""
    if seq <= view.read_seq:
        return
    view.read_seq = seq
    view.last_seq = max(view.last_seq, seq)
    view.read_through(seq)


def apply_own_command(state: UserState, command: Event) -> UserOutcome:
    """The user's own state commands: mute, badge cleared and push preferences. Appended so
    every device converges.

    A mute or a badge cleared names a conversation the user is in (one whose events reached the
    user and that the user has not left); any other is refused with ``command.rejected``
    (``not-a-member``), which is appended instead: invented conversation ids would otherwise
    grow the user's state without bound.
    """
    outcome = UserOutcome()
    match command:
        case ConversationMuteChanged() | BadgeCleared() if (
            command.payload.conversation_id is not None
            and command.payload.conversation_id not in state.conversations
        ):
            command = command_rejected(
                command, command.payload.conversation_id, RejectReason.NOT_A_MEMBER
            )
        case ConversationMuteChanged():
            view = state.view(command.payload.conversation_id)
            view.muted = command.payload.muted
            view.muted_until = command.payload.muted_until
        case UserPushSettingsChanged():
            payload = command.payload
            state.push = PushPreferences(
                muted=payload.muted,
                muted_until=payload.muted_until,
                quiet_hours=payload.quiet_hours,
                locale=payload.locale,
            )
        case BadgeCleared():
            targets = (
                [command.payload.conversation_id]
                if command.payload.conversation_id is not None
                else list(state.conversations)
            )
            for conversation_id in targets:
                view = state.view(conversation_id)
                _on_own_read(view, view.last_seq)
        case _:
            return outcome
    _append(state, outcome, command, DeliveryKind.FULL)
    if state.online():
        outcome.live_nodes = _live_nodes(state)
    return outcome


def apply_presence(state: UserState, event: DeviceConnected | DeviceDisconnected) -> bool:
    """Track which node holds each online device; a late disconnect of an old connection is
    ignored (the connection id tells them apart). Returns whether anything changed."""
    payload = event.payload
    current = state.devices.get(payload.device_id)
    if isinstance(event, DeviceConnected):
        online = OnlineDevice(
            node_id=payload.node_id,
            connection_id=payload.connection_id,
            connected_at=event.occurred_at,
        )
        if current == online:
            return False
        if current is None and len(state.devices) >= MAX_DEVICES:
            del state.devices[next(iter(state.devices))]  # the one connected longest ago
        state.devices.pop(payload.device_id, None)  # the newest connection goes last
        state.devices[payload.device_id] = online
        state.lapsed.discard(payload.device_id)
        return True
    if current is None or current.connection_id != payload.connection_id:
        return False
    del state.devices[payload.device_id]
    return True


def apply_leases(state: UserState, leases: Mapping[str, NodeLease], *, now: datetime) -> None:
    """Which of the user's devices are online at ``now`` (the input's time), as their nodes'
    leases say: a device connected before its node's current run started was held by a run
    that died without its disconnect (SIGKILL, a lost record) and is forgotten; a device whose
    node's lease lapsed counts as offline (``state.lapsed``) but is kept, since the node may
    still renew it (a Kafka blip longer than the lease). A node with no lease on the partition
    never renewed one (a node from before leases): its devices stay online as it said."""
    state.lapsed = set()
    for device, online in list(state.devices.items()):
        lease = leases.get(online.node_id)
        if lease is None:
            continue
        if online.connected_at is not None and online.connected_at < lease.started_at:
            del state.devices[device]
        elif now >= lease.expires_at:
            state.lapsed.add(device)

"""The user rules: sync ids, unread counts, read positions, presence, push collapsing, mute."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.events import (
    Actor,
    BadgeCleared,
    BadgeClearedPayload,
    CommandRejected,
    ConversationMemberAdded,
    ConversationMemberAddedPayload,
    ConversationMuteChanged,
    ConversationMuteChangedPayload,
    DeviceConnected,
    DeviceDisconnected,
    DevicePresencePayload,
    MessageEdited,
    MessageEditedPayload,
    MessageSent,
    MessageSentPayload,
    NodeLeasePayload,
    NodeLeaseRenewed,
    Platform,
    QuietHoursSetting,
    ReceiptRead,
    ReceiptReadPayload,
    TextBody,
    TypingChanged,
    TypingChangedPayload,
    UserPushSettingsChanged,
    UserPushSettingsChangedPayload,
    message_event_id,
)
from streams.conversations import Delivery, DeliveryKind
from streams.users import (
    NodeLease,
    PushPolicy,
    PushPreferences,
    UserState,
    apply_delivery,
    apply_leases,
    apply_own_command,
    apply_presence,
    renew_lease,
)

TENANT = "acme"
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def message(sender: str, seq: int, conversation: str = "c-1") -> Delivery:
    event = MessageSent.new(
        tenant_id=TENANT,
        actor=Actor(user_id=sender),
        event_id=message_event_id(TENANT, sender, f"m{seq}"),
        payload=MessageSentPayload(
            conversation_id=conversation,
            client_msg_id=f"m{seq}",
            body=TextBody(text="hi"),
            conversation_seq=seq,
        ),
    )
    return Delivery(user_id="alice", event=event)


def read(user: str, seq: int) -> Delivery:
    event = ReceiptRead.new(
        tenant_id=TENANT,
        actor=Actor(user_id=user),
        payload=ReceiptReadPayload(conversation_id="c-1", conversation_seq=seq),
    )
    return Delivery(user_id="alice", event=event)


def presence(connected: bool, connection: str = "conn-1") -> DeviceConnected | DeviceDisconnected:
    payload = DevicePresencePayload(
        user_id="alice",
        device_id="phone",
        platform=Platform.IOS,
        node_id="ingress-1",
        connection_id=connection,
    )
    model = DeviceConnected if connected else DeviceDisconnected
    return model.new(tenant_id=TENANT, payload=payload)


def test_sync_ids_strictly_increase_and_unread_counts_follow_reads() -> None:
    state = UserState()
    sync_ids: list[int] = []
    for seq in (1, 2, 3):
        outcome = apply_delivery(state, "alice", message("bob", seq), now=NOW)
        sync_ids.extend(appended.sync_id for appended in outcome.appended)
    outcome = apply_delivery(state, "alice", message("alice", 4), now=NOW)
    sync_ids.extend(appended.sync_id for appended in outcome.appended)
    assert sync_ids == [1, 2, 3, 4]
    view = state.conversations["c-1"]
    assert view.unread == 0  # her own message marks everything before it read
    assert view.read_seq == 4

    apply_delivery(state, "alice", message("bob", 5), now=NOW)
    apply_delivery(state, "alice", message("bob", 6), now=NOW)
    assert view.unread == 2
    apply_delivery(state, "alice", read("alice", 5), now=NOW)
    assert (view.read_seq, view.unread) == (5, 1)
    apply_delivery(state, "alice", read("alice", 3), now=NOW)
    assert (view.read_seq, view.unread) == (5, 1), "read positions never move backward"
    apply_delivery(state, "alice", read("bob", 6), now=NOW)
    assert view.unread == 1, "another member's receipt does not change alice's unread count"


def test_badge_cleared_reads_everything_and_is_appended_for_other_devices() -> None:
    state = UserState()
    for seq in (1, 2):
        apply_delivery(state, "alice", message("bob", seq), now=NOW)
    outcome = apply_own_command(
        state,
        BadgeCleared.new(
            tenant_id=TENANT, actor=Actor(user_id="alice"), payload=BadgeClearedPayload()
        ),
    )
    assert state.conversations["c-1"].unread == 0
    assert [appended.sync_id for appended in outcome.appended] == [3]


def test_offline_user_gets_one_push_per_window_with_merged_count() -> None:
    state = UserState()
    policy = PushPolicy(collapse_window=timedelta(seconds=30))
    first = apply_delivery(state, "alice", message("bob", 1), now=NOW, policy=policy)
    assert first.push is not None and first.push.merged_count == 1
    second = apply_delivery(
        state, "alice", message("bob", 2), now=NOW + timedelta(seconds=5), policy=policy
    )
    assert second.push is None
    third = apply_delivery(
        state, "alice", message("bob", 3), now=NOW + timedelta(seconds=31), policy=policy
    )
    assert third.push is not None
    assert third.push.merged_count == 2
    assert third.push.unread_total == 3


def test_muted_conversations_and_online_users_get_no_push() -> None:
    state = UserState()
    assert apply_delivery(state, "alice", message("bob", 1), now=NOW).push is not None
    apply_own_command(
        state,
        ConversationMuteChanged.new(
            tenant_id=TENANT,
            actor=Actor(user_id="alice"),
            payload=ConversationMuteChangedPayload(conversation_id="c-1", muted=True),
        ),
    )
    later = NOW + timedelta(hours=1)  # past the collapse window: only the mute holds it back
    assert apply_delivery(state, "alice", message("bob", 2), now=later).push is None
    assert apply_delivery(state, "alice", message("bob", 1, "c-2"), now=later).push is not None


def test_a_mute_or_badge_of_a_conversation_the_user_is_not_in_is_refused() -> None:
    state = UserState()
    apply_delivery(state, "alice", message("bob", 1), now=NOW)
    for conversation in ("invented", "c-2"):
        for command in (
            ConversationMuteChanged.new(
                tenant_id=TENANT,
                actor=Actor(user_id="alice"),
                payload=ConversationMuteChangedPayload(conversation_id=conversation, muted=True),
            ),
            BadgeCleared.new(
                tenant_id=TENANT,
                actor=Actor(user_id="alice"),
                payload=BadgeClearedPayload(conversation_id=conversation),
            ),
        ):
            outcome = apply_own_command(state, command)
            (appended,) = outcome.appended
            assert isinstance(appended.event, CommandRejected)
            assert appended.event.payload.reason == "not-a-member"
            assert appended.event.payload.command_event_id == command.event_id
    # Nothing of them stayed in the state: only the one conversation alice is in.
    assert list(state.conversations) == ["c-1"]
    assert state.last_sync_id == 5

    online = UserState()
    assert apply_presence(online, presence(connected=True))
    outcome = apply_delivery(online, "alice", message("bob", 1), now=NOW)
    assert outcome.push is None
    assert outcome.live_nodes == {"ingress-1": ["phone"]}


def push_settings(**fields: object) -> UserPushSettingsChanged:
    return UserPushSettingsChanged.new(
        tenant_id=TENANT,
        actor=Actor(user_id="alice", device_id="phone"),
        payload=UserPushSettingsChangedPayload.model_validate(fields),
    )


BERLIN_NIGHTS = QuietHoursSetting(start="22:00", end="07:00", time_zone="Europe/Berlin")


def test_a_user_muted_until_later_gets_no_push_and_counts_unread_until_it_ends() -> None:
    state = UserState()
    mute = apply_own_command(state, push_settings(muted=True, muted_until=NOW + timedelta(hours=1)))
    # Appended to the queue like a conversation mute: every device of the user sees it.
    assert [appended.sync_id for appended in mute.appended] == [1]
    muted = apply_delivery(state, "alice", message("bob", 1), now=NOW)
    assert muted.push is None
    assert state.conversations["c-1"].unread == 1
    # Like a muted conversation: what came during the mute is not merged into the next push.
    after = apply_delivery(state, "alice", message("bob", 2), now=NOW + timedelta(hours=2))
    assert after.push is not None
    assert (after.push.merged_count, after.push.unread_total) == (1, 2)


def test_an_indefinite_mute_holds_until_unmuted() -> None:
    state = UserState()
    apply_own_command(state, push_settings(muted=True))
    later = NOW + timedelta(days=365)
    assert apply_delivery(state, "alice", message("bob", 1), now=later).push is None
    apply_own_command(state, push_settings(muted=False))
    assert apply_delivery(state, "alice", message("bob", 2), now=later).push is not None


def test_quiet_hours_and_locale_ride_on_the_push_and_each_change_replaces_all() -> None:
    state = UserState()
    apply_own_command(state, push_settings(quiet_hours=BERLIN_NIGHTS, locale="de-AT"))
    first = apply_delivery(state, "alice", message("bob", 1), now=NOW)
    assert first.push is not None
    assert (first.push.quiet_hours, first.push.locale) == (BERLIN_NIGHTS, "de-AT")
    apply_own_command(state, push_settings(locale="fr"))
    second = apply_delivery(state, "alice", message("bob", 2, "c-2"), now=NOW)
    assert second.push is not None
    assert (second.push.quiet_hours, second.push.locale) == (None, "fr")


def test_push_preferences_survive_the_state_json_and_old_state_loads_with_defaults() -> None:
    state = UserState()
    apply_own_command(
        state,
        push_settings(
            muted=True,
            muted_until=NOW + timedelta(hours=8),
            quiet_hours=BERLIN_NIGHTS,
            locale="de",
        ),
    )
    restored = UserState.from_json(state.to_json())
    assert restored == state
    assert restored.push == PushPreferences(
        muted=True, muted_until=NOW + timedelta(hours=8), quiet_hours=BERLIN_NIGHTS, locale="de"
    )
    # State written before push preferences existed (no "push" key) loads with the defaults.
    old = {
        "last_sync_id": 4,
        "conversations": {"c-1": {"last_seq": 3, "read_seq": 1, "unread_seqs": [2, 3]}},
        "devices": {},
    }
    loaded = UserState.from_json(old)
    assert loaded.push == PushPreferences()
    assert not loaded.push.is_muted(NOW)
    assert "push" not in UserState().to_json()
    pushed = apply_delivery(loaded, "alice", message("bob", 4), now=NOW)
    assert pushed.push is not None
    assert (pushed.push.quiet_hours, pushed.push.locale, pushed.push.unread_total) == (
        None,
        None,
        3,
    )


def test_a_late_disconnect_of_an_old_connection_is_ignored() -> None:
    state = UserState()
    apply_presence(state, presence(connected=True, connection="old"))
    apply_presence(state, presence(connected=True, connection="new"))
    assert not apply_presence(state, presence(connected=False, connection="old"))
    assert "phone" in state.devices
    assert apply_presence(state, presence(connected=False, connection="new"))
    assert not state.devices


def test_typing_reaches_online_devices_only_and_takes_no_sync_id() -> None:
    typing = TypingChanged.new(
        tenant_id=TENANT,
        actor=Actor(user_id="bob"),
        payload=TypingChangedPayload(conversation_id="c-1", active=True),
    )
    delivery = Delivery(user_id="alice", event=typing, kind=DeliveryKind.EPHEMERAL)
    offline = UserState()
    assert apply_delivery(offline, "alice", delivery, now=NOW).ephemeral == []
    online = UserState()
    apply_presence(online, presence(connected=True))
    outcome = apply_delivery(online, "alice", delivery, now=NOW)
    assert outcome.ephemeral == [typing] and not outcome.appended
    assert online.last_sync_id == 0


def test_user_state_survives_its_json_form() -> None:
    state = UserState()
    apply_presence(state, presence(connected=True))
    for seq in (1, 2):
        apply_delivery(state, "alice", message("bob", seq), now=NOW)
    restored = UserState.from_json(state.to_json())
    assert restored == state


def test_recalls_and_edits_move_the_last_seq_and_a_new_member_gets_a_view() -> None:
    state = UserState()
    apply_delivery(state, "alice", message("bob", 1), now=NOW)
    edit = MessageEdited.new(
        tenant_id=TENANT,
        actor=Actor(user_id="bob"),
        payload=MessageEditedPayload(
            conversation_id="c-1",
            message_id=message_event_id(TENANT, "bob", "m1"),
            body=TextBody(text="fixed"),
            conversation_seq=2,
        ),
    )
    apply_delivery(state, "alice", Delivery(user_id="alice", event=edit), now=NOW)
    assert state.conversations["c-1"].last_seq == 2
    added = ConversationMemberAdded.new(
        tenant_id=TENANT,
        actor=Actor(user_id="bob"),
        payload=ConversationMemberAddedPayload(conversation_id="c-9", user_id="alice"),
    )
    apply_delivery(state, "alice", Delivery(user_id="alice", event=added), now=NOW)
    assert "c-9" in state.conversations


def renewal(at: datetime, started_at: datetime = NOW, lease_ms: int = 20_000) -> NodeLeaseRenewed:
    return NodeLeaseRenewed.new(
        tenant_id="_system",
        occurred_at=at,
        payload=NodeLeasePayload(node_id="ingress-1", started_at=started_at, lease_ms=lease_ms),
    )


def connected_at(at: datetime) -> DeviceConnected:
    event = presence(True)
    assert isinstance(event, DeviceConnected)
    return event.model_copy(update={"occurred_at": at})


def test_a_device_whose_node_stopped_renewing_its_lease_is_offline_and_pushed_to() -> None:
    """The node of alice's phone died without its disconnect: while its lease holds the phone
    is online (live delivery, no push); once it lapsed, by the message's own time, alice gets
    a push. The device is kept: a node back from a Kafka blip renews and it is online again."""
    lease = renew_lease(None, renewal(NOW + timedelta(seconds=1)))
    assert lease == NodeLease(started_at=NOW, expires_at=NOW + timedelta(seconds=21))
    state = UserState()
    apply_presence(state, connected_at(NOW + timedelta(seconds=2)))

    apply_leases(state, {"ingress-1": lease}, now=NOW + timedelta(seconds=20))
    held = apply_delivery(state, "alice", message("bob", 1), now=NOW + timedelta(seconds=20))
    assert held.push is None and held.live_nodes == {"ingress-1": ["phone"]}

    apply_leases(state, {"ingress-1": lease}, now=NOW + timedelta(seconds=21))
    lapsed = apply_delivery(state, "alice", message("bob", 2), now=NOW + timedelta(seconds=21))
    assert lapsed.push is not None and lapsed.live_nodes == {}
    assert "phone" in state.devices

    renewed = renew_lease(lease, renewal(NOW + timedelta(seconds=30)))
    assert renewed.expires_at == NOW + timedelta(seconds=50)
    apply_leases(state, {"ingress-1": renewed}, now=NOW + timedelta(seconds=31))
    assert apply_delivery(state, "alice", message("bob", 3), now=NOW).live_nodes


def test_a_node_restarted_under_its_id_disowns_the_devices_of_its_earlier_run() -> None:
    state = UserState()
    apply_presence(state, connected_at(NOW + timedelta(seconds=2)))
    old = renew_lease(None, renewal(NOW + timedelta(seconds=5)))
    restarted = NOW + timedelta(seconds=10)
    new = renew_lease(old, renewal(restarted, started_at=restarted))
    assert new.started_at == restarted
    assert renew_lease(new, renewal(NOW + timedelta(seconds=9))) == new, (
        "a late renewal of the old run"
    )
    apply_leases(state, {"ingress-1": new}, now=restarted)
    assert state.devices == {}
    assert apply_delivery(state, "alice", message("bob", 1), now=restarted).push is not None


def test_devices_of_a_node_that_never_renewed_a_lease_stay_online() -> None:
    """State and nodes from before leases: no lease known, the node's word holds."""
    state = UserState.from_json({"devices": {"phone": ["ingress-0", "conn-0"]}})
    apply_leases(state, {}, now=NOW + timedelta(days=1))
    assert apply_delivery(state, "alice", message("bob", 1), now=NOW).push is None
    apply_presence(state, connected_at(NOW))
    assert UserState.from_json(state.to_json()).devices == state.devices

"""The token table's rules on their own: replacement, removal, moved tokens in either read order,
tokens scoped to their tenant, and another user's claim refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas import events as ev
from sinks.push.proof import TokenProofs
from sinks.push.tokens import Detach, Holder, TokenTable

T0 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
PROOFS = TokenProofs(b"test-secret", ttl_seconds=600)


def registration(
    user: str, device: str, token: str, at: datetime, *, tenant: str = "acme", app: str = "app"
) -> ev.PushTokenRegistered:
    return ev.PushTokenRegistered.new(
        tenant_id=tenant,
        occurred_at=at,
        payload=ev.PushTokenRegisteredPayload(
            user_id=user, device_id=device, provider=ev.PushProvider.APNS, token=token, app_id=app
        ),
    )


def removal(user: str, device: str, token: str, at: datetime) -> ev.PushTokenRemoved:
    return ev.PushTokenRemoved.new(
        tenant_id="acme",
        occurred_at=at,
        payload=ev.PushTokenRemovedPayload(
            user_id=user, device_id=device, provider=ev.PushProvider.APNS, token=token, app_id="app"
        ),
    )


def assert_removal(
    detach: Detach, reason: ev.PushTokenRemovalReason, user: str, occurred_at: datetime
) -> None:
    """The removal of ``user``'s "shared" token that ``detach`` writes: for ``reason``, at the
    time of the registration that caused it, and the same event whoever writes it."""
    event = detach.removal()
    assert event.payload.reason is reason
    assert (event.payload.user_id, event.payload.token) == (user, "shared")
    assert event.occurred_at == occurred_at
    assert event.event_id == detach.removal().event_id


def test_a_new_token_replaces_the_old_and_a_stale_removal_changes_nothing() -> None:
    table = TokenTable()
    table.apply(registration("bob", "phone", "t1", T0))
    table.apply(registration("bob", "phone", "t2", T0 + timedelta(seconds=1)))
    assert table.apply(removal("bob", "phone", "t1", T0 + timedelta(seconds=2))) == []
    assert [t.token for t in table.targets("acme", "bob")] == ["t2"]
    assert table.holder_of("acme", ev.PushProvider.APNS, "t1") is None
    table.apply(removal("bob", "phone", "t2", T0 + timedelta(seconds=3)))
    assert table.targets("acme", "bob") == [] and len(table) == 0


def test_a_moved_token_detaches_the_users_earlier_device_whatever_the_read_order() -> None:
    """The same user on a new device id (the app reinstalled): the later registration keeps it."""
    older = registration("dave", "phone", "shared", T0)
    newer = registration("dave", "new-phone", "shared", T0 + timedelta(minutes=1))
    for first, second in ((older, newer), (newer, older)):
        table = TokenTable()
        assert table.apply(first) == []
        (detach,) = table.apply(second)
        assert detach.holder == Holder("acme", "dave", "phone")
        assert [t.device_id for t in table.targets("acme", "dave")] == ["new-phone"]
        assert_removal(detach, ev.PushTokenRemovalReason.MOVED, "dave", newer.occurred_at)


def test_a_token_of_one_tenant_is_not_touched_by_another_tenants_registration() -> None:
    """Tenant B registering the string of a token tenant A's device holds, for B's own app: A
    keeps it, and each holds its own (the provider tells which app the token really is of)."""
    victim = registration("dave", "phone", "shared", T0, app="com.a.chat")
    intruder = registration(
        "mallory", "phone", "shared", T0 + timedelta(minutes=1), tenant="b", app="com.b.chat"
    )
    for first, second in ((victim, intruder), (intruder, victim)):
        table = TokenTable()
        assert table.apply(first) == []
        assert table.apply(second) == []
        assert [t.token for t in table.targets("acme", "dave")] == ["shared"]
        assert [t.token for t in table.targets("b", "mallory")] == ["shared"]
        assert table.holder_of("acme", ev.PushProvider.APNS, "shared") == Holder(
            "acme", "dave", "phone"
        )


def test_another_tenants_claim_on_a_shared_app_is_refused_and_never_takes_it() -> None:
    """One app serving both tenants: B's registration of A's token would put B's messages on
    A's user's phone. It is refused (whatever the read order), and A's device keeps its token."""
    victim = registration("dave", "phone", "shared", T0)
    intruder = registration("mallory", "phone", "shared", T0 + timedelta(minutes=1), tenant="b")
    for first, second in ((victim, intruder), (intruder, victim)):
        table = TokenTable()
        (refused,) = table.apply(first) + table.apply(second)
        assert refused.holder == Holder("b", "mallory", "phone")
        assert refused.removal().tenant_id == "b"
        assert refused.reason is ev.PushTokenRemovalReason.CLAIM_REFUSED
        assert [t.device_id for t in table.targets("acme", "dave")] == ["phone"]
        assert table.targets("b", "mallory") == []
    # Proven (the phone is really signed in to B now): B holds it too; A is not touched.
    table = TokenTable(PROOFS)
    table.apply(victim)
    proof = PROOFS.issue(
        tenant_id="b",
        user_id="mallory",
        device_id="phone",
        provider=ev.PushProvider.APNS,
        token="shared",
        issued_at=intruder.occurred_at,
    )
    proven = intruder.model_copy(
        update={"payload": intruder.payload.model_copy(update={"proof": proof})}
    )
    assert table.apply(proven) == []
    assert [t.device_id for t in table.targets("acme", "dave")] == ["phone"]
    assert [t.device_id for t in table.targets("b", "mallory")] == ["phone"]


def test_another_users_claim_is_refused_whatever_the_read_order() -> None:
    """Another user of the tenant registering a held token proves nothing: the holder keeps it,
    the claimant gets a ``claim-refused`` removal."""
    holder = registration("dave", "phone", "shared", T0)
    claim = registration("mallory", "laptop", "shared", T0 + timedelta(minutes=1))
    for first, second in ((holder, claim), (claim, holder)):
        table = TokenTable()
        detached = table.apply(first) + table.apply(second)
        assert [t.device_id for t in table.targets("acme", "dave")] == ["phone"]
        assert table.targets("acme", "mallory") == []
        (refused,) = detached
        assert refused.holder == Holder("acme", "mallory", "laptop")
        assert_removal(
            refused, ev.PushTokenRemovalReason.CLAIM_REFUSED, "mallory", claim.occurred_at
        )


def test_every_refused_claim_gets_its_own_removal_and_a_released_token_can_be_claimed() -> None:
    table = TokenTable()
    table.apply(registration("dave", "phone", "shared", T0))
    (first,) = table.apply(registration("erin", "phone", "shared", T0 + timedelta(minutes=1)))
    (again,) = table.apply(registration("erin", "phone", "shared", T0 + timedelta(minutes=2)))
    assert first.removal().event_id != again.removal().event_id
    # dave logs out: erin's next registration (the app registers at every launch) gets it.
    table.apply(removal("dave", "phone", "shared", T0 + timedelta(minutes=3)))
    assert table.apply(registration("erin", "phone", "shared", T0 + timedelta(minutes=4))) == []
    assert [t.token for t in table.targets("acme", "erin")] == ["shared"]


def test_a_reload_in_time_order_gives_the_token_to_whom_the_times_say() -> None:
    """dave's phone, then mallory's claim (refused), then dave's reinstall (moved): any read
    order of the latest records gives dave's new phone the token and mallory nothing."""
    records = [
        registration("dave", "phone", "shared", T0),
        registration("mallory", "laptop", "shared", T0 + timedelta(minutes=1)),
        registration("dave", "new-phone", "shared", T0 + timedelta(minutes=2)),
    ]
    for order in (records, records[::-1], [records[1], records[2], records[0]]):
        table = TokenTable()
        detached = table.load(order)
        assert [t.device_id for t in table.targets("acme", "dave")] == ["new-phone"]
        assert table.targets("acme", "mallory") == []
        assert sorted((d.holder.device_id, d.reason) for d in detached) == [
            ("laptop", ev.PushTokenRemovalReason.CLAIM_REFUSED),
            ("phone", ev.PushTokenRemovalReason.MOVED),
        ]


def test_claims_on_a_held_token_leave_no_state_behind() -> None:
    """A client claiming a token it does not hold, from as many device ids as it likes, grows
    nothing: the table holds one entry per device that holds a token."""
    table = TokenTable()
    table.apply(registration("dave", "phone", "shared", T0))
    refusals: list[Detach] = []
    for index in range(1000):
        at = T0 + timedelta(seconds=index + 1)
        refusals += table.apply(registration(f"mallory-{index % 7}", f"d-{index}", "shared", at))
    assert len(refusals) == 1000
    assert len(table) == 1
    assert all(table.targets("acme", f"mallory-{user}") == [] for user in range(7))
    assert [t.device_id for t in table.targets("acme", "dave")] == ["phone"]

"""The token table's rules on their own: replacement, removal, moved tokens in either read order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas import events as ev
from sinks.push.tokens import Holder, TokenTable

T0 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


def registration(
    user: str, device: str, token: str, at: datetime, *, tenant: str = "acme"
) -> ev.PushTokenRegistered:
    return ev.PushTokenRegistered.new(
        tenant_id=tenant,
        occurred_at=at,
        payload=ev.PushTokenRegisteredPayload(
            user_id=user, device_id=device, provider=ev.PushProvider.APNS, token=token, app_id="app"
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


def test_a_new_token_replaces_the_old_and_a_stale_removal_changes_nothing() -> None:
    table = TokenTable()
    table.apply(registration("bob", "phone", "t1", T0))
    table.apply(registration("bob", "phone", "t2", T0 + timedelta(seconds=1)))
    assert table.apply(removal("bob", "phone", "t1", T0 + timedelta(seconds=2))) == []
    assert [t.token for t in table.targets("acme", "bob")] == ["t2"]
    assert table.holder_of(ev.PushProvider.APNS, "t1") is None
    table.apply(removal("bob", "phone", "t2", T0 + timedelta(seconds=3)))
    assert table.targets("acme", "bob") == [] and len(table) == 0


def test_a_moved_token_detaches_the_earlier_holder_whatever_the_read_order() -> None:
    older = registration("dave", "phone", "shared", T0)
    newer = registration("erin", "tablet", "shared", T0 + timedelta(minutes=1), tenant="other")
    for first, second in ((older, newer), (newer, older)):
        table = TokenTable()
        assert table.apply(first) == []
        (detach,) = table.apply(second)
        assert detach.holder == Holder("acme", "dave", "phone")
        assert table.targets("acme", "dave") == []
        assert [t.token for t in table.targets("other", "erin")] == ["shared"]
        event = detach.removal()
        assert event.payload.reason is ev.PushTokenRemovalReason.MOVED
        assert (event.payload.user_id, event.payload.token) == ("dave", "shared")
        assert event.occurred_at == newer.occurred_at
        # Whoever writes it writes the same event.
        assert event.event_id == detach.removal().event_id

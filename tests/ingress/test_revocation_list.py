"""The revocations a node holds: what each scope matches, and that every entry is dropped once
no token it can match is valid any more (the node's memory is bounded by time, not by trust)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core.auth import Claims
from ingress.revocations import RevocationList, revokes
from pipelines.revoke import revocation
from schemas.events import TokensRevoked

HORIZON = timedelta(hours=24, seconds=90)
T0 = datetime(2026, 1, 1, 12, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def claims(
    user: str = "alice",
    *,
    tenant: str = "acme",
    device: str | None = None,
    jti: str | None = "jti-1",
    issued: datetime = T0 - timedelta(minutes=5),
) -> Claims:
    return Claims(
        user_id=user,
        tenant_id=tenant,
        device_id=device,
        roles=frozenset(),
        expires_at=issued + timedelta(hours=1),
        issued_at=issued,
        token_id=jti,
    )


def revoked(**subject: str | None) -> TokensRevoked:
    return revocation(operator="ops", now=T0, **subject)


def test_each_scope_matches_what_it_names() -> None:
    revocations = RevocationList(HORIZON, clock=Clock())
    assert revocations.add(revoked(tenant_id="acme", token_id="jti-1"))
    assert revocations.add(revoked(tenant_id="acme", user_id="bob"))
    assert revocations.add(revoked(tenant_id="acme", user_id="carol", device_id="phone"))
    assert revocations.add(revoked(token_id="jti-anywhere"))

    assert revocations.refusal(claims(), None) == "the token was revoked"
    assert revocations.refusal(claims(jti="jti-2"), None) is None
    assert revocations.refusal(claims(tenant="globex"), None) is None  # that tenant's jti only
    assert revocations.refusal(claims(tenant="globex", jti="jti-anywhere"), None) is not None
    # A user's tokens issued before the moment, not after; not another user's.
    assert revocations.refusal(claims("bob", jti=None), None) is not None
    assert (
        revocations.refusal(claims("bob", jti=None, issued=T0 + timedelta(seconds=1)), None) is None
    )
    assert revocations.refusal(claims("dave", jti=None), None) is None
    # A device's: the token's did, else the device that uses it.
    assert revocations.refusal(claims("carol", jti=None), "phone") is not None
    assert revocations.refusal(claims("carol", jti=None, device="phone"), "laptop") is not None
    assert revocations.refusal(claims("carol", jti=None), "laptop") is None
    # Claims whose iat is unknown count as issued long ago.
    unknown = Claims("bob", "acme", None, frozenset(), T0 + timedelta(hours=1))
    assert revocations.refusal(unknown, None) is not None


def test_entries_are_dropped_at_their_horizon() -> None:
    clock = Clock()
    revocations = RevocationList(HORIZON, clock=clock)
    revocations.add(revoked(tenant_id="acme", token_id="jti-1"))
    revocations.add(revoked(tenant_id="acme", user_id="bob"))
    clock.now = T0 + timedelta(hours=1)
    revocations.add(revocation(operator="ops", now=clock.now, tenant_id="acme", user_id="eve"))
    assert len(revocations) == 3
    assert revocations.prune() == 0

    clock.now = T0 + HORIZON
    # Past the horizon an entry matches nothing even before it is pruned ...
    assert revocations.refusal(claims(), None) is None
    assert revocations.prune() == 2
    assert len(revocations) == 1
    clock.now = T0 + timedelta(hours=1) + HORIZON
    assert revocations.prune() == 1
    assert len(revocations) == 0
    # ... and one already past it is not taken in at all (a replay of an old record).
    assert not revocations.add(revoked(tenant_id="acme", user_id="bob"))
    assert len(revocations) == 0


def test_a_newer_revocation_of_a_subject_replaces_the_older() -> None:
    clock = Clock()
    revocations = RevocationList(HORIZON, clock=clock)
    revocations.add(revoked(tenant_id="acme", user_id="bob"))
    later = T0 + timedelta(hours=2)
    clock.now = later
    revocations.add(revocation(operator="ops", now=later, tenant_id="acme", user_id="bob"))
    assert len(revocations) == 1
    assert revocations.refusal(claims("bob", issued=T0 + timedelta(hours=1)), None) is not None
    # The first entry's horizon passes: the newer one is kept (its stale heap item skipped).
    clock.now = T0 + HORIZON
    assert revocations.prune() == 0
    assert len(revocations) == 1


def test_an_open_socket_is_matched_like_a_presented_token() -> None:
    token = revoked(tenant_id="acme", token_id="jti-1")
    assert revokes(token, "acme", "jti-1", T0)
    assert not revokes(token, "acme", "jti-2", T0)
    assert not revokes(token, "acme", None, T0)
    assert not revokes(token, "globex", "jti-1", T0)
    user = revoked(tenant_id="acme", user_id="bob")
    assert revokes(user, "acme", None, T0 - timedelta(seconds=1))
    assert not revokes(user, "acme", None, T0)

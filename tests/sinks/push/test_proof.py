"""Token challenges: good for one claim, for a while, verified from the record alone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas import events as ev
from sinks.push.proof import TokenProofs
from sinks.push.tokens import Holder, TokenTable

T0 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
PROOFS = TokenProofs(b"test-secret", ttl_seconds=600)


def claim(
    user: str = "erin",
    device: str = "phone",
    token: str = "shared",
    at: datetime = T0,
    *,
    tenant: str = "acme",
    proof: str | None = None,
) -> ev.PushTokenRegistered:
    return ev.PushTokenRegistered.new(
        tenant_id=tenant,
        occurred_at=at,
        payload=ev.PushTokenRegisteredPayload(
            user_id=user,
            device_id=device,
            provider=ev.PushProvider.APNS,
            token=token,
            app_id="app",
            proof=proof,
        ),
    )


def challenge_for(event: ev.PushTokenRegistered, proofs: TokenProofs = PROOFS) -> str:
    """The challenge issued for ``event``'s claim (its device, token and time)."""
    claim = event.payload.model_dump(include={"user_id", "device_id", "provider", "token"})
    return proofs.issue(tenant_id=event.tenant_id, issued_at=event.occurred_at, **claim)


def test_a_challenge_proves_the_claim_it_was_issued_for() -> None:
    challenge = challenge_for(claim())
    assert PROOFS.verify(claim(at=T0 + timedelta(seconds=5), proof=challenge))


@pytest.mark.parametrize(
    "echo",
    [
        claim(user="mallory", at=T0 + timedelta(seconds=5)),
        claim(device="laptop", at=T0 + timedelta(seconds=5)),
        claim(tenant="rival", at=T0 + timedelta(seconds=5)),
        claim(token="other", at=T0 + timedelta(seconds=5)),
        claim(at=T0 + timedelta(seconds=601)),  # expired
        claim(at=T0 - timedelta(seconds=1)),  # before it was issued
    ],
    ids=["other user", "other device", "other tenant", "other token", "expired", "too early"],
)
def test_a_challenge_proves_nothing_else(echo: ev.PushTokenRegistered) -> None:
    challenge = challenge_for(claim())
    proving = echo.model_copy(
        update={"payload": echo.payload.model_copy(update={"proof": challenge})}
    )
    assert not PROOFS.verify(proving)


@pytest.mark.parametrize(
    "proof", ["", "x", "123", "123.", "abc.def", "9" * 40 + ".x", "-5.abc", "1.2.3"]
)
def test_a_malformed_or_forged_proof_is_no_proof(proof: str) -> None:
    event = claim(at=T0 + timedelta(seconds=5))
    forged = event.model_copy(update={"payload": event.payload.model_copy(update={"proof": proof})})
    assert not PROOFS.verify(forged)
    other_key = challenge_for(claim(), TokenProofs(b"another-secret", ttl_seconds=600))
    assert not PROOFS.verify(claim(at=T0 + timedelta(seconds=5), proof=other_key))


def test_a_proven_claim_takes_the_token_from_another_user_whatever_the_read_order() -> None:
    holder = claim(user="dave", at=T0 - timedelta(minutes=5))
    refused = claim()
    proven = claim(at=T0 + timedelta(seconds=5), proof=challenge_for(refused))
    for order in ((holder, refused, proven), (proven, refused, holder), (refused, proven, holder)):
        table = TokenTable(PROOFS)
        detached = [d for event in order for d in table.apply(event)]
        assert [t.device_id for t in table.targets("acme", "erin")] == ["phone"]
        assert table.targets("acme", "dave") == []
        assert Holder("acme", "dave", "phone") in {d.holder for d in detached}
        # Without the key, the same records prove nothing: dave keeps it.
        plain = TokenTable()
        for event in order:
            plain.apply(event)
        assert [t.device_id for t in plain.targets("acme", "dave")] == ["phone"]
        assert plain.targets("acme", "erin") == []

"""Proof that a device receives a push token's pushes: the challenge a claimant must echo.

A token string proves nothing (it shows up in logs, on a shared phone, in a hostile app), so a
registration of a token that a device of *another user* holds is refused
(``sinks.push.tokens``). The one real proof of a token is that the provider delivers to it: the
push sink sends the token a silent (background) push carrying a *challenge*, and only the app
on the phone that holds the token sees it. The app, signed in as the claimant, registers the
token again with the challenge as ``proof``; that registration takes the token.

The challenge is an HMAC (``IM_PUSH__TOKEN_PROOF_SECRET``) of the claim — tenant, user,
device, provider, token — and the time it was issued, so that:

- it is good for that claim only: another device or user cannot use it, nor a phone that got
  it for someone else's claim;
- it expires (``IM_PUSH__TOKEN_PROOF_TTL_SECONDS`` after it was issued, measured against the
  proving registration's own time), so a leaked one is soon worthless;
- verifying needs no state: every sink replica, and a sink reloading the token topic, reaches
  the same verdict from the record alone (nothing to store per pending claim, nothing a client
  can grow), and every replica issues the same challenge for a claim (its time is the claim's).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime

from core.push_settings import PushProviderSettings
from schemas.events import PushProvider, PushTokenRegistered

#: The challenge's fields in the background push's data (strings, as FCM data must be).
CHALLENGE_KEY = "imstream_token_challenge"
CHALLENGE_DEVICE_KEY = "imstream_device_id"


class TokenProofs:
    """Issues and verifies challenges with one secret (every sink replica the same)."""

    def __init__(self, secret: bytes, ttl_seconds: int) -> None:
        if not secret:
            raise ValueError("a token proof secret must not be empty")
        self._secret = secret
        self.ttl_seconds = ttl_seconds

    def issue(
        self,
        *,
        tenant_id: str,
        user_id: str,
        device_id: str,
        provider: PushProvider,
        token: str,
        issued_at: datetime,
    ) -> str:
        """The challenge for this claim, ``<unix seconds>.<mac>``."""
        seconds = int(issued_at.timestamp())
        claim = (tenant_id, user_id, device_id, provider.value, token)
        return f"{seconds}.{self._mac(claim, seconds)}"

    def verify(self, event: PushTokenRegistered) -> bool:
        """Whether the registration carries a challenge issued for it and not yet expired."""
        payload = event.payload
        proof = payload.proof
        if proof is None:
            return False
        seconds_text, _, mac = proof.partition(".")
        if not seconds_text.isdigit() or len(seconds_text) > 12:
            return False
        seconds = int(seconds_text)
        age = event.occurred_at.timestamp() - seconds
        if not 0 <= age <= self.ttl_seconds:
            return False
        claim = (
            event.tenant_id,
            payload.user_id,
            payload.device_id,
            payload.provider.value,
            payload.token,
        )
        return hmac.compare_digest(mac, self._mac(claim, seconds))

    def _mac(self, claim: tuple[str, ...], seconds: int) -> str:
        # Newline-separated: the ids cannot contain one, the token is the last field but the
        # time (digits), so no two claims give one message.
        message = "\n".join((*claim, str(seconds)))
        digest = hmac.new(self._secret, message.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def token_proofs(push: PushProviderSettings) -> TokenProofs | None:
    """The sink's challenge issuer and verifier; None when no proof secret is configured."""
    secret = push.token_proof_secret
    if secret is None or not secret.get_secret_value():
        return None
    return TokenProofs(secret.get_secret_value().encode(), push.token_proof_ttl_seconds)

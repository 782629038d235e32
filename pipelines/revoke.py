"""``imstream revoke``: revoke one token, or log a user or one of their devices out.

Writes one ``tokens.revoked`` event to the revocation topic (``catalog.revocations``), keyed by
its subject (``revocation_key``), and waits until Kafka has it (``acks=all``). Every ingress node
follows that topic: it refuses the revoked tokens from then on and closes the sockets using them
within a second (ingress/revocations.py). The event is also the audit trail: the ClickHouse sink
audits every catalog topic, so it lands in ``audit_events`` with ``event_type`` ``tokens.revoked``
and the operator's name.

Delivery: at least once (idempotent producer); writing the same revocation twice is harmless.
"""

from __future__ import annotations

from datetime import UTC, datetime

from core.connections import UnacknowledgedError, produce_acknowledged
from core.settings import Settings
from schemas.events import (
    SYSTEM_TENANT,
    RevocationScope,
    TokensRevoked,
    TokensRevokedPayload,
    encode_event,
)
from schemas.topics import revocation_key, topic_catalog


class RevocationError(Exception):
    """The revocation was not written: Kafka refused or did not answer."""


def revocation(
    *,
    operator: str,
    tenant_id: str | None = None,
    token_id: str | None = None,
    user_id: str | None = None,
    device_id: str | None = None,
    reason: str | None = None,
    now: datetime | None = None,
) -> TokensRevoked:
    """The event for one of: ``token_id`` (in ``tenant_id``, else in every tenant), ``user_id``
    in ``tenant_id``, or ``user_id`` and ``device_id`` in ``tenant_id``; tokens issued before
    ``now`` are the ones a user or device revocation refuses. Raises ``ValueError`` (pydantic's)
    for a combination that names no single subject or an invalid id."""
    moment = now or datetime.now(UTC)
    if token_id is not None:
        scope = RevocationScope.TOKEN
    elif device_id is not None:
        scope = RevocationScope.DEVICE
    else:
        scope = RevocationScope.USER
    if scope is not RevocationScope.TOKEN and tenant_id is None:
        raise ValueError("a user's or a device's tokens are revoked in one tenant: give --tenant")
    return TokensRevoked.new(
        tenant_id=tenant_id or SYSTEM_TENANT,
        occurred_at=moment,
        payload=TokensRevokedPayload(
            scope=scope,
            token_id=token_id,
            user_id=user_id,
            device_id=device_id,
            issued_before=None if scope is RevocationScope.TOKEN else moment,
            operator=operator,
            reason=reason,
        ),
    )


def publish_revocation(
    settings: Settings, event: TokensRevoked, *, timeout: float = 30.0
) -> tuple[str, int, int]:
    """Write ``event`` and wait for Kafka's acknowledgement: its topic, partition and offset."""
    topic = topic_catalog(settings).revocations
    try:
        partition, offset = produce_acknowledged(
            settings, topic.name, revocation_key(event), encode_event(event), timeout=timeout
        )
    except UnacknowledgedError as error:
        raise RevocationError(
            f"{error}; is Kafka up ({settings.kafka.bootstrap_servers}) and the topic created "
            "(`imstream topics apply`)?"
        ) from error
    return topic.name, partition, offset


def describe(event: TokensRevoked) -> str:
    """What the revocation does, in a sentence for the operator."""
    payload = event.payload
    before = payload.issued_before.isoformat() if payload.issued_before else ""
    tenant = "every tenant" if event.tenant_id == SYSTEM_TENANT else f"tenant {event.tenant_id}"
    match payload.scope:
        case RevocationScope.TOKEN:
            what = f"the token with jti {payload.token_id!r} in {tenant}"
        case RevocationScope.USER:
            what = f"every token of user {payload.user_id!r} in {tenant} issued before {before}"
        case RevocationScope.DEVICE:
            what = (
                f"every token used by device {payload.device_id!r} of user {payload.user_id!r} "
                f"in {tenant} issued before {before}"
            )
    return f"revoked {what}"

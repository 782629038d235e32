"""Building push jobs and notifications for the push tests."""

from __future__ import annotations

import random
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict

from cryptography.hazmat.primitives.asymmetric import ec

from core.push_settings import PreviewMode
from schemas.events import MessageBody, PushJob, PushProvider, TextBody
from sinks.push.notification import PushNotification, PushTarget, build_notification
from sinks.push.outcome import ProviderReply
from sinks.push.policy import QuietHours, RecipientPreferences, decide
from sinks.push.reliability import PushDispatcher, PushSender, RetryPolicy

APNS_TOPIC = "com.example.imstream"
#: A second app (a debug build) whose tokens belong to the APNs sandbox.
APNS_DEBUG_TOPIC = "com.example.imstream.debug"
FCM_APP = "1:1234567890:android:abcdef"


def make_job(
    *,
    conversation_id: str = "c-1",
    conversation_seq: int = 7,
    sender_id: str = "alice",
    body: MessageBody | None = None,
    merged_count: int = 1,
    unread_total: int = 3,
    occurred_at: datetime | None = None,
    tenant_id: str = "acme",
) -> PushJob:
    return PushJob(
        job_id=str(uuid.uuid4()),
        tenant_id=tenant_id,
        user_id="bob",
        conversation_id=conversation_id,
        conversation_seq=conversation_seq,
        message_id=str(uuid.uuid4()),
        sender_id=sender_id,
        body=TextBody(text="hello there") if body is None else body,
        merged_count=merged_count,
        unread_total=unread_total,
        occurred_at=occurred_at or datetime.now(UTC),
    )


def make_notification(
    job: PushJob | None = None,
    *,
    preferences: RecipientPreferences | None = None,
    ttl_seconds: int = 3600,
    preview: PreviewMode = PreviewMode.FULL,
) -> PushNotification:
    job = job or make_job()
    decision = decide(
        job, preferences or RecipientPreferences(), now=datetime.now(UTC), ttl_seconds=ttl_seconds
    )
    return build_notification(job, decision, preview=preview, locale="en", sender_name="Alice")


def quiet_now_notification() -> PushNotification:
    """The default notification to a recipient whose quiet hours are now (an hour either side)."""
    now = datetime.now(UTC)
    around_now = QuietHours(
        start=(now - timedelta(hours=1)).time(),
        end=(now + timedelta(hours=1)).time(),
        time_zone="UTC",
    )
    return make_notification(preferences=RecipientPreferences(quiet_hours=around_now))


async def send_once(sender: PushSender, target: PushTarget) -> ProviderReply:
    """The default notification sent to ``target`` by a sender of its own, closed after."""
    try:
        return await sender.send(make_notification(), target)
    finally:
        await sender.close()


@dataclass(frozen=True, slots=True)
class ApnsKey:
    """An APNs signing key as the Apple developer account gives it: the .p8 text and its ids."""

    pem: str
    key_id: str
    team_id: str
    public_key: ec.EllipticCurvePublicKey

    def credentials(self) -> ApnsCredentials:
        """What an ``ApnsSender`` signs its tokens with: ``ApnsSender(**key.credentials(), …)``."""
        return {"signing_key": self.pem, "key_id": self.key_id, "team_id": self.team_id}


class ApnsCredentials(TypedDict):
    signing_key: str
    key_id: str
    team_id: str


def apns_target(token: str | None = None, device_id: str = "iphone-1") -> PushTarget:
    return PushTarget(device_id, PushProvider.APNS, token or secrets.token_hex(32), APNS_TOPIC)


def fcm_target(token: str | None = None, device_id: str = "pixel-1") -> PushTarget:
    return PushTarget(
        device_id, PushProvider.FCM, token or f"fcm-{secrets.token_urlsafe(32)}", FCM_APP
    )


#: Retries in tens of milliseconds, a few seconds of Retry-After at the most.
TEST_RETRY = RetryPolicy(
    max_attempts=3,
    backoff_base_seconds=0.01,
    backoff_cap_seconds=0.05,
    max_retry_after_seconds=5.0,
)


def make_dispatcher(
    senders: Mapping[PushProvider, PushSender],
    *,
    concurrency: int = 8,
    breaker_failure_threshold: int = 100,
    breaker_cool_down_seconds: float = 0.3,
    request_timeout_seconds: float = 3.0,
    **retry: Any,
) -> PushDispatcher:
    """A dispatcher with test-sized delays: :data:`TEST_RETRY`, with the ``RetryPolicy`` fields
    ``retry`` names changed."""
    return PushDispatcher(
        senders,
        concurrency=concurrency,
        retry=replace(TEST_RETRY, **retry),
        breaker_failure_threshold=breaker_failure_threshold,
        breaker_cool_down_seconds=breaker_cool_down_seconds,
        request_timeout_seconds=request_timeout_seconds,
        rng=random.Random(7),
    )

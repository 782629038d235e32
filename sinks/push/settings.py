"""The push sender's settings group: APNs and FCM credentials and endpoints, delivery limits.

Pipelines' one settings object nests this group (``IM_PUSH__…``); nothing here reads the
environment. The endpoint overrides exist for the local fakes the tests start and for staging
relays: left unset, the senders talk to Apple's and Google's real hosts.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from sinks.push.notification import PreviewMode

Port = Annotated[int, Field(ge=1, le=65535)]


class ApnsEnvironment(StrEnum):
    """Which APNs an app's device tokens belong to: debug builds get sandbox tokens."""

    SANDBOX = "sandbox"
    PRODUCTION = "production"


class PushProviderSettings(BaseModel):
    """APNs, FCM and the delivery limits shared by both providers (each provider gets its own
    concurrency bound and circuit breaker with these values)."""

    model_config = ConfigDict(extra="forbid")

    # APNs: token-based authentication with a .p8 signing key.
    apns_key_path: Path | None = None
    apns_key_id: str | None = None
    apns_team_id: str | None = None
    #: The default bundle id (APNs topic). Every token names its own app, which is the topic
    #: its pushes go to; this is only the connection's fallback.
    apns_topic: str | None = None
    #: The environment of every app not listed in ``apns_app_environments``.
    apns_use_sandbox: bool = True
    #: Per bundle id, which APNs environment its tokens belong to.
    apns_app_environments: dict[str, ApnsEnvironment] = {}
    #: ``host:port`` to use instead of Apple's hosts (for both environments); unset: Apple's.
    apns_host: str | None = None
    #: A PEM file of the CAs to trust instead of the system's (a private relay, the test fake).
    apns_ca_file: Path | None = None
    #: HTTP/2 connections per APNs environment; each carries up to 1000 concurrent streams.
    apns_max_connections: Annotated[int, Field(ge=1)] = 2

    # FCM: HTTP v1 API with a service account (whose JSON names its own OAuth token_uri).
    fcm_credentials_path: Path | None = None
    #: Unset: the project id of the service account.
    fcm_project_id: str | None = None
    #: The base of the v1 endpoint, ``…/v1/projects``; unset: ``https://fcm.googleapis.com``'s.
    fcm_endpoint: str | None = None
    fcm_channel_id: str = "messages"

    # Delivery limits, per provider.
    concurrency: Annotated[int, Field(ge=1)] = 64
    max_attempts: Annotated[int, Field(ge=1)] = 5
    backoff_base_seconds: Annotated[float, Field(gt=0)] = 0.5
    backoff_cap_seconds: Annotated[float, Field(gt=0)] = 30.0
    #: A provider asking to wait longer than this gets no retry: the job is dead-lettered
    #: rather than holding a sender slot for minutes.
    max_retry_after_seconds: Annotated[float, Field(gt=0)] = 120.0
    breaker_failure_threshold: Annotated[int, Field(ge=1)] = 10
    breaker_cool_down_seconds: Annotated[float, Field(gt=0)] = 30.0
    request_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0

    # The push sink process (``imstream run push-sink``).
    #: Push jobs being delivered at once; the sink stops reading jobs while this many are open.
    jobs_in_flight: Annotated[int, Field(ge=1)] = 256
    #: On SIGTERM, how long jobs in flight may take to finish; the rest are read again later.
    drain_seconds: Annotated[float, Field(ge=0)] = 10.0

    # What a notification says and how long it is worth delivering.
    #: A push older than this (since its message) is not sent; providers drop it after that too.
    notification_ttl_seconds: Annotated[int, Field(ge=1)] = 24 * 3600
    default_preview: PreviewMode = PreviewMode.FULL
    #: Per tenant, a preview mode other than ``default_preview``.
    tenant_previews: dict[str, PreviewMode] = {}

    def preview_for(self, tenant_id: str) -> PreviewMode:
        return self.tenant_previews.get(tenant_id, self.default_preview)

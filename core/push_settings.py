"""The push sender's settings group: APNs and FCM credentials and endpoints, delivery limits.

Pipelines' one settings object nests this group (``IM_PUSH__…``); nothing here reads the
environment. The endpoint overrides exist for the local fakes the tests start and for staging
relays: left unset, the senders talk to Apple's and Google's real hosts.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, SecretStr, StringConstraints

from schemas.events import MAX_NAME_CHARS, PushProvider

Port = Annotated[int, Field(ge=1, le=65535)]
AppId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS)]


class PreviewMode(StrEnum):
    FULL = "full"
    SENDER = "sender"
    NONE = "none"


class TenantPushApps(BaseModel):
    """A tenant's apps: where its pushes may go. A token's APNs topic and FCM project come from
    here, never from the client: a client may name one of these apps when it registers a token
    (anything else is refused with ``push-app-not-allowed``), or none, and gets the first."""

    model_config = ConfigDict(extra="forbid")

    #: The bundle ids (APNs topics) of the tenant's iOS apps; the first is the default.
    apns_topics: list[AppId] = []
    #: The Firebase application ids of the tenant's Android apps; the first is the default.
    #: Empty: FCM tokens name no app (FCM addresses a project, not an app; the id selects
    #: nothing and is not checked).
    fcm_app_ids: list[AppId] = []
    #: The FCM project the tenant's Android apps belong to; unset: the deployment's
    #: (``fcm_project_id``, else the service account's).
    fcm_project_id: AppId | None = None

    def app_ids(self, provider: PushProvider) -> list[str]:
        return self.apns_topics if provider is PushProvider.APNS else self.fcm_app_ids

    def resolve(self, provider: PushProvider, requested: str | None) -> str | None:
        """The app id a token of ``provider`` is for: ``requested`` when it is one of this
        tenant's apps, the default when the client named none; None when it may not be used
        (an app of someone else, or no app of this provider configured)."""
        allowed = self.app_ids(provider)
        if provider is PushProvider.FCM and not allowed:
            return requested or FCM_ANY_APP
        if requested is None:
            return allowed[0] if allowed else None
        return requested if requested in allowed else None


#: The app id recorded for an FCM token of a tenant that lists no FCM app ids.
FCM_ANY_APP = "fcm"


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
    #: The deployment's bundle id (APNs topic): the connection's fallback, and the iOS app of
    #: every tenant whose apps (``apps`` / ``tenant_apps``) name none.
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
    #: ``sender``: who wrote, never what (a lock screen is public); ``full`` shows the text and
    #: is a tenant's opt-in (``tenant_previews``).
    default_preview: PreviewMode = PreviewMode.SENDER
    #: Per tenant, a preview mode other than ``default_preview``.
    tenant_previews: dict[str, PreviewMode] = {}

    # Where pushes go (the APNs topic, the FCM project): the operator's choice per tenant.
    #: The apps of every tenant not in ``tenant_apps`` (its APNs topics default to
    #: ``[apns_topic]``).
    apps: TenantPushApps = TenantPushApps()
    #: Per tenant, its own apps (replacing ``apps`` entirely).
    tenant_apps: dict[str, TenantPushApps] = {}

    # Proof of a token claim (``sinks.push.proof``).
    #: The key challenges are signed with, the same on every push sink replica; unset: no
    #: challenges, and a token another user's device holds stays with it until it lets go.
    token_proof_secret: SecretStr | None = None
    #: How long after it was issued a challenge may be echoed.
    token_proof_ttl_seconds: Annotated[int, Field(ge=1)] = 600
    #: At most one challenge to a token in this many seconds (per replica), however many
    #: claims of it come: a claimant cannot make the holder's phone a pager.
    token_challenge_interval_seconds: Annotated[float, Field(gt=0)] = 60.0

    def preview_for(self, tenant_id: str) -> PreviewMode:
        return self.tenant_previews.get(tenant_id, self.default_preview)

    def apps_for(self, tenant_id: str) -> TenantPushApps:
        """The tenant's apps: its own, or the deployment's default."""
        own = self.tenant_apps.get(tenant_id)
        if own is not None:
            return own
        if not self.apps.apns_topics and self.apns_topic:
            return self.apps.model_copy(update={"apns_topics": [self.apns_topic]})
        return self.apps

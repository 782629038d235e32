"""The FCM sender: pyfcm on the HTTP v1 API with a service account (OAuth through google-auth).

Every message carries the conversation as the Android collapse key and notification tag (a newer
push replaces the older one), the configured notification channel, the unread total as the
notification count, a TTL, and a data payload (``conversation_id``, ``conversation_seq``,
``message_id``, all strings) from which the app syncs. In the user's quiet hours it goes at
normal priority, silent and low in the shade.

How pyfcm (2.1) is used, and why:

- **Threads, not its async API.** pyfcm's ``async_notify_multiple_devices`` creates and runs an
  event loop of its own (it cannot be called from a running loop) and opens a session per
  request; its ``notify`` is synchronous (``requests``). Each request therefore runs in a thread
  pool with exactly ``concurrency`` workers: it never blocks the event loop, pooled connections
  and access tokens are reused, and the pool itself caps the requests in flight even when the
  dispatcher has stopped waiting for one that timed out.
- **Endpoint.** :class:`_FcmClient` builds the ``messages:send`` URL from a configurable base
  (Google's by default) and the configured project id, falling back to the service account's —
  pyfcm would prefer the account's project over an explicit one. The OAuth token endpoint is the
  ``token_uri`` of the service-account JSON, as google-auth reads it.
- **One attempt per call.** pyfcm sleeps for a Retry-After and re-sends, recursively and without
  a limit, and its default adapter re-sends on 502/503; the client sends once (with an adapter
  that never retries), so that the dispatcher's backoff, breaker and outcome records see every
  attempt. pyfcm's one re-send after an expired access token is kept.
- **Classification.** pyfcm's ``parse_response`` reduces an error to an exception type; FCM's
  error body (``status``, the ``FcmError`` code, the field a ``BadRequest`` names) and the
  Retry-After header are what decide between an invalid token, a retry and a failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# requests, not httpx: pyfcm sends with it and google-auth's AuthorizedSession refreshes the
# OAuth token on it.
import requests
from google.auth.exceptions import GoogleAuthError, RefreshError, TransportError
from google.oauth2 import service_account
from pyfcm import FCMNotification
from pyfcm.errors import FCMError
from requests.adapters import HTTPAdapter

from core.push_settings import PushProviderSettings
from schemas.events import PushProvider
from sinks.push.errors import LocalReason, PushConfigError
from sinks.push.notification import PushNotification, PushTarget
from sinks.push.outcome import OutcomeKind, ProviderReply, parse_retry_after

log = logging.getLogger(__name__)

GOOGLE_ENDPOINT = FCMNotification.FCM_END_POINT_BASE
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
RETRYABLE_CODES = frozenset({"UNAVAILABLE", "INTERNAL"})
THROTTLED_CODES = frozenset({"QUOTA_EXCEEDED", "RESOURCE_EXHAUSTED"})


class _FcmClient(FCMNotification):  # type: ignore[misc]  # pyfcm has no type information
    """pyfcm's client with a configurable endpoint and one POST per send."""

    def __init__(
        self, *, account: dict[str, Any], project_id: str, endpoint: str, max_connections: int
    ) -> None:
        """``account`` is the parsed service-account JSON."""
        # Credentials made here, not lazily by pyfcm: its lazy set-up is not thread-safe (two
        # threads each make one, and one of them sends the other's, not yet refreshed, token).
        credentials: service_account.Credentials = (
            service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                account, scopes=[FCM_SCOPE]
            )
        )
        super().__init__(
            credentials=credentials,
            project_id=project_id,
            adapter=HTTPAdapter(max_retries=0, pool_maxsize=max_connections),
        )
        self._endpoint = endpoint.rstrip("/")
        self._project_id = project_id

    @property
    def fcm_end_point(self) -> str:
        return self.url_for(None)

    def url_for(self, project_id: str | None) -> str:
        """The send URL of ``project_id`` (a tenant's project); None: the configured one."""
        return f"{self._endpoint}/{project_id or self._project_id}/messages:send"

    def send_request(
        self, payload: bytes, timeout: float | None = None, *, project_id: str | None = None
    ) -> requests.Response:
        """One POST (and one more after an expired access token); the response as it came."""
        url = self.url_for(project_id)
        response: requests.Response = self.requests_session.post(url, data=payload, timeout=timeout)
        if self._is_access_token_expired(response):
            self.thread_local.token_expiry = 0
            response = self.requests_session.post(url, data=payload, timeout=timeout)
        return response


def fcm_payload(
    client: FCMNotification, notification: PushNotification, target: PushTarget, channel_id: str
) -> bytes:
    """The v1 ``messages:send`` body of a notification to the device ``target.token``."""
    if notification.challenge is not None:
        # A data-only message: nothing shown, the app's handler reads the challenge.
        challenge: bytes = client.parse_payload(
            fcm_token=target.token,
            data_payload=notification.data(),
            android_config={"priority": "HIGH", "ttl": f"{notification.ttl_seconds}s"},
        )
        return challenge
    android_notification: dict[str, Any] = {
        "channel_id": channel_id,
        "tag": notification.collapse_id,
        "notification_count": notification.badge,
        "notification_priority": "PRIORITY_LOW" if notification.quiet else "PRIORITY_HIGH",
    }
    if not notification.quiet:
        android_notification["default_sound"] = True
    payload: bytes = client.parse_payload(
        fcm_token=target.token,
        notification_title=notification.title,
        notification_body=notification.body,
        data_payload=notification.data(),
        android_config={
            "collapse_key": notification.collapse_id,
            "priority": "NORMAL" if notification.quiet else "HIGH",
            "ttl": f"{notification.ttl_seconds}s",
            "notification": android_notification,
        },
    )
    return payload


def classify_fcm(status: int, body: bytes, headers: Mapping[str, str]) -> ProviderReply:
    """FCM's answer as an outcome: 200 sent; UNREGISTERED, and INVALID_ARGUMENT about the token,
    an invalid token; 429/QUOTA_EXCEEDED throttled and 5xx/UNAVAILABLE/INTERNAL failed, both
    retried after Retry-After; anything else failed for good."""
    error = _error_of(body)
    if status == 200:
        name = error.get("name") if error is not None else None
        return ProviderReply.sent(status, name if isinstance(name, str) else None)
    details = error.get("error", {}) if error is not None else {}
    if not isinstance(details, dict):
        details = {}
    status_name = str(details.get("status") or "")
    code = _fcm_error_code(details) or status_name or f"http-{status}"
    retry_after = parse_retry_after(headers.get("Retry-After"))
    if code == "UNREGISTERED" or (status == 404 and status_name == "NOT_FOUND"):
        return ProviderReply(OutcomeKind.INVALID_TOKEN, "UNREGISTERED", status_code=status)
    if code == "INVALID_ARGUMENT" and _names_the_token(details):
        return ProviderReply(OutcomeKind.INVALID_TOKEN, code, status_code=status)
    if status == 429 or code in THROTTLED_CODES:
        return ProviderReply(
            OutcomeKind.THROTTLED,
            code,
            retryable=True,
            status_code=status,
            retry_after_seconds=retry_after,
        )
    if status >= 500 or code in RETRYABLE_CODES:
        return ProviderReply(
            OutcomeKind.FAILED,
            code,
            retryable=True,
            status_code=status,
            retry_after_seconds=retry_after,
        )
    return ProviderReply(OutcomeKind.FAILED, code, status_code=status)


def _error_of(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _fcm_error_code(error: dict[str, Any]) -> str | None:
    for detail in error.get("details") or ():
        if isinstance(detail, dict) and detail.get("@type") == FCM_ERROR_TYPE:
            code = detail.get("errorCode")
            return code if isinstance(code, str) else None
    return None


def _names_the_token(error: dict[str, Any]) -> bool:
    """Whether an INVALID_ARGUMENT is about the registration token rather than the payload."""
    for detail in error.get("details") or ():
        if isinstance(detail, dict) and detail.get("@type") == BAD_REQUEST_TYPE:
            for violation in detail.get("fieldViolations") or ():
                if isinstance(violation, dict) and violation.get("field") == "message.token":
                    return True
    message = error.get("message")
    return isinstance(message, str) and "registration token" in message.lower()


class FcmSender:
    """Sends notifications to FCM; one attempt per call (the dispatcher retries)."""

    provider = PushProvider.FCM

    def __init__(
        self,
        *,
        credentials_path: Path,
        project_id: str | None = None,
        endpoint: str | None = None,
        channel_id: str = "messages",
        concurrency: int = 64,
        request_timeout_seconds: float = 10.0,
    ) -> None:
        """``credentials_path`` is the service-account JSON (its ``token_uri`` is where access
        tokens come from); ``endpoint`` the base of the v1 API, ``…/v1/projects``."""
        account = _service_account(credentials_path)
        resolved_project = project_id or account.get("project_id")
        if not isinstance(resolved_project, str) or not resolved_project:
            raise PushConfigError(
                f"no FCM project id: set IM_PUSH__FCM_PROJECT_ID or use a service account "
                f"({credentials_path}) that names its project_id"
            )
        try:
            self._client = _FcmClient(
                account=account,
                project_id=resolved_project,
                endpoint=endpoint or GOOGLE_ENDPOINT,
                max_connections=concurrency,
            )
        except (ValueError, KeyError) as error:
            raise PushConfigError(
                f"the FCM service account {credentials_path} cannot be used ({error}); "
                "download a new key from the Firebase console"
            ) from error
        self._channel_id = channel_id
        self._timeout = request_timeout_seconds
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fcm-send")

    @classmethod
    def from_settings(cls, settings: PushProviderSettings) -> FcmSender:
        if settings.fcm_credentials_path is None:
            raise PushConfigError(
                "FCM is not configured: set IM_PUSH__FCM_CREDENTIALS_PATH (a service-account JSON)"
            )
        return cls(
            credentials_path=settings.fcm_credentials_path,
            project_id=settings.fcm_project_id,
            endpoint=settings.fcm_endpoint,
            channel_id=settings.fcm_channel_id,
            concurrency=settings.concurrency,
            request_timeout_seconds=settings.request_timeout_seconds,
        )

    @property
    def send_url(self) -> str:
        url: str = self._client.fcm_end_point
        return url

    async def send(self, notification: PushNotification, target: PushTarget) -> ProviderReply:
        payload = fcm_payload(self._client, notification, target, self._channel_id)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self._send_blocking, payload, target.project_id
        )

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _send_blocking(self, payload: bytes, project_id: str | None) -> ProviderReply:
        try:
            response = self._client.send_request(
                payload, timeout=self._timeout, project_id=project_id
            )
        except requests.Timeout:
            return ProviderReply(OutcomeKind.FAILED, LocalReason.TIMEOUT, retryable=True)
        except requests.RequestException as error:
            log.info("FCM: %s", error)
            return ProviderReply(OutcomeKind.FAILED, LocalReason.CONNECTION_ERROR, retryable=True)
        except FCMError as error:
            # pyfcm wraps a failed access-token request; google-auth's error is its argument.
            cause = error.args[0] if error.args else None
            if not isinstance(cause, GoogleAuthError):
                raise PushConfigError(f"FCM client: {error}") from error
            retryable = isinstance(cause, TransportError) or (
                isinstance(cause, RefreshError) and cause.retryable
            )
            log.warning("FCM: no access token: %s", cause)
            return ProviderReply(OutcomeKind.FAILED, LocalReason.AUTH_ERROR, retryable=retryable)
        return classify_fcm(response.status_code, response.content, response.headers)


def _service_account(path: Path) -> dict[str, Any]:
    try:
        account = json.loads(path.read_text())
    except OSError as error:
        raise PushConfigError(
            f"cannot read the FCM service account {path}: {error.strerror}; "
            "check IM_PUSH__FCM_CREDENTIALS_PATH"
        ) from error
    except ValueError as error:
        raise PushConfigError(f"the FCM service account {path} is not JSON: {error}") from error
    if not isinstance(account, dict) or account.get("type") != "service_account":
        raise PushConfigError(
            f"{path} is not a service-account key (its type must be service_account); "
            "download one from the Firebase console"
        )
    return account

"""Staff tokens and the guarded analytics app for the tests of the ClickHouse sink's API.

Every route of that API but ``/healthz`` needs a staff (or the ingress's service) token signed
with the development keys of ``Settings()``; the tests build the app and sign the tokens from the
same settings.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from analytics.api import AnalyticsServer, analytics_app
from analytics.queries import Analytics
from core.principals import (
    StaffRole,
    issue_service_token,
    issue_staff_token,
    staff_authenticator,
)
from core.settings import Settings
from schemas.events import SYSTEM_TENANT


def staff_app(analytics: Analytics, settings: Settings | None = None, **options: Any) -> FastAPI:
    """``analytics_app`` behind the gate, verifying the tokens of ``settings`` (default dev)."""
    settings = settings or Settings()
    return analytics_app(analytics, authenticator=staff_authenticator(settings), **options)


@contextmanager
def serving(app: FastAPI, *, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """``app`` on a free local port, as the ClickHouse-owning process serves it: its base URL."""
    server = AnalyticsServer(app, "127.0.0.1", 0, tls=tls)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def staff_token(
    role: StaffRole = StaffRole.PLATFORM_ANALYST,
    *,
    tenant: str = SYSTEM_TENANT,
    subject: str = "test-staff",
    settings: Settings | None = None,
) -> str:
    return issue_staff_token(settings or Settings(), subject=subject, role=role, tenant=tenant)


def staff_headers(
    role: StaffRole = StaffRole.PLATFORM_ANALYST, *, tenant: str = SYSTEM_TENANT
) -> dict[str, str]:
    return {"Authorization": f"Bearer {staff_token(role, tenant=tenant)}"}


def service_headers(tenant: str, user: str = "test-user") -> dict[str, str]:
    """What the ingress sends with a user's search."""
    token = issue_service_token(Settings(), tenant=tenant, user=user)
    return {"Authorization": f"Bearer {token}"}


def staff_get(url: str, timeout: float = 30.0) -> tuple[int, Any]:
    """GET ``url`` with a platform analyst's token: the status and the JSON body (errors too)."""
    response = httpx.get(url, headers=staff_headers(), timeout=timeout)
    return response.status_code, response.json()

"""Staff tokens for the ``imstream`` commands that call the ClickHouse sink's API (port 8091).

Every route there but ``/healthz`` needs a staff token (``core.principals``): the
commands (``replay --into clickhouse``, ``rebuild clickhouse``, ``search``, ``quality check``
over chDB, ``demo``) send one. Where the operator holds the staff secret (HS256, e.g. a local
``make run``) the command signs a short-lived one for the operator (``--operator``, else the
login name); otherwise it sends ``IM_STAFF_AUTH__TOKEN``, one from the identity service.

- ``imstream staff token [--role R] [--tenant T] [--operator NAME] [--dashboards]`` prints a
  token, or the address that opens the dashboards page with it in a browser.

:func:`call_analytics` is the one request those commands make to the API.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
import jwt
import typer

from analytics.access import LOGIN_PARAMETER
from core.principals import StaffRole, issue_staff_token
from core.settings import Settings
from core.tls import client_context
from pipelines.console import load_settings
from pipelines.operator_actions import operator_name
from schemas.events import SYSTEM_TENANT

staff_app = typer.Typer(help="Staff tokens for the ClickHouse sink's API (port 8091).")


@dataclass(frozen=True)
class StaffCredential:
    """How a command authenticates to the API: a fresh token per call, and who it names."""

    settings: Settings
    role: StaffRole
    subject: str
    tenant: str

    @classmethod
    def of(
        cls,
        settings: Settings,
        role: StaffRole,
        operator: str | None = None,
        tenant: str = SYSTEM_TENANT,
    ) -> StaffCredential:
        """The credential for ``role``; ``ValueError`` says what to set when there is none."""
        given = settings.staff_auth.token
        if given is not None:
            # The identity service's token names the operator; the API records that name.
            claims = jwt.decode(given.get_secret_value(), options={"verify_signature": False})
            subject = str(claims.get("sub") or operator_name(operator))
            return cls(settings, role, subject, str(claims.get("tid") or tenant))
        credential = cls(settings, role, operator_name(operator), tenant)
        credential.token()  # RS256 or a placeholder secret outside dev: say so now
        return credential

    def token(self) -> str:
        given = self.settings.staff_auth.token
        if given is not None:
            return given.get_secret_value()
        return issue_staff_token(
            self.settings, subject=self.subject, role=self.role, tenant=self.tenant
        )

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}


def analytics_base_url(settings: Settings) -> str:
    """The API's address from the settings (a wildcard listening host is reached on loopback)."""
    host = settings.sinks.analytics_host
    host = "127.0.0.1" if host in {"0.0.0.0", "::"} else host
    return f"http://{host}:{settings.sinks.analytics_port}"


class AnalyticsRefusalError(Exception):
    """The API answered an error status: the status, and the stable ``code`` and ``message`` of
    its error body (None when the body is not the API's, e.g. a proxy's page)."""

    def __init__(self, status: int, reason: str, code: str | None, message: str | None) -> None:
        super().__init__(f"HTTP Error {status}: {reason}")
        self.status = status
        self.code = code
        self.message = message


def call_analytics(
    method: str,
    url: str,
    headers: Mapping[str, str],
    *,
    timeout: float,
    params: Mapping[str, str] | None = None,
    body: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One request to the API with ``headers`` (a fresh staff token, ``StaffCredential.header``)
    and ``body`` as JSON: the answer's JSON object. An error status raises
    :class:`AnalyticsRefusalError`, no answer (refused, timed out) ``httpx.TransportError``, an
    answer that is not a JSON object ``ValueError``; each command says what to do."""
    response = httpx.request(
        method,
        url,
        params=params,
        json=body,
        headers=headers,
        timeout=timeout,
        # An https API is verified against the system's trust store (or ``SSL_CERT_FILE``).
        verify=client_context(),
    )
    if not response.is_success:
        try:
            refusal = response.json()
        except ValueError:
            refusal = None
        fields = refusal if isinstance(refusal, dict) else {}
        code, message = fields.get("code"), fields.get("message")
        raise AnalyticsRefusalError(
            response.status_code,
            response.reason_phrase,
            None if code is None else str(code),
            None if message is None else str(message),
        )
    answer = response.json()
    if not isinstance(answer, dict):
        raise ValueError(f"{url} answered {type(answer).__name__}, not a JSON object")
    return answer


@staff_app.command("token")
def token_command(
    role: Annotated[
        StaffRole,
        typer.Option("--role", help="operator, platform-analyst or analyst (with --tenant)"),
    ] = StaffRole.PLATFORM_ANALYST,
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="the analyst's tenant (the tid claim)")
    ] = None,
    operator: Annotated[
        str | None, typer.Option("--operator", help="the sub claim (default: the login name)")
    ] = None,
    dashboards: Annotated[
        bool,
        typer.Option("--dashboards", help="print the address that opens the dashboards page"),
    ] = False,
) -> None:
    """Sign a short-lived staff token with IM_STAFF_AUTH__SECRET and print it."""
    if role is StaffRole.INGRESS:
        typer.echo("error: the ingress role is the ingress's own (IM_SERVICE_AUTH__*)", err=True)
        raise typer.Exit(2)
    if role is StaffRole.ANALYST and not tenant:
        typer.echo("error: an analyst token needs --tenant", err=True)
        raise typer.Exit(2)
    settings = load_settings()
    try:
        credential = StaffCredential.of(settings, role, operator, tenant or SYSTEM_TENANT)
    except ValueError as error:
        typer.echo(f"error: [staff-token-unavailable] {error}", err=True)
        raise typer.Exit(1) from error
    token = credential.token()
    if dashboards:
        typer.echo(f"{analytics_base_url(settings)}/dashboards?{LOGIN_PARAMETER}={token}")
    else:
        typer.echo(token)

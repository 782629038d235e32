"""Who may call the ClickHouse sink's API (port 8091): staff and the ingress, never a client.

The API reads every tenant's messages and audit, and starts replays, so it trusts no client
token — whatever roles or tenant one claims — and no field of a request. Its callers are:

- **staff**, with tokens of their own issuer, audience and key (``IM_STAFF_AUTH__*``; the
  client key is refused as the staff key at start-up), one role each:
  ``operator`` (replays, rebuilds, every read), ``platform-analyst`` (every tenant, read-only),
  ``analyst`` (read-only, the tenant of the token's ``tid`` only);
- **the ingress**, asking a user's search: a token it signs per search with its service key
  (``IM_SERVICE_AUTH__*``), role ``ingress``, naming the user (``sub``) and the tenant (``tid``)
  it authenticated. The sink searches that tenant, whatever the request body says.

Both are verified by :class:`core.auth.TokenVerifier` instances of their own, so a token
verifies against exactly one issuer's key. Refusals are :class:`StaffAuthError`:
``unauthorized`` (401: no token, or one that none of the two keys verifies — a client token
included) or ``forbidden`` (403: a genuine token without the role, or another tenant's).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Final

import jwt

from core.auth import (
    DEFAULT_MAX_TOKEN_LENGTH,
    AuthError,
    TokenVerifier,
    issue_token,
    read_public_key,
)
from core.settings import ServiceAuthSettings, Settings, StaffAuthSettings
from schemas.events import SYSTEM_TENANT

#: How long a token the ``imstream`` CLI signs for its operator is good for.
CLI_TOKEN_TTL: Final = timedelta(minutes=15)


class StaffRole(StrEnum):
    """The roles the API knows, strongest first; a token holding several acts as the first."""

    OPERATOR = "operator"
    PLATFORM_ANALYST = "platform-analyst"
    ANALYST = "analyst"
    #: The ingress's service principal (its own key); never granted by a staff token.
    INGRESS = "ingress"


_STAFF_ROLES: Final = (StaffRole.OPERATOR, StaffRole.PLATFORM_ANALYST, StaffRole.ANALYST)


class StaffAuthError(Exception):
    """A request the API refuses before it runs: a stable code and status, a readable message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "field": None}


def unauthorized(message: str) -> StaffAuthError:
    return StaffAuthError(401, "unauthorized", message)


def forbidden(message: str) -> StaffAuthError:
    return StaffAuthError(403, "forbidden", message)


@dataclass(frozen=True, slots=True)
class StaffPrincipal:
    """A verified caller of the API."""

    #: The token's ``sub``: the operator's or analyst's name, or the user the ingress searches
    #: for. The audit records an operator by it.
    subject: str
    role: StaffRole
    #: The token's ``tid``: the only tenant an analyst reads, the user's tenant for the ingress.
    tenant: str

    @property
    def all_tenants(self) -> bool:
        """Whether the principal reads every tenant (an analyst and the ingress read one)."""
        return self.role in {StaffRole.OPERATOR, StaffRole.PLATFORM_ANALYST}


class StaffAuthenticator:
    """Turns an ``Authorization`` header into a :class:`StaffPrincipal`, or refuses it."""

    def __init__(
        self,
        staff: TokenVerifier,
        service: TokenVerifier,
        *,
        staff_issuer: str,
        service_issuer: str,
    ) -> None:
        self._verifiers = {staff_issuer: (staff, False), service_issuer: (service, True)}

    def authenticate(self, authorization: str | None) -> StaffPrincipal:
        token = None
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip()
        if not token:
            raise unauthorized("send Authorization: Bearer <staff token>")
        if len(token) > DEFAULT_MAX_TOKEN_LENGTH:
            raise unauthorized("the token is too long")
        # The issuer picks the one key that may have signed it; the tenant is read here only to
        # be checked by the verifier, which verifies the signature over both.
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError as error:
            raise unauthorized(f"the token is invalid: {error}") from error
        issuer, tenant = unverified.get("iss"), unverified.get("tid")
        chosen = self._verifiers.get(issuer) if isinstance(issuer, str) else None
        if chosen is None or not isinstance(tenant, str):
            raise unauthorized("not a staff or service token (wrong issuer, or no tid)")
        verifier, is_service = chosen
        try:
            claims = verifier.verify(token, tenant)
        except AuthError as error:
            raise unauthorized(f"[{error.code}] {error.message}") from error
        allowed = (StaffRole.INGRESS,) if is_service else _STAFF_ROLES
        for role in allowed:
            if role in claims.roles:
                return StaffPrincipal(subject=claims.user_id, role=role, tenant=claims.tenant_id)
        names = ", ".join(allowed)
        raise forbidden(f"the token has none of the roles {names}")


def _staff_verifier(settings: Settings) -> TokenVerifier:
    staff = settings.staff_auth
    public_key = read_public_key(staff.public_key_path, "IM_STAFF_AUTH__PUBLIC_KEY_PATH")
    secret = None
    if staff.algorithm == "HS256":
        secret = settings.real_secret(staff.secret, "IM_STAFF_AUTH__SECRET")
    return TokenVerifier(
        algorithm=staff.algorithm,
        secret=secret,
        public_key_pem=public_key,
        issuer=staff.issuer,
        audience=staff.audience,
        leeway_seconds=staff.leeway_seconds,
        max_lifetime=timedelta(seconds=staff.max_lifetime_seconds),
    )


def _service_verifier(settings: Settings) -> TokenVerifier:
    service = settings.service_auth
    return TokenVerifier(
        algorithm="HS256",
        secret=settings.real_secret(service.secret, "IM_SERVICE_AUTH__SECRET"),
        issuer=service.issuer,
        audience=service.audience,
        leeway_seconds=settings.staff_auth.leeway_seconds,
        max_lifetime=timedelta(seconds=service.token_ttl_seconds),
    )


def staff_authenticator(settings: Settings) -> StaffAuthenticator:
    """The authenticator the settings describe; a misconfiguration (a short or placeholder
    secret outside dev, an unreadable key, the client key reused) raises ``ValueError``."""
    if settings.staff_auth.issuer == settings.auth.jwt_issuer:
        raise ValueError(
            "IM_STAFF_AUTH__ISSUER equals IM_AUTH__JWT_ISSUER; staff tokens need an issuer of "
            "their own"
        )
    return StaffAuthenticator(
        _staff_verifier(settings),
        _service_verifier(settings),
        staff_issuer=settings.staff_auth.issuer,
        service_issuer=settings.service_auth.issuer,
    )


def issue_staff_token(
    settings: Settings,
    *,
    subject: str,
    role: StaffRole,
    tenant: str = SYSTEM_TENANT,
    ttl: timedelta = CLI_TOKEN_TTL,
) -> str:
    """A staff token signed with the HS256 staff secret: what ``imstream`` commands send when
    the operator runs them where the secret is (``ValueError`` with RS256: no private key)."""
    staff = settings.staff_auth
    if staff.algorithm != "HS256":
        raise ValueError(
            f"with IM_STAFF_AUTH__ALGORITHM={staff.algorithm} the CLI cannot sign a staff token; "
            "set IM_STAFF_AUTH__TOKEN to one from your identity service"
        )
    return _signed(
        settings, staff, "IM_STAFF_AUTH__SECRET", user=subject, tenant=tenant, role=role, ttl=ttl
    )


def issue_service_token(settings: Settings, *, tenant: str, user: str) -> str:
    """The ingress's token for one user's search: role ``ingress``, the user's tenant and id."""
    service, role = settings.service_auth, StaffRole.INGRESS
    ttl = timedelta(seconds=service.token_ttl_seconds)
    return _signed(
        settings, service, "IM_SERVICE_AUTH__SECRET", user=user, tenant=tenant, role=role, ttl=ttl
    )


def _signed(
    settings: Settings,
    auth: StaffAuthSettings | ServiceAuthSettings,
    secret_name: str,
    *,
    user: str,
    tenant: str,
    role: StaffRole,
    ttl: timedelta,
) -> str:
    """A token for ``user`` of ``tenant`` in ``role``, signed with ``auth``'s secret (named
    ``secret_name`` in the settings) and naming its issuer and audience."""
    return issue_token(
        settings.real_secret(auth.secret, secret_name),
        user_id=user,
        tenant_id=tenant,
        issuer=auth.issuer,
        audience=auth.audience,
        roles=[role],
        ttl=ttl,
    )

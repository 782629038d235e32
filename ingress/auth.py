"""JWT verification for the ingress: who is connecting, for which tenant, from which device.

The gateway verifies the token before it processes any other frame and refuses the connection on
failure, so everything past this point may trust :class:`Claims`. Tokens are signed by an identity
service outside imstream, either with a shared secret (HS256, the default) or with a private key
whose public half the ingress holds (RS256). Exactly one algorithm is accepted per verifier, which
rules out algorithm-confusion attacks (``alg: none``, or an HS256 token "signed" with the RS256
public key).

Failures carry a stable code the gateway passes to the client:

- ``token-invalid``: missing, malformed, forged, wrong issuer or audience, not yet valid,
  lacking a required claim (``sub``, ``tid``, ``exp``), or valid for longer than the maximum
  lifetime (a leaked 10-year token would otherwise be good for 10 years);
- ``token-expired``: well-formed and genuine but past ``exp`` (plus leeway): refresh and reconnect;
- ``tenant-mismatch``: genuine, but issued for another tenant than the one the client asked for.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

SUPPORTED_ALGORITHMS: Final = frozenset({"HS256", "RS256"})

#: RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
MIN_HS256_SECRET_BYTES: Final = 32

#: Longer tokens (in characters) are refused before parsing; real ones are well under 2 KiB.
DEFAULT_MAX_TOKEN_LENGTH: Final = 8 * 1024
#: How far in the future a token's ``exp`` may be (from the moment it is presented).
DEFAULT_MAX_LIFETIME: Final = timedelta(hours=24)


class AuthErrorCode(StrEnum):
    TOKEN_INVALID = "token-invalid"
    TOKEN_EXPIRED = "token-expired"
    TENANT_MISMATCH = "tenant-mismatch"


class AuthError(Exception):
    """The token does not let this client in; ``code`` is stable, the message is for humans."""

    def __init__(self, code: AuthErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says about the connecting client."""

    user_id: str
    tenant_id: str
    #: The device the token was issued to, if the identity service binds tokens to devices;
    #: otherwise the hello frame names the device.
    device_id: str | None
    roles: frozenset[str]
    expires_at: datetime


class TokenVerifier:
    """Verifies signature, expiry, issuer, audience and imstream's claims of one token at a time.

    Thread-safe and cheap to call; build one per process from the auth settings.
    """

    def __init__(
        self,
        *,
        algorithm: str = "HS256",
        secret: str | bytes | None = None,
        public_key_pem: str | bytes | None = None,
        issuer: str,
        audience: str,
        leeway_seconds: float = 30.0,
        max_token_length: int = DEFAULT_MAX_TOKEN_LENGTH,
        max_lifetime: timedelta = DEFAULT_MAX_LIFETIME,
    ) -> None:
        """Give ``secret`` for HS256 or ``public_key_pem`` (an RSA public key) for RS256.

        A misconfiguration (unknown algorithm, missing or short secret, unreadable key) raises
        ``ValueError`` here, at start-up, rather than refusing every client later.
        """
        if algorithm not in SUPPORTED_ALGORITHMS:
            supported = ", ".join(sorted(SUPPORTED_ALGORITHMS))
            raise ValueError(f"unsupported JWT algorithm {algorithm!r}; use one of {supported}")
        self._key: bytes | RSAPublicKey
        if algorithm == "HS256":
            if secret is None:
                raise ValueError("HS256 needs the shared secret (IM_AUTH__JWT_SECRET)")
            key = secret.encode() if isinstance(secret, str) else secret
            if len(key) < MIN_HS256_SECRET_BYTES:
                raise ValueError(
                    f"the HS256 secret is {len(key)} bytes; use at least {MIN_HS256_SECRET_BYTES}"
                )
            self._key = key
        else:
            if public_key_pem is None:
                raise ValueError("RS256 needs a PEM public key (IM_AUTH__JWT_PUBLIC_KEY_PATH)")
            pem = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
            public_key = load_pem_public_key(pem)
            if not isinstance(public_key, RSAPublicKey):
                raise ValueError("RS256 needs an RSA public key")
            self._key = public_key
        self._algorithm = algorithm
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds
        self._max_token_length = max_token_length
        self._max_lifetime = max_lifetime

    def verify(self, token: str | None, expected_tenant: str) -> Claims:
        """Return the token's claims, or raise :class:`AuthError` with the reason's code."""
        if not token:
            raise AuthError(AuthErrorCode.TOKEN_INVALID, "no token was presented")
        if len(token) > self._max_token_length:
            raise AuthError(AuthErrorCode.TOKEN_INVALID, "the token is too long")
        try:
            payload = jwt.decode(
                token,
                self._key,
                algorithms=[self._algorithm],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": ["exp", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError(AuthErrorCode.TOKEN_EXPIRED, "the token has expired") from exc
        except jwt.InvalidTokenError as exc:
            raise AuthError(AuthErrorCode.TOKEN_INVALID, f"the token is invalid: {exc}") from exc
        claims = _claims_from(payload)
        if claims.expires_at - datetime.now(UTC) > self._max_lifetime + timedelta(
            seconds=self._leeway
        ):
            raise AuthError(
                AuthErrorCode.TOKEN_INVALID,
                f"the token is valid for longer than the maximum token lifetime "
                f"({self._max_lifetime.total_seconds():g} s); ask for a shorter-lived one",
            )
        if claims.tenant_id != expected_tenant:
            raise AuthError(
                AuthErrorCode.TENANT_MISMATCH,
                f"the token was issued for another tenant than {expected_tenant!r}",
            )
        return claims


def _claims_from(payload: dict[str, Any]) -> Claims:
    """imstream's own claims; PyJWT has already checked ``exp``, ``iss``, ``aud`` and ``sub``."""
    user_id = payload["sub"]
    tenant_id = payload.get("tid")
    device_id = payload.get("did")
    roles = payload.get("roles", [])
    if not isinstance(user_id, str) or not user_id:
        raise AuthError(AuthErrorCode.TOKEN_INVALID, "the token's 'sub' claim is empty")
    if not isinstance(tenant_id, str) or not tenant_id:
        raise AuthError(AuthErrorCode.TOKEN_INVALID, "the token has no 'tid' (tenant) claim")
    if device_id is not None and (not isinstance(device_id, str) or not device_id):
        raise AuthError(AuthErrorCode.TOKEN_INVALID, "the token's 'did' claim is not a device id")
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise AuthError(AuthErrorCode.TOKEN_INVALID, "the token's 'roles' claim is not a list")
    return Claims(
        user_id=user_id,
        tenant_id=tenant_id,
        device_id=device_id,
        roles=frozenset(roles),
        expires_at=datetime.fromtimestamp(payload["exp"], UTC),
    )


def issue_token(
    secret: str | bytes,
    *,
    user_id: str,
    tenant_id: str,
    issuer: str,
    audience: str,
    device_id: str | None = None,
    roles: Iterable[str] = (),
    ttl: timedelta = timedelta(hours=1),
    now: datetime | None = None,
) -> str:
    """Sign an HS256 token the way imstream expects one — for development, tests and demos only.

    Production tokens come from the tenant's identity service; imstream never issues them itself.
    """
    issued_at = now or datetime.now(UTC)
    payload: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": user_id,
        "tid": tenant_id,
        "roles": list(roles),
        "iat": issued_at,
        "exp": issued_at + ttl,
        "jti": uuid.uuid4().hex,
    }
    if device_id is not None:
        payload["did"] = device_id
    return jwt.encode(payload, secret, algorithm="HS256")

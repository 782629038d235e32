"""JWT verification for the ingress: who is connecting, for which tenant, from which device.

The gateway verifies the token before it processes any other frame and refuses the connection on
failure, so everything past this point may trust :class:`Claims`. Tokens are signed by an identity
service outside imstream, either with a shared secret (HS256, the default) or with a private key
whose public half the ingress holds (RS256). Exactly one algorithm is accepted per verifier, which
rules out algorithm-confusion attacks (``alg: none``, or an HS256 token "signed" with the RS256
public key).

Key rotation: besides (or instead of) the single key of the settings, a verifier may hold a JSON
Web Key Set, from a file (``jwks_path``) or a URL (``jwks_url``, the issuer's ``jwks_uri``):
several keys, each with its ``kid`` and one algorithm (an RSA key is RS256, an ``oct`` key
HS256, or its ``alg`` says which of the two). A token whose header names a ``kid`` is verified
with that key and its algorithm only; a ``kid`` the set does not hold is ``token-invalid``; a
token without a ``kid`` is verified with the single key, if one is configured. The file is read
again when it changes (its modification time and size are looked at no more often than every
``jwks_check_seconds``), the URL fetched every ``jwks_refresh_seconds`` and soon after a token
names a ``kid`` not held; so adding the new key, moving the issuer to it, then removing the old
key rotates without a restart. A set that no longer parses (or cannot be fetched) keeps the keys
last read and logs why, so a bad edit locks no one out.

Revocation needs two claims the verifier therefore checks: ``iat`` is required (a per-user
revocation refuses the tokens issued before a moment), and a token may not be valid for longer
than the maximum lifetime counted from its ``iat`` (as well as from now): so every token a
revocation can match has expired by the revocation's moment plus the maximum lifetime, after
which the ingress forgets it (ingress/revocations.py). ``jti`` is optional; a token without one
can be revoked per user or device only.

Failures carry a stable code the gateway passes to the client:

- ``token-invalid``: missing, malformed, forged, wrong issuer or audience, not yet valid,
  lacking a required claim (``sub``, ``tid``, ``exp``, ``iat``), an unknown ``kid``, or valid for
  longer than the maximum lifetime (a leaked 10-year token would otherwise be good for 10 years);
- ``token-expired``: well-formed and genuine but past ``exp`` (plus leeway): refresh and reconnect;
- ``tenant-mismatch``: genuine, but issued for another tenant than the one the client asked for;
- ``token-revoked``: genuine, but revoked by an operator (raised by the gateway, which holds the
  revocations, not by the verifier).
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from schemas.errors import CodedError

_log = logging.getLogger(__name__)

SUPPORTED_ALGORITHMS: Final = frozenset({"HS256", "RS256"})
#: The longest ``jti`` accepted: a revocation names it, so it must fit a revocation record.
MAX_JTI_CHARS: Final = 256
#: How often, at most, the JWKS file's modification time is looked at.
DEFAULT_JWKS_CHECK_SECONDS: Final = 2.0
#: How often a JWKS URL is fetched when no token names an unknown key.
DEFAULT_JWKS_REFRESH_SECONDS: Final = 300.0
#: A larger key set is refused (a real one is a few KB).
MAX_JWKS_BYTES: Final = 1024 * 1024
LONG_AGO: Final = datetime.min.replace(tzinfo=UTC)

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
    TOKEN_REVOKED = "token-revoked"


class AuthError(CodedError[AuthErrorCode]):
    """The token does not let this client in; ``code`` is stable, the message is for humans."""

    bracketed = False


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
    #: When the token was issued (``iat``): a per-user or per-device revocation refuses the
    #: tokens issued before its moment.
    #: Unknown (claims built by hand) counts as issued long ago: revoked by any such revocation.
    issued_at: datetime = LONG_AGO
    #: The token's id (``jti``), by which one token can be revoked; ``None`` if it has none.
    token_id: str | None = None


#: A verification key and the one algorithm it may verify.
_Key = tuple[str, bytes | RSAPublicKey]


def _hs256_key(secret: str | bytes, what: str) -> bytes:
    key = secret.encode() if isinstance(secret, str) else secret
    if len(key) < MIN_HS256_SECRET_BYTES:
        raise ValueError(
            f"the HS256 {what} is {len(key)} bytes; use at least {MIN_HS256_SECRET_BYTES}"
        )
    return key


def read_jwks(text: str | bytes) -> dict[str, _Key]:
    """The keys of a JSON Web Key Set by ``kid``; ``ValueError`` says what is wrong with it.

    Every key needs a ``kid`` and is RS256 (``kty`` RSA) or HS256 (``kty`` oct); an ``alg`` other
    than the key type's, or a key meant for anything but signatures, is refused rather than
    guessed at: each key verifies with exactly one algorithm.
    """
    try:
        document = json.loads(text)
    except ValueError as error:
        raise ValueError(f"not JSON: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('not a JSON Web Key Set (an object with a "keys" list)')
    keys: dict[str, _Key] = {}
    for index, entry in enumerate(document["keys"]):
        if not isinstance(entry, dict):
            raise ValueError(f"keys[{index}] is not an object")
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ValueError(f"keys[{index}] has no kid")
        if kid in keys:
            raise ValueError(f"kid {kid!r} appears twice")
        if entry.get("use", "sig") != "sig":
            raise ValueError(f"key {kid!r} is not a signature key (use={entry.get('use')!r})")
        algorithm = {"RSA": "RS256", "oct": "HS256"}.get(entry.get("kty"))  # type: ignore[arg-type]
        if algorithm is None or entry.get("alg", algorithm) != algorithm:
            raise ValueError(
                f"key {kid!r}: only RSA keys for RS256 and oct keys for HS256 are accepted "
                f"(kty={entry.get('kty')!r}, alg={entry.get('alg')!r})"
            )
        try:
            key = jwt.PyJWK(entry, algorithm).key
        except (jwt.PyJWTError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"key {kid!r} cannot be read: {error!r}") from None
        if algorithm == "HS256":
            keys[kid] = (algorithm, _hs256_key(key, f"key {kid!r}"))
        elif isinstance(key, RSAPublicKey):
            keys[kid] = (algorithm, key)
        else:
            raise ValueError(f"key {kid!r} must be an RSA public key, not a private one")
    return keys


class JwksFile:
    """A JWKS file's keys, read again when the file changes (looked at every ``check_seconds``
    at most); a file that cannot be read or parsed keeps the keys last read."""

    def __init__(self, path: Path, *, check_seconds: float = DEFAULT_JWKS_CHECK_SECONDS) -> None:
        """Reads the file now: a missing or invalid file raises ``ValueError`` at start-up."""
        self._path = path
        self._check_seconds = check_seconds
        self._lock = threading.Lock()
        self._checked_at = time.monotonic()
        self._stamp = self._stat()
        try:
            self._keys = read_jwks(path.read_bytes())
        except (OSError, ValueError) as error:
            raise ValueError(f"the JWKS file {path} cannot be used: {error}") from error

    def missing(self) -> None:
        """The file is looked at on every check anyway."""

    def _stat(self) -> tuple[int, int] | None:
        try:
            status = self._path.stat()
        except OSError:
            return None
        return status.st_mtime_ns, status.st_size

    def keys(self) -> Mapping[str, _Key]:
        """The current keys by ``kid``."""
        now = time.monotonic()
        if now - self._checked_at < self._check_seconds:
            return self._keys
        with self._lock:
            if now - self._checked_at < self._check_seconds:
                return self._keys
            self._checked_at = now
            stamp = self._stat()
            if stamp is None or stamp == self._stamp:
                return self._keys
            try:
                keys = read_jwks(self._path.read_bytes())
            except (OSError, ValueError) as error:
                _log.error("JWKS %s not reloaded (keys kept): %s", self._path, error)
                return self._keys
            self._stamp = stamp
            self._keys = keys
            _log.info("JWKS %s reloaded: kids %s", self._path, sorted(keys))
            return keys


class JwksUrl:
    """A JWKS fetched from a URL (the identity service's ``jwks_uri``) by a thread of its own:
    every ``refresh_seconds``, and soon (at most every ``check_seconds``) after a token named a
    ``kid`` it does not hold, so a key the issuer just started using is picked up without
    waiting for the next refresh. Verification never waits for the network: it uses the keys
    fetched last, and a fetch that fails keeps them (and is logged).
    """

    def __init__(
        self,
        url: str,
        *,
        refresh_seconds: float = DEFAULT_JWKS_REFRESH_SECONDS,
        check_seconds: float = DEFAULT_JWKS_CHECK_SECONDS,
        timeout_seconds: float = 5.0,
    ) -> None:
        """Fetches the set now: an unreachable URL or an invalid set raises ``ValueError`` at
        start-up."""
        if not url.startswith(("https://", "http://")):
            raise ValueError(f"the JWKS URL {url!r} is not an http(s) URL")
        self._url = url
        self._refresh_seconds = refresh_seconds
        self._check_seconds = check_seconds
        self._timeout = timeout_seconds
        #: The system's trust store (where an operator adds a private CA), not httpx's certifi.
        self._verify = ssl.create_default_context()
        try:
            self._keys = read_jwks(self._fetch())
        except (httpx.HTTPError, ValueError) as error:
            raise ValueError(f"the JWKS at {url} cannot be used: {error}") from error
        self._fetched_at = time.monotonic()
        self._wanted = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jwks", daemon=True)
        self._thread.start()

    def keys(self) -> Mapping[str, _Key]:
        return self._keys

    def missing(self) -> None:
        """A token named a ``kid`` not held: fetch again soon."""
        self._wanted.set()

    def close(self) -> None:
        self._stopped.set()
        self._wanted.set()

    def _fetch(self) -> bytes:
        """The set's bytes; an error status raises ``httpx.HTTPStatusError``, a larger set
        ``ValueError`` (read no further than the limit)."""
        body = bytearray()
        with httpx.stream(
            "GET",
            self._url,
            headers={"Accept": "application/json"},
            timeout=self._timeout,
            verify=self._verify,
            follow_redirects=True,
        ) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"the set is over {MAX_JWKS_BYTES} bytes")
        return bytes(body)

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wanted.wait(self._refresh_seconds)
            if self._stopped.is_set():
                return
            # However many unknown kids arrive, one fetch per check interval at most.
            self._stopped.wait(max(0.0, self._fetched_at + self._check_seconds - time.monotonic()))
            self._wanted.clear()
            self._fetched_at = time.monotonic()
            try:
                keys = read_jwks(self._fetch())
            except (httpx.HTTPError, ValueError) as error:
                _log.error("JWKS %s not refreshed (keys kept): %s", self._url, error)
                continue
            if keys.keys() != self._keys.keys():
                _log.info("JWKS %s refreshed: kids %s", self._url, sorted(keys))
            self._keys = keys


def read_public_key(path: Path | None, variable: str) -> bytes | None:
    """The PEM public key at ``path`` (None when none is set); an unreadable file raises
    ``ValueError`` naming ``variable``, the setting that points at it, at start-up."""
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"{variable}={path} cannot be read: {error}") from error


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
        jwks_path: Path | None = None,
        jwks_check_seconds: float = DEFAULT_JWKS_CHECK_SECONDS,
        jwks_url: str | None = None,
        jwks_refresh_seconds: float = DEFAULT_JWKS_REFRESH_SECONDS,
    ) -> None:
        """Give ``secret`` for HS256 or ``public_key_pem`` (an RSA public key) for RS256, and/or
        ``jwks_path`` (a JSON Web Key Set file) or ``jwks_url`` for tokens that name their key
        by ``kid``.

        With a JWKS the single key is optional (no secret nor public key: tokens without a
        ``kid`` are refused). A misconfiguration (unknown algorithm, missing or short secret,
        unreadable key or key set) raises ``ValueError`` here, at start-up, rather than
        refusing every client later.
        """
        if algorithm not in SUPPORTED_ALGORITHMS:
            supported = ", ".join(sorted(SUPPORTED_ALGORITHMS))
            raise ValueError(f"unsupported JWT algorithm {algorithm!r}; use one of {supported}")
        if jwks_path is not None and jwks_url is not None:
            raise ValueError("give a JWKS file or a JWKS URL, not both")
        self._jwks: JwksFile | JwksUrl | None = None
        if jwks_path is not None:
            self._jwks = JwksFile(jwks_path, check_seconds=jwks_check_seconds)
        elif jwks_url is not None:
            self._jwks = JwksUrl(
                jwks_url, refresh_seconds=jwks_refresh_seconds, check_seconds=jwks_check_seconds
            )
        self._key: _Key | None = None
        if algorithm == "HS256":
            if secret is not None:
                self._key = (algorithm, _hs256_key(secret, "secret"))
            elif self._jwks is None:
                raise ValueError("HS256 needs the shared secret (IM_AUTH__JWT_SECRET)")
        elif public_key_pem is not None:
            pem = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
            public_key = load_pem_public_key(pem)
            if not isinstance(public_key, RSAPublicKey):
                raise ValueError("RS256 needs an RSA public key")
            self._key = (algorithm, public_key)
        elif self._jwks is None:
            raise ValueError("RS256 needs a PEM public key (IM_AUTH__JWT_PUBLIC_KEY_PATH)")
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
        algorithm, key = self._key_of(token)
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError(AuthErrorCode.TOKEN_EXPIRED, "the token has expired") from exc
        except jwt.InvalidTokenError as exc:
            raise AuthError(AuthErrorCode.TOKEN_INVALID, f"the token is invalid: {exc}") from exc
        claims = _claims_from(payload)
        longest = self._max_lifetime + timedelta(seconds=self._leeway)
        if (
            claims.expires_at - datetime.now(UTC) > longest
            or claims.expires_at - claims.issued_at > longest
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

    def _key_of(self, token: str) -> _Key:
        """The key (and its one algorithm) the token's header ``kid`` names, or the single key
        for a token without one (a ``kid`` is ignored when no JWKS is configured)."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError as exc:
            raise AuthError(AuthErrorCode.TOKEN_INVALID, f"the token is invalid: {exc}") from exc
        if self._jwks is not None and kid is not None:
            if not isinstance(kid, str):
                raise AuthError(AuthErrorCode.TOKEN_INVALID, "the token's kid is not a string")
            key = self._jwks.keys().get(kid)
            if key is None:
                self._jwks.missing()
                raise AuthError(
                    AuthErrorCode.TOKEN_INVALID,
                    f"the token is signed with key {kid[:64]!r}, which this server does not hold",
                )
            return key
        if self._key is None:
            raise AuthError(
                AuthErrorCode.TOKEN_INVALID, "the token names no key (kid); this server needs one"
            )
        return self._key


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
    token_id = payload.get("jti")
    if token_id is not None and (
        not isinstance(token_id, str) or not token_id or len(token_id) > MAX_JTI_CHARS
    ):
        raise AuthError(
            AuthErrorCode.TOKEN_INVALID,
            f"the token's 'jti' claim is not a string of 1-{MAX_JTI_CHARS} characters",
        )
    return Claims(
        user_id=user_id,
        tenant_id=tenant_id,
        device_id=device_id,
        roles=frozenset(roles),
        expires_at=datetime.fromtimestamp(payload["exp"], UTC),
        issued_at=datetime.fromtimestamp(payload["iat"], UTC),
        token_id=token_id,
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
    key_id: str | None = None,
    token_id: str | None = None,
) -> str:
    """Sign an HS256 token the way imstream expects one — for development, tests and demos only.

    ``key_id`` puts a ``kid`` into the header (a key of a JWKS); ``token_id`` is the ``jti``
    (random unless given). Production tokens come from the tenant's identity service; imstream
    never issues them itself.
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
        "jti": token_id or uuid.uuid4().hex,
    }
    if device_id is not None:
        payload["did"] = device_id
    headers = {"kid": key_id} if key_id is not None else None
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers)

"""The auth matrix: who gets in, and with which error code everybody else is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from core.auth import AuthError, AuthErrorCode, Claims, TokenVerifier, issue_token

SECRET = "test-secret-of-at-least-thirty-two-bytes"
ISSUER = "imstream-test"
AUDIENCE = "imstream-clients"
TENANT = "tenant-a"


@pytest.fixture(scope="module")
def rsa_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_public_pem(rsa_private_key: rsa.RSAPrivateKey) -> bytes:
    return rsa_private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def hs256() -> TokenVerifier:
    return TokenVerifier(secret=SECRET, issuer=ISSUER, audience=AUDIENCE, leeway_seconds=5)


@pytest.fixture
def rs256(rsa_public_pem: bytes) -> TokenVerifier:
    return TokenVerifier(
        algorithm="RS256", public_key_pem=rsa_public_pem, issuer=ISSUER, audience=AUDIENCE
    )


def claims(**overrides: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "tid": TENANT,
        "did": "device-1",
        "roles": ["member"],
        "iat": now,
        "exp": now + timedelta(minutes=5),
    }
    payload.update(overrides)
    return {key: value for key, value in payload.items() if value is not None}


def refused(verifier: TokenVerifier, token: str | None, tenant: str = TENANT) -> AuthErrorCode:
    with pytest.raises(AuthError) as error:
        verifier.verify(token, tenant)
    return error.value.code


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64_json(payload: dict[str, Any]) -> str:
    """A JWT segment by hand, with datetimes as NumericDate like PyJWT writes them."""
    numeric = {
        key: int(value.timestamp()) if isinstance(value, datetime) else value
        for key, value in payload.items()
    }
    return b64(json.dumps(numeric).encode())


def test_valid_hs256_token(hs256: TokenVerifier) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    token = issue_token(
        SECRET,
        user_id="user-1",
        tenant_id=TENANT,
        issuer=ISSUER,
        audience=AUDIENCE,
        device_id="device-1",
        roles=["member", "operator"],
        ttl=timedelta(minutes=10),
        now=now,
        token_id="token-1",
    )
    assert hs256.verify(token, TENANT) == Claims(
        user_id="user-1",
        tenant_id=TENANT,
        device_id="device-1",
        roles=frozenset({"member", "operator"}),
        expires_at=now + timedelta(minutes=10),
        issued_at=now,
        token_id="token-1",
    )


def test_valid_rs256_token(rs256: TokenVerifier, rsa_private_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(did=None, roles=None), rsa_private_key, algorithm="RS256")
    verified = rs256.verify(token, TENANT)
    assert (verified.user_id, verified.tenant_id) == ("user-1", TENANT)
    assert verified.device_id is None
    assert verified.roles == frozenset()


def test_expired_token(hs256: TokenVerifier) -> None:
    past = datetime.now(UTC) - timedelta(hours=2)
    token = jwt.encode(claims(iat=past, exp=past + timedelta(hours=1)), SECRET, algorithm="HS256")
    assert refused(hs256, token) is AuthErrorCode.TOKEN_EXPIRED


def test_expiry_within_leeway_is_tolerated(hs256: TokenVerifier) -> None:
    just_expired = datetime.now(UTC) - timedelta(seconds=2)
    token = jwt.encode(claims(exp=just_expired), SECRET, algorithm="HS256")
    assert hs256.verify(token, TENANT).user_id == "user-1"


def test_a_token_valid_for_longer_than_the_maximum_lifetime_is_refused(
    hs256: TokenVerifier,
) -> None:
    """Before: a 10-year token was accepted (a leaked one stayed good for 10 years)."""
    now = datetime.now(UTC)
    decade = jwt.encode(claims(exp=now + timedelta(days=3650)), SECRET, algorithm="HS256")
    assert refused(hs256, decade) is AuthErrorCode.TOKEN_INVALID
    day = jwt.encode(claims(exp=now + timedelta(hours=23)), SECRET, algorithm="HS256")
    assert hs256.verify(day, TENANT).user_id == "user-1"
    short = TokenVerifier(
        secret=SECRET, issuer=ISSUER, audience=AUDIENCE, max_lifetime=timedelta(minutes=10)
    )
    assert refused(short, day) is AuthErrorCode.TOKEN_INVALID


def test_the_lifetime_counts_from_iat_too(hs256: TokenVerifier) -> None:
    """A 31-day token is refused even on its last day: a revocation forgets its entries once
    every token it can match has expired, which needs every token to live at most the maximum
    lifetime from its ``iat`` (before, such a token was accepted once it had a day left)."""
    now = datetime.now(UTC)
    month = jwt.encode(
        claims(iat=now - timedelta(days=30), exp=now + timedelta(hours=23)),
        SECRET,
        algorithm="HS256",
    )
    assert refused(hs256, month) is AuthErrorCode.TOKEN_INVALID


def test_token_for_another_tenant(hs256: TokenVerifier) -> None:
    token = jwt.encode(claims(tid="tenant-b"), SECRET, algorithm="HS256")
    assert refused(hs256, token, tenant=TENANT) is AuthErrorCode.TENANT_MISMATCH
    assert hs256.verify(token, "tenant-b").tenant_id == "tenant-b"


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"sub": None}, id="no-sub"),
        pytest.param({"tid": None}, id="no-tid"),
        pytest.param({"exp": None}, id="no-exp"),
        pytest.param({"iat": None}, id="no-iat"),
        pytest.param({"jti": 7}, id="numeric-jti"),
        pytest.param({"jti": ""}, id="empty-jti"),
        pytest.param({"jti": "j" * 257}, id="jti-too-long"),
        pytest.param({"iss": None}, id="no-iss"),
        pytest.param({"aud": None}, id="no-aud"),
        pytest.param({"sub": ""}, id="empty-sub"),
        pytest.param({"tid": ""}, id="empty-tid"),
        pytest.param({"tid": 7}, id="numeric-tid"),
        pytest.param({"did": ["device-1"]}, id="did-not-a-string"),
        pytest.param({"roles": "admin"}, id="roles-not-a-list"),
        pytest.param({"roles": ["member", 1]}, id="roles-not-strings"),
        pytest.param({"iss": "someone-else"}, id="wrong-issuer"),
        pytest.param({"aud": "another-service"}, id="wrong-audience"),
        pytest.param({"iat": datetime.now(UTC) + timedelta(hours=1)}, id="issued-in-the-future"),
    ],
)
def test_bad_claims_are_invalid(hs256: TokenVerifier, overrides: dict[str, Any]) -> None:
    token = jwt.encode(claims(**overrides), SECRET, algorithm="HS256")
    assert refused(hs256, token) is AuthErrorCode.TOKEN_INVALID


def test_forged_signature(hs256: TokenVerifier) -> None:
    forged = jwt.encode(claims(), "another-secret-that-is-long-enough-too!", algorithm="HS256")
    assert refused(hs256, forged) is AuthErrorCode.TOKEN_INVALID


def test_tampered_payload(hs256: TokenVerifier) -> None:
    header, _payload, signature = jwt.encode(claims(), SECRET, algorithm="HS256").split(".")
    promoted = b64_json(claims(roles=["operator"]))
    assert refused(hs256, f"{header}.{promoted}.{signature}") is AuthErrorCode.TOKEN_INVALID


def test_rs256_token_from_another_key(rs256: TokenVerifier) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), stranger, algorithm="RS256")
    assert refused(rs256, token) is AuthErrorCode.TOKEN_INVALID


def test_hs256_token_signed_with_the_rs256_public_key(
    rs256: TokenVerifier, rsa_public_pem: bytes
) -> None:
    """The classic algorithm-confusion forgery: anyone holding the public key could sign this."""
    header = b64_json({"alg": "HS256", "typ": "JWT"})
    payload = b64_json(claims())
    signature = hmac.new(rsa_public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert refused(rs256, f"{header}.{payload}.{b64(signature)}") is AuthErrorCode.TOKEN_INVALID


def test_unsigned_token(hs256: TokenVerifier) -> None:
    token = jwt.encode(claims(), "", algorithm="none")
    assert refused(hs256, token) is AuthErrorCode.TOKEN_INVALID


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
        pytest.param("garbage", id="garbage"),
        pytest.param("a.b.c", id="three-garbage-segments"),
        pytest.param("é.ü.ß", id="non-ascii"),
        pytest.param("x" * 20_000, id="oversized"),
    ],
)
def test_garbage_tokens_are_invalid(hs256: TokenVerifier, token: str | None) -> None:
    assert refused(hs256, token) is AuthErrorCode.TOKEN_INVALID


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        pytest.param({"algorithm": "HS512", "secret": SECRET}, "unsupported", id="algorithm"),
        pytest.param({"secret": None}, "needs the shared secret", id="no-secret"),
        pytest.param({"secret": "short"}, "at least 32", id="short-secret"),
        pytest.param({"algorithm": "RS256"}, "PEM public key", id="no-public-key"),
    ],
)
def test_misconfiguration_fails_at_start_up(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenVerifier(issuer=ISSUER, audience=AUDIENCE, **arguments)


# -- key rotation (JWKS) ---------------------------------------------------------------------


def oct_jwk(kid: str, secret: str) -> dict[str, Any]:
    return {"kty": "oct", "kid": kid, "k": b64(secret.encode())}


def rsa_jwk(kid: str, key: rsa.RSAPrivateKey) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}


def write_jwks(path: Path, *keys: dict[str, Any]) -> None:
    """Replace the file at once (as an operator's deploy would), with a new modification time."""
    staged = path.with_suffix(".new")
    staged.write_text(json.dumps({"keys": list(keys)}))
    staged.replace(path)


OLD_SECRET = "old-key-of-at-least-thirty-two-bytes!!"
NEW_SECRET = "new-key-of-at-least-thirty-two-bytes!!"


def signed(key: str | rsa.RSAPrivateKey, kid: str | None, algorithm: str = "HS256") -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(), key, algorithm=algorithm, headers=headers)


def test_the_kid_picks_the_key_of_the_jwks(
    tmp_path: Path, rsa_private_key: rsa.RSAPrivateKey
) -> None:
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, oct_jwk("old", OLD_SECRET), rsa_jwk("rsa", rsa_private_key))
    verifier = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks_path=jwks)
    assert verifier.verify(signed(OLD_SECRET, "old"), TENANT).user_id == "user-1"
    assert verifier.verify(signed(rsa_private_key, "rsa", "RS256"), TENANT).user_id == "user-1"
    assert refused(verifier, signed(OLD_SECRET, "unknown")) is AuthErrorCode.TOKEN_INVALID
    assert refused(verifier, signed(NEW_SECRET, "old")) is AuthErrorCode.TOKEN_INVALID
    # No single key configured: a token must name one of the set.
    assert refused(verifier, signed(OLD_SECRET, None)) is AuthErrorCode.TOKEN_INVALID


def test_a_jwks_key_verifies_with_its_own_algorithm_only(
    tmp_path: Path, rsa_private_key: rsa.RSAPrivateKey
) -> None:
    """An HS256 token "signed" with the RSA key's public half and naming that key is refused."""
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, rsa_jwk("rsa", rsa_private_key))
    verifier = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks_path=jwks)
    public_pem = rsa_private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64_json({"alg": "HS256", "typ": "JWT", "kid": "rsa"})
    payload = b64_json(claims())
    signature = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{payload}.{b64(signature)}"
    assert refused(verifier, forged) is AuthErrorCode.TOKEN_INVALID


def test_rotation_through_the_jwks_file_without_a_restart(tmp_path: Path) -> None:
    """Add the new key, switch the issuer, remove the old key: each step is seen within the
    check interval; during the overlap both keys are good."""
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, oct_jwk("old", OLD_SECRET))
    verifier = TokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, jwks_path=jwks, jwks_check_seconds=0.1
    )
    old, new = signed(OLD_SECRET, "old"), signed(NEW_SECRET, "new")
    assert verifier.verify(old, TENANT).user_id == "user-1"
    assert refused(verifier, new) is AuthErrorCode.TOKEN_INVALID

    write_jwks(jwks, oct_jwk("old", OLD_SECRET), oct_jwk("new", NEW_SECRET))
    time.sleep(0.2)
    assert verifier.verify(new, TENANT).user_id == "user-1"
    assert verifier.verify(old, TENANT).user_id == "user-1"

    write_jwks(jwks, oct_jwk("new", NEW_SECRET))
    time.sleep(0.2)
    assert verifier.verify(new, TENANT).user_id == "user-1"
    assert refused(verifier, old) is AuthErrorCode.TOKEN_INVALID

    # A broken edit keeps the keys last read rather than locking everyone out.
    jwks.write_text("{not json")
    time.sleep(0.2)
    assert verifier.verify(new, TENANT).user_id == "user-1"


def test_the_single_key_still_verifies_tokens_without_a_kid(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, oct_jwk("new", NEW_SECRET))
    verifier = TokenVerifier(secret=SECRET, issuer=ISSUER, audience=AUDIENCE, jwks_path=jwks)
    assert verifier.verify(signed(SECRET, None), TENANT).user_id == "user-1"
    assert verifier.verify(signed(NEW_SECRET, "new"), TENANT).user_id == "user-1"
    # Without a JWKS a kid means nothing (as before): the single key decides.
    plain = TokenVerifier(secret=SECRET, issuer=ISSUER, audience=AUDIENCE)
    assert plain.verify(signed(SECRET, "anything"), TENANT).user_id == "user-1"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        pytest.param("{", "not JSON", id="not-json"),
        pytest.param('{"keys": {}}', "not a JSON Web Key Set", id="no-key-list"),
        pytest.param('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "no kid", id="no-kid"),
        pytest.param(
            json.dumps({"keys": [oct_jwk("short", "short")]}), "at least 32", id="short-oct"
        ),
        pytest.param(
            json.dumps({"keys": [{**oct_jwk("a", OLD_SECRET), "alg": "HS512"}]}),
            "only RSA keys",
            id="other-alg",
        ),
        pytest.param(
            json.dumps({"keys": [{"kty": "EC", "kid": "ec", "crv": "P-256"}]}),
            "only RSA keys",
            id="ec-key",
        ),
        pytest.param(
            json.dumps({"keys": [oct_jwk("a", OLD_SECRET), oct_jwk("a", NEW_SECRET)]}),
            "twice",
            id="duplicate-kid",
        ),
    ],
)
def test_a_bad_jwks_fails_at_start_up(tmp_path: Path, document: str, message: str) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(document)
    with pytest.raises(ValueError, match=message):
        TokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks_path=jwks)


class JwksServer:
    """An identity service's ``jwks_uri`` on localhost, serving whatever ``document`` holds."""

    def __init__(self) -> None:
        self.document = json.dumps({"keys": [oct_jwk("old", OLD_SECRET)]})
        self.fetches = 0
        served = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served.fetches += 1
                body = served.document.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_a_jwks_url_is_fetched_again_for_a_kid_it_does_not_hold(jwks_server: JwksServer) -> None:
    """The issuer starts signing with a new key: the first token naming it is refused and makes
    the verifier fetch the set again (at most once per check interval), so the next one is
    good; a removed key is refused after the next fetch."""
    verifier = TokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        jwks_url=jwks_server.url,
        jwks_check_seconds=0.2,
        jwks_refresh_seconds=3600,
    )
    old, new = signed(OLD_SECRET, "old"), signed(NEW_SECRET, "new")
    assert verifier.verify(old, TENANT).user_id == "user-1"
    jwks_server.document = json.dumps(
        {"keys": [oct_jwk("old", OLD_SECRET), oct_jwk("new", NEW_SECRET)]}
    )
    for _ in range(20):  # a burst of unknown kids costs one fetch
        assert refused(verifier, new) is AuthErrorCode.TOKEN_INVALID
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and jwks_server.fetches < 2:
        time.sleep(0.05)
    time.sleep(0.1)
    assert jwks_server.fetches == 2
    assert verifier.verify(new, TENANT).user_id == "user-1"
    assert verifier.verify(old, TENANT).user_id == "user-1"

    jwks_server.document = "not a key set"
    assert refused(verifier, signed(NEW_SECRET, "newer")) is AuthErrorCode.TOKEN_INVALID
    time.sleep(0.5)
    assert verifier.verify(new, TENANT).user_id == "user-1"  # a bad set keeps the keys


def test_an_unreachable_jwks_url_fails_at_start_up() -> None:
    with pytest.raises(ValueError, match="cannot be used"):
        TokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks_url="http://127.0.0.1:9/jwks.json")

"""A fake FCM: the HTTP v1 ``messages:send`` endpoint and a Google OAuth token endpoint.

The token endpoint checks the service account's signed JWT assertion (RS256, ``kid`` = the
key id, ``iss`` = the client email, ``aud`` = Google's token endpoint, the FCM scope, not
expired) and
issues a bearer token; ``messages:send`` accepts only a token it issued, checks the message as
FCM does, and answers 200 ``{"name": …}`` or FCM's v1 error body (``status``, an ``FcmError``
detail with the error code, a ``BadRequest`` detail naming the field for INVALID_ARGUMENT).
Answers per device token are scripted (:class:`~.script.Script`).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import uuid
from pathlib import Path
from typing import Any

import jwt

# An aiohttp server (httpx is a client only): the fake FCM endpoint and its token endpoint.
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.sinks.push.fakes.script import FakeStats, Received, Reply, Script, wait_before_answering

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
#: The audience of a service account's assertion: Google's token endpoint, whatever URI the
#: assertion is posted to (google-auth always signs for it).
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_TTL = re.compile(r"^\d+(\.\d{1,9})?s$")
_STATUS_OF_CODE = {
    "UNREGISTERED": "NOT_FOUND",
    "INVALID_ARGUMENT": "INVALID_ARGUMENT",
    "QUOTA_EXCEEDED": "RESOURCE_EXHAUSTED",
    "UNAVAILABLE": "UNAVAILABLE",
    "INTERNAL": "INTERNAL",
    "SENDER_ID_MISMATCH": "PERMISSION_DENIED",
    "THIRD_PARTY_AUTH_ERROR": "UNAUTHENTICATED",
}


class FakeFcm:
    def __init__(
        self, *, project_id: str, client_email: str, private_key: rsa.RSAPrivateKey
    ) -> None:
        """``private_key`` is the service account's key: the fake knows its public half, as
        Google does."""
        self.project_id = project_id
        self.client_email = client_email
        self.private_key_id = secrets.token_hex(20)
        self.private_key = private_key
        self.script = Script()
        self.stats = FakeStats()
        self.token_requests = 0
        self.tokens_refused = 0
        self.token_endpoint_script = Script()
        """Answers of the token endpoint (keyed by the client email); 200 issues a token."""
        self._issued: set[str] = set()
        self._runner: web.AppRunner | None = None
        self._port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    @property
    def endpoint(self) -> str:
        """The v1 API base, what the sender's ``endpoint`` setting takes."""
        return f"{self.base_url}/v1/projects"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post("/v1/projects/{project}/messages:send", self._send)
        # A slow answer still pending at the end of a test delays the shutdown by at most 1 s.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def write_service_account(self, path: Path) -> Path:
        """A service-account JSON for this fake, as the Firebase console hands them out."""
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        path.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": self.project_id,
                    "private_key_id": self.private_key_id,
                    "private_key": pem,
                    "client_email": self.client_email,
                    "client_id": "1",
                    "auth_uri": f"{self.base_url}/auth",
                    "token_uri": self.token_uri,
                }
            )
        )
        return path

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = await request.post()
        assertion = form.get("assertion")
        if form.get("grant_type") != JWT_BEARER_GRANT or not isinstance(assertion, str):
            return self._token_error("unsupported_grant_type")
        try:
            if jwt.get_unverified_header(assertion).get("kid") != self.private_key_id:
                return self._token_error("invalid_grant")
            claims = jwt.decode(
                assertion,
                self.private_key.public_key(),
                algorithms=["RS256"],
                audience=GOOGLE_TOKEN_AUDIENCE,
                issuer=self.client_email,
                options={"require": ["iss", "aud", "iat", "exp"]},
            )
        except jwt.PyJWTError:
            return self._token_error("invalid_grant")
        if FCM_SCOPE not in str(claims.get("scope", "")).split():
            return self._token_error("invalid_scope")
        scripted = self.token_endpoint_script.next(self.client_email)
        await wait_before_answering(scripted)
        if scripted.status != 200:
            self.tokens_refused += 1
            return web.json_response(
                {"error": scripted.reason or "internal"}, status=scripted.status
            )
        access_token = f"ya29.fake-{secrets.token_urlsafe(24)}"
        self._issued.add(access_token)
        return web.json_response(
            {"access_token": access_token, "expires_in": 3600, "token_type": "Bearer"}
        )

    def _token_error(self, error: str) -> web.Response:
        self.tokens_refused += 1
        return web.json_response({"error": error}, status=400)

    async def _send(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            document: dict[str, Any] = json.loads(body)
            message: dict[str, Any] = document["message"]
            token = str(message.get("token", ""))
        except (ValueError, KeyError, TypeError):
            document, message, token = {}, {}, ""
        headers = {name.lower(): value for name, value in request.headers.items()}
        stats = self.stats
        stats.begin(Received(token, headers, document, asyncio.get_running_loop().time()))
        reply = self._check(request, headers, message) or self.script.next(token)
        answered: Reply | None = None
        try:
            await wait_before_answering(reply)
            answered = reply
        finally:
            stats.end(answered)
        return self._response(reply)

    def _check(
        self, request: web.Request, headers: dict[str, str], message: dict[str, Any]
    ) -> Reply | None:
        """The error FCM would answer a malformed or unauthorised request with, if any."""
        authorization = headers.get("authorization", "")
        if authorization.removeprefix("Bearer ") not in self._issued:
            return Reply(401, "UNAUTHENTICATED")
        if request.match_info["project"] != self.project_id:
            return Reply(403, "SENDER_ID_MISMATCH")
        if not message:
            return Reply(400, "INVALID_ARGUMENT", field="message")
        if not message.get("token"):
            return Reply(400, "INVALID_ARGUMENT", field="message.token")
        data = message.get("data", {})
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            return Reply(400, "INVALID_ARGUMENT", field="message.data")
        android = message.get("android", {})
        if not isinstance(android, dict):
            return Reply(400, "INVALID_ARGUMENT", field="message.android")
        if "ttl" in android and not _TTL.match(str(android["ttl"])):
            return Reply(400, "INVALID_ARGUMENT", field="message.android.ttl")
        if android.get("priority", "NORMAL") not in {"NORMAL", "HIGH"}:
            return Reply(400, "INVALID_ARGUMENT", field="message.android.priority")
        return None

    def _response(self, reply: Reply) -> web.Response:
        headers = {"Retry-After": reply.retry_after} if reply.retry_after is not None else {}
        if reply.status == 200:
            name = f"projects/{self.project_id}/messages/{uuid.uuid4().hex}"
            return web.json_response({"name": name}, headers=headers)
        code = reply.reason or "INTERNAL"
        details: list[dict[str, Any]] = [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}
        ]
        message = f"fake FCM: {code}"
        if code == "INVALID_ARGUMENT":
            field = reply.field or "message.token"
            description = (
                "The registration token is not a valid FCM registration token"
                if field == "message.token"
                else f"Invalid value at '{field}'"
            )
            message = description
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"field": field, "description": description}],
                }
            )
        error = {
            "error": {
                "code": reply.status,
                "message": message,
                "status": _STATUS_OF_CODE.get(code, code),
                "details": details,
            }
        }
        return web.json_response(error, status=reply.status, headers=headers)

"""Key rotation on a running ingress node: a JWKS file (IM_AUTH__JWKS_PATH) whose keys are
picked by the token's ``kid`` and which is read again when it changes.

Before, the node held one key for good: rotating it meant a restart, with every token signed by
the other key refused in between (no overlap window).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.auth import issue_token
from core.settings import Settings
from tests.ingress.support import (
    TENANT,
    Gateway,
    close_code,
    hello,
    open_socket,
    request,
    start_gateway,
    unique,
)

OLD = ("2026-01", "old-signing-key-of-at-least-32-bytes!!")
NEW = ("2026-07", "new-signing-key-of-at-least-32-bytes!!")
CHECK_SECONDS = 0.2


def write_jwks(path: Path, *keys: tuple[str, str]) -> None:
    document = {
        "keys": [
            {"kty": "oct", "kid": kid, "k": base64.urlsafe_b64encode(secret.encode()).decode()}
            for kid, secret in keys
        ]
    }
    staged = path.with_suffix(".new")
    staged.write_text(json.dumps(document))
    staged.replace(path)


@pytest.fixture(scope="module")
def jwks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "jwks.json"
    write_jwks(path, OLD)
    return path


@pytest.fixture(scope="module")
def rotating(
    ingress_settings: Settings, jwks: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    running = start_gateway(
        ingress_settings,
        tmp_path_factory.mktemp("rotating"),
        auth={"jwks_path": jwks, "jwks_check_seconds": CHECK_SECONDS},
    )
    yield running
    assert running.stop() == 0, running.log()


def signed(settings: Settings, key: tuple[str, str], user: str) -> str:
    kid, secret = key
    return issue_token(
        secret,
        user_id=user,
        tenant_id=TENANT,
        issuer=settings.auth.jwt_issuer,
        audience=settings.auth.jwt_audience,
        key_id=kid,
    )


async def hello_with(node: Gateway, token: str) -> str:
    """``hello_ok``, or the error code and the close code of the refusal."""
    socket_ = await open_socket(node)
    reply = await request(socket_, hello(node.settings, unique("user"), "phone", token_text=token))
    if reply["type"] == "hello_ok":
        await socket_.close()
        return "hello_ok"
    return f"{reply['code']} {await close_code(socket_)}"


async def test_keys_rotate_through_the_jwks_file_without_a_restart(
    rotating: Gateway, jwks: Path
) -> None:
    settings = rotating.settings
    old, new = signed(settings, OLD, "u"), signed(settings, NEW, "u")
    unknown = signed(settings, ("someone-elses", NEW[1]), "u")
    assert await hello_with(rotating, old) == "hello_ok"
    assert await hello_with(rotating, new) == "token-invalid 4002"
    assert await hello_with(rotating, unknown) == "token-invalid 4002"

    # 1. The new key is added: both are good during the overlap.
    write_jwks(jwks, OLD, NEW)
    await asyncio.sleep(CHECK_SECONDS * 3)
    assert await hello_with(rotating, new) == "hello_ok"
    assert await hello_with(rotating, old) == "hello_ok"

    # 2. The issuer signs with the new key; 3. the old key is removed.
    write_jwks(jwks, NEW)
    await asyncio.sleep(CHECK_SECONDS * 3)
    assert await hello_with(rotating, new) == "hello_ok"
    assert await hello_with(rotating, old) == "token-invalid 4002"
    headers = {"Authorization": f"Bearer {old}"}
    status, _, raw = rotating.request(
        "POST", f"/v1/tenants/{TENANT}/commands", {"type": "ping", "id": "p"}, headers
    )
    assert (status, json.loads(raw)["code"]) == (401, "token-invalid")
    assert "JWKS" in rotating.log() and "reloaded" in rotating.log()

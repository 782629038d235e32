"""``wss://`` end to end: an ingress serving TLS with a certificate from a test CA.

The SDK and a raw WebSocket client that trust the CA send and receive a message through the
real pipeline (ingress, stream worker, CQL sink); a client that does not trust it, or that offers
only TLS 1.2, fails the handshake; and a certificate that cannot be loaded stops the node at
start with an operator's message.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake

from client.sdk import Client, ClientClosedError
from core.pki import Pki, make_pki
from core.settings import Settings
from core.tls import client_context
from schemas.errors import CloseCode
from tests.ingress.conftest import running_pipeline
from tests.ingress.support import (
    TENANT,
    Gateway,
    close_code,
    first_message_sent,
    group_message_arrives,
    open_device,
    request,
    run_imstream,
    start_gateway,
    token,
    unique,
)


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA of this module only, and the ingress's certificate (127.0.0.1, localhost)."""
    return make_pki(tmp_path_factory.mktemp("ingress-pki"), {"ingress": ()}, ca_name="wss CA")


@pytest.fixture(scope="module")
def tls_pipeline(
    ingress_settings: Settings,
    serving_keyspace: str,
    test_ca: Pki,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    """The pipeline, its ingress serving https and wss only."""
    leaf = test_ca["ingress"]
    with running_pipeline(
        ingress_settings,
        serving_keyspace,
        tmp_path_factory.mktemp("tls-pipeline"),
        ingress={"tls_cert_path": leaf.cert_file, "tls_key_path": leaf.key_file},
        ca_file=test_ca.ca_file,
    ) as running:
        (gateway,) = running.gateways
        yield gateway


def sdk(gateway: Gateway, user: str, **options: object) -> Client:
    return Client(
        gateway.ws,
        tenant_id=TENANT,
        device_id="phone",
        token=token(gateway.settings, user),
        **options,  # type: ignore[arg-type]
    )


async def test_the_sdk_sends_and_receives_over_wss(tls_pipeline: Gateway, test_ca: Pki) -> None:
    assert tls_pipeline.ws.startswith("wss://")
    ann, ben = unique("ann"), unique("ben")
    async with (
        sdk(tls_pipeline, ann, ca_file=test_ca.ca_file) as sender,
        sdk(tls_pipeline, ben, ca_file=test_ca.ca_file) as receiver,
    ):
        conversation = await sender.create_conversation([ben], kind="direct")
        accepted = await sender.send(conversation, "over TLS 1.3")
        received = await asyncio.wait_for(first_message_sent(receiver), 60)
        assert received.event_id == accepted.event_id
        assert received.payload.body.model_dump()["text"] == "over TLS 1.3"
        # The REST call of the SDK goes to the https twin of the wss URL, with the same trust.
        await receiver.register_push_token("fcm", unique("token"), app_id="com.example")


async def test_a_raw_websocket_client_trusting_the_ca_speaks_tls_13(
    tls_pipeline: Gateway,
) -> None:
    ann, ben = unique("ann"), unique("ben")
    sender, _ = await open_device(tls_pipeline, ann)
    receiver, _ = await open_device(tls_pipeline, ben)
    try:
        transport = sender.transport
        assert transport.get_extra_info("ssl_object").version() == "TLSv1.3"
        await group_message_arrives(sender, receiver, ben, name="tls", text="raw over wss")
    finally:
        await sender.close()
        await receiver.close()
    # Plain REST is served over https the same way.
    status, _, body = tls_pipeline.request("GET", "/readyz")
    assert (status, json.loads(body)["kafka"]) == (200, True)


async def test_a_client_not_trusting_the_ca_fails_the_handshake(tls_pipeline: Gateway) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await connect(tls_pipeline.ws, ssl=client_context(None), open_timeout=20)
    # The SDK stops instead of reconnecting for ever: a certificate does not verify by retrying.
    client = sdk(tls_pipeline, unique("ann"))
    with pytest.raises(ClientClosedError, match="not trusted"):
        await asyncio.wait_for(client.connect(), 30)
    await client.close()
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        async with httpx.AsyncClient(timeout=10) as http:
            await http.get(f"{tls_pipeline.http}/healthz")


async def test_tls_12_and_plain_websocket_are_refused(tls_pipeline: Gateway, test_ca: Pki) -> None:
    old = client_context(test_ca.ca_file)
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    # The server ends a TLS 1.2 handshake (an alert, or a reset before one is read).
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await connect(tls_pipeline.ws, ssl=old, open_timeout=20)
    # No plain ws:// on the TLS port either: its handshake is no TLS record, nothing answers it.
    plain = tls_pipeline.ws.replace("wss://", "ws://")
    with pytest.raises((InvalidHandshake, OSError)):
        await connect(plain, open_timeout=10)


async def test_a_drain_closes_tls_sockets_with_4010(
    ingress_settings: Settings, test_ca: Pki, tmp_path: Path
) -> None:
    """The gateway's own close path (frames written straight to the transport, then the
    transport closed: ``ingress/wsprotocol.py``) over a TLS transport."""
    leaf = test_ca["ingress"]
    gateway = start_gateway(
        ingress_settings,
        tmp_path,
        ingress={"tls_cert_path": leaf.cert_file, "tls_key_path": leaf.key_file},
        ca_file=test_ca.ca_file,
    )
    try:
        socket_, _ = await open_device(gateway, unique("ann"))
        assert (await request(socket_, {"type": "ping", "id": "p"}))["type"] == "pong"
        stopping = asyncio.get_running_loop().run_in_executor(None, gateway.stop)
        assert await close_code(socket_) == CloseCode.SERVER_DRAINING
        assert await stopping == 0, gateway.log()
    finally:
        gateway.stop()


def test_a_certificate_that_cannot_be_loaded_stops_the_node_with_a_message(
    tmp_path: Path, test_ca: Pki
) -> None:
    done = run_imstream(
        "run",
        "ingress",
        variables={
            "IM_INGRESS__TLS_CERT_PATH": str(test_ca["ingress"].cert_file),
            "IM_INGRESS__TLS_KEY_PATH": str(tmp_path / "missing-key.pem"),
        },
    )
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "[settings-invalid] cannot load the TLS certificate" in output, output
    assert "Traceback" not in output, output

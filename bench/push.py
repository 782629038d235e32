"""Push senders against the fake providers: pushes/s and latency per provider through the real
sender stack, against the fake's own capacity measured with a minimal raw client in the same run.

    python -m bench.push [--pushes 4000] [--concurrency 64] [--warmup 300]

**The fakes are test code.** The fake APNs (HTTP/2 over TLS with a throw-away CA) and the fake FCM
(HTTP/1.1 with its OAuth token endpoint) live in ``tests/sinks/push/fakes`` and are reused here by
the benchmark only; nothing in ``imstream`` imports them. They run in a process of their own (one
asyncio loop serving both), so that the client under test and the server do not share a GIL.

Per provider, each phase sends ``--warmup`` unmeasured pushes and then ``--pushes`` measured ones,
from ``--concurrency`` workers that each keep one push in flight (the sink's default bound per
provider is 64):

- **stack**: ``PushDispatcher`` (the production defaults of ``PushProviderSettings``: bound,
  breaker, retries, per-request timeout) over ``ApnsSender`` (aioapns, 2 HTTP/2 connections) or
  ``FcmSender`` (the HTTP v1 API with its OAuth token), one ``deliver`` per push, each push a
  fresh device token and a notification built as the sink builds it;
- **raw**: the same number of requests with the fewest layers Python offers — for APNs one
  TLS connection driven with ``h2`` directly (JWT signed once), for FCM one ``aiohttp`` session
  with a bearer token fetched once — the ceiling: what the fake serves to the cheapest client.

Reported: pushes/s (measured pushes ÷ wall time), latency p50/p95/p99 per push (from the call to
its answer; for the stack, ``deliver`` returning), CPU of this process and of the fakes' process
(percent of one core), the stack ÷ raw ratio, and the fakes' own count of accepted requests (which
must equal the pushes sent). Results go to ``docs/bench/push.json``; the table is in
docs/performance.md ("Push senders").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

# aiohttp, not httpx: the raw ceiling wants the cheapest client; httpx's AsyncClient drove the
# fake FCM 10-15 times slower here (100-115 against 1,200-1,770 pushes/s, same load, Dec 2026).
import aiohttp
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset

from bench.common import REPO_ROOT, Progress, cpu_seconds, percentiles_ms, run_main
from bench.harness import add_output_options, bench_parser, measure_and_report
from core.push_settings import PushProviderSettings
from schemas.events import PushProvider
from sinks.push.apns import ApnsSender
from sinks.push.fcm import FcmSender
from sinks.push.notification import PushNotification, PushTarget
from sinks.push.reliability import PushDispatcher, PushSender
from tests.sinks.push.fakes.tls import LocalPki, make_local_pki
from tests.sinks.push.support import APNS_TOPIC, FCM_APP, make_job, make_notification

RESULTS_PATH = REPO_ROOT / "docs" / "bench" / "push.json"
FCM_PROJECT = "imstream-bench"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"


# ---------------------------------------------------------------------------------------------
# The fakes' process
# ---------------------------------------------------------------------------------------------


def _serve_fakes(
    control: Connection,
    pki: LocalPki,
    apns_public_pem: bytes,
    fcm_private_pem: bytes,
    ids: dict[str, str],
) -> None:
    """The child process: both fakes on one loop; answers ``stats`` and ``stop`` on ``control``."""
    from tests.sinks.push.fakes.apns import FakeApns  # noqa: PLC0415
    from tests.sinks.push.fakes.fcm import FakeFcm  # noqa: PLC0415

    async def serve() -> None:
        apns_public = serialization.load_pem_public_key(apns_public_pem)
        fcm_private = serialization.load_pem_private_key(fcm_private_pem, password=None)
        assert isinstance(apns_public, ec.EllipticCurvePublicKey)
        assert isinstance(fcm_private, rsa.RSAPrivateKey)
        apns = FakeApns(
            pki,
            team_id=ids["team_id"],
            key_id=ids["key_id"],
            public_key=apns_public,
            topics=frozenset({APNS_TOPIC}),
        )
        fcm = FakeFcm(
            project_id=FCM_PROJECT,
            client_email="bench@imstream-bench.iam.gserviceaccount.com",
            private_key=fcm_private,
        )
        await apns.start()
        await fcm.start()
        fcm.write_service_account(Path(ids["service_account"]))
        control.send({"apns": apns.address, "fcm": fcm.endpoint})
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, control.recv)
            if command == "stop":
                break
            # The received requests are not kept: at bench volumes they only cost memory.
            apns.stats.received.clear()
            fcm.stats.received.clear()
            control.send(
                {
                    name: {
                        "accepted": fake.stats.accepted,
                        "rejected": sum(fake.stats.rejected.values()),
                        "abandoned": fake.stats.abandoned,
                    }
                    for name, fake in (("apns", apns), ("fcm", fcm))
                }
            )
        await apns.stop()
        await fcm.stop()

    asyncio.run(serve())


class Fakes:
    """The fakes' process and what the clients need to reach it."""

    def __init__(self, directory: Path) -> None:
        self.pki = make_local_pki(directory)
        apns_key = ec.generate_private_key(ec.SECP256R1())
        self.apns_pem = apns_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        self.key_id = secrets.token_hex(5).upper()
        self.team_id = secrets.token_hex(5).upper()
        self.service_account = directory / "service-account.json"
        fcm_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._control, child = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(
            target=_serve_fakes,
            args=(
                child,
                self.pki,
                apns_key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                ),
                fcm_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
                {
                    "key_id": self.key_id,
                    "team_id": self.team_id,
                    "service_account": str(self.service_account),
                },
            ),
            name="push-fakes",
            daemon=True,
        )
        self.apns_address = ""
        self.fcm_endpoint = ""

    def start(self) -> None:
        self.process.start()
        if not self._control.poll(60):
            raise RuntimeError("the fakes' process did not start within 60 s")
        where = self._control.recv()
        self.apns_address, self.fcm_endpoint = where["apns"], where["fcm"]

    def stats(self) -> dict[str, dict[str, int]]:
        self._control.send("stats")
        answer: dict[str, dict[str, int]] = self._control.recv()
        return answer

    def stop(self) -> None:
        if self.process.is_alive():
            self._control.send("stop")
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid


# ---------------------------------------------------------------------------------------------
# Load: workers that keep one push each in flight
# ---------------------------------------------------------------------------------------------


async def run_load(
    send: Callable[[int], Awaitable[bool]], *, count: int, concurrency: int, first: int = 0
) -> dict[str, Any]:
    """``count`` calls of ``send(i)`` from ``concurrency`` workers; wall time, latencies, and how
    many came back true (delivered)."""
    latencies: list[float] = []
    delivered = 0
    next_index = first
    end = first + count

    async def worker() -> None:
        nonlocal next_index, delivered
        while next_index < end:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            ok = await send(index)
            latencies.append(time.perf_counter() - started)
            delivered += ok

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    return {"pushes": count, "delivered": delivered, "seconds": seconds, "latencies": latencies}


def _apns_token() -> str:
    return secrets.token_hex(32)


def _fcm_token() -> str:
    return f"fcm-{secrets.token_urlsafe(32)}"


def _notifications(count: int) -> list[PushNotification]:
    """Notifications as the sink builds them, of a few conversations (collapse ids differ)."""
    return [make_notification(make_job(conversation_id=f"c-{i}")) for i in range(count)]


# -- the stack --


def stack_sender(provider: PushProvider, fakes: Fakes, concurrency: int) -> PushSender:
    if provider is PushProvider.APNS:
        return ApnsSender(
            signing_key=fakes.apns_pem,
            key_id=fakes.key_id,
            team_id=fakes.team_id,
            default_topic=APNS_TOPIC,
            use_sandbox=True,
            host=fakes.apns_address,
            ca_file=fakes.pki.ca_file,
            max_connections=PushProviderSettings().apns_max_connections,
        )
    return FcmSender(
        credentials_path=fakes.service_account,
        endpoint=fakes.fcm_endpoint,
        channel_id="messages",
        concurrency=concurrency,
    )


def stack_send(
    dispatcher: PushDispatcher, provider: PushProvider, notifications: Sequence[PushNotification]
) -> Callable[[int], Awaitable[bool]]:
    token, app = (
        (_apns_token, APNS_TOPIC) if provider is PushProvider.APNS else (_fcm_token, FCM_APP)
    )

    async def send(index: int) -> bool:
        target = PushTarget(f"device-{index}", provider, token(), app)
        report = await dispatcher.deliver(notifications[index % len(notifications)], target)
        return report.delivered

    return send


# -- raw APNs: h2 over one TLS connection --


class RawApns:
    """The least an APNs client can do: one TLS connection, ``h2`` state machine, one JWT."""

    def __init__(self, fakes: Fakes) -> None:
        self.host, port = fakes.apns_address.rsplit(":", 1)
        self.port = int(port)
        self.ca_file = fakes.pki.ca_file
        self.authorization = "bearer " + jwt.encode(
            {"iss": fakes.team_id, "iat": int(time.time())},
            fakes.apns_pem,
            algorithm="ES256",
            headers={"kid": fakes.key_id},
        )
        self.body = json.dumps(
            {"aps": {"alert": {"title": "alice", "body": "hello there"}, "badge": 3}}
        ).encode()
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.answers: dict[int, asyncio.Future[int]] = {}
        self.statuses: dict[int, int] = {}
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reading: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.set_alpn_protocols(["h2"])
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, ssl=context, server_hostname=self.host
        )
        self.conn.initiate_connection()
        self._flush()
        self.reading = asyncio.get_running_loop().create_task(self._read())

    def _flush(self) -> None:
        assert self.writer is not None
        self.writer.write(self.conn.data_to_send())

    async def _read(self) -> None:
        assert self.reader is not None
        while data := await self.reader.read(65536):
            for event in self.conn.receive_data(data):
                if isinstance(event, ResponseReceived):
                    for key, value in event.headers or []:
                        if key in (":status", b":status"):
                            self.statuses[event.stream_id] = int(value)
                elif isinstance(event, DataReceived):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, StreamEnded | StreamReset):
                    answer = self.answers.pop(event.stream_id, None)
                    if answer is not None and not answer.done():
                        answer.set_result(self.statuses.pop(event.stream_id, 0))
            self._flush()

    async def send(self, _index: int) -> bool:
        stream_id = self.conn.get_next_available_stream_id()
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.answers[stream_id] = answer
        self.conn.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":path", f"/3/device/{_apns_token()}"),
                (":authority", self.host),
                ("authorization", self.authorization),
                ("apns-topic", APNS_TOPIC),
                ("apns-push-type", "alert"),
                ("apns-priority", "10"),
                ("apns-expiration", "0"),
                ("apns-collapse-id", "c-1"),
                ("content-length", str(len(self.body))),
            ],
        )
        self.conn.send_data(stream_id, self.body, end_stream=True)
        self._flush()
        return await answer == 200

    async def close(self) -> None:
        if self.reading is not None:
            self.reading.cancel()
        if self.writer is not None:
            self.writer.close()


# -- raw FCM: one aiohttp session, one bearer token --


class RawFcm:
    def __init__(self, fakes: Fakes, concurrency: int) -> None:
        self.service_account = fakes.service_account
        self.url = f"{fakes.fcm_endpoint}/{FCM_PROJECT}/messages:send"
        self.concurrency = concurrency
        self.session: aiohttp.ClientSession | None = None
        self.headers: dict[str, str] = {}

    async def connect(self) -> None:
        from google.auth.transport.requests import Request  # noqa: PLC0415
        from google.oauth2 import service_account  # noqa: PLC0415

        credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
            str(self.service_account), scopes=[FCM_SCOPE]
        )
        await asyncio.to_thread(credentials.refresh, Request())
        self.headers = {"Authorization": f"Bearer {credentials.token}"}
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.concurrency))

    async def send(self, _index: int) -> bool:
        assert self.session is not None
        message = {
            "message": {
                "token": _fcm_token(),
                "notification": {"title": "alice", "body": "hello there"},
                "android": {"collapse_key": "c-1", "notification": {"channel_id": "messages"}},
                "data": {"conversation_id": "c-1", "conversation_seq": "7"},
            }
        }
        async with self.session.post(self.url, json=message, headers=self.headers) as response:
            await response.read()
            return response.status == 200

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------


async def phase(
    name: str,
    send: Callable[[int], Awaitable[bool]],
    fakes: Fakes,
    options: argparse.Namespace,
    progress: Progress,
) -> dict[str, Any]:
    progress.update(f"{name}: warm-up")
    await run_load(send, count=options.warmup, concurrency=options.concurrency)
    before = fakes.stats()
    own_cpu, fake_cpu = (
        cpu_seconds(os.getpid()),
        cpu_seconds(fakes.pid),
    )
    progress.update(f"{name}: {options.pushes} pushes")
    load = await run_load(
        send, count=options.pushes, concurrency=options.concurrency, first=options.warmup
    )
    seconds = load["seconds"]
    own_cpu = cpu_seconds(os.getpid()) - own_cpu
    fake_cpu = cpu_seconds(fakes.pid) - fake_cpu
    after = fakes.stats()
    provider = name.split(maxsplit=1)[0]
    accepted = after[provider]["accepted"] - before[provider]["accepted"]
    result = {
        "pushes": load["pushes"],
        "delivered": load["delivered"],
        "fake_accepted": accepted,
        "fake_rejected": after[provider]["rejected"] - before[provider]["rejected"],
        "seconds": round(seconds, 3),
        "pushes_per_second": round(load["pushes"] / seconds, 1),
        "latency_ms": percentiles_ms(load["latencies"]),
        "cpu_pct_of_one_core": {
            "bench_process": round(100 * own_cpu / seconds, 1),
            "fakes_process": round(100 * fake_cpu / seconds, 1),
        },
    }
    progress.done(
        f"{name}: {result['pushes_per_second']:,.0f}/s, p50 {result['latency_ms']['p50']} ms, "
        f"p99 {result['latency_ms']['p99']} ms"
    )
    return result


async def run(options: argparse.Namespace, fakes: Fakes, progress: Progress) -> dict[str, Any]:
    results: dict[str, Any] = {}
    settings = PushProviderSettings(concurrency=options.concurrency)
    notifications = _notifications(16)
    for provider in (PushProvider.APNS, PushProvider.FCM):
        raw: RawApns | RawFcm = (
            RawApns(fakes) if provider is PushProvider.APNS else RawFcm(fakes, options.concurrency)
        )
        await raw.connect()
        try:
            raw_result = await phase(f"{provider.value} raw", raw.send, fakes, options, progress)
        finally:
            await raw.close()
        sender = stack_sender(provider, fakes, options.concurrency)
        dispatcher = PushDispatcher.from_settings(settings, {provider: sender})
        try:
            stack_result = await phase(
                f"{provider.value} stack",
                stack_send(dispatcher, provider, notifications),
                fakes,
                options,
                progress,
            )
        finally:
            await sender.close()
        results[provider.value] = {
            "stack": stack_result,
            "raw": raw_result,
            "stack_over_raw": round(
                stack_result["pushes_per_second"] / raw_result["pushes_per_second"], 3
            ),
        }
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser("bench.push", __doc__)
    parser.add_argument("--pushes", type=int, default=4000, help="measured per phase")
    parser.add_argument("--warmup", type=int, default=300, help="unmeasured per phase")
    parser.add_argument("--concurrency", type=int, default=64, help="pushes in flight")
    add_output_options(parser, RESULTS_PATH)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)

    def measure(progress: Progress) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="bench-push-") as directory:
            fakes = Fakes(Path(directory))
            fakes.start()
            try:
                return asyncio.run(run(options, fakes, progress))
            finally:
                fakes.stop()

    return measure_and_report(
        "push",
        options,
        measure,
        parameters=("pushes", "warmup", "concurrency"),
        note="the fakes are tests/sinks/push/fakes (test code), reused by this benchmark only",
    )


if __name__ == "__main__":
    run_main(main)

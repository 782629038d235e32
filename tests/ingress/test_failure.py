"""A node that cannot recover on its own is unready at once and exits with status 70, so that
its supervisor starts a fresh one: before, a dead live-delivery thread (or a fatal producer
error) left a zombie that accepted sockets, answered ``/readyz`` and delivered nothing live."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from confluent_kafka import Consumer

from core.settings import Settings
from ingress.app import create_app
from ingress.server import IngressFailedError
from pipelines.processes.ingress import serve
from tests.ingress.support import free_port, unique, wait_until


def status_of(url: str) -> tuple[int, dict[str, object]]:
    response = httpx.get(url, timeout=5)
    return response.status_code, json.loads(response.content)


async def test_a_dead_live_delivery_thread_makes_the_node_unready_and_exit(
    ingress_settings: Settings,
) -> None:
    ingress = ingress_settings.ingress.model_copy(
        update={"port": free_port(), "internal_port": free_port(), "node_id": unique("node")}
    )
    settings = ingress_settings.model_copy(update={"ingress": ingress})
    app = create_app(settings)
    gateway = app.gateway
    serving = asyncio.get_running_loop().create_task(serve(settings, app))
    readyz = f"http://127.0.0.1:{ingress.internal_port}/readyz"
    async with asyncio.timeout(60):
        while not (gateway.live.assigned and gateway.groups.assigned):
            assert not serving.done(), serving
            await asyncio.sleep(0.05)
    assert (await asyncio.to_thread(status_of, readyz))[0] == 200

    def broken(_consumer: Consumer) -> None:
        raise RuntimeError("injected: the live consumer's loop raised")

    # A fault in the thread, not a stand-in for Kafka: the consumer itself stays real.
    gateway.live._consume = broken  # type: ignore[method-assign, assignment]
    await wait_until(lambda: gateway.failure() is not None, within=10)
    readiness = await gateway.readiness()
    assert not readiness.ready
    assert readiness.failed == f"the {gateway.live.topic} consumer thread died"
    with pytest.raises(IngressFailedError, match="consumer thread died"):
        async with asyncio.timeout(30):
            await serving

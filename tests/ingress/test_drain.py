"""Graceful drain: on SIGTERM every socket is told to reconnect elsewhere (4010), the node
publishes each device's disconnect, flushes Kafka and exits 0."""

from __future__ import annotations

import asyncio
import signal

import pytest

from core.settings import Settings
from schemas.topics import user_key
from tests.ingress.support import (
    TENANT,
    close_code,
    end_offset,
    open_device,
    open_socket,
    read_to_end,
    start_gateway,
    unique,
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_drains_every_socket_with_4010(
    ingress_settings: Settings, tmp_path_factory: pytest.TempPathFactory, signum: signal.Signals
) -> None:
    gateway = start_gateway(ingress_settings, tmp_path_factory.mktemp("drain"))
    users = [unique("user") for _ in range(3)]
    topic = gateway.catalog.presence.name
    keys = [user_key(TENANT, user) for user in users]
    offsets = [await asyncio.to_thread(end_offset, gateway.settings, topic, key) for key in keys]
    sockets = [(await open_device(gateway, user, "phone"))[0] for user in users]
    waiting_for_hello = await open_socket(gateway)

    exit_code = await asyncio.to_thread(gateway.stop, signum)

    assert exit_code == 0, gateway.log()
    assert [await close_code(socket_) for socket_ in sockets] == [4010, 4010, 4010]
    assert await close_code(waiting_for_hello) == 4010
    assert "drained (0 record(s) unacknowledged" in gateway.log()
    for key, (partition, offset) in zip(keys, offsets, strict=True):
        records = await asyncio.to_thread(read_to_end, gateway.settings, topic, partition, offset)
        events = [event for record_key, event in records if record_key == key]
        assert [event["type"] for event in events] == ["device.connected", "device.disconnected"]
        assert {event["payload"]["device_id"] for event in events} == {"phone"}

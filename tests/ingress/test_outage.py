"""Kafka unavailable: a send is never ``accepted`` unless Kafka holds it; the client is told to
retry, and a retry with the same ``client_msg_id`` after Kafka is back gets the same message id.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from core.connections import kafka_config
from core.settings import KafkaSettings, Settings, StackSettings
from pipelines.stack.errors import StackError
from pipelines.stack.manager import LocalStack
from schemas.events import message_event_id
from schemas.topics import conversation_key
from tests.ingress.support import (
    TENANT,
    Gateway,
    JsonObject,
    assert_upgrade_refused,
    create_topics,
    end_offset,
    free_port,
    open_device,
    read_records,
    receive,
    request,
    start_gateway,
    token,
    unique,
    wait_until,
)

MESSAGE_TIMEOUT_MS = 1500
RETRY_AFTER_MS = 700
#: A message timeout no fast answer could come from.
LONG_MESSAGE_TIMEOUT_MS = 20_000
#: What "at once" allows for on a machine shared with other tests.
FAST_SECONDS = 2.0


def send(conversation: str, client_msg_id: str, request_id: str = "r1") -> JsonObject:
    return {
        "type": "send",
        "id": request_id,
        "conversation_id": conversation,
        "client_msg_id": client_msg_id,
        "body": {"type": "text", "text": "are you there?"},
    }


@pytest.fixture(scope="module")
def dead_broker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway whose Kafka address has nothing listening."""
    prefixed = settings.model_copy(
        update={"kafka": settings.kafka.model_copy(update={"topic_prefix": unique("t-dead")})}
    )
    running = start_gateway(
        prefixed,
        tmp_path_factory.mktemp("dead-broker"),
        kafka={"bootstrap_servers": f"127.0.0.1:{free_port()}"},
        ingress={
            "kafka_message_timeout_ms": MESSAGE_TIMEOUT_MS,
            "unavailable_retry_after_ms": RETRY_AFTER_MS,
        },
        wait=Gateway.alive,
    )
    yield running
    assert running.stop() == 0, running.log()


async def test_a_node_that_never_reached_kafka_lets_no_one_in(dead_broker: Gateway) -> None:
    """Without Kafka a starting node cannot have read the token revocations, so it lets no token
    in: the upgrade is refused with 503 ``unavailable`` and ``Retry-After`` (nothing is ever
    accepted), and /readyz says why."""
    status, _, raw = dead_broker.request("GET", "/readyz")
    readiness = json.loads(raw)
    assert (status, readiness["kafka"], readiness["revocations"]) == (503, False, False)
    await assert_upgrade_refused(dead_broker, 503, "unavailable")


def test_no_broker_over_rest_is_503_with_retry_after(dead_broker: Gateway) -> None:
    headers = {"Authorization": f"Bearer {token(dead_broker.settings, unique('user'))}"}
    status, response_headers, raw = dead_broker.request(
        "POST", f"/v1/tenants/{TENANT}/commands", send("c-1", "m-1"), headers
    )
    assert (status, json.loads(raw)["code"]) == (503, "unavailable")
    assert response_headers["retry-after"] == "1"


@pytest.fixture(scope="module")
def second_kafka(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    """A Kafka of its own (free ports, the shared jars) that a test may stop and start."""
    state_dir = tmp_path_factory.mktemp("second-kafka") / "state"
    state_dir.mkdir()
    (state_dir / "jars").symlink_to(settings.stack.state_dir / "jars")
    isolated = settings.model_copy(
        update={
            "kafka": KafkaSettings(
                bootstrap_servers=f"127.0.0.1:{free_port()}", topic_prefix=unique("t-outage")
            ),
            "stack": StackSettings(
                state_dir=Path(state_dir),
                kafka_controller_port=free_port(),
                start_timeout_seconds=90,
                stop_timeout_seconds=20,
            ),
        }
    )
    stack = LocalStack(isolated, services=("kafka",))
    try:
        stack.up()
    except StackError as error:
        # pipelines/stack/services.py draws a random cluster id; one starting with "-" (1 in
        # 64) is read as an option by Kafka's StorageTool and formatting fails. A new id is
        # drawn on the next attempt.
        if "formatting Kafka storage" not in error.message:
            raise
        stack.up()
    yield stack
    stack.down()


def second_kafka_gateway(
    second_kafka: LocalStack, directory: Path, message_timeout_ms: int
) -> tuple[Settings, Gateway]:
    """The catalog's topics on the second Kafka, and a gateway producing to them that gives up
    on a write after ``message_timeout_ms``."""
    kafka_settings = create_topics(
        AdminClient(kafka_config(second_kafka.settings)),
        second_kafka.settings,
        second_kafka.settings.kafka.topic_prefix,
    )
    gateway = start_gateway(
        kafka_settings,
        directory,
        ingress={
            "kafka_message_timeout_ms": message_timeout_ms,
            "unavailable_retry_after_ms": RETRY_AFTER_MS,
        },
    )
    return kafka_settings, gateway


async def test_while_no_broker_is_reachable_a_send_is_unavailable_at_once(
    second_kafka: LocalStack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Once the producer knows every broker connection is down, a send is answered at once, not
    after the message timeout (20 s here) it used to wait for a write that could not happen."""
    _, gateway = second_kafka_gateway(
        second_kafka, tmp_path_factory.mktemp("unreachable"), LONG_MESSAGE_TIMEOUT_MS
    )
    try:
        socket_, _ = await open_device(gateway, unique("user"))
        assert (await request(socket_, send("c-1", "m-before")))["type"] == "accepted"
        await asyncio.to_thread(second_kafka.down)

        def knows_it() -> bool:
            status, _, raw = gateway.request("GET", "/readyz")
            return status == 503 and json.loads(raw)["kafka"] is False

        await wait_until(knows_it, within=60, what="the node to see that Kafka is gone")
        loop = asyncio.get_running_loop()
        for attempt in range(3):
            started = loop.time()
            reply = await request(socket_, send("c-1", f"m-{attempt}", f"r{attempt}"))
            assert (reply["code"], reply["retry_after_ms"]) == ("unavailable", RETRY_AFTER_MS)
            assert "unreachable" in reply["message"]
            assert loop.time() - started < FAST_SECONDS, reply
        headers = {"Authorization": f"Bearer {token(gateway.settings, unique('user'))}"}
        started = loop.time()
        status, _, raw = await asyncio.to_thread(
            gateway.request,
            "POST",
            f"/v1/tenants/{TENANT}/commands",
            send("c-1", "m-rest"),
            headers,
        )
        assert (status, json.loads(raw)["code"]) == (503, "unavailable")
        assert loop.time() - started < FAST_SECONDS
    finally:
        await asyncio.to_thread(second_kafka.up)
        assert gateway.stop() == 0, gateway.log()


async def test_a_send_during_an_outage_is_accepted_only_once_kafka_has_it(
    second_kafka: LocalStack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    kafka_settings, gateway = second_kafka_gateway(
        second_kafka, tmp_path_factory.mktemp("outage"), MESSAGE_TIMEOUT_MS
    )
    try:
        user, conversation = unique("user"), unique("conv")
        topic = gateway.catalog.messages_in.name
        key = conversation_key(TENANT, conversation)
        partition, before = await asyncio.to_thread(end_offset, kafka_settings, topic, key)
        socket_, _ = await open_device(gateway, user)
        assert (await request(socket_, send(conversation, "m-1")))["type"] == "accepted"

        await asyncio.to_thread(second_kafka.down)
        during = await request(socket_, send(conversation, "m-2", "r2"))
        assert (during["type"], during["code"]) == ("error", "unavailable")

        await asyncio.to_thread(second_kafka.up)
        # The client retries as told, with the same ids, until Kafka acknowledges it.
        attempts = 0
        reply = during
        async with asyncio.timeout(90):
            while reply["type"] != "accepted":
                assert (reply["type"], reply["code"]) == ("error", "unavailable"), reply
                await asyncio.sleep(reply["retry_after_ms"] / 1000)
                attempts += 1
                await socket_.send(json.dumps(send(conversation, "m-2", f"r2-{attempts}")))
                reply = await receive(socket_, within=30)
        assert reply["event_id"] == message_event_id(TENANT, user, "m-2")

        records = await asyncio.to_thread(read_records, kafka_settings, topic, partition, before, 2)
        assert [event["payload"]["client_msg_id"] for _, event in records] == ["m-1", "m-2"]
    finally:
        assert gateway.stop() == 0, gateway.log()

"""Read access that follows removals, deletions and recalls at once, on every ingress node.

Two ingress nodes, the stream worker and the CQL sink run on this module's topics and keyspace.
The command that takes access away (remove a member, delete a group, recall a message) is sent
to one node; the reader's device is on the other node and reads right after the ``ok`` — once,
never "eventually": the answer waits until the serving store holds the command's facts, which
every node reads at quorum (docs/storage.md, "Read access").
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cassandra.cluster import Session
from websockets.asyncio.client import ClientConnection

from core.settings import Settings
from ingress.reads import Reads
from sinks.cql.crypto import open_event
from tests.ingress.conftest import Pipeline, running_pipeline
from tests.ingress.support import TENANT, JsonObject, open_device, token, unique
from tests.ingress.test_reads import eventually, read


@pytest.fixture(scope="module")
def pipeline(
    ingress_settings: Settings, serving_keyspace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    logs = tmp_path_factory.mktemp("read-access")
    with running_pipeline(ingress_settings, serving_keyspace, logs, nodes=2) as running:
        yield running


async def send(socket_: Any, conversation: str, text: str) -> str:
    """Send a text; its message id."""
    reply = await read(
        socket_,
        {
            "type": "send",
            "id": unique("s"),
            "conversation_id": conversation,
            "client_msg_id": unique("m"),
            "body": {"type": "text", "text": text},
        },
    )
    assert reply["type"] == "accepted", reply
    return str(reply["event_id"])


async def command(socket_: Any, frame: JsonObject) -> JsonObject:
    return await read(socket_, {"id": unique("c"), **frame})


async def history(socket_: Any, conversation: str, **page: Any) -> JsonObject:
    return await read(
        socket_, {"type": "history", "id": unique("h"), "conversation_id": conversation, **page}
    )


def texts(page: JsonObject) -> list[str]:
    return [
        entry["event"]["payload"]["body"].get("text", "")
        for entry in page["entries"]
        if entry["event"]["type"] == "message.sent"
    ]


async def stored(socket_: Any, conversation: str, count: int) -> JsonObject:
    """The reader's history once it holds ``count`` messages (the sink is behind the send)."""

    async def enough() -> JsonObject | None:
        page = await history(socket_, conversation)
        # Forbidden until the sink stored the group's creation.
        return page if "entries" in page and len(texts(page)) >= count else None

    page: JsonObject = await eventually(f"{count} messages in the history", enough)
    return page


async def group(owner: Any, members: list[str]) -> str:
    created = await command(
        owner, {"type": "conversation.create", "kind": "group", "members": members}
    )
    assert created["type"] == "ok", created
    return str(created["conversation_id"])


async def group_of_three(
    pipeline: Pipeline,
) -> tuple[str, ClientConnection, ClientConnection, ClientConnection, str]:
    """ann's group with bob and cat, ann's and cat's phones on the first node and bob's on the
    second: bob, the three phones (ann's, bob's, cat's) and the group."""
    node_a, node_b = pipeline.gateways
    ann, bob, cat = unique("ann"), unique("bob"), unique("cat")
    ann_phone, _ = await open_device(node_a, ann)
    cat_phone, _ = await open_device(node_a, cat)
    bob_phone, _ = await open_device(node_b, bob)
    conversation = await group(ann_phone, [bob, cat])
    return bob, ann_phone, bob_phone, cat_phone, conversation


async def test_a_removed_member_reads_the_history_up_to_the_removal_on_any_node(
    pipeline: Pipeline,
) -> None:
    node_a = pipeline.gateways[0]
    bob, ann_phone, bob_phone, cat_phone, conversation = await group_of_three(pipeline)
    await send(ann_phone, conversation, "before one")
    await send(cat_phone, conversation, "before two")
    await stored(bob_phone, conversation, 2)

    removed = await command(
        ann_phone,
        {"type": "conversation.remove_member", "conversation_id": conversation, "user_id": bob},
    )
    assert removed["type"] == "ok", removed
    # At once, on the other node: what came before the removal, and nothing after it.
    page = await history(bob_phone, conversation)
    assert (texts(page), page["has_more"]) == (["before one", "before two"], False)

    await send(cat_phone, conversation, "after the removal")
    await stored(cat_phone, conversation, 3)
    for reader in (bob_phone, ann_phone):
        page = await history(reader, conversation)
        assert texts(page) == (
            ["before one", "before two"]
            if reader is bob_phone
            else ["before one", "before two", "after the removal"]
        )
    last_before = 2  # the seq of "before two": the conversation's last when bob went
    forward = await history(bob_phone, conversation, after_seq=0, limit=200)
    assert (texts(forward), forward["has_more"]) == (["before one", "before two"], False)
    past_removal = await history(bob_phone, conversation, after_seq=last_before)
    assert (past_removal["entries"], past_removal["has_more"]) == ([], False)
    back = await history(bob_phone, conversation, before_seq=last_before + 5)
    assert texts(back) == ["before one", "before two"]
    # Who-read stays with the members; the REST door answers as the socket does.
    refused = await read(
        bob_phone, {"type": "who_read", "id": "w", "conversation_id": conversation, "seq": 1}
    )
    assert (refused["type"], refused["code"]) == ("error", "forbidden")
    status, _, raw = node_a.request(
        "GET",
        f"/v1/tenants/{TENANT}/conversations/{conversation}/messages",
        None,
        {"Authorization": f"Bearer {token(node_a.settings, bob)}", "X-Device-Id": "web"},
    )
    assert (status, texts(json.loads(raw))) == (200, ["before one", "before two"])

    # Added again: the whole history again, what came while away included.
    added = await command(
        ann_phone,
        {"type": "conversation.add_member", "conversation_id": conversation, "user_id": bob},
    )
    assert added["type"] == "ok", added

    async def whole() -> JsonObject | None:
        page = await history(bob_phone, conversation)
        return page if len(texts(page)) == 3 else None

    await eventually("the whole history after the member is back", whole)
    for socket_ in (ann_phone, bob_phone, cat_phone):
        await socket_.close()


async def test_members_of_a_deleted_group_lose_its_history_and_bodies_at_once(
    pipeline: Pipeline,
) -> None:
    _, ann_phone, bob_phone, cat_phone, conversation = await group_of_three(pipeline)
    await send(ann_phone, conversation, "the deleted group's secret")
    await stored(bob_phone, conversation, 1)

    # A member who may not delete is refused: answered `ok` once the refusal is stored (not
    # `unavailable` at the wait's limit), and nothing changes.
    refused = await command(
        cat_phone, {"type": "conversation.delete", "conversation_id": conversation}
    )
    assert refused["type"] == "ok", refused
    assert texts(await history(bob_phone, conversation)) == ["the deleted group's secret"]

    deleted = await command(
        ann_phone, {"type": "conversation.delete", "conversation_id": conversation}
    )
    assert deleted["type"] == "ok", deleted
    for reader in (bob_phone, cat_phone, ann_phone):
        page = await history(reader, conversation)
        assert (page["type"], page["code"]) == ("error", "forbidden"), page
    synced = await read(bob_phone, {"type": "sync", "id": "s", "cursor": 0, "limit": 500})
    messages = [
        e["event"]
        for e in synced["events"]
        if e["event"]["type"] == "message.sent"
        and e["event"]["payload"]["conversation_id"] == conversation
    ]
    assert [m["payload"]["body"] for m in messages] == [{"type": "withheld"}]
    assert "secret" not in json.dumps(synced)
    for socket_ in (ann_phone, bob_phone, cat_phone):
        await socket_.close()


async def test_a_recalled_body_is_never_served_again(
    pipeline: Pipeline, cql_session: Session, serving_keyspace: str
) -> None:
    node_a, node_b = pipeline.gateways
    ann, bob = unique("ann"), unique("bob")
    ann_phone, _ = await open_device(node_a, ann)
    bob_phone, _ = await open_device(node_b, bob)
    conversation = await group(ann_phone, [bob])
    message = await send(ann_phone, conversation, "the first draft")
    edited = await command(
        ann_phone,
        {
            "type": "edit",
            "conversation_id": conversation,
            "message_id": message,
            "body": {"type": "text", "text": "the second draft"},
        },
    )
    assert edited["type"] == "ok", edited
    await send(ann_phone, conversation, "kept")

    async def edit_stored() -> JsonObject | None:
        page = await history(bob_phone, conversation)
        return page if "second draft" in json.dumps(page) and len(texts(page)) == 2 else None

    await eventually("the edit in the history", edit_stored)

    recalled = await command(
        ann_phone, {"type": "recall", "conversation_id": conversation, "message_id": message}
    )
    assert recalled["type"] == "ok", recalled
    page = await history(bob_phone, conversation)
    assert "draft" not in json.dumps(page)
    (original,) = [e for e in page["entries"] if e["event"]["event_id"] == message]
    assert (original["recalled"], original["edited"]) == (True, None)
    assert original["event"]["payload"]["body"] == {"type": "withheld"}
    assert texts(page)[-1] == "kept"
    synced = await read(bob_phone, {"type": "sync", "id": "s", "cursor": 0, "limit": 500})
    assert "draft" not in json.dumps(synced)
    assert "kept" in json.dumps(synced)

    # The store itself no longer holds the original body on the message's row.
    rows = cql_session.execute(
        f"SELECT event, edited_event, recalled FROM {serving_keyspace}.timeline "
        "WHERE tenant_id = %s AND conversation_id = %s AND bucket = 0",
        (TENANT, conversation),
    )
    # (Sealed rows: their clear part names the event; sinks/cql/crypto.py.)
    row = next(r for r in rows if json.loads(open_event(None, "", r.event))["event_id"] == message)
    assert (row.recalled, row.edited_event) == (True, None)
    assert "draft" not in row.event
    for socket_ in (ann_phone, bob_phone):
        await socket_.close()


async def test_a_delete_the_store_does_not_hold_in_time_is_unavailable_then_applied(
    pipeline: Pipeline,
) -> None:
    """With the CQL sink stopped, no outcome comes: the answer is `unavailable` at the limit
    (recorded, not yet in effect), and the deletion takes effect once the sink catches up."""
    node_a, node_b = pipeline.gateways
    ann, bob = unique("ann"), unique("bob")
    ann_phone, _ = await open_device(node_a, ann)
    bob_phone, _ = await open_device(node_b, bob)
    conversation = await group(ann_phone, [bob])
    await send(ann_phone, conversation, "still here")
    await stored(bob_phone, conversation, 1)
    limit = node_a.settings.ingress.access_change_timeout_seconds
    pipeline.cql_sink.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        answer = await command(
            ann_phone, {"type": "conversation.delete", "conversation_id": conversation}
        )
        waited = time.monotonic() - started
    finally:
        pipeline.cql_sink.send_signal(signal.SIGCONT)
    assert (answer["type"], answer["code"]) == ("error", "unavailable"), answer
    assert answer["retry_after_ms"] > 0 and "not yet in effect" in answer["message"]
    assert limit <= waited < limit + 5

    async def closed() -> bool:
        page = await history(bob_phone, conversation)
        return page.get("code") == "forbidden"

    await eventually("the deletion in effect after the sink resumed", closed)
    for socket_ in (ann_phone, bob_phone):
        await socket_.close()


async def test_commands_waiting_for_their_outcome_are_bounded(settings: Settings) -> None:
    """A flood of removes must not become a flood of store reads: past ``max_settling`` waits,
    a command is answered at once as not yet in effect (here no store is connected, so every
    wait runs to its limit)."""
    reads = Reads(settings)
    reads.max_settling = 2
    waits = [asyncio.create_task(reads.settled(TENANT, unique("e"), 1.0)) for _ in range(2)]
    await asyncio.sleep(0)
    started = time.monotonic()
    assert await reads.settled(TENANT, unique("e"), 1.0) is False
    assert time.monotonic() - started < 0.5
    assert reads.settling == 2
    assert await asyncio.gather(*waits) == [False, False]
    assert reads.settling == 0

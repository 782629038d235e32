"""Encryption at rest, end to end (docs/security.md, "Encryption at rest"): messages sent through
a gateway are stored sealed by the CQL sink — the text is nowhere in the rows' bytes — and read
back in clear by history, sync and the conversation list; a ciphertext moved to another row does
not open; ``imstream tenant forget-key`` makes a tenant's stored bodies withheld within the key
cache's expiry while its new messages get a new key; plaintext rows from before still read."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from cassandra.cluster import Session
from websockets.asyncio.client import ClientConnection

from core.settings import Settings
from tests.ingress.conftest import Pipeline, running_pipeline
from tests.ingress.support import JsonObject, open_device, run_imstream, unique
from tests.ingress.test_read_access import command, group, history, send, stored, texts
from tests.ingress.test_reads import eventually, read

#: The processes' key cache expiry here: forget-key takes effect within it.
KEY_CACHE_SECONDS = 2.0


@pytest.fixture(scope="module")
def pipeline(
    ingress_settings: Settings, serving_keyspace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    with pytest.MonkeyPatch.context() as patch:
        # Inherited by the CQL sink and the gateway processes.
        patch.setenv("IM_CRYPTO__KEY_CACHE_SECONDS", str(KEY_CACHE_SECONDS))
        logs = tmp_path_factory.mktemp("encryption")
        with running_pipeline(ingress_settings, serving_keyspace, logs) as running:
            yield running


def raw_rows(session: Session, keyspace: str, tenant: str, conversation: str) -> list[str]:
    """Every stored text of the conversation: timeline rows, and the users' queue entries and
    list entries of this tenant (one small tenant per test)."""
    found: list[str] = []
    for row in session.execute(
        f"SELECT event, edited_event FROM {keyspace}.timeline WHERE tenant_id = %s "
        "AND conversation_id = %s AND bucket = 0",
        (tenant, conversation),
    ):
        found.extend(value for value in (row.event, row.edited_event) if value)
    for row in session.execute(f"SELECT tenant_id, event FROM {keyspace}.sync_queue"):
        if row.tenant_id == tenant:
            found.append(row.event)
    for row in session.execute(
        f"SELECT tenant_id, last_preview FROM {keyspace}.user_conversations"
    ):
        if row.tenant_id == tenant and row.last_preview:
            found.append(row.last_preview)
    return found


async def synced_texts(socket_: Any) -> list[str]:
    page = await read(socket_, {"type": "sync", "id": unique("s"), "cursor": 0, "limit": 500})
    return [
        event["event"]["payload"]["body"].get("text", "withheld")
        for event in page["events"]
        if event["event"]["type"] == "message.sent"
    ]


async def previews(socket_: Any) -> dict[str, Any]:
    listed = await read(socket_, {"type": "conversations", "id": unique("l"), "limit": 50})
    return {item["conversation_id"]: item["last_preview"] for item in listed["conversations"]}


async def test_bodies_are_sealed_in_the_store_and_read_back_in_clear(
    pipeline: Pipeline, cql_session: Session, serving_keyspace: str
) -> None:
    (gateway,) = pipeline.gateways
    tenant = unique("tenant")
    ann, bob = unique("ann"), unique("bob")
    ann_phone, _ = await open_device(gateway, ann, tenant=tenant)
    bob_phone, _ = await open_device(gateway, bob, tenant=tenant)
    conversation = await group(ann_phone, [bob])
    secret = f"the-vault-code-{unique('x')}"
    message = await send(ann_phone, conversation, secret)
    await stored(bob_phone, conversation, 1)
    edited = await command(
        ann_phone,
        {
            "type": "edit",
            "conversation_id": conversation,
            "message_id": message,
            "body": {"type": "text", "text": f"{secret}-edited"},
        },
    )
    assert edited["type"] == "ok", edited

    async def edit_stored() -> JsonObject | None:
        page = await history(bob_phone, conversation)
        return page if page["entries"][0].get("edited") else None

    page = await eventually("the edit in the history", edit_stored)
    assert texts(page) == [secret]
    assert page["entries"][0]["edited"]["payload"]["body"]["text"] == f"{secret}-edited"
    assert secret in await synced_texts(bob_phone)

    async def listed() -> dict[str, Any] | None:
        shown = await previews(bob_phone)
        return shown if shown.get(conversation) == f"{secret}-edited" else None

    await eventually("the preview in the list", listed)
    # At rest: sealed (prefix imk1), and the text is in none of the stored bytes.
    stored_values = raw_rows(cql_session, serving_keyspace, tenant, conversation)
    assert len(stored_values) >= 6  # message + edit rows, queue entries, two previews
    assert not [value for value in stored_values if secret in value]
    assert any(value.startswith("imk1.") for value in stored_values)


async def own_group(pipeline: Pipeline) -> tuple[str, ClientConnection, str]:
    """A tenant of the test's own, ann's phone in it, and a group of ann's with one more member."""
    (gateway,) = pipeline.gateways
    tenant = unique("tenant")
    ann = unique("ann")
    ann_phone, _ = await open_device(gateway, ann, tenant=tenant)
    conversation = await group(ann_phone, [unique("bob")])
    return tenant, ann_phone, conversation


def overwrite_timeline(
    session: Session, keyspace: str, tenant: str, conversation: str, *, seq: int, event: str
) -> None:
    """Write ``event`` over the stored value of message ``seq``, as someone with write access
    to the store (not the sink) would."""
    session.execute(
        f"UPDATE {keyspace}.timeline SET event = %s WHERE tenant_id = %s "
        f"AND conversation_id = %s AND bucket = 0 AND seq = {seq}",
        (event, tenant, conversation),
    )


async def test_a_ciphertext_moved_to_another_row_does_not_open(
    pipeline: Pipeline, cql_session: Session, serving_keyspace: str
) -> None:
    tenant, ann_phone, conversation = await own_group(pipeline)
    await send(ann_phone, conversation, "first, private")
    await send(ann_phone, conversation, "second")
    await stored(ann_phone, conversation, 2)
    first = cql_session.execute(
        f"SELECT event FROM {serving_keyspace}.timeline WHERE tenant_id = %s "
        "AND conversation_id = %s AND bucket = 0 AND seq = 1",
        (tenant, conversation),
    ).one()
    # Someone with write access to the store copies message 1's value onto message 2's row.
    overwrite_timeline(
        cql_session, serving_keyspace, tenant, conversation, seq=2, event=first.event
    )
    page = await history(ann_phone, conversation)
    by_seq = {entry["seq"]: entry["event"]["payload"]["body"] for entry in page["entries"]}
    assert by_seq[1] == {"type": "text", "text": "first, private"}
    assert by_seq[2] == {"type": "withheld"}


async def test_plaintext_rows_written_before_encryption_still_read(
    pipeline: Pipeline, cql_session: Session, serving_keyspace: str
) -> None:
    tenant, ann_phone, conversation = await own_group(pipeline)
    await send(ann_phone, conversation, "written sealed")
    page = await stored(ann_phone, conversation, 1)
    # The row as the sink wrote it before this change: the event's JSON in clear.
    legacy = dict(page["entries"][0]["event"])
    legacy["payload"] = {**legacy["payload"], "body": {"type": "text", "text": "from before"}}
    overwrite_timeline(
        cql_session, serving_keyspace, tenant, conversation, seq=1, event=json.dumps(legacy)
    )
    assert texts(await history(ann_phone, conversation)) == ["from before"]


async def test_forget_key_withholds_the_tenants_bodies_and_new_messages_get_a_new_key(
    pipeline: Pipeline, ingress_settings: Settings, serving_keyspace: str
) -> None:
    (gateway,) = pipeline.gateways
    tenant, bystander = unique("tenant"), unique("tenant")
    ann, bob = unique("ann"), unique("bob")
    ann_phone, _ = await open_device(gateway, ann, tenant=tenant)
    bob_phone, _ = await open_device(gateway, bob, tenant=tenant)
    other_phone, _ = await open_device(gateway, ann, tenant=bystander)
    conversation = await group(ann_phone, [bob])
    other_conversation = await group(other_phone, [bob])
    await send(ann_phone, conversation, "shred me")
    await send(other_phone, other_conversation, "keep me")
    await stored(bob_phone, conversation, 1)
    await stored(other_phone, other_conversation, 1)
    assert (await previews(bob_phone))[conversation] == "shred me"

    done = await asyncio.to_thread(
        run_imstream,
        "tenant",
        "forget-key",
        "--tenant",
        tenant,
        "--yes",
        variables={
            "IM_CQL__KEYSPACE": serving_keyspace,
            "IM_KAFKA__TOPIC_PREFIX": ingress_settings.kafka.topic_prefix,
        },
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"tenant {tenant}: data key " in done.stdout
    assert "deleted" in done.stdout

    async def withheld() -> JsonObject | None:
        page = await history(bob_phone, conversation)
        bodies = [entry["event"]["payload"]["body"] for entry in page["entries"]]
        return page if bodies == [{"type": "withheld"}] else None

    # Within the caches' expiry (plus the time to read): withheld, not an error.
    page = await eventually("withheld bodies", withheld, within=KEY_CACHE_SECONDS + 20)
    assert page["type"] == "history_page"
    assert await synced_texts(bob_phone) == ["withheld"]
    assert (await previews(bob_phone))[conversation] is None
    # Another tenant is untouched.
    assert texts(await history(other_phone, other_conversation)) == ["keep me"]

    # The sink's cached copy expires too; then the tenant's new messages get a new key.
    await asyncio.sleep(KEY_CACHE_SECONDS + 1)
    await send(ann_phone, conversation, "after the forget")

    async def new_one_readable() -> JsonObject | None:
        page = await history(bob_phone, conversation)
        return page if "after the forget" in texts(page) else None

    page = await eventually("the new message", new_one_readable)
    bodies = [entry["event"]["payload"]["body"] for entry in page["entries"]]
    assert bodies == [{"type": "withheld"}, {"type": "text", "text": "after the forget"}]
    for socket_ in (ann_phone, bob_phone, other_phone):
        await socket_.close()

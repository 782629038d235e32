"""Client commands turned into events at the door (``ingress.commands``), without a server."""

from __future__ import annotations

import json

import pytest

from ingress.commands import event_for, is_publishing
from ingress.connection import Principal
from schemas import events as ev
from schemas import frames as fr
from schemas.errors import ErrorCode, SchemaError

ALICE = Principal("acme", "alice", "phone")


def created(frame: dict[str, object]) -> ev.ConversationCreated:
    command = fr.parse_client_frame(json.dumps({"type": "conversation.create", "id": "c", **frame}))
    assert is_publishing(command)
    event = event_for(command, ALICE)
    assert isinstance(event, ev.ConversationCreated)
    return event


def test_a_group_may_not_choose_an_id_reserved_for_direct_conversations() -> None:
    squatted = ev.direct_conversation_id("acme", "bob", "carol")
    with pytest.raises(SchemaError) as raised:
        created({"kind": "group", "members": ["bob", "carol"], "conversation_id": squatted})
    assert raised.value.code is ErrorCode.SCHEMA_INVALID
    assert raised.value.field == "conversation_id"
    assert "reserved for direct conversations" in str(raised.value)


def test_a_direct_conversation_gets_the_id_its_pair_derives() -> None:
    event = created({"kind": "direct", "members": ["bob"]})
    assert event.payload.conversation_id == ev.direct_conversation_id("acme", "alice", "bob")
    group = created({"kind": "group", "members": ["bob"], "conversation_id": "team-1"})
    assert group.payload.conversation_id == "team-1"

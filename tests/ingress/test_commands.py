"""Client commands turned into events at the door (``ingress.commands``), and where the
gateway publishes them."""

from __future__ import annotations

import json

import pytest

from core.settings import Settings
from ingress.commands import event_for, is_publishing
from ingress.connection import Principal
from ingress.gateway import Gateway
from schemas import events as ev
from schemas import frames as fr
from schemas.errors import ErrorCode, SchemaError
from tests.schemas.samples import sample_events

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


def test_the_gateways_route_cache_routes_as_the_catalog(ingress_settings: Settings) -> None:
    """``Gateway._route`` remembers the topic per event type; topic and key stay the catalog's."""
    gateway = Gateway(ingress_settings)  # not started: nothing is contacted
    routed = 0
    for event in sample_events().values():
        try:
            expected = gateway.catalog.route(event)
        except ValueError:
            continue  # not published by the ingress
        assert gateway._route(event) == expected  # fills the cache
        assert gateway._route(event) == expected  # answered from it
        routed += 1
    assert routed >= 10
    # The key is the event's, not the first event's of its type.
    other = ev.MessageSent.new(
        tenant_id="globex",
        actor=ev.Actor(user_id="zed"),
        payload=ev.MessageSentPayload(
            conversation_id="c-other", client_msg_id="m-9", body=ev.TextBody(text="x")
        ),
    )
    assert gateway._route(other) == gateway.catalog.route(other)

"""The commands the stream benchmarks load Kafka with, as the ingress would publish them: a
conversation's creation and a text message from one device, with the event ids the ingress
derives (so that a replayed load is deduplicated like a client's retry)."""

from __future__ import annotations

from schemas import events as ev


def conversation_created(
    tenant: str,
    conversation_id: str,
    members: list[str],
    kind: ev.ConversationKind,
    *,
    owner: bool = False,
    name: str | None = None,
) -> ev.ConversationCreated:
    """``conversation_id`` with ``members``, created by the first of them (its owner if
    ``owner``: a group's), named ``name``."""
    creator = members[0]
    owner_id = creator if owner else None
    payload = ev.ConversationCreatedPayload(
        conversation_id=conversation_id, kind=kind, members=members, owner_id=owner_id, name=name
    )
    return ev.ConversationCreated.new(
        tenant_id=tenant,
        actor=ev.Actor(user_id=creator),
        event_id=ev.message_event_id(tenant, creator, f"create-{conversation_id}"),
        payload=payload,
    )


def text_message(
    tenant: str,
    sender: str,
    conversation_id: str,
    client_msg_id: str,
    body: ev.TextBody,
    *,
    device_id: str,
) -> ev.MessageSent:
    """``body`` sent by ``sender`` from ``device_id`` into ``conversation_id``."""
    return ev.MessageSent.new(
        tenant_id=tenant,
        actor=ev.Actor(user_id=sender, device_id=device_id),
        event_id=ev.message_event_id(tenant, sender, client_msg_id),
        payload=ev.MessageSentPayload(
            conversation_id=conversation_id, client_msg_id=client_msg_id, body=body
        ),
    )

"""Client commands as events: what the ingress publishes for each command, and what it answers.

Pure functions, shared by the WebSocket and the REST door, so that both publish the same event
for the same command. The event's actor is always the authenticated principal, never a field of
the command: a client can only speak for itself.

Ids the ingress chooses:

* a message's id is ``message_event_id(tenant, sender, client_msg_id)``, so every retry of a send
  carries the id of the first attempt;
* a direct conversation's id is derived from the tenant and its two members (order does not
  matter), so both users creating "the" conversation between them get the same one;
* a group created without an id gets a random one (a client that wants a retry to be harmless
  chooses the id itself).
"""

from __future__ import annotations

import uuid
from typing import Final, TypeGuard, assert_never, get_args

from pydantic import ValidationError

from ingress.connection import Principal
from schemas import events as ev
from schemas import frames as fr
from schemas.errors import ErrorCode, SchemaError, field_path

#: Namespace of derived direct-conversation ids, fixed forever: changing it changes every id.

#: Commands about one message (its id is chosen by the ingress, see above).
MessageCommand = fr.Send | fr.Recall | fr.Edit
#: Commands about what a user has seen or is doing in a conversation.
ReceiptCommand = fr.Read | fr.Typing
#: Commands that change the user's own notification settings.
SettingsCommand = fr.Mute | fr.PushSettings | fr.ClearBadge
#: Commands that change a conversation or its membership.
ConversationCommand = (
    fr.CreateConversation
    | fr.RenameConversation
    | fr.AddMember
    | fr.RemoveMember
    | fr.ChangeRole
    | fr.LeaveConversation
    | fr.DeleteConversation
)
#: Commands that the ingress turns into an event and publishes; the rest are answered directly.
PublishingCommand = MessageCommand | ReceiptCommand | SettingsCommand | ConversationCommand
_PUBLISHING_MODELS: Final = get_args(PublishingCommand)


def is_publishing(frame: fr.ClientFrame) -> TypeGuard[PublishingCommand]:
    """Whether ``frame`` is a command the ingress answers by publishing an event."""
    return isinstance(frame, _PUBLISHING_MODELS)


def event_for(command: PublishingCommand, principal: Principal) -> ev.Event:
    """The event that records ``command``; raises ``SchemaError`` when the two cannot agree
    (a creator listing themselves as a member, a direct conversation id that is not derived)."""
    actor = ev.Actor(user_id=principal.user_id, device_id=principal.device_id)
    tenant = principal.tenant_id
    try:
        return _event_for(command, principal, actor, tenant)
    except ValidationError as error:
        problem = error.errors(include_url=False)[0]
        value_error = problem["type"] == "value_error"
        message = str(problem["ctx"]["error"]) if value_error else problem["msg"]
        raise SchemaError(
            ErrorCode.SCHEMA_INVALID,
            message,
            field_path(problem["loc"], None) or None,
            request_id=command.id,
        ) from None


def _event_for(
    command: PublishingCommand, principal: Principal, actor: ev.Actor, tenant: str
) -> ev.Event:
    # One builder per command family; `match` (not a type → builder table) keeps mypy's check
    # that every publishing command has exactly one builder.
    match command:
        case fr.Send() | fr.Recall() | fr.Edit():
            return _message_event(command, principal, actor, tenant)
        case fr.Read() | fr.Typing():
            return _receipt_event(command, actor, tenant)
        case fr.Mute() | fr.PushSettings() | fr.ClearBadge():
            return _settings_event(command, actor, tenant)
        case (
            fr.CreateConversation()
            | fr.RenameConversation()
            | fr.AddMember()
            | fr.RemoveMember()
            | fr.ChangeRole()
            | fr.LeaveConversation()
            | fr.DeleteConversation()
        ):
            return _conversation_event(command, principal, actor, tenant)
        case _:
            assert_never(command)


def _message_event(
    command: MessageCommand, principal: Principal, actor: ev.Actor, tenant: str
) -> ev.Event:
    match command:
        case fr.Send():
            return ev.MessageSent.new(
                tenant_id=tenant,
                actor=actor,
                event_id=ev.message_event_id(tenant, principal.user_id, command.client_msg_id),
                payload=ev.MessageSentPayload(
                    conversation_id=command.conversation_id,
                    client_msg_id=command.client_msg_id,
                    body=command.body,
                ),
            )
        case fr.Recall():
            return ev.MessageRecalled.new(
                tenant_id=tenant,
                actor=actor,
                payload=ev.MessageRecalledPayload(
                    conversation_id=command.conversation_id, message_id=command.message_id
                ),
            )
        case fr.Edit():
            return ev.MessageEdited.new(
                tenant_id=tenant,
                actor=actor,
                payload=ev.MessageEditedPayload(
                    conversation_id=command.conversation_id,
                    message_id=command.message_id,
                    body=command.body,
                ),
            )
        case _:
            assert_never(command)


def _receipt_event(command: ReceiptCommand, actor: ev.Actor, tenant: str) -> ev.Event:
    match command:
        case fr.Read():
            return ev.ReceiptRead.new(
                tenant_id=tenant,
                actor=actor,
                payload=ev.ReceiptReadPayload(
                    conversation_id=command.conversation_id,
                    conversation_seq=command.conversation_seq,
                ),
            )
        case fr.Typing():
            return ev.TypingChanged.new(
                tenant_id=tenant,
                actor=actor,
                payload=ev.TypingChangedPayload(
                    conversation_id=command.conversation_id, active=command.active
                ),
            )
        case _:
            assert_never(command)


def _settings_event(command: SettingsCommand, actor: ev.Actor, tenant: str) -> ev.Event:
    match command:
        case fr.Mute():
            return ev.ConversationMuteChanged.new(
                tenant_id=tenant,
                actor=actor,
                payload=ev.ConversationMuteChangedPayload(
                    conversation_id=command.conversation_id,
                    muted=command.muted,
                    muted_until=command.muted_until,
                ),
            )
        case fr.PushSettings():
            quiet_hours = command.quiet_hours
            return ev.UserPushSettingsChanged.new(
                tenant_id=tenant,
                actor=actor,
                payload=ev.UserPushSettingsChangedPayload(
                    muted=command.muted,
                    muted_until=command.muted_until,
                    quiet_hours=(
                        ev.QuietHoursSetting.model_validate(quiet_hours.model_dump())
                        if quiet_hours is not None
                        else None
                    ),
                    locale=command.locale,
                ),
            )
        case fr.ClearBadge():
            return ev.BadgeCleared.new(
                tenant_id=tenant,
                actor=actor,
                payload=ev.BadgeClearedPayload(conversation_id=command.conversation_id),
            )
        case _:
            assert_never(command)


def _conversation_event(
    command: ConversationCommand, principal: Principal, actor: ev.Actor, tenant: str
) -> ev.Event:
    match command:
        case fr.CreateConversation():
            return ev.ConversationCreated.new(
                tenant_id=tenant, actor=actor, payload=_created(command, principal)
            )
        case fr.RenameConversation():
            return ev.ConversationRenamed.new(
                tenant_id=tenant,
                actor=actor,
                payload=ev.ConversationRenamedPayload(
                    conversation_id=command.conversation_id, name=command.name
                ),
            )
        case fr.AddMember():
            return ev.ConversationMemberAdded.new(
                tenant_id=tenant,
                actor=actor,
                payload=ev.ConversationMemberAddedPayload(
                    conversation_id=command.conversation_id,
                    user_id=command.user_id,
                    role=command.role,
                ),
            )
        case fr.RemoveMember():
            return ev.ConversationMemberRemoved.new(
                tenant_id=tenant,
                actor=actor,
                payload=ev.ConversationMemberRemovedPayload(
                    conversation_id=command.conversation_id, user_id=command.user_id
                ),
            )
        case fr.ChangeRole():
            return ev.ConversationMemberRoleChanged.new(
                tenant_id=tenant,
                actor=actor,
                payload=ev.ConversationMemberRoleChangedPayload(
                    conversation_id=command.conversation_id,
                    user_id=command.user_id,
                    role=command.role,
                ),
            )
        case fr.LeaveConversation():
            return ev.ConversationLeft.new(
                tenant_id=tenant,
                actor=actor,
                payload=ev.ConversationLeftPayload(
                    conversation_id=command.conversation_id, user_id=principal.user_id
                ),
            )
        case fr.DeleteConversation():
            return ev.ConversationDeleted.new(
                tenant_id=tenant,
                actor=actor,
                payload=ev.ConversationDeletedPayload(conversation_id=command.conversation_id),
            )
        case _:
            assert_never(command)


def _created(command: fr.CreateConversation, principal: Principal) -> ev.ConversationCreatedPayload:
    creator = principal.user_id
    if creator in command.members:
        raise SchemaError(
            ErrorCode.SCHEMA_INVALID,
            "the creator is a member implicitly; list only the other members",
            "members",
            request_id=command.id,
        )
    if command.kind is ev.ConversationKind.DIRECT:
        derived = ev.direct_conversation_id(principal.tenant_id, creator, command.members[0])
        if command.conversation_id not in (None, derived):
            raise SchemaError(
                ErrorCode.SCHEMA_INVALID,
                f"a direct conversation's id is derived from its members: omit conversation_id "
                f"or send {derived!r}",
                "conversation_id",
                request_id=command.id,
            )
        return ev.ConversationCreatedPayload(
            conversation_id=derived,
            kind=command.kind,
            members=[creator, *command.members],
            name=command.name,
        )
    if command.conversation_id and command.conversation_id.startswith(
        ev.DIRECT_CONVERSATION_PREFIX
    ):
        raise SchemaError(
            ErrorCode.SCHEMA_INVALID,
            f"ids starting with {ev.DIRECT_CONVERSATION_PREFIX!r} are reserved for direct "
            "conversations; choose another id for a group, or omit it",
            "conversation_id",
            request_id=command.id,
        )
    return ev.ConversationCreatedPayload(
        conversation_id=command.conversation_id or str(uuid.uuid4()),
        kind=command.kind,
        members=[creator, *command.members],
        owner_id=creator,
        name=command.name,
    )


def reply_for(command: PublishingCommand, event: ev.Event) -> fr.Accepted | fr.Ok:
    """The reply once ``event`` is durably in Kafka: ``accepted`` for a send, ``ok`` otherwise."""
    if isinstance(command, fr.Send):
        return fr.Accepted(
            id=command.id,
            conversation_id=command.conversation_id,
            client_msg_id=command.client_msg_id,
            event_id=event.event_id,
        )
    if isinstance(command, fr.CreateConversation):
        assert isinstance(event, ev.ConversationCreated)
        return fr.Ok(id=command.id, conversation_id=event.payload.conversation_id)
    return fr.Ok(id=command.id)

"""Kafka ACLs: one principal per imstream service, allowed only what that service does.

A cluster with an authorizer (compose's brokers, ``StandardAuthorizer`` with
``allow.everyone.if.no.acl.found=false``) refuses every request no ACL allows. ``imstream topics
grant`` (run by an administrator, a super user) writes the ACLs below for the catalog's topics,
so that a leaked service credential reads and writes only what that service already does: the
ingress cannot read the sequenced messages, a sink cannot write a client command, nobody but the
stream worker holds a transactional id.

The principal of a service is ``User:<service>``: its SCRAM user name (``IM_KAFKA__SASL_USERNAME``)
is the service's name, as the README's process table and compose.yaml name it. Read access
carries the consumer groups the service uses (named after it, under the topic prefix; the
ingress's per-node groups are not prefixed); write access to a topic implies the idempotent
producer (Kafka 3+). Operators' tools (``imstream topics``, ``dlq``, ``replay``, ``revoke``) run
as an administrator.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)

from core.groups import (
    clickhouse_group_prefix,
    cql_sink_group,
    push_sink_group,
    stream_group_prefix,
)
from core.settings import Settings
from schemas.topics import Topic, TopicCatalog, topic_catalog

#: The services that reach Kafka with a principal of their own, by name.
SERVICES: Final = ("ingress", "stream-worker", "cql-sink", "clickhouse-sink", "push-sink")


@dataclass(frozen=True, slots=True)
class Access:
    """What one service does on Kafka: topics (full names) it reads and writes, consumer-group
    and transactional-id prefixes it uses."""

    reads: frozenset[str]
    writes: frozenset[str]
    group_prefixes: tuple[str, ...]
    transactional_prefixes: tuple[str, ...] = ()
    #: Consumer groups it may describe (its lag sampler reads every group's offsets).
    describes_all_groups: bool = False


def _names(*topics: Topic) -> frozenset[str]:
    return frozenset(topic.name for topic in topics)


def service_access(settings: Settings, service: str) -> Access:
    """The Kafka access of ``service`` (one of :data:`SERVICES`) for this catalog."""
    catalog: TopicCatalog = topic_catalog(settings)

    def dead_letters(*sources: Topic) -> frozenset[str]:
        return _names(*(catalog.dead_letter_of(source) for source in sources))

    if service == "ingress":
        return Access(
            reads=_names(catalog.live_delivery, catalog.group_delivery, catalog.revocations),
            writes=_names(*(topic for topic in catalog.sources() if topic.ingress)),
            group_prefixes=("imstream-ingress-",),
        )
    if service == "stream-worker":
        inputs = (
            catalog.messages_in,
            catalog.typing_in,
            catalog.user_inbox,
            catalog.user_state_in,
            catalog.presence,
        )
        tables = (
            catalog.conversation_state,
            catalog.message_state,
            catalog.user_state,
            catalog.known_users,
        )
        with_dead_letter = [topic for topic in inputs if topic.dead_letter is not None]
        app = stream_group_prefix(settings)
        return Access(
            reads=_names(*inputs, *tables),
            writes=_names(
                *tables,
                catalog.messages_sequenced,
                catalog.group_delivery,
                catalog.user_inbox,
                catalog.sync_events,
                catalog.live_delivery,
                catalog.push_jobs,
            )
            | dead_letters(*with_dead_letter),
            group_prefixes=(app,),
            transactional_prefixes=(app,),
        )
    if service == "cql-sink":
        sources = (catalog.messages_sequenced, catalog.sync_events, catalog.push_tokens)
        return Access(
            reads=_names(*sources),
            writes=dead_letters(*sources),
            group_prefixes=(cql_sink_group(settings),),
        )
    if service == "push-sink":
        return Access(
            reads=_names(catalog.push_tokens, catalog.push_jobs),
            writes=_names(catalog.push_outcomes) | dead_letters(catalog.push_jobs),
            group_prefixes=(push_sink_group(settings),),
        )
    if service == "clickhouse-sink":
        # The audit reads every topic, dead letters included; rebuilds use groups of its own.
        return Access(
            reads=_names(*catalog),
            writes=frozenset(),
            group_prefixes=(clickhouse_group_prefix(settings),),
            describes_all_groups=True,
        )
    raise ValueError(f"unknown service {service!r}; known: {', '.join(SERVICES)}")


def principal_of(service: str) -> str:
    return f"User:{service}"


def acl_bindings(
    settings: Settings, service: str, principal: str | None = None
) -> list[AclBinding]:
    """The ALLOW bindings of ``service`` (for ``principal``, default ``User:<service>``)."""
    access = service_access(settings, service)
    who = principal or principal_of(service)

    def allow(
        kind: ResourceType, name: str, operation: AclOperation, *, prefixed: bool = False
    ) -> AclBinding:
        pattern = ResourcePatternType.PREFIXED if prefixed else ResourcePatternType.LITERAL
        return AclBinding(kind, name, pattern, who, "*", operation, AclPermissionType.ALLOW)

    bindings = []
    for topic in sorted(access.reads | access.writes):
        bindings.append(allow(ResourceType.TOPIC, topic, AclOperation.DESCRIBE))
        if topic in access.reads:
            bindings.append(allow(ResourceType.TOPIC, topic, AclOperation.READ))
        if topic in access.writes:
            bindings.append(allow(ResourceType.TOPIC, topic, AclOperation.WRITE))
    for group in access.group_prefixes:
        bindings.append(allow(ResourceType.GROUP, group, AclOperation.READ, prefixed=True))
    if access.describes_all_groups:
        bindings.append(allow(ResourceType.GROUP, "*", AclOperation.DESCRIBE))
    for transactional in access.transactional_prefixes:
        for operation in (AclOperation.WRITE, AclOperation.DESCRIBE):
            bindings.append(
                allow(ResourceType.TRANSACTIONAL_ID, transactional, operation, prefixed=True)
            )
    return bindings


def apply_acls(
    admin: AdminClient,
    settings: Settings,
    services: Iterable[str] = SERVICES,
    *,
    principals: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Sequence[AclBinding]:
    """Create the bindings of ``services`` (creating an existing one changes nothing); the
    bindings. ``principals`` maps a service to another principal than ``User:<service>``."""
    bindings = [
        binding
        for service in services
        for binding in acl_bindings(settings, service, (principals or {}).get(service))
    ]
    for future in admin.create_acls(bindings, request_timeout=timeout).values():
        future.result(timeout=timeout)
    return bindings


def describe_binding(binding: AclBinding) -> str:
    """One line per binding: principal, operation, resource (``*`` ends a prefix)."""

    def label(value: object) -> str:
        return str(getattr(value, "name", value))

    prefix = "*" if label(binding.resource_pattern_type) == "PREFIXED" else ""
    return (
        f"{binding.principal:<22} {label(binding.operation):<9} "
        f"{label(binding.restype).lower()} {binding.name}{prefix}"
    )

"""Operator actions as audit events.

Every operator command that changes data (``imstream dlq redrive`` today; replays and rebuilds
later) ends by writing one ``operator.action`` event — who ran it, the arguments, what it did and
how it ended — on the operator-actions topic (``catalog.operator_actions``). Nothing but the
ClickHouse sink reads that topic: it audits every catalog topic, so the action lands in
``audit_events`` next to the records it touched.

Delivery: at least once (idempotent producer, ``acks=all``); the event id is random, so a retry
of the whole command is a second action, as it should be. Key: the operator's name.
"""

from __future__ import annotations

import getpass
import re
from collections.abc import Mapping

from pydantic import JsonValue

from core.connections import UnacknowledgedError, produce_acknowledged
from core.settings import Settings
from schemas.events import (
    MAX_ID_CHARS,
    SYSTEM_TENANT,
    OperatorAction,
    OperatorActionPayload,
    OperatorOutcome,
    encode_event,
)
from schemas.topics import operator_key, topic_catalog

_NOT_ID = re.compile(r"[^A-Za-z0-9._:@+=-]+")
#: Who runs a command when the login name cannot be found (a container with no passwd entry).
UNKNOWN_OPERATOR = "unknown"


class OperatorAuditError(Exception):
    """The operator action could not be written: Kafka refused or did not answer."""


def operator_name(explicit: str | None = None) -> str:
    """``explicit`` (``--operator``), else the login name (``$USER``/``$LOGNAME``, then the
    password database), made a valid identifier: the name becomes a Kafka key and an id."""
    if explicit:
        name = explicit
    else:
        try:
            name = getpass.getuser()
        except (KeyError, OSError):
            name = UNKNOWN_OPERATOR
    return _NOT_ID.sub("-", name)[:MAX_ID_CHARS] or UNKNOWN_OPERATOR


def record_operator_action(
    settings: Settings,
    *,
    operator: str,
    command: str,
    arguments: Mapping[str, JsonValue],
    counts: Mapping[str, int],
    outcome: OperatorOutcome,
    error: str | None = None,
    timeout: float = 30.0,
) -> OperatorAction:
    """Write one ``operator.action`` event and wait until Kafka has it (``acks=all``)."""
    event = OperatorAction.new(
        tenant_id=SYSTEM_TENANT,
        payload=OperatorActionPayload(
            operator=operator,
            command=command,
            arguments=dict(arguments),
            counts=dict(counts),
            outcome=outcome,
            error=error[:1000] if error is not None else None,
        ),
    )
    topic = topic_catalog(settings).operator_actions
    try:
        produce_acknowledged(
            settings, topic.name, operator_key(operator), encode_event(event), timeout=timeout
        )
    except UnacknowledgedError as unacknowledged:
        raise OperatorAuditError(str(unacknowledged)) from unacknowledged
    return event

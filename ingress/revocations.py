"""Revoked tokens: what every ingress node refuses, read from the revocation topic.

An operator revokes with ``imstream revoke`` (pipelines/revoke.py), which writes one
``tokens.revoked`` event to the compacted revocation topic (``catalog.revocations``):

- scope ``token``: the token whose ``jti`` it names (in its tenant, or in every tenant when the
  event's tenant is ``SYSTEM_TENANT``);
- scope ``user``: every token of the user issued (``iat``) before ``issued_before`` — a forced
  logout everywhere; tokens issued later are good again;
- scope ``device``: the same, for the tokens one device of the user uses (the token's ``did``,
  else the device the ``hello`` or ``X-Device-Id`` names).

Every node reads the whole topic from the beginning when it starts, without a consumer group
(all partitions assigned, nothing committed), and keeps following it. It is not ready — its
WebSocket handshakes and REST requests are answered ``unavailable`` — until it has read every
partition up to the end it had at start-up: a node that accepted connections sooner would let a
revoked token in after a restart. A revocation read while sockets are open closes the sockets
whose token it matches with ``token-revoked`` (4005), in well under a second of being written.

Bounded memory: a revocation can only ever match tokens issued before its moment (the
revocation's ``occurred_at`` for a ``jti``, ``issued_before`` otherwise), and the verifier
refuses any token valid for longer than the maximum lifetime from its ``iat`` (core/auth.py),
so every token an entry can match has expired by ``moment + max lifetime + 3 leeways`` (one
leeway for an ``iat`` slightly in the future, one for the lifetime check, one for the expiry
check). The entry is dropped then (:meth:`RevocationList.prune`, from a heap, so pruning costs
nothing while nothing expires). The topic forgets old records the same way, by retention
(schemas/topics.py), so no tombstones are written: a restarted node never reads more than the
revocations still in force, plus less than a day.

Delivery: at least once into memory (a record read twice is applied twice, harmlessly). A record
that does not decode is logged and skipped: there is no dead-letter topic, since only operators
write here and ``imstream revoke`` writes what this module reads.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka import Message as KafkaMessage

from core.auth import Claims
from core.connections import consume_ready
from ingress.live import TopicReader
from schemas.events import SYSTEM_TENANT, RevocationScope, TokensRevoked, parse_event

_log = logging.getLogger(__name__)

_POLL_SECONDS: Final = 0.1
_BATCH: Final = 500
_REQUEST_SECONDS: Final = 5.0


@dataclass(frozen=True, slots=True)
class _Entry:
    #: Tokens issued before this are revoked (``None``: every token with the ``jti``).
    issued_before: datetime | None
    #: When no token the entry can match is valid any more.
    forget_at: datetime


_Key = tuple[RevocationScope, tuple[str, ...]]


class RevocationList:
    """The revocations in force on this node (used on the event loop only).

    ``horizon`` is how long after its moment a revocation can still match a valid token (the
    maximum token lifetime plus three leeways, see the module docstring); ``clock`` is for tests.
    """

    def __init__(
        self, horizon: timedelta, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._horizon = horizon
        self._clock = clock
        self._entries: dict[_Key, _Entry] = {}
        #: (forget_at, key) of every entry, stale ones included (skipped when popped).
        self._expiries: list[tuple[datetime, _Key]] = []
        #: Set once the topic was read up to its end at start-up.
        self.ready = False

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, event: TokensRevoked) -> bool:
        """Apply one revocation (replacing an older one of the same subject); ``False`` if it
        is already past its horizon, and so can match no valid token."""
        payload = event.payload
        moment = payload.issued_before or event.occurred_at
        forget_at = moment + self._horizon
        if forget_at <= self._clock():
            return False
        key = _key(event)
        self._entries[key] = _Entry(payload.issued_before, forget_at)
        heapq.heappush(self._expiries, (forget_at, key))
        return True

    def prune(self) -> int:
        """Drop the entries past their horizon; how many were dropped."""
        now = self._clock()
        dropped = 0
        while self._expiries and self._expiries[0][0] <= now:
            forget_at, key = heapq.heappop(self._expiries)
            entry = self._entries.get(key)
            if entry is not None and entry.forget_at == forget_at:
                del self._entries[key]
                dropped += 1
        return dropped

    def refusal(self, claims: Claims, device_id: str | None) -> str | None:
        """Why the token is revoked, or ``None``; ``device_id`` is the device using it."""
        tenant, user = claims.tenant_id, claims.user_id
        if claims.token_id is not None:
            for owner in (tenant, SYSTEM_TENANT):
                if self._live((RevocationScope.TOKEN, (owner, claims.token_id))) is not None:
                    return "the token was revoked"
        entry = self._live((RevocationScope.USER, (tenant, user)))
        if entry is not None and _issued_before(claims.issued_at, entry):
            return "the user was logged out: tokens issued before then are revoked"
        device = claims.device_id or device_id
        if device is not None:
            entry = self._live((RevocationScope.DEVICE, (tenant, user, device)))
            if entry is not None and _issued_before(claims.issued_at, entry):
                return "the device was logged out: tokens issued before then are revoked"
        return None

    def _live(self, key: _Key) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None or entry.forget_at <= self._clock():
            return None
        return entry


def _issued_before(issued_at: datetime, entry: _Entry) -> bool:
    return entry.issued_before is not None and issued_at < entry.issued_before


def _key(event: TokensRevoked) -> _Key:
    payload = event.payload
    if payload.scope is RevocationScope.TOKEN:
        assert payload.token_id is not None
        return payload.scope, (event.tenant_id, payload.token_id)
    assert payload.user_id is not None
    if payload.scope is RevocationScope.USER:
        return payload.scope, (event.tenant_id, payload.user_id)
    assert payload.device_id is not None
    return payload.scope, (event.tenant_id, payload.user_id, payload.device_id)


def revokes(
    event: TokensRevoked, tenant_id: str, token_id: str | None, issued_at: datetime
) -> bool:
    """Whether ``event`` revokes a token (its ``jti`` and ``iat``) of the user and device it
    names, used in ``tenant_id``: for the sockets open when the revocation arrives."""
    payload = event.payload
    if event.tenant_id not in (tenant_id, SYSTEM_TENANT):
        return False
    if payload.scope is RevocationScope.TOKEN:
        return token_id is not None and token_id == payload.token_id
    return payload.issued_before is not None and issued_at < payload.issued_before


class RevocationReader(TopicReader[TokensRevoked]):
    """Reads every partition of the revocation topic from the beginning, then follows it; hands
    each batch of revocations to ``deliver`` and, once every partition was read up to the end
    it had when assigned, calls ``caught_up`` (both on the event loop, in that order)."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        topic: str,
        node_id: str,
        deliver: Callable[[Sequence[TokensRevoked]], None],
        caught_up: Callable[[], None],
    ) -> None:
        super().__init__(
            {**config, "enable.partition.eof": True},
            topic=topic,
            node_id=node_id,
            name="revocations",
            deliver=deliver,
        )
        # A record deleted by retention between the assignment and the fetch must not make the
        # reader jump to the end.
        self._config["auto.offset.reset"] = "earliest"
        self._caught_up = caught_up
        #: The end offset of each partition not yet read up to its end since assignment.
        self._ends: dict[int, int] = {}
        self._reported = False

    def _partitions(self, partitions: int) -> list[int]:
        return list(range(partitions))

    def _frame(self, message: KafkaMessage) -> TokensRevoked | None:
        try:
            event = parse_event(message.value() or b"")
            if not isinstance(event, TokensRevoked):
                raise ValueError(f"a {event.type} event, not tokens.revoked")
        except ValueError as error:
            _log.warning(
                "revocations: skipped a record at %s[%s]@%s: %s",
                message.topic(),
                message.partition(),
                message.offset(),
                error,
            )
            return None
        return event

    def _assign(self, consumer: Consumer, partitions: int) -> bool:
        """Assign every partition at its beginning, noting where each one ends now."""
        ends: dict[int, int] = {}
        try:
            for partition in self._partitions(partitions):
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, partition), timeout=_REQUEST_SECONDS, cached=False
                )
                if high > low:
                    ends[partition] = high
        except KafkaException as error:
            _log.warning("revocations: cannot read the ends of %s: %s", self.topic, error)
            return False
        consumer.assign(
            [
                TopicPartition(self.topic, partition, OFFSET_BEGINNING)
                for partition in range(partitions)
            ]
        )
        self._ends = ends
        self._assigned.set()
        _log.info(
            "revocations: node %s reads %s from the beginning (%d record(s) at most)",
            self._node_id,
            self.topic,
            sum(ends.values()),
        )
        self._report_if_caught_up()
        return True

    def _consume(self, consumer: Consumer) -> None:
        events = []
        for message in consume_ready(consumer, _BATCH, _POLL_SECONDS):
            partition = message.partition() or 0
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self._ends.pop(partition, None)
                else:
                    _log.warning("revocations: consumer error: %s", error.str())
                continue
            offset = message.offset() or 0
            if partition in self._ends and offset + 1 >= self._ends[partition]:
                del self._ends[partition]
            event = self._frame(message)
            if event is not None:
                events.append(event)
        if events:
            self._call(self._deliver, events)
        self._report_if_caught_up()

    def _report_if_caught_up(self) -> None:
        if not self._ends and not self._reported:
            self._reported = True
            self._call(self._caught_up)

    def _call(self, function: Callable[..., None], *arguments: Any) -> None:
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(function, *arguments)
        except RuntimeError:
            _log.debug("event loop closed; revocations not applied")

"""The node's presence lease: a ``node.lease_renewed`` record on every presence partition, every
``IM_INGRESS__PRESENCE_RENEW_SECONDS``.

A device's ``device.connected`` / ``device.disconnected`` are published when its socket opens and
closes; a node killed with SIGKILL (or one whose disconnects Kafka never took) publishes no
disconnect, and its devices would stay online in the user processor's state for good — and a
user with an online device gets no push. So the node also renews a lease: while renewals come,
its devices are online; once ``IM_INGRESS__PRESENCE_LEASE_SECONDS`` passed since the last one,
the user processor counts them offline (``streams.users.apply_leases``). Each renewal names the
node's start time, so a node restarted under the same id disowns the devices of its previous run
at its first renewal.

The user processor keeps presence per user partition, so a renewal goes to every partition of the
presence topic (explicitly, not by key): each partition then learns it in order with its users'
presence and messages, and decides from the records' times alone — a replay decides the same.

Delivery: at least once per renewal, best effort overall — a renewal Kafka does not take is
logged and the next one follows; a node that cannot renew for longer than the lease has its
devices counted offline until it can again (pushes reach them meanwhile: a duplicate, never a
loss).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from ingress.producer import DurableProducer, PublishError
from schemas.events import SYSTEM_TENANT, NodeLeasePayload, NodeLeaseRenewed, encode_event
from schemas.topics import Topic, event_key

_log = logging.getLogger(__name__)


class LeaseRenewer:
    """Renews one node's presence lease on every partition of ``topic`` until stopped."""

    def __init__(
        self,
        producer: DurableProducer,
        topic: Topic,
        *,
        node_id: str,
        renew_seconds: float,
        lease_seconds: float,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.node_id = node_id
        self.renew_seconds = renew_seconds
        self.lease_ms = round(lease_seconds * 1000)
        #: This run's start: devices connected before it belong to an earlier run of the node.
        self.started_at = datetime.now(UTC)
        #: Renewals Kafka acknowledged on every partition (for tests and logs).
        self.renewals = 0
        #: Whether the last renewal failed: an outage is logged once, not every renewal.
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._renew_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def renew(self) -> bool:
        """One renewal on every partition; whether Kafka acknowledged all of them."""
        partitions = await self.producer.partition_count(self.topic.name)
        payload = NodeLeasePayload(
            node_id=self.node_id, started_at=self.started_at, lease_ms=self.lease_ms
        )
        renewals = [
            NodeLeaseRenewed.new(tenant_id=SYSTEM_TENANT, payload=payload)
            for _ in range(partitions or self.topic.partitions)
        ]
        outcomes = await asyncio.gather(
            *(
                self.producer.publish(
                    self.topic.name,
                    event_key(renewal, self.topic.key),
                    encode_event(renewal),
                    partition=partition,
                )
                for partition, renewal in enumerate(renewals)
            ),
            return_exceptions=True,
        )
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        for failure in failures:
            if not isinstance(failure, PublishError):
                raise failure
        if failures:
            _log.log(
                logging.DEBUG if self._failing else logging.WARNING,
                "presence lease of node %s not renewed on %d of %d partition(s): %s",
                self.node_id,
                len(failures),
                len(outcomes),
                failures[0],
            )
            self._failing = True
            return False
        if self._failing:
            _log.info("presence lease of node %s renewed again", self.node_id)
            self._failing = False
        self.renewals += 1
        return True

    async def _renew_forever(self) -> None:
        while True:
            try:
                await self.renew()
            except Exception:
                _log.exception("unexpected error renewing the presence lease")
            await asyncio.sleep(self.renew_seconds)

"""faust's Kafka transport with an idempotent producer.

In at-least-once mode faust creates its aiokafka producer without idempotence, so a retried batch
could be written twice or overtake the batch before it. The stream stage relies on order within a
partition (a conversation's records reach each user in position order; a table's changelog keeps
the latest write), so every producer here is idempotent with ``acks=all``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka


class IdempotentProducer(faust_aiokafka.Producer):
    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class Transport(faust_aiokafka.Transport):
    Producer: ClassVar[type[Any]] = IdempotentProducer


class StreamApp(faust.App):
    """A faust app whose consumer and producer use :class:`Transport`."""

    def _new_transport(self) -> Any:
        return Transport(self.conf.broker_consumer, self)

    def _new_producer_transport(self) -> Any:
        return Transport(self.conf.broker_producer, self)

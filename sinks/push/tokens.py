"""The push sink's token table: which devices of a user have a push token, and who holds a token.

Built from the compacted, device-keyed ``im.push.tokens`` topic (every partition, from the
beginning) and kept up to date by following it. Pure: no Kafka here, so every rule is testable.

- A registration sets the device's token (a newer one replaces an older one); a removal takes
  the device's token away only when it names the token the device holds (a removal of a token
  the device has since replaced concerns the old one — the CQL sink applies the same rule).
- A token is held by one device at a time. When a registration brings a token another
  (tenant, user, device) holds, the later registration keeps it and the other holder is
  *detached*: :meth:`TokenTable.apply` returns a :class:`Detach`, for which the sink writes a
  ``push_token.removed`` (reason ``moved``). Tokens are unique per provider across tenants (a
  token is an app install on a phone), so a phone signed into another tenant's account stops
  receiving the first account's pushes. The topic's partitions are read in no particular order
  relative to each other, so "later" is the registrations' ``occurred_at``, not read order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from schemas.events import (
    PushProvider,
    PushTokenRegistered,
    PushTokenRemovalReason,
    PushTokenRemoved,
    PushTokenRemovedPayload,
    derived_event_id,
)
from sinks.push.notification import PushTarget


@dataclass(frozen=True, slots=True)
class Holder:
    """A device, by the key of the token topic."""

    tenant_id: str
    user_id: str
    device_id: str


@dataclass(frozen=True, slots=True)
class DeviceToken:
    """The token a device registered."""

    provider: PushProvider
    token: str
    app_id: str
    registered_at: datetime
    event_id: str
    """The registration's event id (removal events derive theirs from it)."""

    def target(self, device_id: str) -> PushTarget:
        return PushTarget(device_id, self.provider, self.token, self.app_id)


@dataclass(frozen=True, slots=True)
class Detach:
    """``holder`` lost ``entry``'s token to a later registration, ``moved_by``."""

    holder: Holder
    entry: DeviceToken
    moved_by: DeviceToken

    def removal(self) -> PushTokenRemoved:
        """The ``push_token.removed`` (reason ``moved``) for the old holder. Its id and time
        derive from the two registrations, so whoever writes it (two sink replicas, a restart)
        writes the same event, and its time is after the old registration's (the CQL sink's
        delete then wins over the old row's write)."""
        holder = self.holder
        return PushTokenRemoved.new(
            tenant_id=holder.tenant_id,
            event_id=derived_event_id(
                self.moved_by.event_id,
                f"moved/{holder.tenant_id}/{holder.user_id}/{holder.device_id}",
            ),
            occurred_at=max(self.moved_by.registered_at, self.entry.registered_at),
            payload=PushTokenRemovedPayload(
                user_id=holder.user_id,
                device_id=holder.device_id,
                provider=self.entry.provider,
                token=self.entry.token,
                app_id=self.entry.app_id,
                reason=PushTokenRemovalReason.MOVED,
            ),
        )


class TokenTable:
    """user → {device → token} and (provider, token) → holder; see the module docstring."""

    def __init__(self) -> None:
        self._devices: dict[tuple[str, str], dict[str, DeviceToken]] = {}
        self._holders: dict[tuple[PushProvider, str], Holder] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def targets(self, tenant_id: str, user_id: str) -> list[PushTarget]:
        """The user's devices with a token, in device order."""
        devices = self._devices.get((tenant_id, user_id), {})
        return [devices[device].target(device) for device in sorted(devices)]

    def entry(self, holder: Holder) -> DeviceToken | None:
        return self._devices.get((holder.tenant_id, holder.user_id), {}).get(holder.device_id)

    def holder_of(self, provider: PushProvider, token: str) -> Holder | None:
        return self._holders.get((provider, token))

    def apply(self, event: PushTokenRegistered | PushTokenRemoved) -> list[Detach]:
        """Apply one event of the token topic; the devices it detaches from their token."""
        payload = event.payload
        holder = Holder(event.tenant_id, payload.user_id, payload.device_id)
        if isinstance(event, PushTokenRemoved):
            self.drop(holder, payload.token)
            return []
        entry = DeviceToken(
            payload.provider, payload.token, payload.app_id, event.occurred_at, event.event_id
        )
        current = self.entry(holder)
        if current is not None and current.registered_at > entry.registered_at:
            return []  # an older registration of this device, read after a newer one
        other = self._holders.get((entry.provider, entry.token))
        other_entry = self.entry(other) if other is not None and other != holder else None
        if other is not None and other_entry is not None:
            if other_entry.registered_at > entry.registered_at:
                # The other device registered the token after this one did: this one lost it.
                if current is not None:
                    self.drop(holder, current.token)
                return [Detach(holder, entry, other_entry)]
            self.drop(other, other_entry.token)
            detached = [Detach(other, other_entry, entry)]
        else:
            detached = []
        if current is not None:
            self.drop(holder, current.token)
        self._devices.setdefault((holder.tenant_id, holder.user_id), {})[holder.device_id] = entry
        self._holders[(entry.provider, entry.token)] = holder
        return detached

    def drop(self, holder: Holder, token: str) -> bool:
        """Take ``token`` from ``holder`` if it holds it; whether it did."""
        devices = self._devices.get((holder.tenant_id, holder.user_id))
        entry = devices.get(holder.device_id) if devices else None
        if devices is None or entry is None or entry.token != token:
            return False
        del devices[holder.device_id]
        if not devices:
            del self._devices[(holder.tenant_id, holder.user_id)]
        if self._holders.get((entry.provider, entry.token)) == holder:
            del self._holders[(entry.provider, entry.token)]
        return True

"""The push sink's token table: which devices of a user have a push token, and who holds a token.

Built from the compacted, device-keyed ``im.push.tokens`` topic (every partition, from the
beginning) and kept up to date by following it. Pure: no Kafka here, so every rule is testable.

- A registration sets the device's token (a newer one replaces an older one); a removal takes
  the device's token away only when it names the token the device holds (a removal of a token
  the device has since replaced concerns the old one — the CQL sink applies the same rule).
- A token's identity is (tenant, provider, token): what a device of one tenant registers never
  touches another tenant's devices. Tenant B registering a token string that a device of
  tenant A holds detaches nothing and replaces nothing of A's. B's pushes go through B's apps
  (the APNs topic and FCM project of its settings): a token of A's app pushed under B's topic
  is rejected by the provider and removed from B alone. Where A and B share one app (the
  deployment's default), B's registration of a token A's device holds for that app is a claim
  like another user's below — refused unless proven — so that B's messages do not land on A's
  user's phone; proven, both hold it (A's entry is never taken).
- Within a tenant a token is held by one device at a time. A registration of a token that a
  device *of the same user* holds moves it (the app reinstalled under a new device id): the
  later registration keeps it and the other holder is *detached* — :meth:`TokenTable.apply`
  returns a :class:`Detach`, for which the sink writes a ``push_token.removed`` (reason
  ``moved``). A registration by *another user* proves nothing (a token string is no secret
  once seen: logs, a shared phone, a hostile app): the holder keeps the token, and the
  claimant is refused — a :class:`Detach` of the claimant, written as a ``push_token.removed``
  (reason ``claim-refused``). The claimant gets the token once the holder lets go of it (its
  user logs out: ``DELETE …/push-token``; the provider rejects it; its device registers
  another) and the claimant registers again, as an app does at every launch.
- The topic's partitions are read in no particular order relative to each other, so "later"
  is the registrations' ``occurred_at``, not read order: a claim read after a later one of
  another user still wins (it was first). The sink loads the table in ``occurred_at`` order
  (:meth:`TokenTable.load`), so a reload reaches the state the events' times dictate.
- Refused claims keep no state: a client cannot grow the table by claiming tokens it does not
  hold (one entry per device that holds a token, as before).
"""

from __future__ import annotations

from collections.abc import Iterable
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
from sinks.push.proof import TokenProofs


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
    proven: bool = False
    """The registration echoed a valid challenge (``sinks.push.proof``): it may take the
    token from another user's device."""

    def target(self, device_id: str) -> PushTarget:
        return PushTarget(device_id, self.provider, self.token, self.app_id)


@dataclass(frozen=True, slots=True)
class Detach:
    """``holder`` lost ``entry``'s token to ``moved_by``: a later registration of the same user
    (reason ``moved``), or the registration of another user that holds it (``claim-refused``)."""

    holder: Holder
    entry: DeviceToken
    moved_by: DeviceToken
    reason: PushTokenRemovalReason = PushTokenRemovalReason.MOVED

    def removal(self) -> PushTokenRemoved:
        """The ``push_token.removed`` (reason ``moved`` or ``claim-refused``). Its id and time
        derive from the two registrations, so whoever writes it (two sink replicas, a restart)
        writes the same event, and its time is after the old registration's (the CQL sink's
        delete then wins over the old row's write)."""
        holder = self.holder
        # A refused claim's removal derives from the claim: the same holder refuses every new
        # claim of the device, and each needs its own removal.
        refused = self.reason is PushTokenRemovalReason.CLAIM_REFUSED
        return PushTokenRemoved.new(
            tenant_id=holder.tenant_id,
            event_id=derived_event_id(
                self.entry.event_id if refused else self.moved_by.event_id,
                f"{self.reason.value}/{holder.tenant_id}/{holder.user_id}/{holder.device_id}",
            ),
            occurred_at=max(self.moved_by.registered_at, self.entry.registered_at),
            payload=PushTokenRemovedPayload(
                user_id=holder.user_id,
                device_id=holder.device_id,
                provider=self.entry.provider,
                token=self.entry.token,
                app_id=self.entry.app_id,
                reason=self.reason,
            ),
        )


TokenKey = tuple[str, PushProvider, str]
"""A token's identity: (tenant, provider, token)."""


class TokenTable:
    """user → {device → token} and (tenant, provider, token) → holder; see the module docstring."""

    def __init__(self, proofs: TokenProofs | None = None) -> None:
        """``proofs`` verifies the challenges registrations echo; None: none is accepted."""
        self._devices: dict[tuple[str, str], dict[str, DeviceToken]] = {}
        self._holders: dict[TokenKey, Holder] = {}
        #: (provider, token, app) → {tenant → holder}: the tenants sharing one app install.
        self._app_holders: dict[tuple[PushProvider, str, str], dict[str, Holder]] = {}
        self._proofs = proofs

    def __len__(self) -> int:
        return len(self._holders)

    def targets(self, tenant_id: str, user_id: str) -> list[PushTarget]:
        """The user's devices with a token, in device order."""
        devices = self._devices.get((tenant_id, user_id), {})
        return [devices[device].target(device) for device in sorted(devices)]

    def entry(self, holder: Holder) -> DeviceToken | None:
        return self._devices.get((holder.tenant_id, holder.user_id), {}).get(holder.device_id)

    def holder_of(self, tenant_id: str, provider: PushProvider, token: str) -> Holder | None:
        return self._holders.get((tenant_id, provider, token))

    def load(self, events: Iterable[PushTokenRegistered | PushTokenRemoved]) -> list[Detach]:
        """Apply the latest event of every device (a compacted topic's content) in the order
        they happened; the devices they detach."""
        detached: list[Detach] = []
        for event in sorted(events, key=lambda e: (e.occurred_at, e.event_id)):
            detached += self.apply(event)
        return detached

    def apply(self, event: PushTokenRegistered | PushTokenRemoved) -> list[Detach]:
        """Apply one event of the token topic; the devices it detaches from their token (or
        whose claim it refuses)."""
        payload = event.payload
        holder = Holder(event.tenant_id, payload.user_id, payload.device_id)
        if isinstance(event, PushTokenRemoved):
            self.drop(holder, payload.token)
            return []
        entry = DeviceToken(
            payload.provider,
            payload.token,
            payload.app_id,
            event.occurred_at,
            event.event_id,
            proven=self._proofs is not None and self._proofs.verify(event),
        )
        current = self.entry(holder)
        if current is not None and current.registered_at > entry.registered_at:
            return []  # an older registration of this device, read after a newer one
        # One app serving several tenants: a device of another tenant that registered the token
        # for the same app earlier keeps it — and keeps it alone, unless this claim is proven
        # (then both hold it: another tenant's registration never takes anything from it).
        earlier = [
            (other, other_entry)
            for other, other_entry in self._other_tenants(holder.tenant_id, entry)
            if other_entry.registered_at <= entry.registered_at
        ]
        if earlier and not entry.proven:
            if current is not None:
                self.drop(holder, current.token)
            return [Detach(holder, entry, earlier[0][1], PushTokenRemovalReason.CLAIM_REFUSED)]
        other = self._holders.get((holder.tenant_id, entry.provider, entry.token))
        other_entry = self.entry(other) if other is not None and other != holder else None
        detached: list[Detach] = []
        if other is not None and other_entry is not None:
            later = entry if entry.registered_at >= other_entry.registered_at else other_entry
            # The later registration takes the token when it is the same user's, or proves
            # that its device receives the token's pushes; else the earlier one keeps it.
            moves = other.user_id == holder.user_id or later.proven
            this_wins = (later is entry) == moves
            reason = PushTokenRemovalReason.MOVED if moves else PushTokenRemovalReason.CLAIM_REFUSED
            if not this_wins:
                if current is not None:
                    self.drop(holder, current.token)
                return [Detach(holder, entry, other_entry, reason)]
            self.drop(other, other_entry.token)
            detached.append(Detach(other, other_entry, entry, reason))
        # Read out of order: another tenant's later claims, unproven, lose it to this one.
        for later_holder, later_entry in self._other_tenants(holder.tenant_id, entry):
            if later_entry.registered_at > entry.registered_at and not later_entry.proven:
                self.drop(later_holder, later_entry.token)
                detached.append(
                    Detach(later_holder, later_entry, entry, PushTokenRemovalReason.CLAIM_REFUSED)
                )
        if current is not None:
            self.drop(holder, current.token)
        self._devices.setdefault((holder.tenant_id, holder.user_id), {})[holder.device_id] = entry
        self._holders[(holder.tenant_id, entry.provider, entry.token)] = holder
        app_key = (entry.provider, entry.token, entry.app_id)
        self._app_holders.setdefault(app_key, {})[holder.tenant_id] = holder
        return detached

    def _other_tenants(
        self, tenant_id: str, entry: DeviceToken
    ) -> list[tuple[Holder, DeviceToken]]:
        """The devices of other tenants holding ``entry``'s token for its app."""
        holders = self._app_holders.get((entry.provider, entry.token, entry.app_id), {})
        found = []
        for tenant, other in holders.items():
            other_entry = self.entry(other)
            if tenant != tenant_id and other_entry is not None:
                found.append((other, other_entry))
        return found

    def drop(self, holder: Holder, token: str) -> bool:
        """Take ``token`` from ``holder`` if it holds it; whether it did."""
        devices = self._devices.get((holder.tenant_id, holder.user_id))
        entry = devices.get(holder.device_id) if devices else None
        if devices is None or entry is None or entry.token != token:
            return False
        del devices[holder.device_id]
        if not devices:
            del self._devices[(holder.tenant_id, holder.user_id)]
        key = (holder.tenant_id, entry.provider, entry.token)
        if self._holders.get(key) == holder:
            del self._holders[key]
        app_key = (entry.provider, entry.token, entry.app_id)
        tenants = self._app_holders.get(app_key)
        if tenants is not None and tenants.get(holder.tenant_id) == holder:
            del tenants[holder.tenant_id]
            if not tenants:
                del self._app_holders[app_key]
        return True

"""Presence with leases, on the system as ``imstream up`` runs it: a device whose ingress node is
killed with SIGKILL (its ``device.disconnected`` never published) counts as offline once the
node's lease lapsed, and its user gets pushes again. Before leases the device stayed online in
the user processor's state for good, and its user never got another push."""

from __future__ import annotations

import asyncio
import secrets
import time

from client.sdk import Client
from tests.ingress.support import token, unique
from tests.pipelines.conftest import PRESENCE_LEASE_SECONDS
from tests.pipelines.support import Device, PushFakes, Running
from tests.sinks.push.support import APNS_TOPIC

#: What the push may take beyond the lease: the stream stage, the push sink and the fake, on a
#: machine shared with other tests.
MARGIN_SECONDS = 20.0


async def test_a_device_of_a_killed_node_is_offline_within_the_lease_and_its_user_is_pushed(
    system: Running, push_fakes: PushFakes
) -> None:
    tenant = unique("lease")
    ann, ben = unique("ann"), unique("ben")
    apns_token = secrets.token_hex(32)
    registrar = Client(
        system.url(0),
        tenant_id=tenant,
        device_id="phone",
        token=token(system.settings, ben, tenant=tenant),
        request_timeout=20,
    )
    await registrar.register_push_token("apns", apns_token, APNS_TOPIC)
    async with Device(system, ann, "phone", 0, tenant=tenant) as sender:
        conversation = await sender.client.create_conversation([ben], kind="direct")
        # Ben's phone is on ingress-2. Online, it gets the first message live and no push.
        async with Device(system, ben, "phone", 1, tenant=tenant) as phone:
            await sender.client.send(conversation, "while ben is online")
            await phone.wait(lambda d: len(d.messages(conversation)) == 1, 30, "the message")
            await asyncio.sleep(2 * PRESENCE_LEASE_SECONDS)  # renewals keep him online
            await sender.client.send(conversation, "still online")
            await phone.wait(lambda d: len(d.messages(conversation)) == 2, 30, "the message")
            await asyncio.sleep(1.0)
            assert apns_token not in push_fakes.apns_tokens(), "pushed while online"

            with system.killed("ingress-2"):
                killed_at = time.monotonic()
                deadline = killed_at + PRESENCE_LEASE_SECONDS + MARGIN_SECONDS
                sent = 0
                while apns_token not in push_fakes.apns_tokens():
                    assert time.monotonic() < deadline, (
                        f"no push for ben {deadline - killed_at:.0f} s after his node was "
                        f"killed ({sent} messages sent since): his phone is still online"
                    )
                    await sender.client.send(conversation, f"after the kill {sent}")
                    sent += 1
                    await asyncio.sleep(0.5)
                pushed_after = time.monotonic() - killed_at
                await phone.client.close()  # before the node is back: it stays offline
    assert pushed_after > PRESENCE_LEASE_SECONDS / 2, "pushed before the lease could lapse"

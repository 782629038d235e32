"""Fixtures of the push tests: the fake APNs and FCM servers and senders pointed at them.

Each test gets fresh fakes (fresh counters and scripts) on ephemeral ports of 127.0.0.1; the
test PKI, the APNs signing key and the service account's key are made once per session
(``tests/conftest.py``: the system tests of ``tests/pipelines`` use them too).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sinks.push.apns import ApnsSender
from sinks.push.fcm import FcmSender
from tests.sinks.push.fakes.apns import FakeApns
from tests.sinks.push.fakes.fcm import FakeFcm
from tests.sinks.push.fakes.tls import LocalPki
from tests.sinks.push.support import APNS_DEBUG_TOPIC, APNS_TOPIC, ApnsKey


@pytest.fixture
async def fake_apns(pki: LocalPki, apns_key: ApnsKey) -> AsyncIterator[FakeApns]:
    fake = FakeApns(
        pki,
        team_id=apns_key.team_id,
        key_id=apns_key.key_id,
        public_key=apns_key.public_key,
        topics=frozenset({APNS_TOPIC, APNS_DEBUG_TOPIC}),
    )
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def apns_sender(
    fake_apns: FakeApns, apns_key: ApnsKey, pki: LocalPki
) -> AsyncIterator[ApnsSender]:
    sender = ApnsSender(
        **apns_key.credentials(),
        default_topic=APNS_TOPIC,
        use_sandbox=True,
        host=fake_apns.address,
        ca_file=pki.ca_file,
    )
    yield sender
    await sender.close()


@pytest.fixture
async def fake_fcm(service_account_key: rsa.RSAPrivateKey) -> AsyncIterator[FakeFcm]:
    fake = FakeFcm(
        project_id="imstream-test",
        client_email="push-sender@imstream-test.iam.gserviceaccount.com",
        private_key=service_account_key,
    )
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def fcm_credentials(fake_fcm: FakeFcm, tmp_path: Path) -> Path:
    return fake_fcm.write_service_account(tmp_path / "service-account.json")


@pytest.fixture
async def fcm_sender(fake_fcm: FakeFcm, fcm_credentials: Path) -> AsyncIterator[FcmSender]:
    sender = FcmSender(
        credentials_path=fcm_credentials,
        endpoint=fake_fcm.endpoint,
        channel_id="chat-messages",
        concurrency=8,
        request_timeout_seconds=5.0,
    )
    yield sender
    await sender.close()


@pytest.fixture
def apns_settings(
    fake_apns: FakeApns, apns_key: ApnsKey, pki: LocalPki, tmp_path: Path
) -> dict[str, Any]:
    """The ``IM_PUSH__APNS_*`` settings that point the APNs sender at the fake."""
    key_path = tmp_path / f"AuthKey_{apns_key.key_id}.p8"
    key_path.write_text(apns_key.pem)
    return {
        "apns_key_path": str(key_path),
        "apns_key_id": apns_key.key_id,
        "apns_team_id": apns_key.team_id,
        "apns_topic": APNS_TOPIC,
        "apns_host": fake_apns.address,
        "apns_ca_file": str(pki.ca_file),
    }


@pytest.fixture
def fcm_settings(fake_fcm: FakeFcm, fcm_credentials: Path) -> dict[str, Any]:
    """The ``IM_PUSH__FCM_*`` settings that point the FCM sender at the fake (the service
    account's token_uri already names the fake's token endpoint)."""
    return {"fcm_credentials_path": str(fcm_credentials), "fcm_endpoint": fake_fcm.endpoint}

"""``imstream revoke``'s event: one subject per revocation, keyed so that compaction keeps the
latest of each subject, and audited by the ClickHouse sink like any event."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from core.settings import Settings
from pipelines.revoke import describe, revocation
from schemas.events import SYSTEM_TENANT, encode_event
from schemas.topics import revocation_key, topic_catalog
from sinks.clickhouse.audit import AuditDecoder, KafkaRecord

NOW = datetime(2026, 12, 7, 16, 0, tzinfo=UTC)


def test_each_subject_has_its_own_key() -> None:
    token = revocation(operator="ops", tenant_id="acme", token_id="j-1", now=NOW)
    anywhere = revocation(operator="ops", token_id="j-1", now=NOW)
    user = revocation(operator="ops", tenant_id="acme", user_id="alice", now=NOW)
    device = revocation(operator="ops", tenant_id="acme", user_id="alice", device_id="p", now=NOW)
    assert [revocation_key(event) for event in (token, anywhere, user, device)] == [
        b"acme/token/j-1",
        f"{SYSTEM_TENANT}/token/j-1".encode(),
        b"acme/user/alice",
        b"acme/device/alice/p",
    ]
    assert user.payload.issued_before == NOW
    assert token.payload.issued_before is None
    assert describe(user) == (
        "revoked every token of user 'alice' in tenant acme issued before 2026-12-07T16:00:00+00:00"
    )
    assert describe(anywhere) == "revoked the token with jti 'j-1' in every tenant"


def test_a_user_or_device_needs_a_tenant_and_valid_ids() -> None:
    with pytest.raises(ValueError, match="give --tenant"):
        revocation(operator="ops", user_id="alice")
    with pytest.raises(ValidationError):
        revocation(operator="ops", tenant_id="acme", user_id="alice", device_id="a/b")


def test_the_audit_decodes_a_revocation(settings: Settings) -> None:
    catalog = topic_catalog(settings)
    event = revocation(operator="ops", tenant_id="acme", user_id="alice", device_id="p", now=NOW)
    audited = AuditDecoder(catalog).audit(
        KafkaRecord(
            catalog.revocations.name, 0, 0, revocation_key(event), encode_event(event), 1_000
        )
    )
    assert audited.poison is None
    row = audited.row
    assert (row.event_type, row.tenant_id, row.user_id) == ("tokens.revoked", "acme", "alice")

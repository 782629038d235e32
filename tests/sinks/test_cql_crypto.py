"""Encryption at rest in the CQL store (sinks/cql/crypto.py), against the real Cassandra: the
tenants' data keys (created once under a race, wrapped, cached with a bound and an expiry,
forgotten), the sealed values and their binding to the row, and a wrong or development master
key refused at the start."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cassandra.cluster import Session
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

from core.settings import DEV_MASTER_KEY, AuthSettings, CryptoSettings, Profile, Settings
from sinks.cql.crypto import (
    KeyRing,
    MasterKeyMismatchError,
    forget_key,
    is_sealed,
    open_event,
    open_text,
    seal_event,
    seal_text,
    timeline_context,
)
from sinks.cql.migrate import migrate
from sinks.cql.sink import EXIT_CONFIG
from tests.clock import FakeClock
from tests.ingress.support import create_topics, delete_topics, unique

IMSTREAM = Path(sys.executable).parent / "imstream"
MASTER_KEY = bytes(range(32))
OTHER_MASTER_KEY = bytes(range(1, 33))
EVENT = (
    '{"type":"message.sent","event_id":"m1","tenant_id":"acme","payload":{"conversation_id":"c",'
    '"body":{"type":"text","text":"the launch code is 0000"},"conversation_seq":7}}'
)


@pytest.fixture
def migrated(cql_session: Session, keyspace: str) -> str:
    migrate(cql_session, keyspace, 1)
    return keyspace


def ring(
    session: Session,
    keyspace: str,
    *,
    master_key: bytes = MASTER_KEY,
    cache_size: int = 16,
    cache_seconds: float = 60.0,
    clock: FakeClock | None = None,
) -> KeyRing:
    return KeyRing(
        session,
        keyspace,
        master_key,
        cache_size=cache_size,
        cache_seconds=cache_seconds,
        clock=clock or FakeClock(),
    )


def test_a_tenant_key_is_created_once_under_a_race_and_stored_only_wrapped(
    cql_session: Session, migrated: str
) -> None:
    rings = [ring(cql_session, migrated) for _ in range(4)]  # four processes
    found: list[str] = []
    barrier = threading.Barrier(len(rings))

    def first_write(keys: KeyRing) -> None:
        barrier.wait()
        found.append(keys.current("acme").key_id)

    threads = [threading.Thread(target=first_write, args=(keys,)) for keys in rings]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(found) == 4
    assert len(set(found)) == 1  # everyone uses the winner's key
    [row] = cql_session.execute(f"SELECT * FROM {migrated}.tenant_keys")
    assert row.tenant_id == "acme"
    assert row.key_id == found[0]
    assert row.kek_id == rings[0].kek_id
    assert len(row.wrapped_key) == 12 + 32 + 16  # nonce, the key, the tag: never in clear
    # What one process sealed, every other opens.
    sealed = seal_text(rings[0].current("acme"), "ctx", "secret")
    assert open_text(rings[3].find("acme", found[0]), "ctx", sealed) == "secret"


def test_a_sealed_body_is_bound_to_its_row_and_replays_write_the_same_bytes(
    cql_session: Session, migrated: str
) -> None:
    key = ring(cql_session, migrated).current("acme")
    row = timeline_context("acme", "c", 7, "event")
    sealed = seal_event(key, row, EVENT)
    assert is_sealed(sealed)
    assert "launch code" not in sealed
    assert '"conversation_seq":7' in sealed  # the envelope stays readable, the body does not
    assert open_event(key, row, sealed) == EVENT
    # Deterministic: a replay writes the very same cell (the store's replay contract).
    assert seal_event(key, row, EVENT) == sealed
    # Moved to another row, another column, or with its clear part altered: withheld.
    for elsewhere in (
        timeline_context("acme", "c", 8, "event"),
        timeline_context("acme", "other", 7, "event"),
        timeline_context("acme", "c", 7, "edited_event"),
    ):
        assert '"body":{"type":"withheld"}' in open_event(key, elsewhere, sealed)
    altered = sealed.replace('"conversation_seq":7', '"conversation_seq":9')
    assert "launch code" not in open_event(key, row, altered)
    # Another tenant's key does not open it either; no key (forgotten): withheld.
    other = ring(cql_session, migrated).current("globex")
    assert "launch code" not in open_event(other, row, sealed)
    assert '"body":{"type":"withheld"}' in open_event(None, row, sealed)
    # A plaintext value (written before encryption) reads as it is.
    assert open_event(key, row, EVENT) == EVENT
    assert open_text(key, "ctx", "tok-legacy") == "tok-legacy"


def test_forget_key_shreds_and_caches_forget_it_within_their_expiry(
    cql_session: Session, migrated: str
) -> None:
    clock = FakeClock()
    reader = ring(cql_session, migrated, cache_seconds=30.0, clock=clock)
    old = ring(cql_session, migrated).current("acme")
    sealed = seal_text(old, "ctx", "secret")
    assert open_text(reader.find("acme", old.key_id), "ctx", sealed) == "secret"

    assert forget_key(cql_session, migrated, "acme") == old.key_id
    assert forget_key(cql_session, migrated, "acme") is None  # nothing left to forget
    assert list(cql_session.execute(f"SELECT * FROM {migrated}.tenant_keys")) == []
    # The reader's cached copy serves until it expires, then the key is gone for good.
    clock.now += 29.0
    assert reader.find("acme", old.key_id) is not None
    clock.now += 2.0
    assert reader.find("acme", old.key_id) is None
    assert open_text(reader.find("acme", old.key_id), "ctx", sealed) is None
    # New writes get a new key; the old values stay unreadable.
    fresh = ring(cql_session, migrated).current("acme")
    assert fresh.key_id != old.key_id
    clock.now += 2.0  # past the one-second re-read bound of an unknown key id
    assert reader.find("acme", fresh.key_id) is not None
    assert reader.find("acme", old.key_id) is None


def test_the_key_cache_is_bounded(cql_session: Session, migrated: str) -> None:
    keys = ring(cql_session, migrated, cache_size=3)
    for number in range(10):
        keys.current(f"tenant-{number}")
    assert keys.cached_tenants() == 3
    # The most recently used stay; an evicted tenant's key is read again (and is the same).
    assert keys.find_cached("tenant-9", keys.current("tenant-9").key_id)[0]
    first = ring(cql_session, migrated).current("tenant-0").key_id
    assert not keys.find_cached("tenant-0", first)[0]
    assert keys.current("tenant-0").key_id == first


def test_a_wrong_master_key_is_refused(cql_session: Session, migrated: str) -> None:
    ring(cql_session, migrated).current("acme")
    wrong = ring(cql_session, migrated, master_key=OTHER_MASTER_KEY)
    with pytest.raises(MasterKeyMismatchError, match="wraps none of the tenant keys"):
        wrong.check_master_key()
    with pytest.raises(MasterKeyMismatchError, match="wrapped by master key"):
        wrong.current("acme")
    ring(cql_session, migrated).check_master_key()  # the right one passes


def imstream(
    *arguments: str, environment: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[bytes]:
    """``imstream <arguments>`` as the operator runs it, finished; its output captured."""
    return subprocess.run(
        [str(IMSTREAM), *arguments],
        env=environment,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def test_the_cql_sink_refuses_to_start_with_a_wrong_master_key(
    settings: Settings, cql_session: Session, migrated: str
) -> None:
    ring(cql_session, migrated).current("acme")
    environment = {
        **os.environ,
        "IM_CQL__KEYSPACE": migrated,
        "IM_CRYPTO__MASTER_KEY": base64.b64encode(OTHER_MASTER_KEY).decode(),
    }
    done = imstream("run", "cql-sink", environment=environment, timeout=120)
    assert done.returncode == EXIT_CONFIG, done.stderr.decode()[-2000:]
    assert b"wrong master key" in done.stderr


def test_the_development_master_key_is_refused_outside_dev(tmp_path: Path) -> None:
    real = base64.b64encode(MASTER_KEY).decode()
    assert Settings(profile=Profile.DEV).master_key() == base64.b64decode(DEV_MASTER_KEY)
    client_key = AuthSettings(jwt_secret=SecretStr("a-real-client-secret-for-this-test"))
    for profile in (Profile.TEST, Profile.PROD):
        with pytest.raises(ValueError, match="IM_CRYPTO__MASTER_KEY"):
            Settings(profile=profile, auth=client_key).master_key()
        configured = Settings(
            profile=profile, auth=client_key, crypto=CryptoSettings(master_key=SecretStr(real))
        )
        assert configured.master_key() == MASTER_KEY
        path = tmp_path / "kek"
        path.write_text(DEV_MASTER_KEY + "\n")
        from_file = Settings(
            profile=profile, auth=client_key, crypto=CryptoSettings(master_key_path=path)
        )
        with pytest.raises(ValueError, match="development master key"):
            from_file.master_key()
        path.write_text(real + "\n")
        assert from_file.master_key() == MASTER_KEY
    for malformed in ("", "c2hvcnQ=", "not base64!"):
        with pytest.raises(ValueError, match="32 bytes"):
            Settings(crypto=CryptoSettings(master_key=SecretStr(malformed))).master_key()


def test_the_cql_sink_refuses_to_start_with_the_development_key_outside_dev() -> None:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("IM_CRYPTO__")},
        "IM_PROFILE": "prod",
        "IM_AUTH__JWT_SECRET": "a-real-client-secret-for-this-test",
    }
    done = imstream("run", "cql-sink", environment=environment, timeout=60)
    assert done.returncode == EXIT_CONFIG, done.stderr.decode()[-2000:]
    assert b"IM_CRYPTO__MASTER_KEY" in done.stderr


@pytest.fixture
def audited(kafka_admin: AdminClient, settings: Settings) -> Iterator[Settings]:
    """Topics of this test's own (the operator audit the CLI writes to among them): a fresh
    stack has none under the default prefix."""
    prefixed = create_topics(kafka_admin, settings, unique("t-rewrap") + ".")
    yield prefixed
    delete_topics(kafka_admin, prefixed)


def test_the_master_key_rotates_by_rewrapping_with_no_sealed_value_rewritten(
    audited: Settings, cql_session: Session, migrated: str
) -> None:
    before = ring(cql_session, migrated).current("acme")
    sealed = seal_text(before, "ctx", "secret")
    ring(cql_session, migrated).current("globex")
    forget_key(cql_session, migrated, "globex")
    ring(cql_session, migrated, master_key=bytes(32)).current("stray")  # another master key
    # During the rotation a process holds both: new keys wrap with the new one.
    both = KeyRing(
        cql_session,
        migrated,
        OTHER_MASTER_KEY,
        cache_size=16,
        cache_seconds=60.0,
        previous_master_key=MASTER_KEY,
    )
    both.check_master_key()
    assert open_text(both.find("acme", before.key_id), "ctx", sealed) == "secret"

    environment = {
        **os.environ,
        "IM_CQL__KEYSPACE": migrated,
        "IM_KAFKA__TOPIC_PREFIX": audited.kafka.topic_prefix,
        "IM_CRYPTO__MASTER_KEY": base64.b64encode(OTHER_MASTER_KEY).decode(),
        "IM_CRYPTO__PREVIOUS_MASTER_KEY": base64.b64encode(MASTER_KEY).decode(),
    }
    done = imstream("tenant", "rewrap-keys", environment=environment, timeout=120)
    assert done.returncode == 1, done.stderr.decode()  # the stray key is neither's
    assert b"1 tenant key(s) re-wrapped" in done.stdout
    assert b"[key-unknown] 1 tenant key(s)" in done.stderr
    assert b"stray" in done.stderr
    assert b"not audited" not in done.stderr
    # The new master key alone opens acme's key now: the same key, the same sealed values.
    after = ring(cql_session, migrated, master_key=OTHER_MASTER_KEY)
    after.check_master_key()
    assert open_text(after.find("acme", before.key_id), "ctx", sealed) == "secret"
    with pytest.raises(MasterKeyMismatchError):
        ring(cql_session, migrated).find("acme", before.key_id)  # the old one no longer does
    # Again: nothing left to do for acme.
    again = imstream("tenant", "rewrap-keys", environment=environment, timeout=120)
    assert b"0 tenant key(s) re-wrapped" in again.stdout
    assert b"1 already under" in again.stdout

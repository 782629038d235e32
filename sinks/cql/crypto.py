"""Encryption at rest in the CQL store: per-tenant data keys wrapped by a master key.

**Keys.** Each tenant has one data key (DEK, 32 random bytes, AES-256-GCM) with a random
``key_id``. It is stored only wrapped by the master key (the key-encryption key, KEK, from
``IM_CRYPTO__MASTER_KEY``) in ``tenant_keys`` of the anchor keyspace, created on first use with
``INSERT ... IF NOT EXISTS``: concurrent writers of a new tenant all use the one that won.
Deleting the row (``imstream tenant forget-key``) shreds the tenant's data: every value sealed
with that key stays unreadable, and the next write creates a new key with a new id.

**Values.** The sealed columns stay ``text`` (no migration of the serving tables; a value
without the prefix is plaintext written before encryption and reads as it is):

- an event JSON that carries a body (``message.sent``, ``message.edited``):
  ``imk1.<key_id>.<base64url(nonce ‖ ciphertext of the body's JSON)>.<the event JSON with the
  body replaced by {"type":"withheld"}>`` — the envelope (ids, sender, seq, time) stays readable,
  as it is in the row's other columns already; only the body is sealed. Unsealed with no key,
  the event is served with its body withheld, exactly like a recalled message's.
- a text (a conversation-list preview, a push token):
  ``imk1.<key_id>.<base64url(nonce ‖ ciphertext)>``; unsealed with no key: ``None``.

**Associated data** binds each ciphertext to its row and column (``context``, e.g.
``timeline|tenant|conversation|seq|event``), to the key id, and to the event's clear part: a
ciphertext copied to another row, column or event does not decrypt (``InvalidTag``) and reads
as withheld, with a warning in the log.

**Nonces** are synthetic (:func:`_nonce`): the same value sealed for the same row gives the same
bytes, so replays and rebuilds write the cells a single pass writes.

**Master key rotation**: a key ring given the previous master key unwraps the keys it wrapped
(found by ``kek_id``); :func:`rewrap_keys` moves them to the new master key.

**Cache.** Unwrapped keys are kept in memory per tenant (LRU of ``key_cache_size`` tenants),
each for ``key_cache_seconds`` — a key forgotten in the table stops decrypting in every process
within that time; the absence of a key is cached the same way, so a shredded tenant's rows cost
no CQL read each. A hit costs no I/O; the sink's batch path reads a tenant's key at most once
per ``key_cache_seconds``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.cluster import Session
from cassandra.query import SimpleStatement
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic_core import from_json, to_json

from core.settings import Settings
from sinks.cql.migrate import check_keyspace_name

log = logging.getLogger(__name__)

PREFIX = "imk1."
_NONCE_BYTES = 12
_WITHHELD_BODY = {"type": "withheld"}
#: How soon a value sealed with a key id other than the cached one may trigger a re-read of the
#: tenant's key (a key created by another process after a forget-key): bounded, so a shredded
#: tenant's old rows never cost a CQL read each.
RELOAD_AFTER_SECONDS = 1.0


class MasterKeyMismatchError(Exception):
    """A tenant's data key is wrapped by another master key than this process holds."""


def kek_id(master_key: bytes) -> str:
    """A fingerprint of the master key, stored with each wrapped key (never the key itself)."""
    return hashlib.sha256(b"imstream-kek|" + master_key).hexdigest()[:16]


def is_sealed(value: str | None) -> bool:
    return value is not None and value.startswith(PREFIX)


@dataclass(frozen=True, slots=True)
class DataKey:
    key_id: str
    aead: AESGCM
    #: The key of the synthetic nonces (derived from the data key; see :func:`_nonce`).
    nonce_key: bytes

    @classmethod
    def of(cls, key_id: str, dek: bytes) -> DataKey:
        return cls(key_id, AESGCM(dek), hmac.new(dek, b"imstream-nonce", hashlib.sha256).digest())


def _nonce(key: DataKey, ad: bytes, plaintext: bytes) -> bytes:
    """A synthetic nonce: the MAC of the associated data and the plaintext (the SIV idea).

    Deterministic on purpose: sealing the same value for the same row twice gives the same bytes,
    so a replay or a rebuild writes cells equal to a single pass's (the store's replay contract,
    and ``imstream rebuild cql --verify`` comparing digests, hold as without encryption). Two
    different values (or rows — the row is in the associated data) get unrelated nonces; equal
    nonces would need a 96-bit collision of HMAC-SHA256. What it reveals: that a row was
    rewritten with the value it had, which its write timestamp says anyway."""
    return hmac.new(key.nonce_key, ad + b"\x00" + plaintext, hashlib.sha256).digest()[:_NONCE_BYTES]


@dataclass(slots=True)
class _Entry:
    loaded_at: float
    key: DataKey | None


class KeyRing:
    """The tenants' data keys: created, found, cached and forgotten (thread-safe)."""

    def __init__(
        self,
        session: Session,
        keyspace: str,
        master_key: bytes,
        *,
        cache_size: int,
        cache_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        execute: Callable[[Any, tuple[Any, ...]], Any] | None = None,
        previous_master_key: bytes | None = None,
    ) -> None:
        """``execute(statement, values)`` runs the key queries (default: the session's, once;
        the CQL sink passes one that retries transient failures). ``previous_master_key``:
        the master key being rotated away from — it still unwraps the keys it wrapped (found by
        their ``kek_id``), new keys are wrapped with ``master_key`` only."""
        keyspace = check_keyspace_name(keyspace)
        self.keyspace = keyspace
        self.session = session
        self._execute = execute or session.execute
        self._kek = AESGCM(master_key)
        self.kek_id = kek_id(master_key)
        #: Every master key this process can unwrap with, by fingerprint.
        self._unwrappers = {self.kek_id: self._kek}
        if previous_master_key is not None:
            self._unwrappers.setdefault(kek_id(previous_master_key), AESGCM(previous_master_key))
        self.cache_size = cache_size
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._select = session.prepare(
            f"SELECT key_id, kek_id, wrapped_key FROM {keyspace}.tenant_keys WHERE tenant_id = ?"
        )
        self._select.consistency_level = ConsistencyLevel.LOCAL_QUORUM
        self._insert = session.prepare(
            f"INSERT INTO {keyspace}.tenant_keys (tenant_id, key_id, kek_id, wrapped_key, "
            "created_at) VALUES (?, ?, ?, ?, ?) IF NOT EXISTS"
        )
        self._sample = session.prepare(f"SELECT kek_id FROM {keyspace}.tenant_keys LIMIT 100")
        self._sample.consistency_level = ConsistencyLevel.LOCAL_QUORUM

    # -- the keys --

    def check_master_key(self) -> None:
        """Refuse (``MasterKeyMismatchError``) a master key that wraps none of the stored keys
        while keys exist: a process started with a wrong key would otherwise serve every body
        as withheld. Keys under other master keys may coexist during a re-wrap."""
        found = {row.kek_id for row in self._execute(self._sample, ())}
        if found and not found & set(self._unwrappers):
            raise MasterKeyMismatchError(
                f"IM_CRYPTO__MASTER_KEY (fingerprint {self.kek_id}) wraps none of the tenant "
                f"keys stored (fingerprints {', '.join(sorted(found))}): wrong master key"
            )

    def current(self, tenant_id: str) -> DataKey:
        """The tenant's data key for writing: created on first use, race-safe."""
        entry = self._cached(tenant_id)
        if entry is not None and entry.key is not None:
            return entry.key
        key = self._load(tenant_id)
        if key is None:
            key = self._create(tenant_id)
        self._store(tenant_id, key)
        return key

    def find(self, tenant_id: str, key_id: str) -> DataKey | None:
        """The tenant's data key ``key_id`` for reading, or None if it is gone (forgotten)."""
        found, key = self.find_cached(tenant_id, key_id)
        if found:
            return key
        key = self._load(tenant_id)
        self._store(tenant_id, key)
        return key if key is not None and key.key_id == key_id else None

    def find_cached(self, tenant_id: str, key_id: str) -> tuple[bool, DataKey | None]:
        """``(True, key or None)`` when the cache can answer without I/O, else ``(False,
        None)`` (for the ingress: it reads the table on a thread then)."""
        with self._lock:
            entry = self._cache.get(tenant_id)
            if entry is None:
                return False, None
            age = self._clock() - entry.loaded_at
            if age >= self.cache_seconds:
                return False, None
            self._cache.move_to_end(tenant_id)
            if entry.key is not None and entry.key.key_id == key_id:
                return True, entry.key
            # Another id than the cached key's: a forgotten key's value (unreadable), or a key
            # created after a forget-key by another process (re-read, at most once a second).
            if age < min(self.cache_seconds, RELOAD_AFTER_SECONDS):
                return True, None
            return False, None

    def forget(self, tenant_id: str) -> str | None:
        """Delete the tenant's wrapped key (see :func:`forget_key`) and its cached copy here."""
        key_id = forget_key(self.session, self.keyspace, tenant_id)
        with self._lock:
            self._cache.pop(tenant_id, None)
        return key_id

    def _cached(self, tenant_id: str) -> _Entry | None:
        with self._lock:
            entry = self._cache.get(tenant_id)
            if entry is None or self._clock() - entry.loaded_at >= self.cache_seconds:
                return None
            self._cache.move_to_end(tenant_id)
            return entry

    def _store(self, tenant_id: str, key: DataKey | None) -> None:
        with self._lock:
            self._cache[tenant_id] = _Entry(self._clock(), key)
            self._cache.move_to_end(tenant_id)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def cached_tenants(self) -> int:
        with self._lock:
            return len(self._cache)

    def _load(self, tenant_id: str) -> DataKey | None:
        rows = list(self._execute(self._select, (tenant_id,)))
        return self._unwrap(tenant_id, rows[0]) if rows else None

    def _create(self, tenant_id: str) -> DataKey:
        key_id = secrets.token_hex(8)
        dek = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(_NONCE_BYTES)
        wrapped = nonce + self._kek.encrypt(nonce, dek, _wrap_ad(tenant_id, key_id))
        result = self._execute(
            self._insert, (tenant_id, key_id, self.kek_id, wrapped, datetime.now(UTC))
        ).one()
        if result is not None and not _applied(result):
            # Another writer created the tenant's key first: everyone uses the winner's.
            log.info("tenant %s: another process created its data key first", tenant_id)
            return self._unwrap(tenant_id, result)
        log.info("tenant %s: data key %s created", tenant_id, key_id)
        return DataKey.of(key_id, dek)

    def _unwrap(self, tenant_id: str, row: Any) -> DataKey:
        wrapped = bytes(row.wrapped_key)
        unwrapper = self._unwrappers.get(str(row.kek_id), self._kek)
        try:
            dek = unwrapper.decrypt(
                wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], _wrap_ad(tenant_id, row.key_id)
            )
        except InvalidTag:
            raise MasterKeyMismatchError(
                f"the data key of tenant {tenant_id} is wrapped by master key {row.kek_id}, "
                f"not by this process's {self.kek_id}"
            ) from None
        return DataKey.of(str(row.key_id), dek)


@dataclass
class RewrapResult:
    """What :func:`rewrap_keys` did: keys re-wrapped, keys already under the new master key,
    and the tenants whose key neither master key opens (left as they are)."""

    rewrapped: int = 0
    current: int = 0
    unknown: list[str] = field(default_factory=list)


def rewrap_keys(
    session: Session, keyspace: str, old_master_key: bytes, new_master_key: bytes
) -> RewrapResult:
    """Re-wrap every tenant key wrapped by ``old_master_key`` with ``new_master_key`` (the same
    key id and data key: no sealed value changes). Idempotent: keys already under the new master
    key are skipped. Each row is replaced only if it still holds the key it was read with
    (``IF key_id = ?``), so a concurrent forget-key is never undone."""
    keyspace = check_keyspace_name(keyspace)
    old, new = AESGCM(old_master_key), AESGCM(new_master_key)
    old_id, new_id = kek_id(old_master_key), kek_id(new_master_key)
    update = session.prepare(
        f"UPDATE {keyspace}.tenant_keys SET wrapped_key = ?, kek_id = ? WHERE tenant_id = ? "
        "IF key_id = ?"
    )
    result = RewrapResult()
    rows = session.execute(
        SimpleStatement(
            f"SELECT tenant_id, key_id, kek_id, wrapped_key FROM {keyspace}.tenant_keys",
            fetch_size=500,
        )
    )
    for row in rows:
        if row.kek_id == new_id:
            result.current += 1
            continue
        wrapped, ad = bytes(row.wrapped_key), _wrap_ad(row.tenant_id, row.key_id)
        try:
            if row.kek_id != old_id:
                raise InvalidTag
            dek = old.decrypt(wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], ad)
        except InvalidTag:
            result.unknown.append(str(row.tenant_id))
            continue
        nonce = os.urandom(_NONCE_BYTES)
        rewrapped = nonce + new.encrypt(nonce, dek, ad)
        applied = session.execute(update, (rewrapped, new_id, row.tenant_id, row.key_id)).one()
        if applied is None or _applied(applied):
            result.rewrapped += 1
    return result


def forget_key(session: Session, keyspace: str, tenant_id: str) -> str | None:
    """Delete the tenant's wrapped data key (crypto-shredding); returns its id, or None when
    the tenant has none. Needs no master key. Processes that hold the key in their cache stop
    using it within ``key_cache_seconds``; the tenant's next write creates a new key."""
    keyspace = check_keyspace_name(keyspace)
    rows = list(
        session.execute(
            f"SELECT key_id FROM {keyspace}.tenant_keys WHERE tenant_id = %s", (tenant_id,)
        )
    )
    if not rows:
        return None
    session.execute(
        f"DELETE FROM {keyspace}.tenant_keys WHERE tenant_id = %s IF EXISTS", (tenant_id,)
    )
    return str(rows[0].key_id)


def _applied(row: Any) -> bool:
    if isinstance(row, dict):
        return bool(row.get("[applied]"))
    return bool(row[0])


def _wrap_ad(tenant_id: str, key_id: str) -> bytes:
    return f"imstream-dek|{tenant_id}|{key_id}".encode()


def _ad(key_id: str, context: str, clear: str) -> bytes:
    return f"{PREFIX}{key_id}|{context}|{clear}".encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- sealing (the sink) --


def seal_text(key: DataKey, context: str, text: str) -> str:
    ad, plaintext = _ad(key.key_id, context, ""), text.encode()
    nonce = _nonce(key, ad, plaintext)
    sealed = key.aead.encrypt(nonce, plaintext, ad)
    return f"{PREFIX}{key.key_id}.{_b64(nonce + sealed)}"


def seal_event(key: DataKey, context: str, event_json: str) -> str:
    """``event_json`` with its body sealed (see the module docstring); an event without a body
    (or with a withheld one) is returned as it is."""
    event = from_json(event_json)
    payload = event.get("payload") if isinstance(event, dict) else None
    body = payload.get("body") if isinstance(payload, dict) else None
    if payload is None or body is None or body == _WITHHELD_BODY:
        return event_json
    payload["body"] = _WITHHELD_BODY
    clear = to_json(event).decode()
    ad, plaintext = _ad(key.key_id, context, clear), to_json(body)
    nonce = _nonce(key, ad, plaintext)
    sealed = key.aead.encrypt(nonce, plaintext, ad)
    return f"{PREFIX}{key.key_id}.{_b64(nonce + sealed)}.{clear}"


# -- opening (every reader) --


def key_id_of(value: str | None) -> str | None:
    """The key id a stored value was sealed with, or None for a plaintext value."""
    if not is_sealed(value):
        return None
    assert value is not None
    return value[len(PREFIX) :].split(".", 1)[0]


def open_text(key: DataKey | None, context: str, value: str | None) -> str | None:
    """The plaintext of a stored text; None when its key is gone or it does not belong here."""
    if not is_sealed(value):
        return value
    assert value is not None
    key_id, _, sealed = value[len(PREFIX) :].partition(".")
    if key is None or key.key_id != key_id:
        return None
    try:
        data = _unb64(sealed)
        return key.aead.decrypt(
            data[:_NONCE_BYTES], data[_NONCE_BYTES:], _ad(key_id, context, "")
        ).decode()
    except (InvalidTag, binascii.Error, ValueError):
        log.warning("a sealed value does not open in %s (moved or altered?)", context)
        return None


def open_event(key: DataKey | None, context: str, value: str) -> str:
    """The stored event's JSON with its body; with its body withheld when the key is gone (or
    the ciphertext does not belong to this row)."""
    if not is_sealed(value):
        return value
    key_id, _, rest = value[len(PREFIX) :].partition(".")
    sealed, _, clear = rest.partition(".")
    if key is None or key.key_id != key_id:
        return clear
    try:
        data = _unb64(sealed)
        body = key.aead.decrypt(
            data[:_NONCE_BYTES], data[_NONCE_BYTES:], _ad(key_id, context, clear)
        )
    except (InvalidTag, binascii.Error, ValueError):
        log.warning("a sealed body does not open in %s (moved or altered?)", context)
        return clear
    event = from_json(clear)
    event["payload"]["body"] = from_json(body)
    return to_json(event).decode()


def open_value(key: DataKey | None, context: str, value: str | None) -> str | None:
    """A stored value of either kind (an event with a sealed body, or a sealed text), opened."""
    if not is_sealed(value):
        return value
    assert value is not None
    if len(value[len(PREFIX) :].split(".", 2)) == 3:
        return open_event(key, context, value)
    return open_text(key, context, value)


# -- the contexts: which row and column a value belongs to --


def timeline_context(tenant_id: str, conversation_id: str, seq: int, column: str) -> str:
    return f"timeline|{tenant_id}|{conversation_id}|{seq}|{column}"


def sync_context(tenant_id: str, user_id: str, sync_id: int) -> str:
    return f"sync_queue|{tenant_id}|{user_id}|{sync_id}"


def preview_context(tenant_id: str, user_id: str, conversation_id: str) -> str:
    return f"user_conversations|{tenant_id}|{user_id}|{conversation_id}"


def device_context(tenant_id: str, user_id: str, device_id: str) -> str:
    return f"devices|{tenant_id}|{user_id}|{device_id}"


def key_ring(
    session: Session,
    settings: Settings,
    execute: Callable[[Any, tuple[Any, ...]], Any] | None = None,
) -> KeyRing:
    """The process's key ring from its settings (the anchor keyspace's ``tenant_keys``);
    ``ValueError`` for a missing or development master key outside dev."""
    return KeyRing(
        session,
        settings.cql.keyspace,
        settings.master_key(),
        cache_size=settings.crypto.key_cache_size,
        cache_seconds=settings.crypto.key_cache_seconds,
        execute=execute,
        previous_master_key=settings.previous_master_key(),
    )

"""The processors' tables on disk: one LMDB environment per processor loop, a checkpoint per state
topic partition, so a restarted or rebalanced worker restores only the changelog's tail.

The compacted state topics stay the source of truth (docs/streams.md, "State store"). The store is
a cache of them that survives restarts:

- a batch's writes reach the store only after its Kafka transaction committed, in one LMDB write
  transaction: the store never holds state Kafka does not;
- every ``CHECKPOINT_INTERVAL`` (and at a clean stop) the loop records, per state partition, an
  offset of the state topic that everything in the store is at or past (the partition's high
  watermark read between two transactions, when all the loop's writes are committed and applied);
- on assignment the loop reads each state partition from its checkpoint to the end. A worker
  killed between a commit and the store write re-reads that batch's state records from its
  older checkpoint: the same values, applied again.

A checkpoint older than the state topic's ``delete.retention.ms`` is not trusted (a deletion in
the tail may have been compacted away since): that table is emptied and restored in full.

Why LMDB: one write transaction holds the batch's values and the checkpoints together, so the store
and its checkpoint always agree; reads are memory-mapped (no copy into Python until a value is
decoded); keys are sorted, so a parent's children (``streams.state``) are one range scan. Values are
JSON; recently used ones are kept decoded in a bounded cache in front of the store.
"""

from __future__ import annotations

import struct
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import pydantic_core

from core.records import StateWrite
from streams.state import CHILD_SEPARATOR

#: Virtual size of the memory map: the most the store can grow to (files grow with use only).
MAP_SIZE = 1 << 40
#: Decoded values kept in front of the store.
CACHE_ENTRIES = 200_000
_CHECKPOINTS = b"__checkpoints"
_EXPIRY = b"__expiry"
_MILLIS = struct.Struct(">Q")
_MISSING: Any = object()


def encode(value: dict[str, Any]) -> bytes:
    return pydantic_core.to_json(value)


def decode(value: bytes) -> dict[str, Any]:
    decoded = pydantic_core.from_json(value)
    if not isinstance(decoded, dict):
        raise ValueError("a state value is a JSON object")
    return decoded


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The state topic offset a partition's values in the store are at or past."""

    offset: int
    #: When it was written (epoch seconds).
    at: float
    #: The state topic's Kafka topic id: a topic deleted and created again is another topic.
    topic_id: str


class StateStore:
    """The tables of one processor loop in an LMDB environment at ``path``.

    ``expiring`` names tables whose values carry ``at`` (epoch seconds) and are forgotten after a
    retention (the message table): an index by time makes each prune cost what it removes.
    """

    def __init__(
        self,
        path: Path,
        tables: Iterable[str],
        *,
        expiring: Iterable[str] = (),
        cache_entries: int = CACHE_ENTRIES,
    ) -> None:
        self.path = path
        self._names = list(tables)
        self._expiring = set(expiring)
        self._cache_entries = cache_entries
        #: Recently used values as their JSON (None: known absent) and parents' children. Bytes
        #: and tuples of strings, not decoded dicts: the garbage collector does not traverse
        #: them, so its full collections do not grow with the cache (as dicts, 100,000 cached
        #: values made every message 30% dearer).
        self._cache: dict[tuple[str, str], bytes | tuple[str, ...] | None] = {}
        #: Values of expiring tables prefetched for the current batch (a dedupe lookup per new
        #: message would otherwise churn the cache): replaced by the next prefetch or write.
        self._transient: dict[tuple[str, str], dict[str, Any] | None] = {}
        path.mkdir(parents=True, exist_ok=True)
        # sync/metasync off: a committed LMDB transaction survives the process being killed (the
        # pages are in the OS cache); a machine crash may undo the last ones, and then the
        # checkpoint written with them is undone too — the restore reads their records again.
        self._env = lmdb.open(
            str(path),
            map_size=MAP_SIZE,
            max_dbs=len(self._names) + 2,
            sync=False,
            metasync=False,
            readahead=False,
        )
        self._dbs = {name: self._env.open_db(name.encode()) for name in self._names}
        self._checkpoints = self._env.open_db(_CHECKPOINTS)
        self._expiry = self._env.open_db(_EXPIRY)

    def close(self) -> None:
        self._env.close()

    # -- reads (``streams.state.StateReader``) --

    def get(self, table: str, key: str) -> dict[str, Any] | None:
        cached = self._cache.get((table, key), _MISSING)
        if cached is not _MISSING:
            return None if cached is None else decode(cached)
        transient = self._transient.get((table, key), _MISSING)
        if transient is not _MISSING:
            return transient  # type: ignore[no-any-return]
        with self._env.begin(db=self._dbs[table]) as txn:
            raw = txn.get(key.encode())
        if table not in self._expiring:
            self._remember(table, key, raw)
        return None if raw is None else decode(raw)

    def prefetch(self, keys: Mapping[str, Iterable[str]]) -> None:
        """Read the keys a batch is about to read that the cache does not hold, in one read
        transaction with one call per table: each LMDB call releases the GIL (see ``apply``)."""
        wanted = {
            table: sorted({key for key in names if (table, key) not in self._cache})
            for table, names in keys.items()
        }
        self._transient = {}
        if not any(wanted.values()):
            return
        with self._env.begin(buffers=True) as txn:
            for table, names in wanted.items():
                if not names:
                    continue
                cursor = txn.cursor(db=self._dbs[table])
                found = {
                    bytes(key): bytes(raw)
                    for key, raw in cursor.getmulti([name.encode() for name in names])
                }
                for name in names:
                    raw = found.get(name.encode())
                    if table in self._expiring:
                        self._transient[(table, name)] = None if raw is None else decode(raw)
                    else:
                        self._remember(table, name, raw)

    def children(self, table: str, parent: str) -> list[str]:
        cached = self._cache.get((table, parent + CHILD_SEPARATOR), _MISSING)
        if isinstance(cached, tuple):
            return list(cached)
        prefix = f"{parent}{CHILD_SEPARATOR}".encode()
        found: list[str] = []
        with self._env.begin(db=self._dbs[table]) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for key in cursor.iternext(keys=True, values=False):
                    if not key.startswith(prefix):
                        break
                    found.append(key[len(prefix) :].decode())
        # Cached under "<parent>#" (no value's key): dropped when a child is added or removed.
        self._remember(table, parent + CHILD_SEPARATOR, tuple(found))
        return found

    def size(self) -> int:
        with self._env.begin() as txn:
            return sum(txn.stat(db)["entries"] for db in self._dbs.values())

    # -- writes --

    def apply(
        self, writes: Sequence[StateWrite], encoded: Sequence[bytes | None] | None = None
    ) -> None:
        """A committed batch's writes (``encoded``: their values as already serialised), in one
        LMDB transaction with one call per table. Each LMDB call releases the GIL, and in a
        process with two busy loops a release may wait up to a switch interval (5 ms) to get it
        back: 20 single puts and gets took 0.7 ms beside a busy thread against 0.013 ms alone,
        so the stage reads and writes in batches (``prefetch``, ``putmulti``)."""
        values = [
            (write.table, write.key.encode(), None if write.value is None else raw)
            for write, raw in zip(
                writes,
                encoded if encoded is not None else [_encoded(w.value) for w in writes],
                strict=True,
            )
        ]
        self._store(values, [write.value for write in writes])
        self._transient = {}
        for (table, _key, raw), write in zip(values, writes, strict=True):
            if table in self._expiring:
                continue  # read from the store when needed: see ``_transient``
            self._written(table, write.key, raw)

    def restore(self, table: str, records: Sequence[tuple[bytes, bytes | None]]) -> None:
        """State records read from the state topic (key, JSON value or None), in order: stored as
        they are (decoded only where the time index needs the value's ``at``)."""
        latest = dict(records)  # a key read twice: its last value
        expiring = table in self._expiring
        decoded = [decode(raw) if expiring and raw is not None else None for raw in latest.values()]
        self._store([(table, key, raw) for key, raw in latest.items()], decoded)
        cache = self._cache
        if cache:
            for key in latest:
                text = key.decode()
                cache.pop((table, text), None)
                parent, separator, _child = text.rpartition(CHILD_SEPARATOR)
                if separator:
                    cache.pop((table, parent + CHILD_SEPARATOR), None)

    def _store(
        self,
        values: Sequence[tuple[str, bytes, bytes | None]],
        decoded: Sequence[dict[str, Any] | None],
    ) -> None:
        """Put (or, with None, delete) each ``(table, key, raw)``; ``decoded`` gives the values
        of expiring tables their ``at``. Each key appears once."""
        puts: dict[str, list[tuple[bytes, bytes]]] = defaultdict(list)
        expiry: list[tuple[bytes, bytes]] = []
        deletes: list[tuple[str, bytes]] = []
        for (table, key, raw), value in zip(values, decoded, strict=True):
            if raw is None:
                deletes.append((table, key))
                continue
            puts[table].append((key, raw))
            if table in self._expiring and value is not None:
                expiry.append((_expiry_key(table, float(value.get("at", 0)), key), b""))
        with self._env.begin(write=True) as txn:
            for table, items in puts.items():
                txn.cursor(db=self._dbs[table]).putmulti(items)
            if expiry:
                txn.cursor(db=self._expiry).putmulti(expiry)
            for table, key in deletes:
                txn.delete(key, db=self._dbs[table])

    def _written(self, table: str, key: str, value: bytes | None) -> None:
        """The cache after a write of ``key``: its value, and its parent's list of children
        dropped (a child added or removed)."""
        parent, separator, _child = key.rpartition(CHILD_SEPARATOR)
        if separator:
            self._cache.pop((table, parent + CHILD_SEPARATOR), None)
        self._remember(table, key, value)

    def _remember(self, table: str, key: str, value: bytes | tuple[str, ...] | None) -> None:
        cache = self._cache
        if len(cache) >= self._cache_entries:
            for stale in list(cache)[: self._cache_entries // 10]:
                del cache[stale]
        cache[(table, key)] = value

    def prune(self, table: str, older_than: float) -> int:
        """Forget values of an expiring table whose ``at`` is before ``older_than``."""
        prefix = table.encode() + b"\0"
        cutoff = _expiry_key(table, older_than, b"")
        db = self._dbs[table]
        pruned = 0
        with self._env.begin(write=True) as txn:
            cursor = txn.cursor(db=self._expiry)
            if not cursor.set_range(prefix):
                return 0
            while cursor.key().startswith(prefix) and cursor.key() < cutoff:
                key = cursor.key()[len(prefix) + _MILLIS.size :]
                raw = txn.get(key, db=db)
                # A value written again later has a later entry of its own: keep it.
                if raw is not None and float(decode(raw).get("at", 0)) < older_than:
                    txn.delete(key, db=db)
                    self._cache.pop((table, key.decode()), None)
                    pruned += 1
                if not cursor.delete():
                    break
        return pruned

    # -- checkpoints --

    def checkpoint(self, topic: str, partition: int) -> Checkpoint | None:
        """A state partition's checkpoint, or None."""
        with self._env.begin(db=self._checkpoints) as txn:
            raw = txn.get(f"{topic}:{partition}".encode())
        if raw is None:
            return None
        value = decode(raw)
        return Checkpoint(int(value["offset"]), float(value["at"]), str(value["topic_id"]))

    def set_checkpoints(
        self, offsets: Mapping[tuple[str, int], int], topic_ids: Mapping[str, str]
    ) -> None:
        now = time.time()
        with self._env.begin(write=True, db=self._checkpoints) as txn:
            for (topic, partition), offset in offsets.items():
                value = {"offset": offset, "at": now, "topic_id": topic_ids[topic]}
                txn.put(f"{topic}:{partition}".encode(), encode(value))

    def clear(self, table: str, topic: str) -> None:
        """Empty one table (and its entries in the time index) and forget the checkpoints of its
        state topic ``topic``; the other tables and their checkpoints stay."""
        with self._env.begin(write=True) as txn:
            txn.drop(self._dbs[table], delete=False)
            for db, prefix in (
                (self._checkpoints, f"{topic}:".encode()),
                (self._expiry, table.encode() + b"\0"),
            ):
                cursor = txn.cursor(db=db)
                if cursor.set_range(prefix):
                    while cursor.key().startswith(prefix):
                        if not cursor.delete():
                            break
        self._cache = {key: value for key, value in self._cache.items() if key[0] != table}


def _encoded(value: dict[str, Any] | None) -> bytes | None:
    return None if value is None else encode(value)


def _expiry_key(table: str, at: float, key: bytes) -> bytes:
    return table.encode() + b"\0" + _MILLIS.pack(max(0, int(at * 1000))) + key

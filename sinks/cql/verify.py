"""Comparing two keyspaces' serving tables row by row: does a rebuild reproduce the live store?

Every row of every serving table is read from both keyspaces (paged) and folded into an
order-independent digest (the sum of each row's SHA-256 modulo 2^256, so no row order and no
memory beyond one page); equal digests and counts mean equal tables. Cells are compared by value,
not by write time. Meant for ``imstream rebuild cql`` and tests: it reads everything.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cassandra.cluster import Session
from cassandra.query import SimpleStatement

from sinks.cql.migrate import check_keyspace_name

#: The tables the CQL sink fills (docs/storage.md): what a rebuild must reproduce.
SERVING_TABLES = (
    "timeline",
    "messages_by_id",
    "conversations",
    "members",
    "read_positions",
    "sync_queue",
    "sync_heads",
    "user_conversations",
    "devices",
    "former_members",
    "recalled_messages",
)
_MODULUS = 1 << 256
PAGE_ROWS = 2000


@dataclass(frozen=True)
class TableComparison:
    table: str
    live_rows: int
    rebuilt_rows: int
    live_digest: str
    rebuilt_digest: str

    @property
    def equal(self) -> bool:
        return self.live_rows == self.rebuilt_rows and self.live_digest == self.rebuilt_digest


def table_digest(session: Session, keyspace: str, table: str) -> tuple[int, str]:
    """``(rows, digest)`` of one table."""
    check_keyspace_name(keyspace)
    statement = SimpleStatement(f"SELECT * FROM {keyspace}.{table}", fetch_size=PAGE_ROWS)
    total = 0
    rows = 0
    for row in session.execute(statement):
        text = repr(sorted(row._asdict().items()))
        total = (total + int.from_bytes(hashlib.sha256(text.encode()).digest(), "big")) % _MODULUS
        rows += 1
    return rows, f"{total:064x}"


def compare_keyspaces(
    session: Session, live: str, rebuilt: str, tables: tuple[str, ...] = SERVING_TABLES
) -> list[TableComparison]:
    comparisons = []
    for table in tables:
        live_rows, live_digest = table_digest(session, live, table)
        rebuilt_rows, rebuilt_digest = table_digest(session, rebuilt, table)
        comparisons.append(
            TableComparison(table, live_rows, rebuilt_rows, live_digest, rebuilt_digest)
        )
    return comparisons

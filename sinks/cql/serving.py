"""Which keyspace serves: the anchor (``IM_CQL__KEYSPACE``) or the rebuilt one swapped in.

Cassandra has no table or keyspace rename, so ``imstream rebuild cql`` builds a fresh keyspace and
the swap is a pointer: the one row of ``<anchor>.serving_keyspace``. The CQL sink and the
ingress nodes resolve it when they start. The CQL sink's consumer group follows the keyspace
(``core.groups.cql_sink_group``): a rebuild fills its keyspace as exactly the group the sink
uses once it is swapped in, so the restarted sink goes on where the rebuild stopped, with
nothing missed and nothing written twice.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cassandra.cluster import Session

from sinks.cql.migrate import check_keyspace_name

POINTER_TABLE = "serving_keyspace"
#: The live CQL sink's consumer group (after the topic prefix), for the anchor keyspace.


def serving_keyspace(session: Session, anchor: str) -> str:
    """The keyspace that serves: the pointer's, else ``anchor`` (also before migration 2)."""
    check_keyspace_name(anchor)
    tables = session.execute(
        "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s AND table_name = %s",
        (anchor, POINTER_TABLE),
    ).one()
    if tables is None:
        return anchor
    row = session.execute(
        f"SELECT target_keyspace FROM {anchor}.{POINTER_TABLE} WHERE anchor = %s", (anchor,)
    ).one()
    return (
        check_keyspace_name(row.target_keyspace)
        if row is not None and row.target_keyspace
        else anchor
    )


def swap_serving_keyspace(session: Session, anchor: str, keyspace: str, operator: str) -> str:
    """Point ``anchor`` at ``keyspace``; returns the keyspace that served before."""
    previous = serving_keyspace(session, anchor)
    session.execute(
        f"INSERT INTO {anchor}.{POINTER_TABLE} (anchor, target_keyspace, previous, swapped_at, "
        "swapped_by) VALUES (%s, %s, %s, %s, %s)",
        (anchor, check_keyspace_name(keyspace), previous, datetime.now(UTC), operator),
    )
    return previous

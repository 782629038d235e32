"""The processors' tables as they read them: values by key, and the children of a key.

State is kept fine-grained (docs/streams.md, "State layout"): what changes together is one value.
A user's header (sync id, devices, push preferences, unread total) is one value and each of the
user's conversations another, keyed ``<user key>#<conversation id>``; a conversation's header is
one value and each member another, keyed ``<conversation key>#<user id>``. No value grows with a
user's history, number of conversations or a group's membership, so no value can approach the
record limit and a message rewrites only the few small values it changes.

``#`` appears in no id (``schemas.events`` ids are ``[A-Za-z0-9._:@+=-]``), so a child key names
its parent unambiguously. :class:`MemoryState` keeps an index of each parent's children, so "every
conversation of this user" or "every member of this group" is a lookup, not a scan.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

#: Between a parent key and a child id.
CHILD_SEPARATOR = "#"


def child_key(parent: str, child: str) -> str:
    return f"{parent}{CHILD_SEPARATOR}{child}"


def split_child(key: str) -> tuple[str, str] | None:
    """``(parent, child)`` of a child key; None for any other key."""
    parent, separator, child = key.rpartition(CHILD_SEPARATOR)
    return (parent, child) if separator else None


class StateReader(Protocol):
    """Read access to the tables, as a processor gets it for a batch."""

    def get(self, table: str, key: str) -> dict[str, Any] | None:
        """The current value of ``key``, or None."""
        ...

    def children(self, table: str, parent: str) -> list[str]:
        """The child ids stored under ``parent`` (in no particular order)."""
        ...

    def prefetch(self, keys: Mapping[str, Iterable[str]]) -> None:
        """A hint: the keys (per table) a batch is about to read, fetched together."""
        ...


class MemoryState:
    """Tables in memory: ``table → key → value``, with each parent's children indexed."""

    def __init__(self, tables: list[str] | None = None) -> None:
        self._data: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        self._children: dict[str, dict[str, set[str]]] = defaultdict(dict)
        for table in tables or []:
            self._data[table] = {}

    def get(self, table: str, key: str) -> dict[str, Any] | None:
        return self._data[table].get(key)

    def children(self, table: str, parent: str) -> list[str]:
        return list(self._children[table].get(parent, ()))

    def prefetch(self, keys: Mapping[str, Iterable[str]]) -> None:
        """Nothing to fetch: every value is in memory."""

    def put(self, table: str, key: str, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Set (or, with None, delete) a value; returns the value it replaced."""
        data = self._data[table]
        split = split_child(key)
        if value is None:
            old = data.pop(key, None)
            if split is not None and old is not None:
                siblings = self._children[table].get(split[0])
                if siblings is not None:
                    siblings.discard(split[1])
                    if not siblings:
                        del self._children[table][split[0]]
            return old
        old = data.get(key)
        data[key] = value
        if split is not None and old is None:
            self._children[table].setdefault(split[0], set()).add(split[1])
        return old

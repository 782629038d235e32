"""The state store (LMDB on disk, real): values, children, pruning by age, checkpoints, wipe."""

from __future__ import annotations

from pathlib import Path

from core.records import StateWrite
from streams.store import StateStore


def store(path: Path, **kwargs: int) -> StateStore:
    return StateStore(path, ["users", "messages"], expiring=["messages"], **kwargs)


def test_values_and_children_survive_reopening(tmp_path: Path) -> None:
    first = store(tmp_path)
    first.apply(
        [
            StateWrite("users", "acme/ann", {"last_sync_id": 3}, 0),
            StateWrite("users", "acme/ann#c-1", {"read_seq": 1}, 0),
            StateWrite("users", "acme/ann#c-2", {"read_seq": 2}, 0),
            StateWrite("users", "acme/anna#c-9", {"read_seq": 9}, 0),
            StateWrite("users", "acme/ann#c-3", {"read_seq": 3}, 0),
        ]
    )
    first.apply([StateWrite("users", "acme/ann#c-3", None, 0)])
    first.close()
    again = store(tmp_path)
    assert again.get("users", "acme/ann") == {"last_sync_id": 3}
    assert again.get("users", "acme/ann#c-3") is None
    # Only ann's own children: not anna's, not the deleted one.
    assert sorted(again.children("users", "acme/ann")) == ["c-1", "c-2"]
    assert again.children("users", "acme/bob") == []
    assert again.size() == 4


def test_a_bounded_cache_never_serves_a_stale_value(tmp_path: Path) -> None:
    small = store(tmp_path, cache_entries=10)
    for round_ in range(3):
        small.apply([StateWrite("users", f"u{n}", {"round": round_}, 0) for n in range(50)])
        assert all(small.get("users", f"u{n}") == {"round": round_} for n in range(50))
    small.restore("users", [(b"u7", None), (b"u8", b'{"round": 9}')])
    assert small.get("users", "u7") is None and small.get("users", "u8") == {"round": 9}


def test_pruning_removes_what_expired_and_costs_what_it_removes(tmp_path: Path) -> None:
    messages = store(tmp_path)
    messages.apply(
        [StateWrite("messages", f"m{n}", {"seq": n, "at": 1000.0 + n}, 0) for n in range(10)]
    )
    # m2 written again later (a recall updates its record): its new time counts.
    messages.apply([StateWrite("messages", "m2", {"seq": 2, "at": 5000.0}, 0)])
    assert messages.prune("messages", older_than=1005.0) == 4  # m0, m1, m3, m4
    assert [n for n in range(10) if messages.get("messages", f"m{n}")] == [2, 5, 6, 7, 8, 9]
    assert messages.prune("messages", older_than=1005.0) == 0
    assert messages.prune("messages", older_than=6000.0) == 6
    assert messages.size() == 0


def test_checkpoints_and_clearing_one_table(tmp_path: Path) -> None:
    state = store(tmp_path)
    assert state.checkpoint("users-changelog", 0) is None
    offsets = {("users-changelog", 0): 42, ("users-changelog", 1): 7, ("messages-changelog", 0): 9}
    state.set_checkpoints(offsets, {"users-changelog": "id-1", "messages-changelog": "id-2"})
    checkpoint = state.checkpoint("users-changelog", 0)
    assert checkpoint is not None and (checkpoint.offset, checkpoint.topic_id) == (42, "id-1")
    state.apply(
        [
            StateWrite("users", "acme/ann", {"last_sync_id": 3}, 0),
            StateWrite("messages", "m1", {"seq": 1, "at": 1000.0}, 0),
        ]
    )
    # A table the store cannot trust any more is emptied alone: the others (a global table's
    # known users, say) keep their values and checkpoints.
    state.clear("users", "users-changelog")
    assert state.get("users", "acme/ann") is None
    assert state.checkpoint("users-changelog", 1) is None
    assert state.get("messages", "m1") == {"seq": 1, "at": 1000.0}
    kept = state.checkpoint("messages-changelog", 0)
    assert kept is not None and kept.offset == 9
    state.clear("messages", "messages-changelog")
    assert state.size() == 0
    assert state.prune("messages", older_than=10_000.0) == 0  # its time index went with it

"""A page's byte budget (no I/O): which entries a page over it keeps, in which direction."""

from __future__ import annotations

from ingress.reads import MAX_PAGE_BYTES, _within_budget

ENTRY = MAX_PAGE_BYTES // 4 + 1  # four of them are over the budget


def test_scrolling_forward_keeps_the_oldest_entries() -> None:
    rows = list(range(10))
    kept, cut = _within_budget(rows, lambda _row: ENTRY, keep="first")
    assert (kept, cut) == ([0, 1, 2], True)


def test_scrolling_back_keeps_the_newest_entries() -> None:
    rows = list(range(10))
    kept, cut = _within_budget(rows, lambda _row: ENTRY, keep="last")
    assert (kept, cut) == ([7, 8, 9], True)


def test_a_page_within_the_budget_is_whole_and_one_entry_always_goes() -> None:
    assert _within_budget([1, 2, 3], lambda _row: 10, keep="first") == ([1, 2, 3], False)
    huge = 2 * MAX_PAGE_BYTES
    assert _within_budget([1, 2], lambda _row: huge, keep="last") == ([2], True)
    assert _within_budget([], lambda _row: huge, keep="first") == ([], False)

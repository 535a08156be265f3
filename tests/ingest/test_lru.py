"""LRU: the size cap of the ingest caches, which entries it lets go, and which it must keep."""

from __future__ import annotations

import pytest

from trackhouse.ingest.lru import LRU, SCAN_SLACK


def test_the_least_recently_used_entries_go_past_the_cap() -> None:
    lru: LRU[str, int] = LRU(3)
    for i in range(10):
        lru[f"k{i}"] = i
        assert len(lru) <= 3
    assert [k for k in (f"k{i}" for i in range(10)) if k in lru] == ["k7", "k8", "k9"]
    assert lru.evictions == 7


def test_reading_an_entry_makes_it_the_most_recent_and_in_does_not() -> None:
    lru: LRU[str, int] = LRU(2)
    lru["a"], lru["b"] = 1, 2
    assert lru["a"] == 1  # a is now newer than b
    assert "b" in lru  # does not touch b
    lru["c"] = 3
    assert "b" not in lru and lru.get("a") == 1 and lru.get("c") == 3
    assert lru.get("b") is None and lru.get("b", 0) == 0


def test_rewriting_an_entry_does_not_evict_and_setdefault_keeps_what_is_there() -> None:
    lru: LRU[str, int] = LRU(2)
    lru["a"], lru["b"] = 1, 2
    lru["a"] = 10
    assert len(lru) == 2 and lru.evictions == 0
    assert lru.setdefault("a", 99) == 10
    assert lru.setdefault("c", 3) == 3 and "b" not in lru  # a was used last
    assert lru.pop("c") == 3 and lru.pop("c") is None


def test_held_entries_stay_and_the_others_go_in_their_place() -> None:
    held = {"a", "b"}
    lru: LRU[str, int] = LRU(3, keep=held.__contains__)
    for key in ("a", "b", "c", "d", "e"):
        lru[key] = 0
    assert set(held) <= {k for k in "abcde" if k in lru}
    assert len(lru) == 3 and "e" in lru
    held.clear()  # no longer in use: the next write may let them go
    lru["f"] = 0
    assert len(lru) == 3 and "f" in lru and lru.evictions == 3


def test_the_entry_written_is_kept_even_when_every_other_one_is_held() -> None:
    lru: LRU[str, int] = LRU(2, keep=lambda key: key != "new")
    lru["a"], lru["b"] = 1, 2
    lru["new"] = 3
    assert len(lru) == 3 and lru.get("new") == 3 and lru.evictions == 0


def test_a_map_full_of_held_entries_grows_past_its_cap_and_shrinks_back() -> None:
    """More held entries than the cap allows: the map keeps them all (never loses state the store
    does not have), and each write examines a bounded number of them; once they are released,
    writes bring the map back to its cap."""
    held = {f"h{i}" for i in range(SCAN_SLACK * 3)}
    lru: LRU[str, int] = LRU(10, keep=held.__contains__)
    for key in sorted(held):
        lru[key] = 0
    assert len(lru) == len(held) and lru.evictions == 0
    held.clear()
    for i in range(len(lru)):
        lru[f"n{i}"] = 0
        if len(lru) == 10:
            break
    assert len(lru) == 10


def test_the_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="cap must be > 0"):
        LRU(0)

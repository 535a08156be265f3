"""A map with a size cap that lets its least recently used entries go: the ingest caches.

For caches of what the store holds (writer marks, run records): an entry let go is read
from the store again on its next use, so a cap bounds memory without changing answers.
Invariants:
- reading (`get`, `[]`) or writing an entry makes it the most recently used; `in` does not;
- writing a new entry into a full map first lets the least recently used entries go, so
  that it is back at `cap` with the new one, except those `keep` holds (state the store
  does not have yet): those stay, and are passed over as if just used, so the next trims
  look past them; the entry written is never the one let go;
- one write examines at most `excess + SCAN_SLACK` entries, none twice: held entries
  outnumbering the cap keep the map over it (by those entries), and many of them at the
  old end may keep it over for a few writes, rather than each write scanning all of them.

Single event loop; no locks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar, overload

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Held entries a trim may pass over beyond the ones it lets go (see the module docstring).
SCAN_SLACK = 64


class LRU(Generic[K, V]):
    def __init__(self, cap: int, keep: Callable[[K], bool] | None = None) -> None:
        if cap <= 0:
            raise ValueError(f"cap must be > 0, got {cap!r}")
        self.cap = cap
        self._keep = keep
        self._entries: OrderedDict[K, V] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __getitem__(self, key: K) -> V:
        value = self._entries[key]
        self._entries.move_to_end(key)
        return value

    @overload
    def get(self, key: K) -> V | None: ...
    @overload
    def get(self, key: K, default: V) -> V: ...

    def get(self, key: K, default: V | None = None) -> V | None:
        if key not in self._entries:
            return default
        return self[key]

    def __setitem__(self, key: K, value: V) -> None:
        if key not in self._entries:
            self._trim(self.cap - 1)  # room first: the entry written is never the one let go
        self._entries[key] = value
        self._entries.move_to_end(key)

    def setdefault(self, key: K, value: V) -> V:
        """The entry for `key`, made most recent; `value` is stored only when there is none."""
        if key in self._entries:
            return self[key]
        self[key] = value
        return value

    def pop(self, key: K) -> V | None:
        return self._entries.pop(key, None)

    def _trim(self, size: int) -> None:
        """Let the least recently used entries go until at most `size` are left (held ones stay)."""
        excess = len(self._entries) - size
        budget = min(len(self._entries), excess + SCAN_SLACK)  # each entry looked at once at most
        while excess > 0 and budget > 0:
            budget -= 1
            key = next(iter(self._entries))
            if self._keep is not None and self._keep(key):
                self._entries.move_to_end(key)  # in use: look past it next time
                continue
            del self._entries[key]
            self.evictions += 1
            excess -= 1

"""A collision-free map from string ids to dense rows, so that per-item state lives in numpy arrays.

Rows are handed out in first-seen order, so a row is a stable name for an id for as long as the id
is in the map (a counter column). ``capacity`` bounds the map: past it, :meth:`IdMap.rows` maps new
ids to ``-1`` and counts them as ``overflow`` instead of growing without end, unless the owner makes
room with :meth:`IdMap.evict`, whose rows the next new ids reuse (lowest row first).

>>> ids = IdMap(capacity=3)
>>> ids.rows(["a", "b", "a", "c", "d"]).tolist()
[0, 1, 0, 2, -1]
>>> ids.overflow, len(ids), ids.id_of(1)
(1, 3, 'b')
>>> ids.evict([0]); ids.rows(["e", "a"]).tolist(), ids.id_of(0), "a" in ids
([0, -1], 'e', False)
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["IdMap"]


class IdMap:
    """String id → dense row, bounded by ``capacity``; see the module docstring."""

    def __init__(self, *, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._rows: dict[str, int] = {}
        self._ids: list[str] = []  # by row; "" for an evicted row not yet reused
        self._free: list[int] = []  # evicted rows, reused lowest first (a heap)
        self.overflow = 0

    def __len__(self) -> int:
        """Rows handed out (the extent of per-row arrays), evicted ones included."""
        return len(self._ids)

    @property
    def used(self) -> int:
        """Ids currently mapped."""
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def row(self, key: str) -> int:
        """The row of ``key``, assigning the next one if it is new; -1 when the map is full."""
        row = self._rows.get(key)
        if row is not None:
            return row
        if not key:
            raise ValueError("ids must be non-empty strings ('' marks a freed row)")
        if self._free:
            row = heapq.heappop(self._free)
            self._rows[key] = row
            self._ids[row] = key
            return row
        if len(self._ids) >= self.capacity:
            self.overflow += 1
            return -1
        row = len(self._ids)
        self._rows[key] = row
        self._ids.append(key)
        return row

    def evict(self, rows: Iterable[int]) -> None:
        """Forget the ids at ``rows``; new ids reuse the rows (the owner clears their state first)."""
        for row in rows:
            key = self._ids[row]
            if key and self._rows.get(key) == row:
                del self._rows[key]
                self._ids[row] = ""
                heapq.heappush(self._free, row)

    def rows(self, keys: Iterable[str], *, new: list[str] | None = None) -> npt.NDArray[np.int64]:
        """Rows of many keys at once (new keys are assigned in order, and appended to ``new``)."""
        get, row = self._rows.get, self.row
        if new is None:
            return np.fromiter((r if (r := get(k)) is not None else row(k) for k in keys), dtype=np.int64)

        def assign(key: str) -> int:
            assigned = row(key)
            if assigned >= 0:
                new.append(key)
            return assigned

        return np.fromiter((r if (r := get(k)) is not None else assign(k) for k in keys), dtype=np.int64)

    def lookup(self, key: str) -> int:
        """The row of a known id, or -1 (never assigns)."""
        return self._rows.get(key, -1)

    def id_of(self, row: int) -> str:
        return self._ids[row]

    def ids(self) -> list[str]:
        """Ids by row ("" for an evicted row not yet reused)."""
        return list(self._ids)

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "ids": list(self._ids),
            "overflow": self.overflow,
            "free": sorted(self._free),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self._ids = list(state["ids"])
        self._rows = {key: row for row, key in enumerate(self._ids) if key}
        self.overflow = int(state["overflow"])
        self._free = list(state.get("free", []))  # a sorted list is a heap

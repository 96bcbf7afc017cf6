"""Item id → embedding row for a table that grows with the catalogue and forgets stale items.

Monolith's lesson for streaming recommenders: the catalogue is open (new items arrive all day) and
hashing ids into a fixed table makes them collide, so the map is **collision-free** (a dict), the
table keeps **spare capacity** (it grows by half when full, so growth is rare and amortised) up to a
hard ``capacity``, and past that the **stalest rows are evicted** (least recently trained; an
evicted row is reinitialised for its new item). Row 0 is padding and never holds an item.

Each call that changes the map says which rows changed, because a changed row must be reinitialised
in the model and published in the next sparse delta with its new item id.

>>> rows = ItemRows(capacity=3)
>>> rows.assign(["a", "b", "a"], step=1).rows.tolist()
[1, 2, 1]
>>> change = rows.assign(["c", "d"], step=2)  # full: "d" takes the stalest row, "a"'s or "b"'s
>>> change.rows.tolist(), change.new_rows.tolist(), change.evicted
([3, 1], [3, 1], ['a'])
>>> rows.lookup(["a", "d", "zzz"]).tolist()
[0, 1, 0]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Assignment", "ItemRows"]

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Assignment:
    """What :meth:`ItemRows.assign` did: each id's row, rows newly (re)assigned, ids evicted."""

    rows: IntArray
    new_rows: IntArray
    evicted: list[str]


class ItemRows:
    """Collision-free id → row map with spare capacity and least-recently-used eviction."""

    def __init__(self, *, capacity: int, spare: float = 0.5, initial_rows: int = 1024) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.spare = spare
        self._row: dict[str, int] = {}
        self._ids: list[str | None] = [None]  # row 0: padding
        # Rows allocated in the embedding table (padding included); grows by `spare` when full.
        self.allocated = min(capacity, initial_rows) + 1
        self.last_used = np.zeros(self.allocated, dtype=np.int64)  # training step that last touched a row

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._row

    @property
    def used(self) -> int:
        """Rows handed out so far (1..used hold items; the rest of ``allocated`` is spare)."""
        return len(self._ids) - 1

    def id_of(self, row: int) -> str | None:
        return self._ids[row] if row < len(self._ids) else None

    def ids(self) -> list[str | None]:
        """Item id of every allocated row (``None`` for padding and unused rows)."""
        return self._ids + [None] * (self.allocated - len(self._ids))

    def lookup(self, item_ids: Sequence[str]) -> IntArray:
        """Rows of known ids, 0 (padding) for unknown ones; never assigns."""
        get = self._row.get
        return np.fromiter((get(item, 0) for item in item_ids), dtype=np.int64, count=len(item_ids))

    def assign(self, item_ids: Sequence[str], *, step: int) -> Assignment:
        """Rows for ``item_ids``, assigning new ones (growing, then evicting the stalest rows)."""
        protected = {row for item in item_ids if (row := self._row.get(item)) is not None}
        rows = np.empty(len(item_ids), dtype=np.int64)
        new_rows: list[int] = []
        evicted: list[str] = []
        candidates: list[int] = []  # eviction order, computed once per call and only when full
        for index, item in enumerate(item_ids):
            row = self._row.get(item)
            if row is None:
                row = self._new_row(protected, evicted, candidates)
                self._row[item] = row
                self._ids[row] = item
                protected.add(row)
                new_rows.append(row)
            rows[index] = row
        self.touch(rows, step=step)
        return Assignment(rows, np.asarray(new_rows, dtype=np.int64), evicted)

    def touch(self, rows: IntArray, *, step: int) -> None:
        """Mark rows as used at ``step`` (training on them keeps them from eviction)."""
        self.last_used[rows] = step

    def _new_row(self, protected: set[int], evicted: list[str], candidates: list[int]) -> int:
        if len(self._ids) < self.allocated:
            self._ids.append(None)
            return len(self._ids) - 1
        if self.allocated - 1 < self.capacity:
            grown = min(self.capacity, max(self.allocated, int((self.allocated - 1) * (1 + self.spare)))) + 1
            self.last_used = np.concatenate([self.last_used, np.zeros(grown - self.allocated, np.int64)])
            self.allocated = grown
            self._ids.append(None)
            return len(self._ids) - 1
        # Full: evict the least recently used row that this call does not need.
        if not candidates:
            order = np.argsort(self.last_used[1:], kind="stable") + 1
            candidates.extend(reversed(order.tolist()))  # pop() takes the stalest
        while candidates:
            row = candidates.pop()
            if row not in protected:
                old = self._ids[row]
                assert old is not None
                del self._row[old]
                evicted.append(old)
                return int(row)
        raise ValueError(f"one call needs more than capacity={self.capacity} distinct items")

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "spare": self.spare,
            "allocated": self.allocated,
            "ids": list(self._ids),
            "last_used": self.last_used.copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self.spare = float(state["spare"])
        self.allocated = int(state["allocated"])
        self._ids = list(state["ids"])
        self._row = {item: row for row, item in enumerate(self._ids) if item is not None}
        self.last_used = np.asarray(state["last_used"], dtype=np.int64).copy()

    @classmethod
    def from_ids(cls, ids: Sequence[str | None], *, capacity: int, spare: float = 0.5) -> ItemRows:
        """Rebuild a map from the row → id list a model snapshot carries."""
        rows = cls(capacity=capacity, spare=spare)
        used = len(ids)
        while used and ids[used - 1] is None:
            used -= 1
        rows.load_state_dict(
            {
                "capacity": capacity,
                "spare": spare,
                "allocated": len(ids),
                "ids": list(ids[:used]) or [None],
                "last_used": np.zeros(len(ids), dtype=np.int64),
            }
        )
        return rows

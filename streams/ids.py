"""A collision-free map from string ids to dense rows, so that per-item state lives in numpy arrays.

Rows are handed out in first-seen order and never reused, so a row is a stable name for an id for
the life of the state (a model's embedding table, a counter column). ``capacity`` bounds the map:
past it, :meth:`IdMap.rows` maps new ids to ``-1`` and counts them as ``overflow`` instead of
growing without end.

>>> ids = IdMap(capacity=3)
>>> ids.rows(["a", "b", "a", "c", "d"]).tolist()
[0, 1, 0, 2, -1]
>>> ids.overflow, len(ids), ids.id_of(1)
(1, 3, 'b')
"""

from __future__ import annotations

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
        self._ids: list[str] = []
        self.overflow = 0

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def row(self, key: str) -> int:
        """The row of ``key``, assigning the next one if it is new; -1 when the map is full."""
        row = self._rows.get(key)
        if row is not None:
            return row
        if len(self._ids) >= self.capacity:
            self.overflow += 1
            return -1
        row = len(self._ids)
        self._rows[key] = row
        self._ids.append(key)
        return row

    def rows(self, keys: Iterable[str]) -> npt.NDArray[np.int64]:
        """Rows of many keys at once (new keys are assigned in order)."""
        get, row = self._rows.get, self.row
        return np.fromiter((r if (r := get(k)) is not None else row(k) for k in keys), dtype=np.int64)

    def lookup(self, key: str) -> int:
        """The row of a known id, or -1 (never assigns)."""
        return self._rows.get(key, -1)

    def id_of(self, row: int) -> str:
        return self._ids[row]

    def ids(self) -> list[str]:
        return list(self._ids)

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "ids": list(self._ids), "overflow": self.overflow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self._ids = list(state["ids"])
        self._rows = {key: row for row, key in enumerate(self._ids)}
        self.overflow = int(state["overflow"])

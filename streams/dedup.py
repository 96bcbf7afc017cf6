"""Remembering recent event ids, so that a re-sent event is not counted twice."""

from __future__ import annotations

from typing import Any

__all__ = ["RecentIds"]


class RecentIds:
    """A bounded set of the most recent ids: two generations of ``capacity // 2`` each.

    Membership looks in both; when the young generation fills up, it becomes the old one and the old
    one is dropped. So the set always remembers at least the last ``capacity // 2`` ids and never
    more than ``capacity``, with O(1) insert, lookup and eviction and no per-id bookkeeping.
    """

    def __init__(self, capacity: int) -> None:
        self._half = max(capacity // 2, 1) if capacity > 0 else 0
        self._young: set[str] = set()
        self._old: set[str] = set()

    def __contains__(self, item: str) -> bool:
        return item in self._young or item in self._old

    def add(self, item: str) -> None:
        if not self._half:
            return
        self._young.add(item)
        if len(self._young) >= self._half:
            self._old, self._young = self._young, set()

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def state_dict(self) -> dict[str, Any]:
        return {"half": self._half, "young": list(self._young), "old": list(self._old)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._half = int(state["half"])
        self._young = set(state["young"])
        self._old = set(state["old"])

"""Per-user recent histories: the last ``max_len`` events of each user, oldest first.

A user's events are keyed by ``user_id`` and so live in one partition, whose order is the same on
every replay: appending in arrival order gives the same history after a crash and replay as in an
uninterrupted run. Memory is bounded twice: ``max_len`` events per user, and ``max_users`` users, the
least recently active evicted first (exactness across replays holds while under that cap, since which
user is evicted first can depend on how partitions interleave).

>>> h = UserHistories(max_len=2, max_users=10)
>>> h.append(["u", "u", "u"], ["a", "b", "c"], ["view", "view", "click"], [1, 2, 3])
>>> h.items("u")
['b', 'c']
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from itertools import islice
from typing import Any, NamedTuple

__all__ = ["HistoryEntry", "UserHistories"]


class HistoryEntry(NamedTuple):
    item_id: str
    type: str
    ts_ms: int


class UserHistories:
    """Bounded recent history per user; see the module docstring."""

    def __init__(self, *, max_len: int = 50, max_users: int = 1_000_000) -> None:
        if max_len < 1 or max_users < 1:
            raise ValueError("max_len and max_users must be at least 1")
        self.max_len = max_len
        self.max_users = max_users
        # Plain tuples inside (a NamedTuple per event cost ~10% of the worker's batch time);
        # readers get HistoryEntry values.
        self._users: OrderedDict[str, deque[tuple[str, str, int]]] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._users)

    def append(
        self, users: Sequence[str], items: Sequence[str], types: Sequence[str], ts_ms: Sequence[int]
    ) -> None:
        """Append a batch of events, in arrival order."""
        table, max_len = self._users, self.max_len
        for user, item, kind, ts in zip(users, items, types, ts_ms, strict=True):
            history = table.get(user)
            if history is None:
                history = table[user] = deque(maxlen=max_len)
                if len(table) > self.max_users:
                    table.popitem(last=False)
                    self.evicted += 1
            else:
                table.move_to_end(user)
            history.append((item, kind, ts))

    def get(self, user: str) -> list[HistoryEntry]:
        """The user's recent events, oldest first (empty for an unknown user)."""
        return [HistoryEntry(*entry) for entry in self._users.get(user, ())]

    def items(self, user: str) -> list[str]:
        return [entry[0] for entry in self._users.get(user, ())]

    def recent_items(self, user: str, n: int) -> list[str]:
        """The user's last ``n`` items, newest first (cheap: no copy of the whole history)."""
        history = self._users.get(user)
        return [entry[0] for entry in islice(reversed(history), n)] if history else []

    def expire(self, *, before_ms: int) -> int:
        """Forget users whose newest event is older than ``before_ms`` (event time). Returns how many.

        Opt-in (``FRESHREC_STREAM__USER_TTL_S``): which users are gone depends on when the sweep runs,
        so histories stop being exactly replay-stable for users near the cut-off.
        """
        cold = [user for user, history in self._users.items() if history and history[-1][2] < before_ms]
        for user in cold:
            del self._users[user]
        self.evicted += len(cold)
        return len(cold)

    def state_dict(self) -> dict[str, Any]:
        return {
            "max_len": self.max_len,
            "max_users": self.max_users,
            "evicted": self.evicted,
            "users": [(user, list(history)) for user, history in self._users.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.max_len = int(state["max_len"])
        self.max_users = int(state["max_users"])
        self.evicted = int(state["evicted"])
        self._users = OrderedDict(
            (user, deque((tuple(entry) for entry in entries), maxlen=self.max_len))
            for user, entries in state["users"]
        )

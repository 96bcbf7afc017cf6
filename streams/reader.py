"""A typed, in-process read API over running stream workers' state, safe while they write.

Every read takes the lock of the worker that keeps that part of the state (its role: counters,
sequences or heads), which the worker holds while it applies a batch, so a reader sees whole batches
only, never half of one. Reads are short (an ``argpartition`` over one row of counts at most), so they
do not hold up ingestion.

Used by serving as ``reader = StateReader(worker)``, then ``reader.popular(10, kind="decayed")``,
``reader.history("user-1")``, ``reader.related(recent, 50, exclude=seen)``.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from freshrec.errors import ConfigError
from streams.histories import HistoryEntry
from streams.worker import StreamWorker

__all__ = ["ItemCounts", "StateReader"]


@dataclass(frozen=True, slots=True)
class ItemCounts:
    """One item's counters at the newest event time the worker has seen."""

    item_id: str
    total: int
    decayed: float
    windowed: dict[int, int]  # window in seconds -> count


class StateReader:
    """Read the counters, histories and heads of ``workers`` from any thread.

    One worker keeping every role, or one worker per role (the first that keeps a role serves it).
    """

    def __init__(self, *workers: StreamWorker) -> None:
        if not workers:
            raise ValueError("a StateReader needs at least one worker")
        self._by_role: dict[str, StreamWorker] = {}
        for worker in workers:
            for role in worker.roles:
                self._by_role.setdefault(role, worker)

    def _keeper(self, role: str) -> StreamWorker:
        try:
            return self._by_role[role]
        except KeyError:
            raise ConfigError(f"no stream worker here keeps the {role!r} role") from None

    def popular(
        self, k: int, *, kind: str | int = "total", event_type: str | None = None
    ) -> list[tuple[str, float]]:
        """Top-``k`` items by all-time (``"total"``), ``"decayed"`` or windowed (seconds) counts."""
        with (worker := self._keeper("counters")).lock:
            return worker.state.counters.top(k, kind=kind, event_type=event_type)

    def counts(self, item_id: str, *, event_type: str | None = None) -> ItemCounts:
        with (worker := self._keeper("counters")).lock:
            counters = worker.state.counters
            return ItemCounts(
                item_id=item_id,
                total=counters.total(item_id, event_type),
                decayed=counters.decayed(item_id, event_type),
                windowed={w: counters.windowed(item_id, w, event_type) for w in counters.config.windows_s},
            )

    def history(self, user_id: str) -> list[HistoryEntry]:
        """The user's recent events, oldest first; empty for an unknown user."""
        with (worker := self._keeper("sequences")).lock:
            return worker.state.histories.get(user_id)

    def neighbours(self, item_id: str, k: int = 10) -> list[tuple[str, float]]:
        """Items most often seen near ``item_id`` in users' recent windows."""
        with (worker := self._keeper("sequences")).lock:
            return worker.state.cooccurrence.neighbours(item_id, k)

    def newest(self, n: int) -> list[str]:
        """The ``n`` items the stream saw first most recently (new arrivals), newest first."""
        with (worker := self._keeper("counters")).lock:
            return worker.state.counters.newest(n)

    def related(self, recent: Sequence[str], n: int, *, exclude: set[str]) -> list[tuple[str, float]]:
        """Top-``n`` items by summed co-occurrence with ``recent`` items, ``exclude`` left out."""
        with (worker := self._keeper("sequences")).lock:
            scores = worker.state.cooccurrence.score(recent, exclude=exclude)
        return heapq.nlargest(n, scores.items(), key=lambda kv: (kv[1], kv[0]))

    def ctr_moments(self, items: Sequence[str]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """CTR posterior means and variances of many items under one lock, as arrays."""
        with (worker := self._keeper("counters")).lock:
            return worker.state.clicks.moments(items)

    def scores(self, user_id: str, items: Sequence[str], head: str) -> list[float] | None:
        """A head's scores for many items (None when no worker here keeps that head)."""
        worker = self._by_role.get("heads")
        if worker is None or head not in worker.state.heads:
            return None
        with worker.lock:
            predict = worker.state.heads[head].predict_one
            return [predict(user_id, item) for item in items]

    def rank(self, user_id: str, items: Sequence[str], head: str) -> list[str] | None:
        """``items`` in a head's order for the user (ties keep their order; None when no worker here
        keeps that head)."""
        worker = self._by_role.get("heads")
        if worker is None or head not in worker.state.heads:
            return None
        with worker.lock:
            return worker.state.heads[head].rank(user_id, items)

    def sizes(self) -> dict[str, int]:
        """What the state holds, for ``/metrics``: items counted, counter bytes, users with a history,
        items with co-occurrence lists, and each head's entries."""
        out: dict[str, int] = {}
        if (counters := self._by_role.get("counters")) is not None:
            with counters.lock:
                out["counter_items"] = counters.state.counters.items.used
                out["counter_bytes"] = counters.state.counters.nbytes()
        if (sequences := self._by_role.get("sequences")) is not None:
            with sequences.lock:
                out["history_users"] = len(sequences.state.histories)
                out["cooccurrence_items"] = len(sequences.state.cooccurrence)
        if (heads := self._by_role.get("heads")) is not None:
            with heads.lock:
                out |= {f"head_{name}_entries": head.size for name, head in heads.state.heads.items()}
        return out

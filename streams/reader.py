"""A typed, in-process read API over a running stream worker's state, safe while it writes.

Every read takes the worker's lock, which the worker holds while it applies a batch, so a reader sees
whole batches only, never half of one. Reads are short (an ``argpartition`` over one row of counts at
most), so they do not hold up ingestion.

>>> # reader = StateReader(worker)
>>> # reader.popular(10, kind="decayed"), reader.history("user-1")
"""

from __future__ import annotations

from dataclasses import dataclass

from streams.clicks import CtrPosterior
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
    """Read the counters and histories of ``worker`` from any thread."""

    def __init__(self, worker: StreamWorker) -> None:
        self._worker = worker

    def popular(
        self, k: int, *, kind: str | int = "total", event_type: str | None = None
    ) -> list[tuple[str, float]]:
        """Top-``k`` items by all-time (``"total"``), ``"decayed"`` or windowed (seconds) counts."""
        with self._worker.lock:
            return self._worker.state.counters.top(k, kind=kind, event_type=event_type)

    def counts(self, item_id: str, *, event_type: str | None = None) -> ItemCounts:
        with self._worker.lock:
            counters = self._worker.state.counters
            return ItemCounts(
                item_id=item_id,
                total=counters.total(item_id, event_type),
                decayed=counters.decayed(item_id, event_type),
                windowed={w: counters.windowed(item_id, w, event_type) for w in counters.config.windows_s},
            )

    def history(self, user_id: str) -> list[HistoryEntry]:
        """The user's recent events, oldest first; empty for an unknown user."""
        with self._worker.lock:
            return self._worker.state.histories.get(user_id)

    def neighbours(self, item_id: str, k: int = 10) -> list[tuple[str, float]]:
        """Items most often seen near ``item_id`` in users' recent windows."""
        with self._worker.lock:
            return self._worker.state.cooccurrence.neighbours(item_id, k)

    def ctr(self, item_id: str) -> CtrPosterior:
        """The item's click-through posterior: impressions, attributed clicks, mean and variance."""
        with self._worker.lock:
            return self._worker.state.clicks.posterior(item_id)

    def score(self, user_id: str, item_id: str, head: str) -> tuple[float, float]:
        """A head's score for the pair and its uncertainty in [0, 1]."""
        with self._worker.lock:
            model = self._worker.state.heads[head]
            return model.predict_one(user_id, item_id), model.uncertainty_one(user_id, item_id)

    def offsets(self) -> dict[tuple[str, int], int]:
        """The next offset per (topic, partition) the state reflects."""
        with self._worker.lock:
            return dict(self._worker.state.offsets)

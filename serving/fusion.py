"""Learned fusion of the candidate sources: an online softmax over per-source ranks and scores.

A request gathers candidates from several sources (the transformer's top-n, co-occurrence with the
user's recent items, popularity) and the MF head scores the best of them. A fixed reciprocal-rank
fusion weighs every source alike, so a weak source pulls the strong one's items down: replayed on
ml-100k, the fused list scored about two thirds of co-occurrence alone. Here each candidate is
described by what each source says of it (:func:`candidate_features`) and ranked by a linear score
``x · w`` whose weights are learned online, from the stream, in the serving process itself:

- **Label**: the user's next event. A request keeps its candidates' features (:class:`PendingRequests`,
  bounded); when the user's history later shows the event that followed the request, that item is
  the positive and the other candidates the negatives.
- **Model**: a conditional logit (softmax over the request's candidates, the listwise loss of "which
  candidate did the user take next"), fitted by AdaGrad. An event whose item was not a candidate
  teaches nothing about how to order the candidates, and is skipped.
- **No leak**: a request is scored with the weights as they are, and its label can only arrive with a
  later event, so it is learned after it was scored (test-then-learn, as a replay scores it).

The weights start at a reciprocal-rank-like prior (each source's log-rank and presence weigh 1), so
an untrained replica ranks about as the fixed fusion did. Cost per request: one ``(m, d)`` feature
matrix and one product (m ≤ a few hundred candidates, d = 16); learning is the same size.

>>> import numpy as np
>>> fusion = OnlineFusion(learning_rate=0.5)
>>> lists = {"cooccurrence": [("a", 3.0), ("b", 1.0)], "popular": [("b", 9.0), ("c", 5.0)]}
>>> names, x, best = candidate_features(lists)
>>> names, best
(['a', 'b', 'c'], ['cooccurrence', 'popular', 'popular'])
>>> before = fusion.score(x)
>>> fusion.learn_one(x, names.index("c"))
>>> bool(fusion.score(x)[2] - fusion.score(x)[0] > before[2] - before[0])
True
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "FEATURES",
    "SOURCES",
    "LearnedFusion",
    "OnlineFusion",
    "PendingRequests",
    "candidate_features",
    "next_event",
]

logger = logging.getLogger(__name__)

SOURCES: Final = ("transformer", "cooccurrence", "popular")
_PER_SOURCE: Final = ("present", "reciprocal_rank", "log_rank", "score", "log_score")
FEATURES: Final = (*(f"{s}_{f}" for s in SOURCES for f in _PER_SOURCE), "mf")
MF: Final = len(FEATURES) - 1  # the MF head's column: its z-scored score over the shortlist, else 0
FloatArray = npt.NDArray[np.float64]
Float32Array = npt.NDArray[np.float32]


def candidate_features(
    lists: Mapping[str, Sequence[tuple[str, float]]],
) -> tuple[list[str], Float32Array, list[str]]:
    """The union of the sources' candidates, their ``(m, d)`` features, and each one's best source.

    Per source (columns in :data:`FEATURES` order): whether it listed the item, ``1 / (1 + rank)``,
    ``1 - log(1 + rank) / log(1 + len)`` (1 at the top, 0 at the list's end), its score scaled to
    [0, 1] within the list (scores of different sources are on different scales), and the score
    itself, log-compressed (one co-occurrence is weaker evidence than thirty). The MF column
    is left at 0 for the caller to fill. An item's best source is the one that ranked it best (ties:
    the earlier source in :data:`SOURCES`), as the response's ``source`` reports it.
    """
    index: dict[str, int] = {}
    columns: list[tuple[int, list[int], list[float]]] = []
    for j, source in enumerate(SOURCES):
        ranked = lists.get(source)
        if not ranked:
            continue
        rows = [index.setdefault(item, len(index)) for item, _ in ranked]
        columns.append((j, rows, [score for _, score in ranked]))
    m = len(index)
    x = np.zeros((m, len(FEATURES)), dtype=np.float32)
    if not m:
        return [], x, []
    for j, rows, scores in columns:
        at = np.asarray(rows, dtype=np.int64)
        n = len(rows)
        rank = np.arange(n, dtype=np.float32)
        values = np.asarray(scores, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        base = j * len(_PER_SOURCE)
        x[at, base] = 1.0
        x[at, base + 1] = 1.0 / (1.0 + rank)
        x[at, base + 2] = 1.0 - np.log1p(rank) / math.log1p(n) if n > 1 else 1.0
        x[at, base + 3] = (values - low) / (high - low) if high > low else 1.0
        x[at, base + 4] = np.sign(values) * np.log1p(np.abs(values))  # how strong, not only how high
    reciprocal = x[:, 1 : MF : len(_PER_SOURCE)]  # (m, sources): 0 where a source did not list it
    best = [SOURCES[j] for j in reciprocal.argmax(axis=1).tolist()]
    return list(index), x, best


def _mf_column(x: Float32Array, rows: npt.NDArray[np.int64], scores: Sequence[float]) -> None:
    """Write the MF head's scores of ``rows`` into ``x``'s MF column, z-scored over those rows (a
    head's scale drifts as it learns; its order within the request is what carries over)."""
    values = np.asarray(scores, dtype=np.float32)
    if len(values) > 1:
        sd = float(values.std())
        x[rows, MF] = (values - values.mean()) / sd if sd > 0 else 0.0


def _prior() -> FloatArray:
    """Start weights: each source's presence and log-rank weigh 1 (about what RRF ranks by)."""
    w = np.zeros(len(FEATURES))
    for j in range(len(SOURCES)):
        w[j * len(_PER_SOURCE)] = 1.0
        w[j * len(_PER_SOURCE) + 2] = 1.0
    w[MF] = 0.1
    return w


class OnlineFusion:
    """A conditional logit over a request's candidates, learned one labelled request at a time.

    ``score`` is safe from any thread; ``learn_one`` swaps in new weight arrays (a reader sees the old
    or the new weights, never half an update), and learners are serialised by a lock.
    """

    def __init__(self, *, learning_rate: float = 0.2, l2: float = 1e-4) -> None:
        self.learning_rate = learning_rate
        self.l2 = l2
        self.weights: FloatArray = _prior()
        self._squares: FloatArray = np.full(len(FEATURES), 1e-6)  # AdaGrad's sum of squared gradients
        self.learned = 0  # labelled requests learned
        self._lock = threading.Lock()

    def score(self, x: Float32Array) -> FloatArray:
        """``(m,)`` scores of the ``(m, d)`` candidates: higher ranks first."""
        scores: FloatArray = x @ self.weights
        return scores

    def learn_one(self, x: Float32Array, positive: int) -> None:
        """One step of the softmax cross-entropy of candidate ``positive`` among the rows of ``x``."""
        with self._lock:
            w = self.weights
            logits = x @ w  # (m,)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            gradient = p @ x - x[positive] + self.l2 * w  # (d,)
            squares = self._squares + gradient * gradient
            self.weights = w - self.learning_rate * gradient / np.sqrt(squares)
            self._squares = squares
            self.learned += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "features": list(FEATURES),
            "weights": self.weights.tolist(),
            "squares": self._squares.tolist(),
            "learned": self.learned,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["features"]) != list(FEATURES):
            raise ValueError(f"fusion state has features {state['features']}, this code uses {FEATURES}")
        with self._lock:
            self.weights = np.asarray(state["weights"], dtype=np.float64)
            self._squares = np.asarray(state["squares"], dtype=np.float64)
            self.learned = int(state["learned"])

    def explain(self) -> dict[str, float]:
        """The weights by feature name (for logs and docs)."""
        return dict(zip(FEATURES, self.weights.round(4).tolist(), strict=True))


@dataclass(frozen=True, slots=True)
class _Pending:
    names: tuple[str, ...]
    x: Float32Array
    last: tuple[str, str, int] | None  # the newest history entry the request saw


def next_event(history: Sequence[tuple[str, str, int]], last: tuple[str, str, int] | None) -> str | None:
    """The item of the first history entry after ``last`` (the newest entry a request saw), or None
    when nothing came after it, or when ``last`` has left the bounded history (too much happened
    since to know which event came first)."""
    if last is None:
        return history[0][0] if history else None
    for position in range(len(history) - 1, -1, -1):
        if history[position] == last:
            return history[position + 1][0] if position + 1 < len(history) else None
    return None


class PendingRequests:
    """Each user's last request, kept until the user's next event labels it; the least recently
    requesting users are dropped beyond ``capacity`` (memory stays bounded, learning becomes a sample)."""

    def __init__(self, *, capacity: int) -> None:
        self.capacity = capacity
        self._users: OrderedDict[str, _Pending] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._users)

    def keep(
        self, user_id: str, names: Sequence[str], x: Float32Array, last: tuple[str, str, int] | None
    ) -> None:
        if self.capacity <= 0 or not len(names):
            return
        with self._lock:
            self._users[user_id] = _Pending(tuple(names), x, last)
            self._users.move_to_end(user_id)
            while len(self._users) > self.capacity:
                self._users.popitem(last=False)

    def label(self, user_id: str, history: Sequence[tuple[str, str, int]]) -> tuple[Float32Array, int] | None:
        """The user's pending request as a labelled example, once ``history`` shows the event after
        it: its features and the row of that event's item (None when the item was not a candidate,
        or nothing happened yet). A labelled request is consumed."""
        with self._lock:
            pending = self._users.get(user_id)
            if pending is None:
                return None
            item = next_event(history, pending.last)
            if item is None:
                return None
            del self._users[user_id]
        try:
            return pending.x, pending.names.index(item)
        except ValueError:
            return None


class LearnedFusion:
    """What a serving process runs per request: learn from the user's previous request if its label
    has arrived, then rank this request's candidates, then keep them until their own label comes."""

    def __init__(self, *, learning_rate: float = 0.2, pending_users: int = 4_096) -> None:
        self.model = OnlineFusion(learning_rate=learning_rate)
        self.pending = PendingRequests(capacity=pending_users)

    def rank(
        self,
        user_id: str,
        lists: Mapping[str, Sequence[tuple[str, float]]],
        history: Sequence[tuple[str, str, int]],
        *,
        head: Callable[[list[str]], Sequence[float] | None] | None = None,
        shortlist: int = 50,
    ) -> tuple[list[tuple[str, float]], dict[str, str]]:
        """The candidates of ``lists`` best first with their scores, and each one's best source.

        ``history`` is the user's recent events (oldest first) as the stream state has them *now*:
        it labels the user's previous request, never this one. ``head`` (the MF head's scores of
        some items, or None) re-scores the ``shortlist`` best."""
        model = self.model
        if (example := self.pending.label(user_id, history)) is not None:
            model.learn_one(*example)
        names, x, best = candidate_features(lists)
        if not names:
            return [], {}
        scores = model.score(x)
        if head is not None:
            top = np.argsort(-scores, kind="stable")[:shortlist]
            head_scores = head([names[i] for i in top.tolist()])
            if head_scores is not None:
                _mf_column(x, top, head_scores)
                scores = model.score(x)
        self.pending.keep(user_id, names, x, history[-1] if history else None)
        values = scores.tolist()
        order = sorted(range(len(names)), key=lambda i: (-values[i], names[i]))
        return [(names[i], values[i]) for i in order], dict(zip(names, best, strict=True))

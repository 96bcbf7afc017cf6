"""Prequential (test-then-train) evaluation of the online recommenders, through Kafka.

The dataset is replayed into a one-partition topic of its own (one partition keeps the global time
order the protocol needs), consumed back, and for every event, **before** anything learns from it,
each method ranks the whole catalogue seen so far for that user, minus the items the user already
interacted with. A hit is the event's item in the top ``k``; NDCG@k credits it ``1 / log2(rank + 2)``.
Then every method learns the event. An item never seen before cannot be recommended: a miss for all.

Methods: ``popularity`` (all-time counts), ``decayed_popularity`` (forward decay), ``cooccurrence``
(summed co-occurrence with the user's recent items), ``mf`` (river BiasedMF regressing stars, the
stream worker's head as configured by default), ``mf_implicit`` (the same head on implicit feedback:
each event a positive, four uniformly sampled negatives), and ``blend`` (the sum of the min-max
normalised scores of decayed popularity, co-occurrence and ``mf_implicit``).
Ties are broken the same way for every method, by first appearance of the item in the stream, so
that no method gets a free ride from many equal scores.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson
from confluent_kafka import Consumer

from freshrec.events import Event, parse_event
from freshrec.settings import Settings
from freshrec.store import Store
from learners.mf import MatrixFactorisationHead
from streams import replay
from streams.cooccurrence import CoOccurrence
from streams.ids import IdMap

__all__ = ["METHODS", "MethodResult", "PrequentialEvaluator", "run"]

logger = logging.getLogger(__name__)

METHODS: Final = ("popularity", "decayed_popularity", "cooccurrence", "mf", "mf_implicit", "blend")
FloatArray = npt.NDArray[np.float64]
_EVAL_COLUMNS: Final = (
    "run_id", "dataset", "protocol", "method", "events", "k", "hr", "ndcg", "params",
    "started_at", "finished_at",
)  # fmt: skip


@dataclass(slots=True)
class MethodResult:
    hits: int = 0
    ndcg: float = 0.0

    def as_dict(self, events: int) -> dict[str, float]:
        return {
            "hr@10": self.hits / events if events else 0.0,
            "ndcg@10": self.ndcg / events if events else 0.0,
        }


class PrequentialEvaluator:
    """Test-then-train over a stream of events; see the module docstring."""

    def __init__(
        self,
        *,
        k: int = 10,
        half_life_s: float = 30 * 86_400.0,
        window: int = 5,
        seed: int = 0,
    ) -> None:
        self.k = k
        self.half_life_s = half_life_s
        self.window = window
        self.events = 0
        self.results = {method: MethodResult() for method in METHODS}
        self._items = IdMap(capacity=10_000_000)
        self._capacity = 1024
        self._counts: FloatArray = np.zeros(self._capacity)
        self._forward: FloatArray = np.zeros(self._capacity)
        self._biases: FloatArray = np.zeros(self._capacity)
        self._factors: FloatArray = np.zeros((self._capacity, 16))
        self._landmark_ms: int | None = None
        self._seen: dict[str, list[int]] = {}
        self._recent: dict[str, list[str]] = {}
        self._cooccurrence = CoOccurrence(window=window, max_neighbours=100)
        self._mf = MatrixFactorisationHead(n_factors=16, seed=seed)
        # The same head trained on implicit feedback: every event a positive, four negatives drawn
        # uniformly from the items seen so far.
        self._mf_implicit = MatrixFactorisationHead(
            n_factors=16, seed=seed, negatives=4, uniform_negatives=True, learning_rate=0.05
        )
        self._implicit_factors: FloatArray = np.zeros((self._capacity, 16))
        self._implicit_biases: FloatArray = np.zeros(self._capacity)

    def step(self, event: Event) -> None:
        """Score the event with every method, then let every method learn it."""
        self.events += 1
        target = self._items.lookup(event.item_id)
        if target >= 0:
            self._test(event, target)
        self._learn(event)

    # ------------------------------------------------------------------ test

    def _test(self, event: Event, target: int) -> None:
        n = len(self._items)
        seen = self._seen.get(event.user_id, [])
        if target in seen:
            return  # a re-interaction with a seen item cannot be recommended: scored as a miss
        scores = {
            "popularity": self._counts[:n].copy(),
            "decayed_popularity": self._forward[:n] * self._decay_to(event.ts_ms),
            "cooccurrence": self._cooccurrence_scores(event.user_id, n),
            "mf": self._mf_scores(self._mf, self._factors, self._biases, event.user_id, n),
            "mf_implicit": self._mf_scores(
                self._mf_implicit, self._implicit_factors, self._implicit_biases, event.user_id, n
            ),
        }
        scores["blend"] = sum(
            (_minmax(scores[m]) for m in ("decayed_popularity", "cooccurrence", "mf_implicit")),
            start=np.zeros(n),
        )
        for method, values in scores.items():
            if seen:
                values[seen] = -np.inf
            rank = _rank_of(values, target)
            if rank < self.k:
                result = self.results[method]
                result.hits += 1
                result.ndcg += 1.0 / math.log2(rank + 2)

    def _cooccurrence_scores(self, user_id: str, n: int) -> FloatArray:
        values = np.zeros(n)
        for item, score in self._cooccurrence.score(self._recent.get(user_id, [])[-self.window :]).items():
            row = self._items.lookup(item)
            if 0 <= row < n:
                values[row] = score
        return values

    @staticmethod
    def _mf_scores(
        head: MatrixFactorisationHead, factors: FloatArray, biases: FloatArray, user_id: str, n: int
    ) -> FloatArray:
        base = biases[:n] + head.global_mean
        user = head.user_factors(user_id)
        if user is None:
            return base
        vector, bias = user
        scored: FloatArray = factors[:n] @ vector + base + bias
        return scored

    def _decay_to(self, ts_ms: int) -> float:
        if self._landmark_ms is None:
            return 0.0
        return float(np.exp2(-(ts_ms - self._landmark_ms) / (self.half_life_s * 1000)))

    # ------------------------------------------------------------------ train

    def _learn(self, event: Event) -> None:
        row = self._items.row(event.item_id)
        if row >= self._capacity:
            self._grow()
        self._counts[row] += 1
        if self._landmark_ms is None:
            self._landmark_ms = event.ts_ms
        self._forward[row] += math.pow(2.0, (event.ts_ms - self._landmark_ms) / (self.half_life_s * 1000))
        recent = self._recent.setdefault(event.user_id, [])
        self._cooccurrence.observe(event.user_id, event.item_id, recent=recent[-self.window * 4 :])
        recent.append(event.item_id)
        if len(recent) > 8 * self.window:
            del recent[: -4 * self.window]
        self._seen.setdefault(event.user_id, []).append(row)
        for head, factors, biases in (
            (self._mf, self._factors, self._biases),
            (self._mf_implicit, self._implicit_factors, self._implicit_biases),
        ):
            head.learn_one(event)
            for touched in head.touched:  # mirror the changed rows for one-product scoring
                item = head.item_factors(touched)
                touched_row = self._items.lookup(touched)
                if item is not None and 0 <= touched_row < self._capacity:
                    factors[touched_row], biases[touched_row] = item

    def _grow(self) -> None:
        self._capacity *= 2
        for name in ("_counts", "_forward", "_biases", "_implicit_biases"):
            old = getattr(self, name)
            new = np.zeros(self._capacity)
            new[: len(old)] = old
            setattr(self, name, new)
        for name in ("_factors", "_implicit_factors"):
            old_factors = getattr(self, name)
            factors = np.zeros((self._capacity, old_factors.shape[1]))
            factors[: len(old_factors)] = old_factors
            setattr(self, name, factors)


def _minmax(values: FloatArray) -> FloatArray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    scaled: FloatArray = (values - low) / (high - low)
    return scaled


def _rank_of(values: FloatArray, target: int) -> int:
    """0-based rank of ``target``: items scoring higher, plus equal-scoring items seen before it."""
    score = values[target]
    return int((values > score).sum() + (values[:target] == score).sum())


def run(
    settings: Settings,
    store: Store,
    dataset: str,
    *,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Replay ``dataset`` through its own one-partition topic, evaluate, record in ``eval_runs``."""
    run_id = uuid.uuid4().hex[:12]
    eval_settings = settings.model_copy(
        update={"topic_prefix": f"{settings.topic_prefix}eval-{run_id}.", "broker_partitions": 1}
    )
    started = time.time()
    published = replay.run(eval_settings, dataset, limit=limit).published
    consumer = Consumer(
        eval_settings.kafka_config(
            **{"group.id": f"eval-{run_id}", "auto.offset.reset": "earliest", "enable.auto.commit": False}
        )
    )
    consumer.subscribe([eval_settings.topics.events])
    evaluator = PrequentialEvaluator()
    consumed = 0
    far_future = 2**62
    try:
        while consumed < published:
            for message in consumer.consume(10_000, 1.0):
                if message.error() is not None:
                    continue
                consumed += 1
                evaluator.step(parse_event(message.value() or b"", now_ms=far_future, max_future_skew_ms=0))
                if progress is not None and consumed % 5000 == 0:
                    progress(consumed, published)
    finally:
        consumer.close()
    finished = time.time()
    methods = {m: r.as_dict(evaluator.events) for m, r in evaluator.results.items()}
    store.insert(
        "eval_runs",
        [
            [run_id] * len(methods),
            [dataset] * len(methods),
            ["prequential"] * len(methods),
            list(methods),
            [evaluator.events] * len(methods),
            [evaluator.k] * len(methods),
            [m["hr@10"] for m in methods.values()],
            [m["ndcg@10"] for m in methods.values()],
            [orjson.dumps({"limit": limit, "half_life_s": evaluator.half_life_s}).decode()] * len(methods),
            [int(started * 1000)] * len(methods),
            [int(finished * 1000)] * len(methods),
        ],
        column_names=_EVAL_COLUMNS,
    )
    logger.info("prequential %s: %d events in %.1f s", dataset, evaluator.events, finished - started)
    return {"dataset": dataset, "events": evaluator.events, "run_id": run_id, "methods": methods}

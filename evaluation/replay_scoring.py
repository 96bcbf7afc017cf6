"""The evaluator behind ``freshrec eval replay``: scores every method on one request, then learns.

:class:`ReplayEvaluator` is fed the messages of the events topic one at a time. For each, it ranks
the user's top ``k`` with every method from the state *before* the event (:meth:`~ReplayEvaluator.score`),
then lets a real :class:`~streams.worker.StreamWorker` apply the message and runs the fine-tune
schedule (:meth:`~ReplayEvaluator.learn`). The protocol, the methods and what is measured are told in
:mod:`evaluation.replay`, which wires this evaluator to Kafka, the publisher and a replica.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from confluent_kafka import Message

from freshrec.errors import ConfigError, KafkaUnavailable
from freshrec.events import Event, parse_event
from freshrec.settings import Settings
from learners.mf import MatrixFactorisationHead
from learners.registry import build_heads
from learners.sequences import LEARNED_TYPES, Sequences, sequences_from_events
from publishers.replica import Replica
from publishers.updates import ModelVersion, state_checksum
from serving.recommender import Recommender
from serving.retrieval import RowStats, ServingIndex
from streams.ids import IdMap
from streams.reader import StateReader
from streams.stores import partition_of
from streams.worker import StreamWorker

__all__ = [
    "METHODS",
    "SINGLE_SOURCES",
    "MethodScores",
    "ReplayConfig",
    "ReplayEvaluator",
    "interval",
    "rank_of",
]

logger = logging.getLogger(__name__)

METHODS: Final = (
    "popularity", "decayed_popularity", "cooccurrence", "mf",
    "transformer", "transformer_frozen", "transformer_stale", "served", "served_explore",
)  # fmt: skip
SINGLE_SOURCES: Final = ("popularity", "decayed_popularity", "cooccurrence", "mf", "transformer")
_Z95: Final = 1.959964
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """What a replay evaluation does besides the settings' own sections."""

    k: int = 10
    finetune_every: int = 10_000  # events between two fine-tunes, in event order (0: never)
    # The first training (the frozen model, and the fine-tuned one's start): its own epochs and
    # wall-clock budget (None: the fine-tune's), so the frozen baseline is trained, not a few steps.
    first_epochs: int | None = None
    first_budget_s: float | None = None
    sample: float = 1.0  # share of the events scored (all are learned)
    seed: int = 0  # of the sample and of the exploration sampler
    apply_timeout_s: float = 120.0  # longest wait for the replica to apply a published version
    buckets: int = 20  # points of the quality-over-time series
    # The freshness control (transformer_stale): a second fine-tuner at every fine-tune, doubling
    # their cost. Off for data without a time order (its events are then just another order).
    freshness_control: bool = True

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}")
        if not 0.0 < self.sample <= 1.0:
            raise ConfigError(
                f"--sample must be in (0, 1], got {self.sample}: it is the share of events scored"
            )
        if self.finetune_every < 0:
            raise ConfigError(f"--finetune-every must be 0 (never) or more, got {self.finetune_every}")


@dataclass(slots=True)
class MethodScores:
    """Per scored event, the NDCG@k gain of one method (0 for a miss; a hit is a gain above 0)."""

    gains: list[float] = field(default_factory=list)

    def add(self, rank: int | None, k: int) -> None:
        self.gains.append(1.0 / math.log2(rank + 2) if rank is not None and rank < k else 0.0)

    def summary(self) -> dict[str, Any]:
        gains = np.asarray(self.gains, dtype=np.float64)
        hits = (gains > 0).astype(np.float64)
        return {
            "hr@10": float(hits.mean()) if len(hits) else 0.0,
            "ndcg@10": float(gains.mean()) if len(gains) else 0.0,
            "ci95": list(interval(hits)),
            "ndcg_ci95": list(interval(gains)),
        }


def interval(values: FloatArray) -> tuple[float, float]:
    """95% normal-approximation interval of the mean of ``values``."""
    n = len(values)
    if n == 0:
        return (0.0, 0.0)
    mean = float(values.mean())
    half = _Z95 * float(values.std(ddof=1)) / math.sqrt(n) if n > 1 else float("inf")
    return (mean - half, mean + half)


class ReplayEvaluator:
    """Test-then-learn over messages of the events topic; see :mod:`evaluation.replay`.

    ``finetune`` (settable after construction, since the fine-tune reads :meth:`freshest`): called
    with the event count after every ``finetune_every``-th learned event; it returns the version it
    published (or None), which the replica must then apply before the next scored request.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        config: ReplayConfig,
        replica: Replica,
        finetune: Callable[[int], int | None] | None = None,
    ) -> None:
        self.config = config
        self.k = config.k
        self.worker = StreamWorker(settings, heads=build_heads(settings.stream))
        self.reader = StateReader(self.worker)
        self.replica = replica
        self.finetune = finetune
        serve = settings.serve
        self._serve = serve
        self.served = Recommender(
            settings=serve.model_copy(update={"policy": "none", "seed": config.seed}),
            replica=replica,
            reader=self.reader,
        )
        self.explore = Recommender(
            settings=serve.model_copy(update={"policy": "uncertainty", "seed": config.seed}),
            replica=replica,
            reader=self.reader,
        )
        self.frozen: ServingIndex | None = None  # built once, from the first version applied
        # The freshness control: trained as often and as much as the served transformer, on the
        # oldest window instead of the freshest (see stale_window); its index follows each version.
        self.stale: ServingIndex | None = None
        self._stale_stats = RowStats()
        self.scores = {method: MethodScores() for method in METHODS}
        self.events = 0
        self.scorable = 0  # scored events whose item was known and not yet seen by the user
        self.timeline: list[tuple[int, int, int]] = []  # per scored event: (event number, ts, version)
        self.finetunes: list[dict[str, Any]] = []
        # Per served method: slots of the returned lists holding an item the user already
        # interacted with (serving excludes only the history the stream keeps, history_len long).
        self.seen_slots = {"served": 0, "served_explore": 0}
        self.slots = {"served": 0, "served_explore": 0}
        self.window: deque[tuple[str, str, int]] = deque(maxlen=settings.train.window_events)
        self.oldest: list[tuple[str, str, int]] = []  # the first window_events learned events
        self._rng = random.Random(config.seed)
        self._seen: dict[str, set[str]] = {}
        self._mirrors: dict[int, _ItemFactorMirror] = {}  # id(head) -> mirror, per partition's head
        replica.on_version(self._on_version)
        if replica.current is not None:
            self._on_version(replica.current)

    # ------------------------------------------------------------------ the loop

    def step(self, message: Message) -> None:
        """Score the message's event with every method (when sampled), then learn it."""
        value = message.value() or b""
        event = parse_event(value, now_ms=2**62, max_future_skew_ms=0)
        self.events += 1
        if self._rng.random() < self.config.sample:
            self.score(event)
        self.learn(message, event)

    def score(self, event: Event) -> None:
        """Every method's rank of the event's item, from the state before the event."""
        version = self.replica.version
        self.timeline.append((self.events, event.ts_ms, version))
        counters = self.worker.state.counters
        target = counters.items.lookup(event.item_id)
        seen = self._seen.get(event.user_id, set())
        if target < 0 or event.item_id in seen:
            for scores in self.scores.values():
                scores.add(None, self.k)
            return
        self.scorable += 1
        n = len(counters.items)
        # Rows are looked up now: the merged rows are renumbered when a store evicts items.
        lookup = counters.items.lookup
        seen_rows = [row for item in seen if (row := lookup(item)) >= 0]
        history = [entry.item_id for entry in self.reader.history(event.user_id)]
        vectors = {
            "popularity": counters.scores("total"),
            "decayed_popularity": counters.scores("decayed"),
            "cooccurrence": self._cooccurrence(history, seen, n),
            "mf": self._mf(event.user_id, n),
        }
        for method, values in vectors.items():
            if seen_rows:
                values[seen_rows] = -np.inf
            self.scores[method].add(rank_of(values, target), self.k)
        for method, index in (
            ("transformer", self.served.index),
            ("transformer_frozen", self.frozen),
            ("transformer_stale", self.stale),
        ):
            self.scores[method].add(_index_rank(index, history, seen, event.item_id, self.k), self.k)
        for method, recommender in (("served", self.served), ("served_explore", self.explore)):
            recommender._popular_cache = None  # event time, not wall time: see evaluation.replay
            items = [item.item_id for item in recommender.recommend(event.user_id, self.k).items]
            self.slots[method] += len(items)
            self.seen_slots[method] += sum(1 for item in items if item in seen)
            self.scores[method].add(items.index(event.item_id) if event.item_id in items else None, self.k)

    def learn(self, message: Message, event: Event) -> None:
        """The stream worker's own apply path for this one message, then :meth:`remember`."""
        self.worker._apply([message])
        self._check_routing(message, event)
        self.remember(event)

    def remember(self, event: Event) -> None:
        """What the evaluator keeps of a learned event (seen items, MF mirror, the fine-tune's
        window), then the fine-tune schedule."""
        self._seen.setdefault(event.user_id, set()).add(event.item_id)
        self._mirror_mf(event)
        if event.type in LEARNED_TYPES:
            learned = (event.user_id, event.item_id, event.ts_ms)
            self.window.append(learned)
            if len(self.oldest) < (self.window.maxlen or 0):
                self.oldest.append(learned)
        every = self.config.finetune_every
        if self.finetune is not None and every and self.events % every == 0:
            self._cycle()

    def freshest(self) -> tuple[Sequences, int]:
        """The fine-tune's window: the last ``window_events`` learned events seen so far."""
        return sequences_from_events(self.window), len(self.window)

    def stale_window(self) -> tuple[Sequences, int]:
        """The freshness control's window: as many events as :meth:`freshest` holds, the oldest
        ones. Until the window is full the two are the same events; after, same size, no news."""
        oldest = self.oldest[: len(self.window)]
        return sequences_from_events(oldest), len(oldest)

    def on_stale_version(self, version: ModelVersion) -> None:
        """Index the control's newest version as serving would (same row statistics)."""
        self._stale_stats.observe(version)
        self.stale = self._index(version, self._stale_stats)

    # ------------------------------------------------------------------ methods

    def _cooccurrence(self, history: Sequence[str], seen: set[str], n: int) -> FloatArray:
        values = np.zeros(n)
        if history:
            lookup = self.worker.state.counters.items.lookup
            for item, score in self.worker.state.cooccurrence.score(history[-10:], exclude=seen).items():
                row = lookup(item)
                if 0 <= row < n:
                    values[row] = score
        return values

    def _mf_head(self, user_id: str) -> MatrixFactorisationHead | None:
        """The MF head that learns ``user_id``'s events: the one of the user's partition."""
        routed = self.worker.state.heads.get("mf")
        head = routed.for_user(user_id) if routed is not None else None
        return head if isinstance(head, MatrixFactorisationHead) else None

    def _mirror(self, head: MatrixFactorisationHead) -> _ItemFactorMirror:
        """The item-factor mirror of ``head``, created (from all it learned so far) on first use."""
        mirror = self._mirrors.get(id(head))
        if mirror is None or mirror.head is not head:  # an id reused after a store was replaced
            mirror = self._mirrors[id(head)] = _ItemFactorMirror(head)
        return mirror

    def _mf(self, user_id: str, n: int) -> FloatArray:
        """The MF score of every item row for ``user_id``, from the head of the user's partition."""
        head = self._mf_head(user_id)
        if head is None:
            return np.zeros(n)
        mirror = self._mirror(head)
        mirror.sync(self.worker.state.counters.items)
        return mirror.scores(user_id, n)

    def _mirror_mf(self, event: Event) -> None:
        """Copy the item factors the event's head just changed into that head's mirror."""
        head = self._mf_head(event.user_id)
        if head is not None:
            self._mirror(head).sync(self.worker.state.counters.items, head.touched)

    def _check_routing(self, message: Message, event: Event) -> None:
        """Refuse a message whose partition is not the one its user's head is routed to: the MF
        method would score that user with a head that never learned from them."""
        routed = self.worker.state.heads.get("mf")
        store = self.worker.state.stores.get(message.partition() or 0)
        if routed is None or store is None or routed.for_user(event.user_id) is store.heads.get("mf"):
            return
        expected = partition_of(event.user_id, routed.partitions)
        raise ConfigError(
            f"user {event.user_id!r}'s event came from partition {message.partition()} of "
            f"{message.topic()}, but freshrec's partitioner puts the user in partition {expected} of "
            f"{routed.partitions}: publish the events keyed by user id with `freshrec replay`, into a "
            "topic with FRESHREC_BROKER_PARTITIONS partitions"
        )

    # ------------------------------------------------------------------ fine-tunes

    def _on_version(self, version: ModelVersion) -> None:
        if self.frozen is None:  # the first version: trained once, never updated
            stats = RowStats()
            stats.observe(version)
            self.frozen = self._index(version, stats)

    def _index(self, version: ModelVersion, stats: RowStats) -> ServingIndex:
        return ServingIndex.build(
            version,
            stats,
            max_uncertainty=self._serve.index_max_uncertainty,
            max_pool=self._serve.explore_pool,
            quantized=self._serve.quantized_scan,
        )

    def _cycle(self) -> None:
        assert self.finetune is not None
        started = time.monotonic()
        version = self.finetune(self.events)
        trained = time.monotonic()
        if version is None:
            return
        deadline = trained + self.config.apply_timeout_s
        while not self._serving(version):  # the next request must see it, as a replica's would
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"the replica did not apply v{version} within {self.config.apply_timeout_s:.0f} s of "
                    "its publish: check that the broker is up (`freshrec broker status`)"
                )
            time.sleep(0.01)
        self.finetunes.append(
            {
                "at_event": self.events,
                "version": version,
                "train_s": round(trained - started, 2),
                "apply_ms": round((time.monotonic() - trained) * 1000, 1),
            }
        )

    def _serving(self, version: int) -> bool:
        """Whether both recommenders serve ``version`` or newer (and the frozen index exists): the
        replica makes a version current, then its listeners build their indexes."""
        indexes = (self.served.index, self.explore.index)
        return self.frozen is not None and all(
            index is not None and index.version.version >= version for index in indexes
        )

    # ------------------------------------------------------------------ results

    def frozen_state(self) -> dict[str, Any] | None:
        """The frozen model's version and the checksum of the parameters it scores with *now*
        (equal to that version's own checksum when nothing changed it)."""
        frozen = self.frozen
        if frozen is None:
            return None
        params = {name: frozen.model.state_dict()[name].numpy() for name in frozen.version.params}
        return {"version": frozen.version.version, "state_checksum": state_checksum(params, frozen.item_of)}

    def stale_state(self) -> dict[str, Any] | None:
        """The freshness control's newest version, its checksum and its window's time span."""
        if self.stale is None:
            return None
        oldest = self.oldest[: len(self.window)]
        return {
            "version": self.stale.version.version,
            "state_checksum": self.stale.version.state_checksum,
            "window_events": len(oldest),
            "window_last_ts_ms": oldest[-1][2] if oldest else None,
            "fresh_window_last_ts_ms": self.window[-1][2] if self.window else None,
        }

    def summary(self) -> dict[str, dict[str, Any]]:
        return {method: scores.summary() for method, scores in self.scores.items()}

    def paired(self) -> dict[str, dict[str, Any]]:
        """HR@k differences on the same requests, with their intervals: served against each single
        source, and what freshness buys the transformer."""
        pairs = [("served", source) for source in SINGLE_SOURCES]
        pairs += [
            ("served_explore", "served"),
            ("transformer", "transformer_frozen"),
        ]
        if self.stale is not None:  # the freshness control ran
            pairs.append(("transformer", "transformer_stale"))
        out: dict[str, dict[str, Any]] = {}
        for left, right in pairs:
            a = np.asarray(self.scores[left].gains) > 0
            b = np.asarray(self.scores[right].gains) > 0
            diff = a.astype(np.float64) - b.astype(np.float64)
            out[f"{left} - {right}"] = {
                "hr@10": float(diff.mean()) if len(diff) else 0.0,
                "ci95": list(interval(diff)),
            }
        return out

    def over_time(self) -> list[dict[str, Any]]:
        """HR@k per method over consecutive, equally sized slices of the scored events."""
        n = len(self.timeline)
        if not n:
            return []
        bounds = np.linspace(0, n, min(self.config.buckets, n) + 1).astype(int)
        out = []
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            last_event, last_ts, version = self.timeline[hi - 1]
            point: dict[str, Any] = {
                "from_event": self.timeline[lo][0],
                "to_event": last_event,
                "ts_ms": last_ts,
                "model_version": version,
                "scored": hi - lo,
            }
            for method, scores in self.scores.items():
                point[method] = sum(1 for g in scores.gains[lo:hi] if g > 0) / (hi - lo)
            out.append(point)
        return out


class _ItemFactorMirror:
    """One MF head's item factors and biases as arrays by merged counter row, so that one matrix
    product scores the whole catalogue for a user (river keeps them in per-item dicts).

    Each partition's head learns its own item factors, so each head has its own mirror. It follows
    the head through the items each ``learn_one`` touched (:meth:`sync` with ``touched``), and
    copies everything again when the rows it is laid out by are renumbered: the merged id map is
    rebuilt after a store evicts items or moves away. An item the head never learned keeps zeros,
    so its score is the head's global mean plus the user's bias, as ``predict_one`` says.
    """

    def __init__(self, head: MatrixFactorisationHead) -> None:
        self.head = head
        self._ids: IdMap | None = None  # the merged id map the rows below follow
        self._factors: FloatArray = np.zeros((0, 0))
        self._biases: FloatArray = np.zeros(0)

    def sync(self, ids: IdMap, touched: Sequence[str] = ()) -> None:
        """Bring the rows of ``touched`` items up to date; all rows when ``ids`` was rebuilt."""
        if ids is not self._ids:
            self._ids = ids
            self._factors = np.zeros((0, self._factors.shape[1]))
            self._biases = np.zeros(0)
            touched = [item for item in ids.ids() if item]
        for item in touched:
            factors = self.head.item_factors(item)
            row = ids.lookup(item)
            if factors is None or row < 0:
                continue
            vector, bias = factors
            if not self._factors.shape[1]:
                self._factors = np.zeros((len(self._biases), len(vector)))
            self._grow(row + 1)
            self._factors[row] = vector
            self._biases[row] = bias

    def scores(self, user_id: str, n: int) -> FloatArray:
        """The head's score of every row below ``n`` for ``user_id`` (its ``predict_one``)."""
        self._grow(n)
        base = self._biases[:n] + self.head.global_mean
        user = self.head.user_factors(user_id)
        if user is None:
            return base
        vector, bias = user
        if not self._factors.shape[1]:
            return base + bias
        scores: FloatArray = self._factors[:n] @ np.asarray(vector, dtype=np.float64) + base + bias
        return scores

    def _grow(self, n: int) -> None:
        if n <= len(self._biases):
            return
        size = max(n, 2 * len(self._biases), 1024)
        biases = np.zeros(size)
        biases[: len(self._biases)] = self._biases
        factors = np.zeros((size, self._factors.shape[1]))
        factors[: len(self._factors)] = self._factors
        self._biases, self._factors = biases, factors


def rank_of(values: FloatArray, target: int) -> int:
    """0-based rank of ``target``: rows scoring higher, plus equal-scoring rows before it (ties by
    first appearance, as ``eval prequential`` breaks them)."""
    score = values[target]
    return int((values > score).sum() + (values[:target] == score).sum())


def _index_rank(
    index: ServingIndex | None, history: Sequence[str], seen: set[str], item: str, k: int
) -> int | None:
    """The item's rank in a transformer index's top ``k`` for this history, or None."""
    if index is None or item not in index.row_of:
        return None
    vector = index.user_vector(history)
    if vector is None:
        return None
    top = [name for name, _ in index.top(vector, k, exclude=seen)]
    return top.index(item) if item in top else None

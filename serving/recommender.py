"""Recommendations: candidates from every signal, a fused ranking, exploration with known propensities.

For a user and ``k``:

1. **Candidates**, each with its ``source``: the transformer's exact top-n over the confident index
   (user state from the history the stream keeps), co-occurrence neighbours of the user's recent items,
   and decayed popularity. Items the user has already interacted with are filtered out everywhere.
   An unknown user has no history: popularity and exploration serve them.
2. **Ranking** (``fusion``): by default **learned** (:mod:`serving.fusion`): each candidate is
   described by its rank and score in each source, and the MF head's score over the best
   ``max(50, 3k)``, and ranked by a linear score whose weights this process learns online from each
   user's next event (the item taken after a request is the positive among that request's
   candidates). A request is scored before its own event can be learned. ``rrf`` keeps the fixed
   reciprocal-rank fusion (``sum 1 / (60 + rank)`` of the sources' orders and of the MF head's),
   which weighs every source alike: replayed on ml-100k it served fewer hits than co-occurrence
   alone. ``sources`` leaves sources out (what the replay's ablation does). An item's ``source``
   is the source that ranked it best.
3. **Exploration**, by policy:

   - ``uncertainty`` (default): ``round(k * explore_fraction)`` slots go to the **exploration pool**:
     items the index left out because their embedding is young, items the stream has seen lately
     that the model has no row for yet, and the fused candidates just below the cut. Each is scored
     by UCB, ``mean CTR + c * (sd of the CTR posterior + 0.1 x embedding uncertainty)``, and slots
     are filled by independent draws from ``softmax(UCB / temperature)`` (a repeat leaves its slot to
     the ranking); an explore item's ``propensity`` is its probability under that softmax, exactly
     the chance of that item in that slot. Exploit items are deterministic
     given the state: propensity 1.
   - ``epsilon``: each slot, with probability epsilon, shows a uniformly drawn unseen item from the
     catalogue instead (propensity ``epsilon / pool``); exploit slots carry ``1 - epsilon``, the
     chance that the slot went to the ranking (which ranked item fills it depends on the earlier
     slots' draws: exact per slot, conditional per item).
   - ``none``: the fused ranking only.

Explore items take evenly spaced positions (not only the bottom, where position bias would starve
them). Each response carries its :class:`~streams.impressions.Exploration`, logged with it: the
ranking's head, the exploration pool with each item's CTR mean and uncertainty bonus, the catalogue
size and the policy's parameters, so that any policy's chance of any item can be recomputed offline
(``freshrec eval ips --policy``). Under ``none`` and ``epsilon`` the pool is the ranking's first k.
Every response is a :class:`Recommendation`; :mod:`serving.api` logs it as an impression.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from freshrec.errors import ConfigError
from freshrec.settings import ServeSettings
from publishers.replica import Replica
from publishers.updates import ModelVersion
from serving.fusion import SOURCES, LearnedFusion
from serving.retrieval import RowStats, ServingIndex
from serving.scan import ScanCounts
from streams.impressions import Exploration, ServedItem
from streams.reader import StateReader

__all__ = ["SERVED_HEADS", "Recommendation", "Recommender"]

logger = logging.getLogger(__name__)

# The incremental heads whose scores serving reads (a source and a fusion feature): a serving
# process keeps only these.
SERVED_HEADS: frozenset[str] = frozenset({"mf"})
_RRF_K = 60.0
_POPULAR_TTL_S = 0.5


@dataclass(frozen=True, slots=True)
class Recommendation:
    request_id: str
    user_id: str
    model_version: int
    policy: str
    items: list[ServedItem]
    latency_ms: float
    exploration: Exploration | None = None  # what the policy could have shown, for the decision log


class Recommender:
    """Serves from the newest model version a replica holds and the stream state a reader sees."""

    def __init__(
        self, *, settings: ServeSettings, replica: Replica | None = None, reader: StateReader | None = None
    ) -> None:
        self.settings = settings
        self.reader = reader
        self.rng = np.random.default_rng(settings.seed)
        self._stats = RowStats()
        self.scans = ScanCounts()  # over every version served, for /metrics
        self._index: ServingIndex | None = None
        self._popular_cache: tuple[float, list[tuple[str, float]]] | None = None
        self._known: list[str] = []  # the model's items, for epsilon's uniform draw
        self._known_set: set[str] = set()
        self._listeners: list[Callable[[Recommendation], None]] = []
        unknown = set(settings.sources) - {*SOURCES, "mf"}
        if unknown:
            raise ConfigError(
                f"unknown candidate sources {sorted(unknown)}: FRESHREC_SERVE__SOURCES takes "
                f"{[*SOURCES, 'mf']}"
            )
        self._sources = frozenset(settings.sources)
        self.fusion = LearnedFusion(
            learning_rate=settings.fusion_learning_rate, pending_users=settings.fusion_pending_users
        )
        if replica is not None:
            replica.on_version(self._refresh)
            if replica.current is not None:
                self._refresh(replica.current)

    @property
    def index(self) -> ServingIndex | None:
        return self._index

    def _refresh(self, version: ModelVersion) -> None:
        """A new version: rebuild the index beside the old one, then swap (readers see one or the other)."""
        self._stats.observe(version)
        self._known = [item for item in version.item_ids if item is not None]
        self._known_set = set(self._known)
        self._index = ServingIndex.build(
            version,
            self._stats,
            max_uncertainty=self.settings.index_max_uncertainty,
            max_pool=self.settings.explore_pool,
            quantized=self.settings.quantized_scan,
            scan_counts=self.scans,
        )
        logger.info(
            "serving v%d: %d items indexed, %d in the exploration pool",
            version.version,
            len(self._index.index_rows),
            len(self._index.pool_rows),
        )

    def recommend(self, user_id: str, k: int, *, request_id: str | None = None) -> Recommendation:
        started = time.perf_counter()
        index = self._index
        reader = self.reader
        history_entries = reader.history(user_id) if reader is not None else []
        history = [entry.item_id for entry in history_entries]
        seen = set(history)
        n = max(self.settings.candidates, k)
        lists: dict[str, list[tuple[str, float]]] = {}
        use = self._sources
        if index is not None and history and "transformer" in use:
            if torch.get_num_threads() != self.settings.torch_threads:
                # OpenMP's thread count is per calling thread: the API's event-loop thread starts at
                # the default (all cores), which made each user state 8x slower.
                torch.set_num_threads(self.settings.torch_threads)
            vector = index.user_vector(history)
            if vector is not None:
                lists["transformer"] = index.top(vector, n, exclude=seen)
        if reader is not None:
            if history and "cooccurrence" in use:
                lists["cooccurrence"] = reader.related(history[-10:], n, exclude=seen)
            if "popular" in use:
                lists["popular"] = [
                    item for item in self._popular(reader, n + len(seen)) if item[0] not in seen
                ][:n]
        if self.settings.fusion == "learned":
            ranked, source = self._learned(user_id, lists, history_entries, k)
        else:
            ranked, source = self._rrf(user_id, lists, k)
        policy = self.settings.policy
        if policy == "uncertainty":
            items, exploration = self._uncertainty(ranked, source, k, seen)
        else:
            if policy == "epsilon":
                items = self._epsilon(ranked, source, k, seen)
            else:
                items = [ServedItem(i, s, source[i], False, 1.0) for i, s in ranked[:k]]
            exploration = self._exploration(k, [item for item, _ in ranked[:k]], [])
        result = Recommendation(
            request_id=request_id or uuid.uuid4().hex,
            user_id=user_id,
            model_version=0 if index is None else index.version.version,
            policy=policy,
            items=items,
            latency_ms=(time.perf_counter() - started) * 1000,
            exploration=exploration,
        )
        for listener in self._listeners:
            listener(result)
        return result

    def on_decision(self, listener: Callable[[Recommendation], None]) -> None:
        """Call ``listener`` with every response, as served (the simulator's off-policy check reads
        the decisions in process)."""
        self._listeners.append(listener)

    def _learned(
        self,
        user_id: str,
        lists: dict[str, list[tuple[str, float]]],
        history: Sequence[tuple[str, str, int]],
        k: int,
    ) -> tuple[list[tuple[str, float]], dict[str, str]]:
        """The candidates ranked by the learned fusion, after it learned from the user's previous
        request if the user's history now shows the event that followed it (never this request's:
        its event comes later)."""
        reader = self.reader
        head = None
        if reader is not None and "mf" in self._sources:
            head = functools.partial(reader.scores, user_id, head="mf")
        return self.fusion.rank(user_id, lists, history, head=head, shortlist=max(50, 3 * k))

    def _rrf(
        self, user_id: str, lists: dict[str, list[tuple[str, float]]], k: int
    ) -> tuple[list[tuple[str, float]], dict[str, str]]:
        """Fixed reciprocal-rank fusion, the MF head's order over the head of it joining in."""
        fused, source = _fuse(lists)
        if self.reader is not None and fused and "mf" in self._sources:
            # The head re-ranks the head of the fused list (a cascade: river scores ~3 µs a pair).
            names = [item for item, _ in sorted(fused.items(), key=lambda kv: -kv[1])[: max(50, 3 * k)]]
            ranked = self.reader.rank(user_id, names, "mf")
            if ranked is not None:  # the MF head's order over the candidates joins the fusion
                for rank, item in enumerate(ranked):
                    fused[item] += 1.0 / (_RRF_K + rank + 1)
        return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0])), source

    def _popular(self, reader: StateReader, n: int) -> list[tuple[str, float]]:
        """Decayed popularity's top ``n``, filled up from all-time counts, recomputed at most every
        ``_POPULAR_TTL_S``: it scores every item (3 ms at 1M items) and moves slowly, unlike the
        user's own history.

        The fill matters: a decayed count halves every half-life of *event time*, so after old
        events (a dataset from 1998) and a few fresh ones, every old item's score underflows to
        exactly 0 and only the few fresh items rank. A new user, who has nothing but popularity
        and exploration, then got 1 item for k=10 from a catalogue of thousands. Items past the
        decayed ones follow by total count, so the list is as long as the catalogue allows."""
        cached = self._popular_cache
        now = time.monotonic()
        if cached is None or now - cached[0] > _POPULAR_TTL_S or len(cached[1]) < n:
            size = max(n, 2 * self.settings.candidates)
            ranked = reader.popular(size, kind="decayed")
            if len(ranked) < size:
                listed = {item for item, _ in ranked}
                fill = reader.popular(size + len(listed), kind="total")
                ranked += [(item, 0.0) for item, _ in fill if item not in listed][: size - len(ranked)]
            cached = self._popular_cache = (now, ranked)
        return cached[1][:n]

    # -- exploration ------------------------------------------------------------------------------

    def _pool(self, exclude: set[str], tail: Sequence[str]) -> dict[str, float]:
        """Exploration candidates and their embedding uncertainty (1 for items the model lacks):
        the ranking's tail, the index's newest young rows (``explore_pool``), the stream's new
        arrivals."""
        index = self._index
        if index is None:
            pool = dict.fromkeys(tail, 1.0)
        else:  # tail items relevant but below the cut: their CTR posterior decides
            rows = np.array([index.row_of.get(item, -1) for item in tail], dtype=np.int64)
            known = np.where(rows >= 0, index.uncertainty[np.maximum(rows, 0)], 1.0)
            pool = dict(zip(tail, known.tolist(), strict=True))
            for item, uncertainty in zip(index.pool_items, index.pool_uncertainty, strict=True):
                if item not in exclude:
                    pool[item] = uncertainty
        if self.reader is not None:  # new arrivals in the stream that the model has no row for yet
            rows_of = index.row_of if index is not None else {}
            for item in self.reader.newest(self.settings.candidates):
                if item not in rows_of and item not in exclude:
                    pool.setdefault(item, 1.0)
        return pool

    def _exploration(
        self, k: int, head: list[str], names: list[str], names_embedding: np.ndarray | None = None
    ) -> Exploration:
        """The record of what this response could have shown: the ranking's ``head`` (in order) and
        the other items of the exploration pool, ``names``, with their embedding uncertainty (looked
        up when not given)."""
        everything = head + names
        if names_embedding is None:
            embedding = self._embedding_uncertainty(everything)
        else:
            embedding = np.concatenate([self._embedding_uncertainty(head), names_embedding])
        mean, bonus = self._bonus(everything, embedding)
        settings = self.settings
        params = {"explore_fraction": settings.explore_fraction, "ucb_c": settings.ucb_c,
                  "temperature": settings.temperature, "epsilon": settings.epsilon}  # fmt: skip
        return Exploration(
            policy=settings.policy,
            params=params,
            k=k,
            catalogue=self._catalogue_size(),
            ranked=len(head),
            pool=everything,
            mean=mean,
            bonus=bonus,
        )

    def _bonus(self, names: list[str], embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CTR posterior means and the UCB bonus per unit of ``ucb_c`` (sd of the CTR posterior +
        0.1 x embedding uncertainty) of ``names``."""
        if self.reader is not None:
            mean, variance = self.reader.ctr_moments(names)
            sd = np.sqrt(variance)
        else:
            mean, sd = np.full(len(names), 0.05), np.full(len(names), 0.05)
        return np.asarray(mean, dtype=np.float64), sd + 0.1 * embedding

    def _embedding_uncertainty(self, names: Sequence[str]) -> np.ndarray:
        """Each item's embedding uncertainty (1 for items the model has no row for)."""
        index = self._index
        if index is None:
            return np.ones(len(names))
        rows = np.array([index.row_of.get(item, -1) for item in names], dtype=np.int64)
        return np.where(rows >= 0, index.uncertainty[np.maximum(rows, 0)], 1.0)

    def _uncertainty(
        self, ranked: list[tuple[str, float]], source: dict[str, str], k: int, seen: set[str]
    ) -> tuple[list[ServedItem], Exploration]:
        slots = round(k * self.settings.explore_fraction)
        exploit = [item for item, _ in ranked[: k - slots]]
        tail = [item for item, _ in ranked[k - slots : k - slots + self.settings.candidates]]
        pool = self._pool(seen | set(exploit), tail) if slots else {}
        picks: list[ServedItem] = []
        names = list(pool)  # the tail first, in the ranking's order, then young rows and new arrivals
        embedding = np.fromiter(pool.values(), dtype=np.float64, count=len(names))
        # The exploit items' moments too, in the same call: the record then lets a policy with fewer
        # explore slots be evaluated (its pool starts earlier in the ranking).
        exploration = self._exploration(k, exploit, names, embedding)
        if pool:
            exploration = replace(exploration, ranked=len(exploit) + len(tail))
            mean, bonus = exploration.mean[len(exploit) :], exploration.bonus[len(exploit) :]
            ucb = mean + self.settings.ucb_c * bonus
            logits = (ucb - ucb.max()) / self.settings.temperature
            p = np.exp(logits)
            p /= p.sum()
            # Each explore slot is an independent draw from the same distribution, so the probability
            # of an item in a slot is exactly its p (draws without replacement would make a later
            # slot's probability depend on the earlier draws). A repeated draw leaves the slot to
            # the ranking.
            chosen: set[int] = set()
            for choice in self.rng.choice(len(names), size=slots, p=p).tolist():
                if choice not in chosen:
                    chosen.add(choice)
                    picks.append(
                        ServedItem(names[choice], float(ucb[choice]), "explore", True, float(p[choice]))
                    )
        scores = dict(ranked)
        exploit_items = [ServedItem(i, scores[i], source[i], False, 1.0) for i in exploit]
        # Fill from the ranking when the pool ran short, so that k items come back when they exist.
        picked = {item.item_id for item in picks}
        for item, score in ranked[k - slots :]:
            if len(exploit_items) + len(picks) >= k:
                break
            if item not in picked:
                exploit_items.append(ServedItem(item, score, source[item], False, 1.0))
        return _interleave(exploit_items, picks), exploration

    def _epsilon(
        self, ranked: list[tuple[str, float]], source: dict[str, str], k: int, seen: set[str]
    ) -> list[ServedItem]:
        epsilon = self.settings.epsilon
        catalogue = self._catalogue()
        exploit = iter(ranked)
        out: list[ServedItem] = []
        used: set[str] = set()
        for _ in range(k):
            if catalogue and self.rng.random() < epsilon:
                # Uniform over the catalogue; a seen or repeated draw falls back to the ranking, so the
                # propensity of a shown explore item stays epsilon / |catalogue|.
                item = catalogue[int(self.rng.integers(len(catalogue)))]
                if item not in used and item not in seen:
                    used.add(item)
                    out.append(ServedItem(item, 0.0, "explore", True, epsilon / len(catalogue)))
                    continue
            for item, score in exploit:
                if item not in used:
                    used.add(item)
                    out.append(ServedItem(item, score, source[item], False, 1.0 - epsilon))
                    break
        return out

    def _catalogue_size(self) -> int:
        """How many items epsilon draws from (:meth:`_catalogue`), without building the list."""
        if self.reader is None:
            return len(self._known)
        return len(self._known) + sum(
            1 for i in self.reader.newest(self.settings.candidates) if i not in self._known_set
        )

    def _catalogue(self) -> list[str]:
        """What epsilon draws from: the model's items (listed once per version) and the stream's
        new arrivals."""
        known = self._known
        if self.reader is None:
            return known
        fresh = [i for i in self.reader.newest(self.settings.candidates) if i not in self._known_set]
        return known + fresh if fresh else known


def _fuse(lists: dict[str, list[tuple[str, float]]]) -> tuple[dict[str, float], dict[str, str]]:
    """Reciprocal-rank fusion of ranked lists; each item's source is the list that ranked it best."""
    fused: dict[str, float] = {}
    best: dict[str, tuple[int, str]] = {}
    for name, ranked in lists.items():
        for rank, (item, _) in enumerate(ranked):
            fused[item] = fused.get(item, 0.0) + 1.0 / (_RRF_K + rank + 1)
            if item not in best or rank < best[item][0]:
                best[item] = (rank, name)
    return fused, {item: name for item, (_, name) in best.items()}


def _interleave(exploit: Sequence[ServedItem], explore: Sequence[ServedItem]) -> list[ServedItem]:
    """Explore items at evenly spaced positions among the exploit items."""
    total = len(exploit) + len(explore)
    positions = {math.floor((j + 1) * total / (len(explore) + 1)) for j in range(len(explore))}
    out: list[ServedItem] = []
    exploit_iter, explore_iter = iter(exploit), iter(explore)
    for position in range(total):
        source = explore_iter if position in positions else exploit_iter
        item = next(source, None) or next(exploit_iter if source is explore_iter else explore_iter)
        out.append(item)
    return out

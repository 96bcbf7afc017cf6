"""One state store per input partition, and the merged view readers see over a worker's stores.

A stream worker keeps a :class:`PartitionStore` per partition of ``events`` it owns (in Kafka
Streams' words, a state store per task): its item counters and CTR posteriors, its users' histories,
its co-occurrence counts, its recent event ids and its heads, with the input offsets they reflect.
Users are the events' key, so a user's whole history lives in one store; an item is counted in
every partition where it occurs. A store is what moves between workers (:mod:`streams.changelog`).

Readers keep the interface they had when a worker had one state: ``state.counters.top(10)``,
``state.histories.get(user)``, ``state.cooccurrence.score(recent)``, ``state.clicks.moments(items)``,
``state.heads["mf"].predict_one(user, item)``. Each merged view answers from every store:

- **counters**: totals, windowed and decayed counts are summed over partitions, and equal what one
  store of the whole stream would count: decayed counts are taken at the newest event time of all
  partitions, and a window ends at the newest bucket of all partitions (a partition that lags still
  holds the records of its older buckets, and those the merged window has left are subtracted).
  Rows (``items.lookup``, ``scores``) are those of a merged id map that grows as stores see new
  items; ties between equal scores go by that map's first-seen order.
- **histories** and **heads**: a user is in one partition; the history is looked up in each store
  (one dict lookup per partition), a head's score comes from the head of the user's partition,
  found by the partitioner freshrec's producers use (librdkafka's default: CRC-32 of the key,
  modulo the partition count). A user of a partition this worker does not own is scored by an
  untrained copy of the head (what the head says before any learning).
- **co-occurrence** and **CTR**: counts summed over partitions (a pair is counted where its user
  is; an impression and its click share the user's partition, as ``impressions`` is keyed by user).

Reads cost a loop over the stores (a handful of partitions per worker); the merged counter rows are
kept up to date incrementally, and rebuilt only after a store evicts items or moves away.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from freshrec.events import Event
from streams.clicks import ClickThrough, CtrPosterior
from streams.cooccurrence import CoOccurrence
from streams.counters import CounterConfig, ItemCounters, top_rows
from streams.dedup import RecentIds
from streams.heads import Head
from streams.histories import HistoryEntry, UserHistories
from streams.ids import IdMap

__all__ = [
    "ROLE_PARTS",
    "MergedClicks",
    "MergedCoOccurrence",
    "MergedCounters",
    "MergedHistories",
    "MergedRecent",
    "PartitionStore",
    "RoutedHead",
    "partition_of",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_STORE_VERSION = 2

#: What each stream role keeps of a store.
ROLE_PARTS: Final = {
    "counters": ("counters", "clicks"),
    "sequences": ("histories", "cooccurrence"),
    "heads": ("heads",),
}


def partition_of(key: str, partitions: int) -> int:
    """The partition librdkafka's default partitioner (``consistent_random``) gives a key."""
    return zlib.crc32(key.encode()) % partitions


class PartitionStore:
    """One input partition's state, and the offsets (per input topic) it reflects."""

    def __init__(
        self,
        *,
        counters: ItemCounters,
        recent: RecentIds,
        histories: UserHistories,
        cooccurrence: CoOccurrence,
        clicks: ClickThrough,
        heads: dict[str, Head],
    ) -> None:
        self.counters = counters
        self.recent = recent
        self.histories = histories
        self.cooccurrence = cooccurrence
        self.clicks = clicks
        self.heads = heads
        self.offsets: dict[str, int] = {}  # input topic -> next offset to read in this partition
        # Parts (by role) restored from a snapshot further on than ``offsets``: per input topic, the
        # offset from which each applies events again (see ``load_parts``). Empty once caught up.
        self.ahead: dict[str, dict[str, int]] = {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STORE_VERSION,
            "counters": _trim_types(self.counters.state_dict()),
            "recent": self.recent.state_dict(),
            "histories": self.histories.state_dict(),
            "cooccurrence": self.cooccurrence.state_dict(),
            "clicks": self.clicks.state_dict(),
            "heads": {name: head.state_dict() for name, head in self.heads.items()},
            "offsets": dict(self.offsets),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a snapshot of this partition. It must hold every head this store keeps (a head
        missing from it would start untrained at the snapshot's offsets, having missed the events
        before them); heads it holds beyond those are dropped, so that a serving replica, which
        keeps only the heads it reads, loads the snapshots of stream workers that keep more."""
        for role in ROLE_PARTS:
            self.load_part(state, role)
        self.recent.load_state_dict(state["recent"])
        self.offsets = {str(topic): int(offset) for topic, offset in state["offsets"].items()}
        self.ahead = {}

    def load_part(self, state: dict[str, Any], role: str) -> None:
        """Load only the part of a snapshot that ``role`` keeps (:data:`ROLE_PARTS`); its offsets
        and recent ids are not touched."""
        if state.get("version") != _STORE_VERSION:
            raise ValueError(f"partition state version {state.get('version')} is not {_STORE_VERSION}")
        if role == "counters":
            self.counters.load_state_dict(_pad_types(state["counters"]))
            self.clicks.load_state_dict(state["clicks"])
        elif role == "sequences":
            self.histories.load_state_dict(state["histories"])
            self.cooccurrence.load_state_dict(state["cooccurrence"])
        elif role == "heads":
            missing = set(self.heads) - set(state["heads"])
            if missing:
                raise ValueError(
                    f"snapshot has heads {sorted(state['heads'])}, "
                    f"without {sorted(missing)} that this worker keeps"
                )
            for name, head in self.heads.items():
                head.load_state_dict(state["heads"][name])
        else:
            raise ValueError(f"unknown role {role!r}; known: {', '.join(ROLE_PARTS)}")

    def load_parts(self, parts: Mapping[str, dict[str, Any]], *, events: str) -> None:
        """Load each role's part from its own snapshot (``parts``: role -> state), as when the
        roles run as separate groups, each with its changelog at its own offsets.

        The store then reads from the lowest offsets of them (per input topic), with the recent
        ids of the snapshot lowest in ``events`` (the input topic), and :attr:`ahead` records, per
        part that is further on, from which offset it applies events again: up to there, an event
        is applied to the parts that have not seen it only. Since each part is a function of the
        prefix alone, the result equals one store that kept every role."""
        if not parts:
            raise ValueError("no part to load")
        for role, state in parts.items():
            self.load_part(state, role)
        offsets = {
            role: {str(t): int(o) for t, o in state["offsets"].items()} for role, state in parts.items()
        }
        topics = {topic for by_topic in offsets.values() for topic in by_topic}
        self.offsets = {
            # A part that has no offset in a topic does not read it (sequences and heads: impressions).
            topic: min(by_topic[topic] for by_topic in offsets.values() if topic in by_topic)
            for topic in topics
        }
        base = min(parts, key=lambda role: offsets[role].get(events, 0))
        self.recent.load_state_dict(parts[base]["recent"])
        self.ahead = {}
        for role, by_topic in offsets.items():
            ahead = {t: o for t, o in by_topic.items() if o > self.offsets.get(t, 0)}
            if ahead:
                self.ahead[role] = ahead


def _trim_types(counters: dict[str, Any]) -> dict[str, Any]:
    """The counters' state with only the rows of event types seen: the arrays have a row for each
    of ``max_types`` (16) types, and streams use three or four, so snapshots shrink about 4x."""
    used = len(counters["types"]["ids"])
    trimmed = dict(counters)
    trimmed["total"] = counters["total"][:used]
    trimmed["forward"] = counters["forward"][:used]
    trimmed["windows"] = [window[:used] for window in counters["windows"]]
    return trimmed


def _pad_types(counters: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`_trim_types`: rows of zeros for the types not seen yet."""
    rows = int(counters["config"]["max_types"])

    def pad(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if array.shape[0] == rows:
            return array
        padded = np.zeros((rows, *array.shape[1:]), dtype=array.dtype)
        padded[: array.shape[0]] = array
        return padded

    padded = dict(counters)
    padded["total"] = pad(counters["total"])
    padded["forward"] = pad(counters["forward"])
    padded["windows"] = [pad(window) for window in counters["windows"]]
    return padded


class MergedCounters:
    """Item counters summed over a worker's stores (see the module docstring)."""

    def __init__(self, stores: Mapping[int, PartitionStore], config: CounterConfig) -> None:
        self._stores = stores
        self.config = config
        self._half_life_ms = config.half_life_s * 1000.0
        self._items = IdMap(capacity=2**62)
        self._maps: dict[int, IntArray] = {}  # partition -> merged row of each of its rows
        self._synced: dict[int, tuple[int, int, int]] = {}  # partition -> (id(counters), rows, evicted)

    @property
    def items(self) -> IdMap:
        """The merged id map: one row per item seen in any store (rows of ``scores``)."""
        self._sync()
        return self._items

    def _sync(self) -> None:
        """Extend the merged map with new items; rebuild it after an eviction or a store's move."""
        stores = self._stores
        stale = set(self._synced) != set(stores) or any(
            self._synced[p][0] != id(store.counters) or self._synced[p][2] != store.counters.evicted
            for p, store in stores.items()
        )
        if stale:
            self._items = IdMap(capacity=2**62)
            self._maps = {}
            self._synced = {}
        for partition, store in sorted(stores.items()):
            ids = store.counters.items
            done = self._synced.get(partition, (0, 0, 0))[1]
            if len(ids) > done:
                fresh = [ids.id_of(row) for row in range(done, len(ids))]
                rows = np.fromiter((self._items.row(key) if key else -1 for key in fresh), dtype=np.int64)
                previous = self._maps.get(partition, np.zeros(0, dtype=np.int64))
                self._maps[partition] = np.concatenate([previous, rows])
            self._synced[partition] = (id(store.counters), len(ids), store.counters.evicted)

    @property
    def now_ms(self) -> int | None:
        """The newest event time counted in any store: the reference of decayed scores."""
        times = [t for store in self._stores.values() if (t := store.counters.now_ms) is not None]
        return max(times) if times else None

    @property
    def evicted(self) -> int:
        return sum(store.counters.evicted for store in self._stores.values())

    def total(self, item: str, event_type: str | None = None) -> int:
        return sum(store.counters.total(item, event_type) for store in self._stores.values())

    def decayed(self, item: str, event_type: str | None = None, *, at_ms: int | None = None) -> float:
        at = at_ms if at_ms is not None else self.now_ms
        return sum(store.counters.decayed(item, event_type, at_ms=at) for store in self._stores.values())

    def windowed(self, item: str, window_s: int, event_type: str | None = None) -> int:
        index = self._window_index(window_s)
        count = 0
        for store in self._stores.values():
            counters = store.counters
            count += counters.windowed(item, window_s, event_type)
            row = counters.items.lookup(item)
            if row < 0:
                continue
            kind = counters.types.lookup(event_type) if event_type is not None else -1
            if event_type is not None and kind < 0:
                continue  # this store never saw the type: nothing counted, nothing to subtract
            for kinds, rows in self._expired(counters, index):
                hit = rows == row
                if kind >= 0:
                    hit &= kinds == kind
                count -= int(hit.sum())
        return count

    def _window_index(self, window_s: int) -> int:
        try:
            return self.config.windows_s.index(window_s)
        except ValueError:
            raise ValueError(f"no {window_s} s window; configured: {self.config.windows_s}") from None

    def _expired(self, counters: ItemCounters, index: int) -> list[tuple[IntArray, IntArray]]:
        """The window records of a store that the newest bucket of all stores has expired.

        A store's window ends at its own newest bucket; the merged window ends at the newest bucket
        of any store, as one store of the whole stream would. The store still holds the records of
        every bucket in its own window (to subtract them when they expire), so the buckets between
        the two ends are subtracted here, and the merged count is exactly one store's.
        """
        watermarks = [store.counters._watermarks[index] for store in self._stores.values()]
        cut = max(watermarks, default=0) - self.config.buckets + 1  # oldest live bucket, merged
        pending = counters._pending[index]
        return [record for bucket, records in pending.items() if bucket < cut for record in records]

    def scores(self, kind: str | int, event_type: str | None = None) -> FloatArray:
        """Scores of every merged row: ``"total"``, ``"decayed"`` or a window in seconds."""
        self._sync()
        out = np.zeros(len(self._items) + 1)  # the last slot takes evicted rows, then is dropped
        now = self.now_ms
        for partition, store in self._stores.items():
            counters = store.counters
            values = counters.scores(kind, event_type)
            if kind == "decayed" and now is not None and counters.now_ms is not None:
                values = values * np.exp2(-(now - counters.now_ms) / self._half_life_ms)
            elif isinstance(kind, int):
                wanted = counters.types.lookup(event_type) if event_type is not None else -1
                for kinds, rows in self._expired(counters, self._window_index(kind)):
                    if event_type is not None:
                        rows = rows[kinds == wanted]
                    np.subtract.at(values, rows[rows < len(values)], 1.0)
            rows = self._maps.get(partition, np.zeros(0, dtype=np.int64))[: len(values)]
            out[np.where(rows >= 0, rows, len(self._items))] += values[: len(rows)]
        merged: FloatArray = out[:-1]
        return merged

    def top(
        self, k: int, kind: str | int = "total", event_type: str | None = None
    ) -> list[tuple[str, float]]:
        """The ``k`` items with the highest summed score, best first."""
        values = self.scores(kind, event_type)
        if not len(values) or k <= 0:
            return []
        return [
            (self._items.id_of(int(row)), float(values[row]))
            for row in top_rows(values, k)
            if values[row] > 0
        ]

    def newest(self, n: int) -> list[str]:
        """New arrivals: each store's newest first-seen items, taken in turn (an approximation of
        the order one store would give: first sightings in different partitions are not ordered)."""
        lists = [store.counters.newest(n) for _, store in sorted(self._stores.items())]
        out: list[str] = []
        seen: set[str] = set()
        for rank in range(max((len(items) for items in lists), default=0)):
            for items in lists:
                if rank < len(items) and items[rank] not in seen:
                    seen.add(items[rank])
                    out.append(items[rank])
        return out[:n] if n > 0 else []

    def nbytes(self) -> int:
        return sum(store.counters.nbytes() for store in self._stores.values())


class MergedHistories:
    """Users' histories over a worker's stores: each user is in one of them."""

    def __init__(self, stores: Mapping[int, PartitionStore], *, max_len: int) -> None:
        self._stores = stores
        self.max_len = max_len

    def _of(self, user: str) -> UserHistories | None:
        for store in self._stores.values():
            if store.histories.recent_items(user, 1):
                return store.histories
        return None

    def __len__(self) -> int:
        return sum(len(store.histories) for store in self._stores.values())

    @property
    def evicted(self) -> int:
        return sum(store.histories.evicted for store in self._stores.values())

    def get(self, user: str) -> list[HistoryEntry]:
        histories = self._of(user)
        return histories.get(user) if histories is not None else []

    def items(self, user: str) -> list[str]:
        histories = self._of(user)
        return histories.items(user) if histories is not None else []

    def recent_items(self, user: str, n: int) -> list[str]:
        histories = self._of(user)
        return histories.recent_items(user, n) if histories is not None else []


class MergedCoOccurrence:
    """Co-occurrence counts summed over a worker's stores."""

    def __init__(self, stores: Mapping[int, PartitionStore], *, min_count: int = 1) -> None:
        self._stores = stores
        self.min_count = min_count

    def __len__(self) -> int:
        return len({item for store in self._stores.values() for item in store.cooccurrence._counts})

    @property
    def pruned(self) -> int:
        return sum(store.cooccurrence.pruned for store in self._stores.values())

    def neighbours(self, item_id: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` items most often seen near ``item_id``, strongest first (ties by id)."""
        summed: dict[str, float] = {}
        for store in self._stores.values():
            for other, count in store.cooccurrence.neighbours(item_id, 2 * store.cooccurrence.max_neighbours):
                summed[other] = summed.get(other, 0.0) + count
        return sorted(summed.items(), key=lambda kv: (-kv[1], kv[0]))[:k]

    def score(self, recent: Iterable[str], *, exclude: set[str] | None = None) -> dict[str, float]:
        recent = list(recent)
        scores: dict[str, float] = {}
        for store in self._stores.values():
            for other, value in store.cooccurrence.score(recent, exclude=exclude).items():
                scores[other] = scores.get(other, 0.0) + value
        return scores


class MergedClicks:
    """Impressions and attributed clicks summed over a worker's stores, as one Beta posterior."""

    def __init__(self, stores: Mapping[int, PartitionStore], *, alpha: float, beta: float) -> None:
        self._stores = stores
        self.alpha = alpha
        self.beta = beta

    @property
    def unattributed(self) -> int:
        return sum(store.clicks.unattributed for store in self._stores.values())

    @property
    def pending(self) -> int:
        return sum(store.clicks.pending for store in self._stores.values())

    def posterior(self, item_id: str) -> CtrPosterior:
        n = c = 0
        for store in self._stores.values():
            part = store.clicks.posterior(item_id)
            n, c = n + part.impressions, c + part.clicks
        a, b = self.alpha + c, self.beta + n - c
        mean = a / (a + b)
        return CtrPosterior(item_id, n, c, mean, mean * (1.0 - mean) / (a + b + 1.0))

    def moments(self, items: Sequence[str]) -> tuple[FloatArray, FloatArray]:
        n = np.zeros(len(items))
        c = np.zeros(len(items))
        for store in self._stores.values():
            for index, item in enumerate(items):
                n[index] += store.clicks._impressions.get(item, 0)
                c[index] += store.clicks._clicks.get(item, 0)
        total = self.alpha + self.beta + n
        mean = (self.alpha + c) / total
        return mean, mean * (1.0 - mean) / (total + 1.0)


class MergedRecent:
    """The recent event ids of every store (an id is remembered in its user's partition)."""

    def __init__(self, stores: Mapping[int, PartitionStore]) -> None:
        self._stores = stores

    def __contains__(self, event_id: str) -> bool:
        return any(event_id in store.recent for store in self._stores.values())

    def __len__(self) -> int:
        return sum(len(store.recent) for store in self._stores.values())

    def state_dict(self) -> dict[str, Any]:
        return {str(p): store.recent.state_dict() for p, store in self._stores.items()}


class RoutedHead(Head):
    """A head kept per partition, answering for a user from the head of the user's partition."""

    def __init__(
        self, name: str, prototype: Head, stores: Mapping[int, PartitionStore], partitions: int
    ) -> None:
        self.name = name
        self._prototype = copy.deepcopy(prototype)  # untrained: what a head says before learning
        self._stores = stores
        self.partitions = partitions

    def for_user(self, user_id: str) -> Head:
        """The head that learns from ``user_id``'s events (an untrained one if not owned here)."""
        store = self._stores.get(partition_of(user_id, self.partitions))
        return store.heads[self.name] if store is not None else self._prototype

    def learn_one(self, event: Event) -> None:
        self.for_user(event.user_id).learn_one(event)

    def predict_one(self, user_id: str, item_id: str) -> float:
        return self.for_user(user_id).predict_one(user_id, item_id)

    def uncertainty_one(self, user_id: str, item_id: str) -> float:
        return self.for_user(user_id).uncertainty_one(user_id, item_id)

    def rank(self, user_id: str, items: Sequence[str]) -> list[str]:
        return self.for_user(user_id).rank(user_id, items)

    @property
    def size(self) -> int:
        return sum(store.heads[self.name].size for store in self._stores.values())

    def state_dict(self) -> dict[str, Any]:
        return {str(p): store.heads[self.name].state_dict() for p, store in self._stores.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for partition, head_state in state.items():
            store = self._stores.get(int(partition))
            if store is not None:
                store.heads[self.name].load_state_dict(head_state)

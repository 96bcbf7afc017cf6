"""The MF head kept per partition (as stream workers keep it) beside one head over the whole stream.

    python bench/partitioned_heads.py [--dataset ml-100k] [--partitions 4] [--sample 5]

Prequential (test-then-train) on the dataset in time order, without Kafka: before each sampled
event, each variant ranks every item seen so far for the user, minus the items the user already
had, and a hit is the event's item in the top 10; then every variant learns the event. ``global``
is one :class:`~learners.mf.MatrixFactorisationHead` fed every event; ``per-partition`` is one head
per partition (users routed by :func:`streams.stores.partition_of`, as the producer routes them),
each fed its partition's events and scoring its own users. Ties go by first appearance. Prints
HR@10 and NDCG@10 of both, and their ratio.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import numpy.typing as npt
import orjson

from freshrec.datasets import load_dataset
from freshrec.events import Event
from freshrec.settings import Settings
from learners.mf import MatrixFactorisationHead
from streams.ids import IdMap
from streams.stores import partition_of

FloatArray = npt.NDArray[np.float64]


class _Mirror:
    """A head and its item factors mirrored by row, for one product per scoring."""

    def __init__(self) -> None:
        self.head = MatrixFactorisationHead()
        self.factors = np.zeros((1024, 0))  # widened to the head's factors at the first update
        self.biases = np.zeros(1024)

    def learn(self, event: Event, items: IdMap) -> None:
        self.head.learn_one(event)
        for touched in self.head.touched:
            found = self.head.item_factors(touched)
            row = items.lookup(touched)
            if found is None or row < 0:
                continue
            vector, bias = found
            self._ensure(row + 1)
            if self.factors.shape[1] != len(vector):
                self.factors = np.zeros((len(self.biases), len(vector)))
            self.factors[row], self.biases[row] = vector, bias

    def _ensure(self, rows: int) -> None:
        while rows > len(self.biases):
            self.factors = np.vstack([self.factors, np.zeros_like(self.factors)])
            self.biases = np.concatenate([self.biases, np.zeros_like(self.biases)])

    def scores(self, user: str, n: int) -> FloatArray:
        self._ensure(n)
        base = self.biases[:n] + self.head.global_mean
        found = self.head.user_factors(user)
        if found is None:
            return base
        vector, bias = found
        scored: FloatArray = self.factors[:n] @ np.asarray(vector, dtype=np.float64) + base + bias
        return scored


def _rank(values: FloatArray, target: int) -> int:
    score = values[target]
    return int((values > score).sum() + (values[:target] == score).sum())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--sample", type=int, default=5, help="Score every N-th event (all learn).")
    args = parser.parse_args()
    settings = Settings()
    records = load_dataset(
        args.dataset, datasets_dir=settings.datasets_dir, cache_dir=settings.cache_dir
    ).records
    items = IdMap(capacity=10_000_000)
    single = _Mirror()
    parts = [_Mirror() for _ in range(args.partitions)]
    seen: dict[str, list[int]] = {}
    hits = {"global": 0, "per-partition": 0}
    ndcg = {"global": 0.0, "per-partition": 0.0}
    scored = 0
    started = time.perf_counter()
    for index, record in enumerate(records):
        raw = orjson.loads(record.value)
        event = Event(
            event_id=raw["event_id"],
            user_id=raw["user_id"],
            item_id=raw["item_id"],
            type=raw["type"],
            ts_ms=int(raw["ts"]),
            value=raw.get("value"),
        )
        own = parts[partition_of(event.user_id, args.partitions)]
        target = items.lookup(event.item_id)
        history = seen.setdefault(event.user_id, [])
        if index % args.sample == 0 and target >= 0 and target not in history:
            scored += 1
            n = len(items)
            for name, mirror in (("global", single), ("per-partition", own)):
                values = mirror.scores(event.user_id, n)
                values[history] = -np.inf
                rank = _rank(values, target)
                if rank < 10:
                    hits[name] += 1
                    ndcg[name] += 1.0 / math.log2(rank + 2)
        row = items.row(event.item_id)
        history.append(row)
        single.learn(event, items)
        own.learn(event, items)
    elapsed = time.perf_counter() - started
    print(
        f"{args.dataset}, {len(records):,} events, {scored:,} scored, "
        f"{args.partitions} partitions, {elapsed:.0f} s"
    )
    print(f"{'mf head':<16}{'HR@10':>8}{'NDCG@10':>9}")
    for name in hits:
        print(f"{name:<16}{hits[name] / scored:>8.4f}{ndcg[name] / scored:>9.4f}")
    print(f"per-partition / global HR@10: {hits['per-partition'] / max(hits['global'], 1):.2f}")


if __name__ == "__main__":
    main()

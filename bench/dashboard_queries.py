"""Dashboard panels on the embedded ClickHouse: how long each query takes as the log grows.

The built-in page polls every panel every 5 s and Grafana refreshes every 10 s, so a panel should
answer well within that. For ``--events`` synthetic events (Zipf items, users with sessions, event
times spread over ``--days``; one impression log with clicks for 1% of them), each panel's query
is timed over all the data (the page's default range, about 240 buckets), beside a baseline
measured in the same run on the same table: ``SELECT count() FROM events FINAL`` (one pass over the
deduplicated table).

    .venv/bin/python bench/dashboard_queries.py --events 100000 1000000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from freshrec import queries
from freshrec.settings import Settings
from freshrec.store import Store, open_store


def fill(store: Store, events: int, days: int, rng: np.random.Generator) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    users = rng.integers(0, max(1, events // 50), size=events)
    items = rng.zipf(1.2, size=events) % max(1, events // 20)
    offsets = np.sort(rng.integers(0, days * 86_400_000, size=events))
    ts = [start + timedelta(milliseconds=int(ms)) for ms in offsets]
    kinds = np.array(["view", "click", "purchase"])[rng.choice(3, size=events, p=[0.85, 0.12, 0.03])]
    columns = {
        "event_id": [f"e{n}" for n in range(events)],
        "user_id": [f"u{u}" for u in users],
        "item_id": [f"i{i}" for i in items],
        "type": kinds.tolist(),
        "ts": ts,
        "value": [None] * events,
        "topic": ["events"] * events,
        "partition": (np.arange(events) % 4).tolist(),
        "offset": list(range(events)),
        "kafka_ts": ts,
        "ingested_at": [t + timedelta(milliseconds=200) for t in ts],
    }
    for begin in range(0, events, 200_000):
        part = [values[begin : begin + 200_000] for values in columns.values()]
        store.insert("events", part, column_names=list(columns))
    served = max(1, events // 100)  # one response of 10 slots per 100 events
    slots = served * 10
    impressions = {
        "request_id": [f"r{n // 10}" for n in range(slots)],
        "user_id": [f"u{int(users[(n // 10) % events])}" for n in range(slots)],
        "position": [n % 10 for n in range(slots)],
        "item_id": [f"i{int(i)}" for i in rng.zipf(1.2, size=slots) % max(1, events // 20)],
        "score": [1.0] * slots,
        "source": ["transformer"] * slots,
        "explore": [n % 10 in (3, 7) for n in range(slots)],
        "propensity": [1.0] * slots,
        "policy": ["uncertainty"] * slots,
        "model_version": [1] * slots,
        "latency_ms": [2.0] * slots,
        "served_at": [ts[(n // 10) * 100 % events] for n in range(slots)],
        "topic": ["impressions"] * slots,
        "partition": [0] * slots,
        "offset": list(range(slots)),
    }
    store.insert("impressions", list(impressions.values()), column_names=list(impressions))


def timed(run: object, repeats: int) -> float:
    """Median seconds of ``run()`` over ``repeats`` calls, after one warm-up."""
    assert callable(run)
    run()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="freshrec-bench-dash-") as tmp:
        run(Path(tmp), args.events, args.days, args.repeats)


def run(home: Path, sizes: list[int], days: int, repeats: int) -> None:
    store = open_store(Settings(home=home))  # chDB: one path per process, one database per size
    try:
        rng = np.random.default_rng(0)
        print(f"chDB at {home}; median of {repeats} after a warm-up; ms, and x the baseline")
        for events in sizes:
            database = f"bench_{events}"
            sized = Store(client=store.client, database=database, dsn_kind=store.dsn_kind)
            sized.migrate()
            fill(sized, events, days, rng)
            baseline = timed(
                lambda s=sized: s.rows(f"SELECT count() FROM {s.table('events')} FINAL"), repeats
            )
            print(f"\n{events:,} events ({days} days): baseline count() FINAL {baseline * 1000:.1f} ms")
            print(f"{'panel':22} {'ms':>9} {'x base':>8} {'rows':>6}")
            for name in queries.QUERIES:
                rows = len(queries.panel(sized, name).rows)
                seconds = timed(lambda n=name, s=sized: queries.panel(s, n), repeats)
                print(f"{name:22} {seconds * 1000:>9.1f} {seconds / baseline:>8.1f} {rows:>6}")
    finally:
        store.close()


if __name__ == "__main__":
    main()

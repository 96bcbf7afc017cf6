"""Sink throughput: Kafka ``events`` → validated → ClickHouse, beside two baselines in the same run.

    python bench/sink_throughput.py [--events 500000] [--rounds 2]

Baselines, each a fresh consumer group reading the same topic:
1. ``bare``: a confluent-kafka batch ``consume(10000)`` loop that only counts messages;
2. ``decode``: the same loop, plus ``orjson.loads`` of every message;
3. ``sink``: :class:`streams.sink.AuditSink` — validation, dedup, column building and chDB inserts.

Each rate is timed from the first message received to the last one handled, so group joins do not
count. The best of ``--rounds`` is reported for each, with the sink's ratio to both baselines.
Uses ``FRESHREC_KAFKA_BOOTSTRAP`` when set, else starts a local broker on free ports in a temp home.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from typing import Any

import orjson
from harness import bench_cluster, consume_loop, time_batches

from freshrec.settings import Settings, SinkSettings
from freshrec.store import open_store
from streams.producer import EventProducer
from streams.sink import AuditSink


def _events(n: int, seed: int = 1) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    now = int(time.time() * 1000) - 86_400_000
    out = []
    for i in range(n):
        user = f"u{rng.randrange(50_000)}"
        event = {
            "event_id": f"bench-{i}",
            "user_id": user,
            "item_id": f"i{int(rng.paretovariate(1.2)) % 100_000}",
            "type": ("view", "view", "view", "click", "purchase")[i % 5],
            "ts": now + i,
        }
        out.append((user.encode(), orjson.dumps(event)))
    return out


def _sink_rate(settings: Settings, n: int) -> tuple[float, float]:
    """Events/s of the sink, and the share of its time spent inside ClickHouse inserts."""
    store = open_store(settings)
    insert_s = 0.0
    real_insert = store.insert

    def timed_insert(*args: Any, **kwargs: Any) -> None:
        nonlocal insert_s
        started = time.perf_counter()
        real_insert(*args, **kwargs)
        insert_s += time.perf_counter() - started

    store.insert = timed_insert  # type: ignore[method-assign]
    run_settings = settings.model_copy(
        update={"sink": SinkSettings(group_id=f"bench-sink-{uuid.uuid4().hex}", batch_size=10_000)}
    )
    sink = AuditSink(settings=run_settings, store=store)
    elapsed = time_batches(sink, "_process", lambda: sink.stats.consumed, n)
    rows = store.rows(f"SELECT count() FROM {store.table('events')} WHERE startsWith(event_id, 'bench-')")
    store.command(f"TRUNCATE TABLE {store.table('events')}")
    store.close()
    assert sink.stats.events == n, (sink.stats, rows)
    return n / elapsed, insert_s / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, bench_cluster(clickhouse_dsn=f"chdb://{tmp}/chdb") as base:
        events = _events(args.events)
        started = time.perf_counter()
        with EventProducer(base) as producer:
            for key, value in events:
                producer.produce(base.topics.events, value, key=key)
        produce_s = time.perf_counter() - started
        size = sum(len(v) for _, v in events) / len(events)
        print(f"produced {args.events:,} events ({size:.0f} B avg) in {produce_s:.1f} s", file=sys.stderr)

        best = {"bare": 0.0, "decode": 0.0, "sink": 0.0}
        insert_share = 0.0
        for round_no in range(1, args.rounds + 1):
            sink_rate, share = _sink_rate(base, args.events)
            rates = {
                "bare": consume_loop(base, args.events),
                "decode": consume_loop(base, args.events, orjson.loads),
                "sink": sink_rate,
            }
            if sink_rate > best["sink"]:
                insert_share = share
            print(
                f"round {round_no}: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in rates.items()),
                file=sys.stderr,
            )
            best = {k: max(best[k], rates[k]) for k in best}
        print(f"\nsink throughput, {args.events:,} events, best of {args.rounds} rounds")
        print(f"{'loop':<10}{'events/s':>12}{'sink / loop':>14}")
        for name, rate in best.items():
            print(f"{name:<10}{rate:>12,.0f}{best['sink'] / rate:>14.2f}")
        print(f"share of the sink's time inside ClickHouse inserts: {insert_share:.0%}")


if __name__ == "__main__":
    main()

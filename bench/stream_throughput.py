"""Stream worker throughput: counters beside a bare consume-and-decode loop, in the same run.

    python bench/stream_throughput.py [--events 1000000] [--rounds 1]

Synthetic events, Zipf-distributed items (exponent 1.1 over 100,000 items), 200,000 users, through
the local broker (or ``FRESHREC_KAFKA_BOOTSTRAP``). Each loop is a fresh consumer group timed from its
first message to its last. Reported: events/s of the baseline (``consume(10000)`` + ``orjson.loads``)
and of :class:`streams.worker.StreamWorker` keeping every role, then each role alone (checkpoints
every 5 s included), their ratios, the counters' memory, and freshness under load with one worker
and with the roles split into processes. Then the state changelog: the size of the state of the
events per role set, how fast it is encoded and written to the changelog (snapshot MiB/s), and how
long a worker with an empty home takes to restore it from Kafka, and freshness while the counters
group scales out from one worker to two with the state of the events behind it (the rebalance
pause: flush, restore). ``--state-only`` measures only these.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import orjson
from harness import bench_cluster, consume_loop, produce_synthetic, time_batches

from freshrec.settings import Settings, StreamSettings
from learners.registry import build_heads
from streams.admin import ensure_topics
from streams.changelog import Changelog
from streams.producer import EventProducer
from streams.reader import StateReader
from streams.state_codec import encode_state
from streams.worker import StreamWorker

ALL_ROLES = ("counters", "sequences", "heads")


def _worker_rate(settings: Settings, n: int, roles: tuple[str, ...]) -> tuple[float, int]:
    group = f"bench-stream-{uuid.uuid4().hex[:8]}"
    stream = StreamSettings(group_id=group, roles=roles)
    worker = StreamWorker(settings.model_copy(update={"stream": stream}), heads=build_heads(stream))
    elapsed = time_batches(worker, "_apply", lambda: worker.stats.consumed, n)
    assert worker.stats.counted == n, worker.stats
    return n / elapsed, worker.state.counters.nbytes()


def _state_costs(settings: Settings, n: int, roles: tuple[str, ...]) -> dict[str, float]:
    """The changelog's costs for the state of ``n`` events: a worker keeping ``roles`` counts them
    (no periodic snapshot), then every partition is encoded and written to the changelog (timed
    apart), and a worker with an empty home restores them all (read, verify, decode, load)."""
    group = f"bench-state-{uuid.uuid4().hex[:8]}"
    stream = StreamSettings(group_id=group, roles=roles, checkpoint_interval_s=3_600.0)
    worker = StreamWorker(settings.model_copy(update={"stream": stream}), heads=build_heads(stream))
    time_batches(worker, "_apply", lambda: worker.stats.consumed, n)  # its exit flushes every partition
    stores = worker.state.stores
    started = time.perf_counter()
    payloads = {p: encode_state(store.state_dict()) for p, store in stores.items()}
    encoded = time.perf_counter() - started
    size = sum(len(payload) for payload in payloads.values())
    with Changelog(settings.model_copy(update={"stream": stream})) as changelog:
        changelog.restore(list(payloads))  # what an owner knows before writing
        started = time.perf_counter()
        for partition, payload in payloads.items():
            changelog.write(partition, payload, stores[partition].offsets)
        written = time.perf_counter() - started
    empty = settings.model_copy(update={"stream": stream, "home": settings.home / group})
    fresh = StreamWorker(empty, heads=build_heads(stream))
    started = time.perf_counter()
    restored = fresh.restore()
    restore_s = time.perf_counter() - started
    assert sum(o.get(settings.topics.events, 0) for o in restored.values()) == n
    return {"bytes": size, "encode_s": encoded, "write_s": written, "restore_s": restore_s}


def _scale_out(
    settings: Settings, *, rate: int, seconds: float, backlog: int
) -> tuple[list[float], list[float]]:
    """Freshness while the counters group scales out from one worker to two.

    A topic of its own gets ``backlog`` events first (state to flush and restore), then load at
    ``rate`` events/s; a probe event for a new item every 0.1 s is timed until either worker counts
    it. A third of the way in, a second worker joins the group: the first flushes the partitions it
    gives up to the changelog, the second restores them. Returns the probes' latencies before the
    join and from the join on, each sorted."""
    group = f"bench-scale-{uuid.uuid4().hex[:8]}"
    stream = StreamSettings(group_id=group, roles=("counters",), session_timeout_ms=10_000)
    settings = settings.model_copy(
        update={"topic_prefix": f"{settings.topic_prefix}{group}.", "stream": stream}
    )
    ensure_topics(settings)
    with EventProducer(settings) as producer:
        for i in range(backlog):
            event = {"event_id": f"b{i}", "user_id": f"u{i % 50_000}", "item_id": f"i{i % 50_000}",
                     "type": "view", "ts": int(time.time() * 1000)}  # fmt: skip
            producer.produce(settings.topics.events, orjson.dumps(event), key=f"u{i % 50_000}".encode())
    workers = [
        StreamWorker(settings.model_copy(update={"stream": stream.model_copy(update={"worker_id": w})}))
        for w in ("a", "b")
    ]
    threads = [threading.Thread(target=w.run) for w in workers]
    threads[0].start()
    while not workers[0].assigned or workers[0].stats.consumed < backlog:
        time.sleep(0.05)
    stop = threading.Event()

    def load() -> None:
        with EventProducer(settings) as producer:
            sent, started = 0, time.perf_counter()
            while not stop.is_set():
                for _ in range(int((time.perf_counter() - started) * rate) - sent):
                    user = f"u{sent % 50_000}"
                    event = {"event_id": f"{group}-{sent}", "user_id": user, "item_id": f"i{sent % 20_000}",
                             "type": "view", "ts": int(time.time() * 1000)}  # fmt: skip
                    producer.produce(settings.topics.events, orjson.dumps(event), key=user.encode())
                    sent += 1
                time.sleep(0.002)

    def counted(item: str) -> bool:
        for worker in workers:
            with worker.lock:
                if worker.state.counters.total(item) > 0:
                    return True
        return False

    loader = threading.Thread(target=load)
    loader.start()
    before: list[float] = []
    after: list[float] = []
    try:
        with EventProducer(settings, **{"linger.ms": 0}) as producer:
            started = time.perf_counter()
            probe = 0
            while time.perf_counter() - started < seconds:
                joined = len(threads) == 2 and threads[1].is_alive()
                if not joined and time.perf_counter() - started > seconds / 3:
                    threads[1].start()
                    joined = True
                item = f"probe-{group}-{probe}"
                event = {"event_id": item, "user_id": f"p{probe}", "item_id": item, "type": "click",
                         "ts": int(time.time() * 1000)}  # fmt: skip
                sent_at = time.perf_counter()
                producer.produce(settings.topics.events, orjson.dumps(event), key=f"p{probe}".encode())
                producer.flush()
                while not counted(item):
                    time.sleep(0.002)
                (after if joined else before).append(time.perf_counter() - sent_at)
                probe += 1
                time.sleep(max(0.0, 0.1 - (time.perf_counter() - sent_at)))
        owned = sorted(workers[0].assigned | workers[1].assigned)
        split = bool(workers[0].assigned) and bool(workers[1].assigned)
        assert owned == list(range(settings.broker_partitions)) and split, "the group did not scale out"
    finally:
        stop.set()
        loader.join()
        for worker in workers:
            worker.stop()
        for thread in threads:
            if thread.is_alive() or thread.ident is not None:
                thread.join()
    return sorted(before), sorted(after)


def _freshness(settings: Settings, *, rate: int, seconds: float, batch_size: int, split: bool) -> list[float]:
    """Produce at ``rate`` events/s for ``seconds``; every 0.1 s a probe event for a fresh item is
    produced and the read API polled until its counters count it. ``split=False``: one worker keeps
    every role in this process. ``split=True``: this process keeps the counters role, and the
    sequences and heads roles run as ``freshrec stream --role ...`` processes on the same topic."""
    group = f"bench-fresh-{uuid.uuid4().hex[:8]}"
    # A topic of its own: freshness is about new events, not a backlog.
    roles = ("counters",) if split else ALL_ROLES
    settings = settings.model_copy(
        update={
            "topic_prefix": f"{settings.topic_prefix}{group}.",
            "stream": StreamSettings(group_id=group, batch_size=batch_size, roles=roles),
        }
    )
    ensure_topics(settings)
    others: list[subprocess.Popen[bytes]] = []
    if split:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")} | {
            "FRESHREC_HOME": str(settings.home),
            "FRESHREC_KAFKA_BOOTSTRAP": settings.bootstrap,
            "FRESHREC_TOPIC_PREFIX": settings.topic_prefix,
            "FRESHREC_STREAM__GROUP_ID": group,
            "FRESHREC_STREAM__BATCH_SIZE": str(batch_size),
        }
        for role in ("sequences", "heads"):
            command = [sys.executable, "-m", "freshrec_app", "stream", "--role", role]
            others.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL))
    worker = StreamWorker(settings, heads=build_heads(settings.stream))
    reader = StateReader(worker)
    thread = threading.Thread(target=worker.run)
    thread.start()
    while not worker.assigned:
        time.sleep(0.05)
    latencies: list[float] = []
    stop = threading.Event()

    def load() -> None:
        with EventProducer(settings) as producer:
            sent, started = 0, time.perf_counter()
            while not stop.is_set():
                due = int((time.perf_counter() - started) * rate)
                for _ in range(due - sent):
                    user = f"u{sent % 50_000}"
                    event = {
                        "event_id": f"{group}-{sent}",
                        "user_id": user,
                        "item_id": f"i{sent % 20_000}",
                        "type": "view",
                        "ts": int(time.time() * 1000),
                    }
                    producer.produce(settings.topics.events, orjson.dumps(event), key=user.encode())
                    sent += 1
                time.sleep(0.002)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        with EventProducer(settings, **{"linger.ms": 0}) as producer:
            deadline = time.perf_counter() + seconds
            probe = 0
            while time.perf_counter() < deadline:
                item = f"probe-{group}-{probe}"
                event = {
                    "event_id": item,
                    "user_id": f"p{probe}",
                    "item_id": item,
                    "type": "click",
                    "ts": int(time.time() * 1000),
                }
                sent_at = time.perf_counter()
                producer.produce(settings.topics.events, orjson.dumps(event), key=f"p{probe}".encode())
                producer.flush()
                while reader.counts(item).total < 1:
                    time.sleep(0.002)
                latencies.append(time.perf_counter() - sent_at)
                probe += 1
                time.sleep(max(0.0, 0.1 - (time.perf_counter() - sent_at)))
    finally:
        stop.set()
        loader.join()
        worker.stop()
        thread.join()
        for process in others:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    return sorted(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--fresh-rate", type=int, default=20_000, help="Events/s of load while probing.")
    parser.add_argument("--fresh-seconds", type=float, default=15.0)
    parser.add_argument("--fresh-batch", type=int, default=2_000, help="Worker batch size while probing.")
    parser.add_argument(
        "--state-only", action="store_true", help="Measure only the changelog's snapshot and restore costs."
    )
    args = parser.parse_args()
    with bench_cluster() as settings:
        started = time.perf_counter()
        produce_synthetic(settings, args.events)
        print(f"produced {args.events:,} events in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        configs = {
            "all": ALL_ROLES,
            "counters+sequences": ("counters", "sequences"),
            "counters": ("counters",),
            "sequences": ("sequences",),
            "heads": ("heads",),
        }
        print(f"\nstream state in the changelog, {args.events:,} events")
        print(
            f"{'roles':<24}{'MiB':>8}{'encode MiB/s':>14}{'write MiB/s':>13}"
            f"{'snapshot MiB/s':>16}{'restore s':>11}"
        )
        for name in ("counters", "counters+sequences", "all"):
            cost = _state_costs(settings, args.events, configs[name])
            mib = cost["bytes"] / 2**20
            print(
                f"{name:<24}{mib:>8.1f}{mib / cost['encode_s']:>14.1f}{mib / cost['write_s']:>13.1f}"
                f"{mib / (cost['encode_s'] + cost['write_s']):>16.1f}{cost['restore_s']:>11.2f}"
            )
        before, after = _scale_out(
            settings, rate=args.fresh_rate, seconds=args.fresh_seconds, backlog=args.events
        )
        for label, latencies in (("one worker", before), ("from the second one's join", after)):
            p50 = latencies[len(latencies) // 2]
            p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
            print(
                f"scale-out 1 -> 2 counters workers at {args.fresh_rate:,} events/s, {label}: "
                f"{len(latencies)} probes, p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
                f"max {latencies[-1] * 1000:.0f} ms"
            )
        if args.state_only:
            return
        best = dict.fromkeys(["loop", *configs], 0.0)
        memory = 0
        for round_no in range(1, args.rounds + 1):
            rates = {"loop": consume_loop(settings, args.events, orjson.loads)}
            for name, roles in configs.items():
                rates[name], nbytes = _worker_rate(settings, args.events, roles)
                memory = max(memory, nbytes)
            print(
                f"round {round_no}: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in rates.items()),
                file=sys.stderr,
            )
            best = {k: max(best[k], rates[k]) for k in best}
        print(f"\nstream throughput, {args.events:,} events, best of {args.rounds}")
        print(f"{'loop':<52}{'events/s':>12}{'ratio':>8}")
        print(f"{'consume + orjson.loads':<52}{best['loop']:>12,.0f}{1.0:>8.2f}")
        labels = {
            "all": "one worker, every role (mf + engagement heads)",
            "counters+sequences": "one worker, counters + sequences (no heads)",
            "counters": "role: counters (item counters, CTR)",
            "sequences": "role: sequences (histories, co-occurrence)",
            "heads": "role: heads (mf + engagement)",
        }
        for name, label in labels.items():
            print(f"{label:<52}{best[name]:>12,.0f}{best[name] / best['loop']:>8.2f}")
        print(f"counter arrays: {memory / 2**20:.1f} MiB")
        for split in (False, True):
            fresh = _freshness(
                settings,
                rate=args.fresh_rate,
                seconds=args.fresh_seconds,
                batch_size=args.fresh_batch,
                split=split,
            )
            p50, p99 = fresh[len(fresh) // 2], fresh[min(len(fresh) - 1, int(len(fresh) * 0.99))]
            how = "roles split into 3 processes" if split else "one worker, every role"
            print(
                f"freshness at {args.fresh_rate:,} events/s ({how}, batches of {args.fresh_batch:,}), "
                f"{len(fresh)} probes: "
                f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {fresh[-1] * 1000:.0f} ms"
            )


if __name__ == "__main__":
    main()

"""Serving replica start-up: from the stream workers' snapshots beside from offset 0, in the same run.

    python bench/replica_startup.py [--events 1000000] [--rounds 1]

Synthetic events (Zipf-distributed items, exponent 1.1 over 100,000 items; 200,000 users), through
the local broker (or ``FRESHREC_KAFKA_BOOTSTRAP``). A stream worker keeping every role (the
default ``freshrec stream``, with the MF head) counts them all and snapshots each partition to its
changelog on exit. Then a new serving replica is started as its own process (``freshrec serve``,
empty ``FRESHREC_HOME``, new worker id), once with ``FRESHREC_SERVE__BOOTSTRAP=true`` (it restores
the stream workers' snapshots, then follows the topic) and once with ``false`` (it reads ``events``
from offset 0), one after the other. Reported: seconds from the process's start to its first
``GET /readyz`` 200 (polled every 50 ms; caught up within ``FRESHREC_SERVE__READY_MAX_LAG``, 1,000
messages), for each, and their ratio. Python's start and imports are included: they are the floor.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid

import httpx
from harness import bench_cluster, free_port, produce_synthetic

from freshrec.settings import Settings
from learners.registry import build_heads
from streams.worker import StreamWorker

TARGET_S = 15.0  # with bootstrap, at 1M events of history


def _stream_workers(settings: Settings, n: int) -> float:
    """The deployment's stream workers (every role in one group) over the ``n`` events; their exit
    flushes every partition's snapshot. Returns the seconds they took."""
    worker = StreamWorker(settings, heads=build_heads(settings.stream))
    started = time.perf_counter()
    worker.run(until_idle_s=3.0)
    assert worker.stats.counted == n, worker.stats
    return time.perf_counter() - started


def _replica_startup(
    settings: Settings, *, bootstrap: bool, timeout_s: float
) -> tuple[float, dict[str, object]]:
    """Seconds from a new ``freshrec serve`` process's start to its first ``/readyz`` 200, and
    that answer."""
    home = settings.home.parent / f"replica-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
    env.update(
        {
            "FRESHREC_HOME": str(home),
            "FRESHREC_KAFKA_BOOTSTRAP": settings.bootstrap,
            "FRESHREC_TOPIC_PREFIX": settings.topic_prefix,
            "FRESHREC_API_PORT": str(port),
            "FRESHREC_STREAM__WORKER_ID": f"replica-{uuid.uuid4().hex[:8]}",
            "FRESHREC_SERVE__WORKERS": "1",
            "FRESHREC_SERVE__BOOTSTRAP": "true" if bootstrap else "false",
        }
    )
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "freshrec_app", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            while True:
                elapsed = time.perf_counter() - started
                if process.poll() is not None:
                    stderr = process.stderr.read().decode() if process.stderr else ""
                    raise RuntimeError(f"the replica exited ({process.returncode}):\n{stderr[-3000:]}")
                if elapsed > timeout_s:
                    raise RuntimeError(f"the replica was not ready within {timeout_s:.0f} s")
                try:
                    response = http.get("/readyz")
                except httpx.TransportError:  # not listening yet
                    response = None
                if response is not None and response.status_code == 200:
                    answer: dict[str, object] = response.json()
                    return elapsed, answer
                time.sleep(0.05)
    finally:
        process.terminate()
        try:
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3_600.0, help="Longest wait for one replica, s.")
    args = parser.parse_args()
    with bench_cluster() as settings:
        started = time.perf_counter()
        produce_synthetic(settings, args.events)
        print(f"produced {args.events:,} events in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        seconds = _stream_workers(settings, args.events)
        print(f"stream workers counted and snapshotted them in {seconds:.1f} s", file=sys.stderr)
        with_s: list[float] = []
        without_s: list[float] = []
        for round_no in range(1, args.rounds + 1):
            on, on_answer = _replica_startup(settings, bootstrap=True, timeout_s=args.timeout)
            off, off_answer = _replica_startup(settings, bootstrap=False, timeout_s=args.timeout)
            print(
                f"round {round_no}: bootstrap {on:.2f} s (lag {on_answer['lag']}), "
                f"offset 0 {off:.2f} s (lag {off_answer['lag']})",
                file=sys.stderr,
            )
            with_s.append(on)
            without_s.append(off)
    on, off = min(with_s), min(without_s)
    print(f"\nserving replica start-up (process start -> /readyz 200), {args.events:,} events of history")
    print(f"{'from the stream workers snapshots':<36}{on:>9.2f} s   (target <= {TARGET_S:.0f} s at 1M)")
    print(f"{'from offset 0 (bootstrap off)':<36}{off:>9.2f} s")
    print(f"{'ratio offset 0 / bootstrap':<36}{off / on:>9.1f} x")


if __name__ == "__main__":
    main()

"""faust-streaming against confluent-kafka on the stream worker's simplest job, in the same run.

    .venv/bin/pip install -e '.[bench]'   # faust-streaming is not a dependency of freshrec
    python bench/faust_vs_confluent.py [--events 200000]

Both decode each message's JSON and count its item in a dict, reading the same topic (4 partitions,
lz4-compressed batches from our producer) through fresh consumer groups, timed from the first
message to the last: confluent-kafka's batch ``consume(10000)`` loop in this process, and a faust
agent over ``stream.take(1000, within=0.5)`` in its own process (``bench/faust_agent.py``).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import orjson
from harness import bench_cluster, consume_loop

from freshrec.settings import Settings
from streams.producer import EventProducer


def _confluent(settings: Settings, n: int) -> float:
    counts: dict[str, int] = {}
    loads = orjson.loads

    def count(value: bytes) -> None:
        item = loads(value)["item_id"]
        counts[item] = counts.get(item, 0) + 1

    return consume_loop(settings, n, count)


def _faust(settings: Settings, n: int) -> float:
    agent = Path(__file__).with_name("faust_agent.py")
    with tempfile.TemporaryDirectory() as workdir:
        result = subprocess.run(
            [sys.executable, str(agent), settings.bootstrap, settings.topics.events, str(n)],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=workdir,
            check=False,
        )
    match = re.search(r"RESULT faust (\d+)", result.stdout + result.stderr)
    if match is None:
        raise RuntimeError(f"the faust agent failed:\n{result.stderr[-3000:]}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    with bench_cluster() as settings:
        items = np.random.default_rng(3).zipf(1.1, size=args.events) % 100_000
        with EventProducer(settings) as producer:
            for i in range(args.events):
                user = f"u{i % 5000}"
                event = {
                    "event_id": f"f{i}",
                    "user_id": user,
                    "item_id": f"i{items[i]}",
                    "type": "view",
                    "ts": i,
                }
                producer.produce(settings.topics.events, orjson.dumps(event), key=user.encode())
        confluent = _confluent(settings, args.events)
        faust = _faust(settings, args.events)
        print(f"\ndecode + count, {args.events:,} events")
        print(f"{'loop':<44}{'events/s':>12}{'ratio':>8}")
        print(f"{'confluent-kafka consume(10000) loop':<44}{confluent:>12,.0f}{1.0:>8.2f}")
        print(f"{'faust agent, stream.take(1000, within=0.5)':<44}{faust:>12,.0f}{faust / confluent:>8.3f}")


if __name__ == "__main__":
    main()

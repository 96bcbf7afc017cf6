"""faust-streaming against confluent-kafka on the stream worker's simplest job, in the same run.

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
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
from confluent_kafka import Consumer

from freshrec.broker import LocalBroker
from freshrec.settings import Settings
from streams.admin import ensure_topics
from streams.producer import EventProducer


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _confluent(settings: Settings, n: int) -> float:
    consumer = Consumer(
        settings.kafka_config(**{"group.id": f"b-{uuid.uuid4().hex}", "auto.offset.reset": "earliest"})
    )
    consumer.subscribe([settings.topics.events])
    counts: dict[str, int] = {}
    seen, started, loads = 0, 0.0, orjson.loads
    while seen < n:
        batch = consumer.consume(10_000, 1.0)
        if batch and not started:
            started = time.perf_counter()
        for message in batch:
            item = loads(message.value())["item_id"]
            counts[item] = counts.get(item, 0) + 1
        seen += len(batch)
    elapsed = time.perf_counter() - started
    consumer.close()
    return n / elapsed


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
    tmp = Path(tempfile.mkdtemp(prefix="freshrec-bench-"))
    settings = Settings(home=tmp / "home", topic_prefix=f"bench-{uuid.uuid4().hex[:8]}.")
    broker = None
    if settings.uses_local_broker:
        settings = settings.model_copy(
            update={"broker_port": _free_port(), "broker_controller_port": _free_port()}
        )
        broker = LocalBroker(settings)
        broker.start()
    try:
        ensure_topics(settings)
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
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()

"""What the benchmarks share: a Kafka cluster for the run, and the baseline consume loop.

Every benchmark measures freshrec beside a baseline in the same run, on the same topic, because
these machines are noisy; the baseline is a confluent-kafka batch ``consume(10000)`` loop.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer

from freshrec.broker import LocalBroker
from freshrec.settings import Settings
from streams.admin import ensure_topics

__all__ = ["bench_cluster", "consume_loop", "free_port", "time_batches"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def bench_cluster(**overrides: Any) -> Iterator[Settings]:
    """Settings for one benchmark run: its own home and topic prefix, with topics created, on
    ``FRESHREC_KAFKA_BOOTSTRAP`` when set, else on a local broker started (and stopped) for the run."""
    tmp = Path(tempfile.mkdtemp(prefix="freshrec-bench-"))
    settings = Settings(home=tmp / "home", topic_prefix=f"bench-{uuid.uuid4().hex[:8]}.", **overrides)
    broker = None
    if settings.uses_local_broker:
        settings = settings.model_copy(
            update={"broker_port": free_port(), "broker_controller_port": free_port()}
        )
        broker = LocalBroker(settings)
        broker.start()
    try:
        ensure_topics(settings)
        yield settings
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # a broker's log and a chDB home: gigabytes per run


def consume_loop(settings: Settings, n: int, handle: Callable[[bytes], object] | None = None) -> float:
    """Events/s of a fresh group reading ``n`` messages of ``events`` with a batch ``consume(10000)``
    loop, calling ``handle`` on each value (None: count only), timed from the first message."""
    consumer = Consumer(
        settings.kafka_config(
            **{
                "group.id": f"bench-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
    )
    consumer.subscribe([settings.topics.events])
    seen, started = 0, 0.0
    while seen < n:
        batch = consumer.consume(10_000, 1.0)
        if batch and not started:
            started = time.perf_counter()
        if handle is not None:
            for message in batch:
                handle(message.value() or b"")
        seen += len(batch)
    elapsed = time.perf_counter() - started
    consumer.close()
    return n / elapsed


def time_batches(runner: Any, handler: str, consumed: Callable[[], int], n: int) -> float:
    """Run ``runner.run()`` (a sink or a stream worker) in a thread until ``consumed()`` reaches ``n``,
    timing its batch handler (the method named ``handler``) from its first call to the batch that
    reached ``n``; returns the seconds elapsed. The handler is wrapped on the instance only."""
    marks: dict[str, float] = {}
    real = getattr(runner, handler)

    def timed(messages: list[Any]) -> None:
        marks.setdefault("first", time.perf_counter())
        real(messages)
        if consumed() >= n:
            marks["last"] = time.perf_counter()
            runner.stop()

    setattr(runner, handler, timed)
    thread = threading.Thread(target=runner.run)
    thread.start()
    thread.join()
    return marks["last"] - marks["first"]


def produce_synthetic(settings: Settings, n: int, *, seed: int = 7) -> None:
    """``n`` synthetic events on ``events``, keyed by user: items Zipf(1.1) over 100,000, 200,000
    users, a view / click / purchase mix, one millisecond apart from a day ago."""
    import numpy as np
    import orjson

    from streams.producer import EventProducer

    rng = np.random.default_rng(seed)
    items = rng.zipf(1.1, size=n) % 100_000
    users = rng.integers(0, 200_000, size=n)
    now = int(time.time() * 1000) - 86_400_000
    kinds = ("view", "view", "view", "click", "purchase")
    with EventProducer(settings) as producer:
        for i in range(n):
            user = f"u{users[i]}"
            event = {"event_id": f"s{i}", "user_id": user, "item_id": f"i{items[i]}", "type": kinds[i % 5],
                     "ts": now + i}  # fmt: skip
            producer.produce(settings.topics.events, orjson.dumps(event), key=user.encode())

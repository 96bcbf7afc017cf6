"""The read API against a live worker: a new event becomes visible within a bounded time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import orjson
from support import wait_until

from freshrec.settings import Settings, StreamSettings
from learners.registry import build_heads
from streams.admin import ensure_topics
from streams.producer import EventProducer
from streams.reader import StateReader
from streams.worker import StreamWorker


def test_events_become_visible_through_the_reader_while_the_worker_runs(
    make_settings: Callable[..., Settings],
) -> None:
    base = make_settings()
    settings = base.model_copy(
        update={
            "stream": StreamSettings(
                group_id=f"reader-{base.topic_prefix}", windows_s=(3600,), window_buckets=60
            )
        }
    )
    ensure_topics(settings)
    worker = StreamWorker(settings, heads=build_heads(settings.stream))
    reader = StateReader(worker)
    thread = threading.Thread(target=worker.run)
    thread.start()
    latencies = []
    try:
        wait_until(lambda: bool(worker.assigned), timeout_s=60)
        now = int(time.time() * 1000)
        with EventProducer(settings) as producer:
            for i in range(20):
                event = {
                    "event_id": f"r{i}",
                    "user_id": "alice",
                    "item_id": f"item-{i % 3}",
                    "type": ("impression", "click")[i % 2],
                    "ts": now + i,
                    "request_id": f"req-{i // 2}",
                }
                started = time.monotonic()
                producer.produce(settings.topics.events, orjson.dumps(event), key=b"alice")
                producer.flush()
                wait_until(
                    lambda n=i + 1: len(reader.history("alice")) == min(n, 50), timeout_s=10, interval_s=0.005
                )  # type: ignore[misc]
                latencies.append(time.monotonic() - started)
    finally:
        worker.stop()
        thread.join(timeout=60)
    assert [e.item_id for e in reader.history("alice")] == [f"item-{i % 3}" for i in range(20)]
    assert reader.popular(2) == [("item-0", 7.0), ("item-1", 7.0)]
    counts = reader.counts("item-2")
    assert (counts.total, counts.windowed) == (6, {3600: 6}) and counts.decayed > 5.99
    # Impression i (even) and click i+1 share a request but not an item: no click is attributed;
    # each waits (pending) for an impression of its own item in its request.
    posterior = worker.state.clicks.posterior("item-0")
    assert posterior.impressions == 4 and posterior.clicks == 0
    assert (worker.state.clicks.unattributed, worker.state.clicks.pending) == (0, 10)
    scores = reader.scores("alice", ["item-0"], "mf")
    assert scores is not None and worker.state.heads["mf"].uncertainty_one("alice", "item-0") < 1.0
    assert sum(worker.state.offsets.values()) == 20
    assert [item for item, _ in reader.neighbours("item-0")] == ["item-1", "item-2"]
    latencies.sort()
    print(f"produce-to-visible latency: p50 {latencies[10] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms")
    assert latencies[10] < 1.0  # the median event is readable within a second

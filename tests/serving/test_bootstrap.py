"""A serving replica's stream state starts from the stream workers' snapshots, against the real
broker: a new replica (empty home, new worker id) restores them instead of reading ``events`` from
offset 0, equals the stream workers' state, follows the topic, and is ready only once caught up; a
restarted replica takes its own snapshot when that is further on; with bootstrap off it reads from 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from support import free_port_pair, wait_until

from freshrec.settings import ServeSettings, Settings, StreamSettings
from learners.registry import build_heads
from serving.recommender import SERVED_HEADS
from serving.server import ServingStack, bootstrap_changelogs
from streams.admin import ensure_topics
from streams.heads import Head
from streams.producer import EventProducer
from streams.worker import StreamWorker
from streams.worker_state import StreamState

BEFORE, AFTER = 3_000, 600  # events the stream workers snapshot; events produced after
MAX_LAG = 50
USERS, ITEMS = 97, 41


@pytest.fixture
def boot_settings(make_settings: Callable[..., Settings], run_id: str) -> Settings:
    port, _ = free_port_pair()
    return make_settings(
        api_port=port,
        # The stream workers keep a head serving does not read: their snapshots must still load.
        stream=StreamSettings(
            group_id=f"boot-{run_id}",
            batch_timeout_s=0.05,
            checkpoint_interval_s=0.5,
            heads=("mf", "engagement"),
        ),
        serve=ServeSettings(ready_max_lag=MAX_LAG),
    )


def _produce(settings: Settings, start: int, stop: int) -> None:
    ensure_topics(settings)
    base = int(time.time() * 1000) - 600_000
    with EventProducer(settings) as producer:
        for n in range(start, stop):
            user = f"u-{n % USERS}"
            event = {"event_id": f"e-{n}", "user_id": user, "item_id": f"i-{(n * 7) % ITEMS}",
                     "type": ("view", "click")[n % 2], "ts": base + n * 10}  # fmt: skip
            producer.produce(settings.topics.events, orjson.dumps(event), key=user.encode())


def _replica(settings: Settings, home: Path, worker_id: str, **serve: object) -> Settings:
    port, _ = free_port_pair()
    stream = settings.stream.model_copy(update={"worker_id": worker_id})
    return settings.model_copy(
        update={
            "home": home,
            "api_port": port,
            "stream": stream,
            "serve": settings.serve.model_copy(update=serve),
        }
    )


def _run_stream_workers(settings: Settings) -> StreamWorker:
    """The deployment's ``freshrec stream`` (every role in one group) until drained; its exit
    flushes every partition's snapshot to the group's changelog."""
    worker = StreamWorker(settings, heads=build_heads(settings.stream))
    worker.run(until_idle_s=1.5)
    return worker


def _served_heads(settings: Settings) -> dict[str, Head]:
    """The heads a replica keeps: those serving reads."""
    return {name: head for name, head in build_heads(settings.stream).items() if name in SERVED_HEADS}


def _assert_same_state(replica: StreamState, reference: StreamState) -> None:
    items = [f"i-{n}" for n in range(ITEMS)]
    users = [f"u-{n}" for n in range(USERS)]
    ref = reference.counters
    assert set(replica.counters.items.ids()) == set(ref.items.ids()) == set(items)
    for item in items:
        for kind in ("view", "click", None):
            assert replica.counters.total(item, kind) == ref.total(item, kind)
            for window in ref.config.windows_s:
                assert replica.counters.windowed(item, window, kind) == ref.windowed(item, window, kind)
        assert replica.cooccurrence.neighbours(item, 10) == reference.cooccurrence.neighbours(item, 10)
    assert all(replica.histories.get(user) == reference.histories.get(user) for user in users)
    assert all(reference.histories.get(user) for user in users)
    for name in SERVED_HEADS:
        scores = [replica.heads[name].predict_one(u, i) for u in users[:20] for i in items]
        expected = [reference.heads[name].predict_one(u, i) for u in users[:20] for i in items]
        assert np.allclose(scores, expected, rtol=1e-9), name
    assert replica.offsets == reference.offsets


def test_a_new_replica_starts_from_the_stream_workers_snapshots(
    boot_settings: Settings, tmp_path: Path
) -> None:
    settings = boot_settings
    _produce(settings, 0, BEFORE)
    _run_stream_workers(settings)  # snapshots at BEFORE
    _produce(settings, BEFORE, BEFORE + AFTER)  # the replica must read these, and only these
    replica_settings = _replica(settings, tmp_path / "replica-home", "replica-1")
    stack = ServingStack(replica_settings)
    stack.start()
    try:
        with httpx.Client(base_url=stack.url, timeout=10) as http:

            def ready() -> bool:
                response = http.get("/readyz")
                if response.status_code != 200:
                    return False
                with stack.worker.lock:  # ready means caught up: at most MAX_LAG events still to apply
                    applied = sum(
                        o for (t, _), o in stack.worker.state.offsets.items() if t == settings.topics.events
                    )
                assert applied >= BEFORE + AFTER - MAX_LAG, response.json()
                return True

            wait_until(ready, timeout_s=60, interval_s=0.05)
        wait_until(lambda: stack.worker.stats.consumed == AFTER, timeout_s=30)
        partitions = settings.broker_partitions
        assert (stack.worker.stats.restored, stack.worker.stats.bootstrapped) == (partitions, partitions)
        assert stack.worker.stats.counted == AFTER  # none of the events before the snapshots
    finally:
        stack.stop()  # flushes the replica's own snapshots, at BEFORE + AFTER
    assert stack.worker.stats.consumed == AFTER

    # The stream workers follow the same events from their snapshots: the same state, exactly.
    reference = _run_stream_workers(settings)
    assert reference.stats.consumed == AFTER
    _assert_same_state(stack.worker.state, reference.state)


def test_a_restarted_replica_takes_whichever_snapshot_is_further_on(
    boot_settings: Settings, tmp_path: Path
) -> None:
    settings = boot_settings
    _produce(settings, 0, BEFORE)
    _run_stream_workers(settings)  # the stream group's snapshots: at BEFORE
    _produce(settings, BEFORE, BEFORE + AFTER)
    replica_settings = _replica(settings, tmp_path / "replica-home", "replica-2")
    stack = ServingStack(replica_settings)
    stack.start()
    try:
        wait_until(lambda: stack.worker.stats.consumed == AFTER, timeout_s=60)
    finally:
        stack.stop()  # its own snapshots: at BEFORE + AFTER, ahead of the stream group's

    # Restarted with its worker id: its own changelog is further on than the stream group's.
    again = StreamWorker(
        stack.settings, heads=_served_heads(stack.settings), bootstrap=bootstrap_changelogs(replica_settings)
    )
    restored = again.restore()
    assert sum(o.get(settings.topics.events, 0) for o in restored.values()) == BEFORE + AFTER
    assert again.stats.bootstrapped == 0
    # Once the stream group has moved further on, its snapshots win.
    _produce(settings, BEFORE + AFTER, BEFORE + 2 * AFTER)
    _run_stream_workers(settings)
    again = StreamWorker(
        stack.settings, heads=_served_heads(stack.settings), bootstrap=bootstrap_changelogs(replica_settings)
    )
    restored = again.restore()
    assert sum(o.get(settings.topics.events, 0) for o in restored.values()) == BEFORE + 2 * AFTER
    assert again.stats.bootstrapped == settings.broker_partitions


def test_with_bootstrap_off_a_replica_reads_from_offset_0(boot_settings: Settings, tmp_path: Path) -> None:
    settings = boot_settings
    _produce(settings, 0, BEFORE)
    _run_stream_workers(settings)
    replica_settings = _replica(settings, tmp_path / "replica-home", "replica-3", bootstrap=False)
    assert bootstrap_changelogs(replica_settings) == {}
    stack = ServingStack(replica_settings)
    stack.start()
    try:
        wait_until(lambda: stack.worker.stats.consumed >= BEFORE, timeout_s=60)
        assert (stack.worker.stats.consumed, stack.worker.stats.bootstrapped) == (BEFORE, 0)
    finally:
        stack.stop()


def test_a_replica_combines_the_parts_of_stream_workers_split_by_role(
    boot_settings: Settings, tmp_path: Path
) -> None:
    settings = boot_settings
    # One group per role, each stopped at its own offsets: counters at 1,000, sequences at 2,000,
    # heads at 3,000 (docker-compose's stream-counters, stream-sequences, stream-heads).
    for stop, role in ((1_000, "counters"), (2_000, "sequences"), (3_000, "heads")):
        _produce(settings, stop - 1_000, stop)
        stream = settings.stream.model_copy(update={"roles": (role,)})
        part = settings.model_copy(update={"stream": stream})
        worker = StreamWorker(part, heads=build_heads(stream))
        worker.run(until_idle_s=1.5)
        assert worker.stats.consumed == stop, role
    _produce(settings, 3_000, 3_000 + AFTER)
    replica_settings = _replica(settings, tmp_path / "replica-home", "replica-4")
    stack = ServingStack(replica_settings)
    stack.start()
    try:
        wait_until(lambda: stack.worker.stats.consumed >= 2_000 + AFTER, timeout_s=60)
        with stack.worker.lock:
            assert not any(store.ahead for store in stack.worker.state.stores.values())  # caught up
        # From the lowest part's offsets (counters: 1,000), not from offset 0.
        assert stack.worker.stats.consumed == 2_000 + AFTER
        assert stack.worker.stats.bootstrapped == settings.broker_partitions
    finally:
        stack.stop()

    # One uninterrupted worker keeping every role, in a group of its own, over the same events.
    stream = settings.stream.model_copy(update={"group_id": f"{settings.stream.group_id}-ref"})
    reference = _run_stream_workers(settings.model_copy(update={"stream": stream}))
    assert reference.stats.consumed == 3_000 + AFTER
    _assert_same_state(stack.worker.state, reference.state)

"""Fine-tune → publish → replica, through the real broker: exact, healing, atomic, reversible."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from confluent_kafka import Producer
from support import wait_until

from freshrec.errors import NothingToTrain, VersionConflict
from freshrec.settings import Settings, TrainSettings
from freshrec.store import Store
from learners.finetune import FineTuner
from learners.scheduler import FineTuneSchedule
from learners.sequences import Sequences
from publishers.publisher import CHUNK_HEADER, Publisher, list_updates
from publishers.replica import Replica, ReplicaSubscriber
from publishers.snapshots import SnapshotStore
from publishers.updates import ModelVersion, state_checksum

TABLE = "item_emb.weight"


class Window:
    """An in-memory freshest window that tests move forward (new users and items each cycle)."""

    def __init__(self) -> None:
        self.cycle = 0
        self.sequences: Sequences = {}

    def advance(self, *, new_items: int = 0, users: int = 30) -> None:
        rng = np.random.default_rng(self.cycle)
        catalogue = [f"i{n}" for n in range(40)] + [f"c{self.cycle}-new{n}" for n in range(new_items)]
        self.sequences = {
            f"u{self.cycle}-{u}": [catalogue[int(i)] for i in rng.integers(len(catalogue), size=8)]
            for u in range(users)
        }
        self.cycle += 1

    def __call__(self) -> tuple[Sequences, int]:
        return self.sequences, sum(len(s) for s in self.sequences.values())


@pytest.fixture
def train_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        train=TrainSettings(max_len=8, dim=16, blocks=1, epochs=1, budget_s=30, dense_every=2, negatives=32)
    )


@pytest.fixture
def publisher(train_settings: Settings, store: Store) -> Iterator[Publisher]:
    pub = Publisher(train_settings, snapshots=SnapshotStore.for_settings(train_settings), store=store)
    yield pub
    pub.close()


@pytest.fixture
def replica(train_settings: Settings) -> Iterator[Replica]:
    replica = Replica(snapshots=SnapshotStore.for_settings(train_settings), gap_timeout_s=1.0)
    with ReplicaSubscriber(train_settings, replica):
        yield replica


def _same(a: ModelVersion, b: ModelVersion) -> bool:
    return (
        a.item_ids == b.item_ids
        and set(a.params) == set(b.params)
        and all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    )


def _tuned(
    settings: Settings, store: Store, publisher: Publisher, replica: Replica, *, cycles: int
) -> tuple[Window, FineTuner]:
    """A fine-tuner that has run ``cycles`` cycles on fresh windows, the replica caught up with it."""
    window = Window()
    tuner = FineTuner(settings, publisher=publisher, source=window, store=store)
    for _ in range(cycles):
        window.advance()
        tuner.cycle()
    wait_until(_caught_up(replica, publisher), timeout_s=20)
    return window, tuner


def _caught_up(replica: Replica, publisher: Publisher) -> Callable[[], bool]:
    return lambda: publisher.latest is not None and replica.version == publisher.latest.version


def test_replica_equals_the_trainer_after_every_cycle(
    train_settings: Settings, store: Store, publisher: Publisher, replica: Replica
) -> None:
    window = Window()
    tuner = FineTuner(train_settings, publisher=publisher, source=window, store=store)
    kinds = []
    for cycle in range(4):
        window.advance(new_items=5 if cycle == 2 else 0)
        result = tuner.cycle()
        kinds.append([p.kind for p in result.published])
        wait_until(_caught_up(replica, publisher), timeout_s=20)
        served = replica.current
        assert served is not None and publisher.latest is not None
        assert _same(served, publisher.latest)
        trainer = tuner.trainer
        assert trainer is not None
        params = trainer.params()
        # Embeddings are published every cycle: the replica's table is the trainer's, bit for bit.
        assert np.array_equal(served.params[TABLE], params[TABLE])
        assert list(served.item_ids) == trainer.items.ids()
        if "dense" in kinds[-1] or cycle == 0:
            assert all(np.array_equal(served.params[k], v) for k, v in params.items())
        if cycle == 2:  # the new items got rows, and those rows travelled in this cycle's sparse delta
            assert all(f"c2-new{n}" in served.item_ids for n in range(5))
            sparse = result.published[0]
            assert sparse.kind == "sparse" and sparse.rows < len(served.item_ids)
    assert kinds == [["snapshot"], ["sparse", "dense"], ["sparse"], ["sparse", "dense"]]
    assert replica.stats.rejected == 0 and replica.stats.healed == 0
    recorded = list_updates(store)
    assert [u["version"] for u in recorded] == list(range(1, 7))
    assert [u["kind"] for u in recorded] == ["snapshot", "sparse", "dense", "sparse", "sparse", "dense"]
    runs = store.rows(f"SELECT count(), countIf(status = 'ok') FROM {store.table('training_runs')} FINAL")
    assert runs == [(4, 4)]


def test_lost_and_corrupted_updates_heal_from_the_snapshot_store(
    train_settings: Settings, store: Store, publisher: Publisher, replica: Replica
) -> None:
    window, tuner = _tuned(train_settings, store, publisher, replica, cycles=1)
    base = publisher.latest
    assert base is not None

    # Lost: a version is made and stored but never reaches Kafka; the next one arrives on a gap.
    table = np.array(base.params[TABLE])
    table[1] += 1.0
    lost = ModelVersion.build(
        base.version + 1,
        {**base.params, TABLE: table},
        base.item_ids,
        config=base.config,
        sparse_tables=base.sparse_tables,
    )
    publisher.snapshots.save(lost)
    publisher.latest = lost
    window.advance()
    tuner.cycle()
    wait_until(_caught_up(replica, publisher), timeout_s=20)
    assert replica.stats.healed == 1
    assert replica.current is not None and _same(replica.current, publisher.latest)

    # Corrupted: the next version's bytes arrive damaged; the replica rejects them and heals.
    current = publisher.latest
    table = np.array(current.params[TABLE])
    table[2] -= 1.0
    damaged = ModelVersion.build(
        current.version + 1,
        {**current.params, TABLE: table},
        current.item_ids,
        config={},
        sparse_tables=current.sparse_tables,
    )
    publisher.snapshots.save(damaged)
    publisher.latest = damaged
    producer = Producer(train_settings.kafka_config())
    header = f"{damaged.version}:{current.version}:sparse:0:1:{'0' * 64}"
    producer.produce(
        train_settings.topics.model_sparse, b"not the update", headers=[(CHUNK_HEADER, header.encode())]
    )
    producer.flush(10)
    wait_until(lambda: replica.version == damaged.version, timeout_s=20)
    assert replica.stats.rejected == 1 and replica.stats.healed == 2
    assert replica.current is not None and _same(replica.current, damaged)


def test_readers_never_see_a_mixed_version(
    train_settings: Settings, store: Store, publisher: Publisher, replica: Replica
) -> None:
    window, tuner = _tuned(train_settings, store, publisher, replica, cycles=1)
    stop = threading.Event()
    seen: list[int] = []
    mixed: list[int] = []

    def read() -> None:
        while not stop.is_set():
            model = replica.current
            assert model is not None
            if state_checksum(model.params, model.item_ids) != model.state_checksum:
                mixed.append(model.version)
            seen.append(model.version)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for cycle in range(3):
            window.advance(new_items=3 * cycle)
            tuner.cycle()
        wait_until(_caught_up(replica, publisher), timeout_s=20)
    finally:
        stop.set()
        reader.join()
    assert not mixed
    assert len(set(seen)) >= 2 and seen == sorted(seen)  # it read across updates, never going back


def test_rollback_restores_the_earlier_parameters_exactly(
    train_settings: Settings, store: Store, publisher: Publisher, replica: Replica
) -> None:
    window, tuner = _tuned(train_settings, store, publisher, replica, cycles=3)
    earlier = publisher.snapshots.load(2)
    assert publisher.latest is not None and not _same(publisher.latest, earlier)
    head = publisher.latest.version
    published = publisher.rollback(2)
    assert published.version == head + 1 and published.kind == "snapshot"
    wait_until(_caught_up(replica, publisher), timeout_s=20)
    assert replica.current is not None and _same(replica.current, earlier)
    assert replica.current.rollback_of == 2
    # The next fine-tune warm-starts from the rolled-back parameters.
    window.advance()
    result = tuner.cycle()
    assert result.warm_started_from == head + 1


def test_schedule_never_overlaps_and_retries_a_failure(
    train_settings: Settings, store: Store, publisher: Publisher
) -> None:
    window = Window()  # empty at first: the first cycle fails
    tuner = FineTuner(train_settings, publisher=publisher, source=window, store=store)
    with pytest.raises(NothingToTrain):
        tuner.cycle()
    schedule = FineTuneSchedule(tuner, interval_s=3600, retry_s=0.5)
    schedule.start()
    try:
        wait_until(lambda: schedule.failed == 1, timeout_s=30)
        window.advance()  # data arrives: the retry succeeds
        wait_until(lambda: schedule.succeeded == 1, timeout_s=60)
    finally:
        schedule.stop()
    statuses = store.rows(
        f"SELECT status, count() FROM {store.table('training_runs')} FINAL GROUP BY status ORDER BY status"
    )
    assert statuses == [("failed", 2), ("ok", 1)]


def test_a_rollback_beside_a_running_trainer_is_adopted_not_overwritten(
    train_settings: Settings, store: Store, publisher: Publisher, replica: Replica
) -> None:
    window = Window()
    tuner = FineTuner(train_settings, publisher=publisher, source=window, store=store)
    for _ in range(2):
        window.advance()
        tuner.cycle()
    # v1 snapshot, v2 sparse, v3 dense; another process (freshrec model rollback) publishes v4 = v1.
    other = Publisher(train_settings, snapshots=SnapshotStore.for_settings(train_settings), store=store)
    assert other.rollback(1).version == 4
    other.close()
    window.advance()
    with pytest.raises(VersionConflict):
        tuner.cycle()  # the trainer's publisher finds the head moved, adopts it, and the cycle fails
    result = tuner.cycle()  # the retry warm-starts from the rollback
    assert result.warm_started_from == 4
    assert [(p.version, p.parent) for p in result.published] == [(5, 4), (6, 5)]  # sparse, dense
    wait_until(_caught_up(replica, publisher), timeout_s=20)
    assert replica.current is not None and _same(replica.current, publisher.snapshots.load(6))
    assert [u["version"] for u in list_updates(store)] == [1, 2, 3, 4, 5, 6]

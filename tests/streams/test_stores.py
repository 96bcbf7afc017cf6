"""Stores per partition, read merged: the merged counters equal one store of the whole stream."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from freshrec.events import Event
from freshrec.settings import Settings, StreamSettings
from learners.registry import build_heads
from streams.admin import ensure_topics
from streams.counters import CounterConfig, ItemCounters
from streams.producer import EventProducer
from streams.state_codec import decode_state, encode_state
from streams.stores import partition_of
from streams.worker_state import StreamState

HOUR, DAY = 3_600, 86_400
CONFIG = CounterConfig(windows_s=(HOUR, DAY), buckets=12, half_life_s=float(HOUR))


def _state(partitions: int, heads: tuple[str, ...] = ()) -> StreamState:
    stream = StreamSettings(windows_s=(HOUR, DAY), window_buckets=12, half_life_s=float(HOUR), heads=heads)
    state = StreamState(
        Settings(broker_partitions=partitions, stream=stream), heads=build_heads(stream) if heads else None
    )
    for partition in range(partitions):
        state.store(partition)
    return state


events = st.lists(
    st.tuples(
        st.integers(0, 30),  # user
        st.integers(0, 40),  # item
        st.sampled_from(["view", "click"]),
        st.integers(0, 3 * DAY * 1000),  # event time: windows expire along the way
    ),
    min_size=1,
    max_size=300,
)


@settings(max_examples=60, deadline=None)
@given(events, st.integers(1, 4), st.integers(1, 50))
def test_merged_counters_equal_one_store_of_the_whole_stream(
    stream: list[tuple[int, int, str, int]], partitions: int, batch: int
) -> None:
    """Each partition's window ends at its own newest bucket; the merged one at the newest of all,
    as a single store's does, whatever the split and the batching."""
    state = _state(partitions)
    single = ItemCounters(CONFIG)
    by_partition: dict[int, list[tuple[str, str, int]]] = {}
    for user, item, kind, ts in stream:
        by_partition.setdefault(user % partitions, []).append((f"i{item}", kind, ts))
    single.update([f"i{e[1]}" for e in stream], [e[2] for e in stream], [e[3] for e in stream])
    for partition, rows in by_partition.items():
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            state.stores[partition].counters.update(
                [r[0] for r in chunk], [r[1] for r in chunk], [r[2] for r in chunk]
            )
    merged = state.counters
    assert set(merged.items.ids()) == set(single.items.ids())
    assert merged.now_ms == single.now_ms
    for item in single.items.ids():
        for kind in ("view", "click", None):
            assert merged.total(item, kind) == single.total(item, kind)
            assert merged.windowed(item, HOUR, kind) == single.windowed(item, HOUR, kind)
            assert merged.windowed(item, DAY, kind) == single.windowed(item, DAY, kind)
            assert np.isclose(merged.decayed(item, kind), single.decayed(item, kind), rtol=1e-9)
    for kind_ in ("total", "decayed", HOUR, DAY):
        for event_type in ("click", None):
            got = merged.scores(kind_, event_type)
            want = single.scores(kind_, event_type)
            by_item = {merged.items.id_of(row): got[row] for row in range(len(got))}
            assert all(
                np.isclose(by_item[single.items.id_of(row)], want[row], rtol=1e-9) for row in range(len(want))
            )
    assert [c for _, c in merged.top(5, DAY)] == [c for _, c in single.top(5, DAY)]


def test_reads_follow_the_users_partition() -> None:
    state = _state(3, heads=("mf",))
    rng = random.Random(3)
    for n in range(600):
        user = f"u{rng.randrange(40)}"
        partition = partition_of(user, 3)
        store = state.stores[partition]
        item = f"i{rng.randrange(30)}"
        store.cooccurrence.observe_batch([user], [item], store.histories.recent_items)
        store.histories.append([user], [item], ["view"], [n])
        event = Event(event_id=f"e{n}", user_id=user, item_id=item, type="rating", ts_ms=n, value=4.0)
        store.heads["mf"].learn_one(event)
        store.clicks.observe("impression", item, f"r{n}")
        if n % 3 == 0:
            store.clicks.observe("click", item, f"r{n}")
    for user in (f"u{n}" for n in range(40)):
        own = state.stores[partition_of(user, 3)]
        assert state.histories.get(user) == own.histories.get(user)
        assert all(not s.histories.get(user) for s in state.stores.values() if s is not own)
        assert state.heads["mf"].predict_one(user, "i1") == own.heads["mf"].predict_one(user, "i1")
    assert state.heads["mf"].size == sum(s.heads["mf"].size for s in state.stores.values())
    co = state.cooccurrence.score(["i1", "i2"], exclude={"i3"})
    for item, value in co.items():
        assert value == sum(
            s.cooccurrence.score(["i1", "i2"], exclude={"i3"}).get(item, 0.0) for s in state.stores.values()
        )
    posterior = state.clicks.posterior("i1")
    assert (
        posterior.impressions == sum(s.clicks.posterior("i1").impressions for s in state.stores.values()) > 0
    )
    means, _ = state.clicks.moments(["i1"])
    assert np.isclose(means[0], posterior.mean)


def test_partition_of_is_where_the_producer_puts_a_user(make_settings: Callable[..., Settings]) -> None:
    """Heads answer from the user's partition: the routing must be the producer's partitioner."""
    settings = make_settings()
    ensure_topics(settings)
    users = [f"user-{n}" for n in range(200)]
    with EventProducer(settings) as producer:
        for user in users:
            producer.produce(settings.topics.events, b"{}", key=user.encode())
    consumer = Consumer(settings.kafka_config(**{"group.id": "partition-check", "enable.auto.commit": False}))
    try:
        consumer.assign(
            [
                TopicPartition(settings.topics.events, p, OFFSET_BEGINNING)
                for p in range(settings.broker_partitions)
            ]
        )
        where: dict[str, int] = {}
        for _ in range(100):
            for message in consumer.consume(500, 0.2):
                assert message.error() is None
                where[(message.key() or b"").decode()] = message.partition() or 0
            if len(where) == len(users):
                break
    finally:
        consumer.close()
    assert where == {user: partition_of(user, settings.broker_partitions) for user in users}
    assert len(set(where.values())) == settings.broker_partitions


def test_a_store_snapshots_only_the_event_types_it_has_seen() -> None:
    state = _state(1)
    store = state.stores[0]
    store.counters.update(["a", "b", "a"], ["view", "click", "view"], [1_000, 2_000, 3_000])
    snapshot = store.state_dict()
    assert snapshot["counters"]["total"].shape == (2, 2)  # 2 types of 16 rows, 2 items
    assert all(window.shape == (2, 2) for window in snapshot["counters"]["windows"])
    again = state.new_store()
    again.load_state_dict(decode_state(encode_state(snapshot)))
    again.counters.update(["c"], ["purchase"], [4_000])  # a third type still has its row
    assert [again.counters.total(i, t) for i, t in [("a", "view"), ("b", "click"), ("c", "purchase")]] == [
        2,
        1,
        1,
    ]
    assert again.counters.windowed("a", HOUR) == 2

"""The state changelog: a lossless codec; snapshots restored whole or not at all (real broker)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from freshrec.settings import Settings, StreamSettings
from streams.changelog import Changelog, Manifest, changelog_topic
from streams.clicks import ClickThrough
from streams.cooccurrence import CoOccurrence
from streams.counters import CounterConfig, ItemCounters
from streams.dedup import RecentIds
from streams.histories import UserHistories
from streams.state_codec import decode_state, encode_state

KILL_SEED = int(os.environ.get("FRESHREC_FAULT_SEED", "1414"))


def _filled_state(seed: int) -> dict[str, Any]:
    """A state dict of every kind of stream state, filled with a few thousand random events."""
    rng = random.Random(seed)
    n = 3_000
    users = [f"u{rng.randrange(50)}" for _ in range(n)]
    items = [f"i{rng.randrange(300)}" for _ in range(n)]
    types = [rng.choice(["view", "click", "impression"]) for _ in range(n)]
    stamps = sorted(1_700_000_000_000 + rng.randrange(10 * 86_400_000) for _ in range(n))
    counters = ItemCounters(CounterConfig(windows_s=(3_600, 86_400), buckets=12, max_items=200))
    histories = UserHistories(max_len=20)
    co = CoOccurrence(window=3, max_neighbours=4, min_count=2)
    clicks = ClickThrough()
    recent = RecentIds(1_000)
    for start in range(0, n, 500):
        end = start + 500
        counters.update(items[start:end], types[start:end], stamps[start:end])
        co.observe_batch(users[start:end], items[start:end], histories.recent_items)
        histories.append(users[start:end], items[start:end], types[start:end], stamps[start:end])
    for index in range(n):
        clicks.observe(types[index], items[index], f"r{index // 5}" if index % 3 else None)
        recent.add(f"e{index}")
    assert counters.evicted > 0 and co.pruned > 0  # the awkward paths are in the state too
    return {
        "counters": counters.state_dict(),
        "histories": histories.state_dict(),
        "cooccurrence": co.state_dict(),
        "clicks": clicks.state_dict(),
        "recent": recent.state_dict(),
        "heads": {"blob": bytes(rng.randrange(256) for _ in range(1_000))},
    }


def _same(a: Any, b: Any) -> bool:
    """Equality of state dicts up to what JSON cannot keep: tuples as lists, int keys as strings."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(np.array_equal(a, b))
        )
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and sorted(map(str, a)) == sorted(map(str, b))
            and all(_same(value, b[str(key)] if str(key) in b else b[key]) for key, value in a.items())
        )
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b and type(a) is type(b))


def test_codec_round_trips_every_kind_of_stream_state() -> None:
    state = _filled_state(7)
    decoded = decode_state(encode_state(state))
    assert _same(state, decoded)
    # What matters: each part loads back into an object whose state is the original's.
    counters = ItemCounters()
    counters.load_state_dict(decoded["counters"])
    assert _same(counters.state_dict(), state["counters"])
    assert counters.top(5) == _loaded(ItemCounters(), state["counters"]).top(5)
    histories, co, clicks = UserHistories(), CoOccurrence(), ClickThrough()
    histories.load_state_dict(decoded["histories"])
    co.load_state_dict(decoded["cooccurrence"])
    clicks.load_state_dict(decoded["clicks"])
    assert _same(histories.state_dict(), state["histories"])
    assert _same(co.state_dict(), state["cooccurrence"])
    assert _same(clicks.state_dict(), state["clicks"])
    recent = RecentIds(10)
    recent.load_state_dict(decoded["recent"])
    assert all(f"e{index}" in recent for index in range(2_500, 3_000)) and "e1" not in recent
    decoded["counters"]["total"][0, 0] += 1  # arrays come back writable, not views of the payload


def _loaded(target: ItemCounters, state: dict[str, Any]) -> ItemCounters:
    target.load_state_dict(state)
    return target


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**62), 2**62),
    st.text(max_size=8),
    st.floats(allow_nan=False, allow_infinity=False),
)
arrays = st.sampled_from(["<i8", "<f8", "|u1", "<i4"]).flatmap(
    lambda dtype: st.lists(st.integers(0, 100), max_size=12).map(lambda xs: np.array(xs, dtype=dtype))
)
trees = st.recursive(
    scalars | arrays | st.binary(max_size=16),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=5).filter(lambda key: not key.startswith("\x00")), inner, max_size=4
        )
    ),
    max_leaves=20,
)


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=6), trees, max_size=5))
def test_codec_is_lossless(state: dict[str, Any]) -> None:
    assert _same(state, decode_state(encode_state(state)))


def test_codec_refuses_what_is_not_a_snapshot() -> None:
    payload = encode_state({"a": np.arange(10)})
    for bad in [b"", b"pickle", payload[:-1], payload + b"x", b"FRSTATE1" + b"\xff" * 12]:
        with pytest.raises(ValueError):
            decode_state(bad)


# ------------------------------------------------------------------------------ through the broker


def _settings(make_settings: Callable[..., Settings]) -> Settings:
    base = make_settings()
    return base.model_copy(update={"stream": StreamSettings(group_id=f"stream-{base.topic_prefix}")})


def test_topic_is_named_by_group_and_roles(make_settings: Callable[..., Settings]) -> None:
    base = make_settings()
    assert changelog_topic(base) == f"{base.topic_prefix}state.counters-sequences-heads"
    counters = base.model_copy(update={"stream": StreamSettings(group_id="g+1.", roles=("counters",))})
    assert changelog_topic(counters) == f"{base.topic_prefix}state.g_1.counters"


def test_snapshots_restore_per_partition_newest_first_in_chunks(
    make_settings: Callable[..., Settings],
) -> None:
    settings = _settings(make_settings)
    payloads = {p: [os.urandom(5_000 + 997 * p + 311 * g) for g in range(3)] for p in range(3)}
    with Changelog(settings, chunk_bytes=1_000) as writer:
        assert writer.partitions == settings.broker_partitions  # as many as `events`
        for generation in range(3):
            for partition in range(3):
                offsets = {"events": 100 * generation + partition, "impressions": generation}
                manifest = writer.write(partition, payloads[partition][generation], offsets)
                assert manifest.chunks == -(-len(payloads[partition][generation]) // 1_000) > 1
    restored = Changelog(settings).restore()
    assert sorted(restored) == [0, 1, 2]  # partition 3 never had a snapshot
    for partition, snapshot in restored.items():
        assert snapshot.payload == payloads[partition][2]
        assert snapshot.offsets == {"events": 200 + partition, "impressions": 2}
        assert snapshot.manifest.sha256 == hashlib.sha256(payloads[partition][2]).hexdigest()
    only = Changelog(settings).restore([1])
    assert list(only) == [1] and only[1].payload == payloads[1][2]


def _raw_messages(settings: Settings, topic: str) -> list[tuple[str, bytes | None]]:
    """Every (key, value) on ``topic``, in log order per partition."""
    consumer = Consumer(settings.kafka_config(**{"group.id": "raw-reader", "enable.auto.commit": False}))
    out: list[tuple[str, bytes | None]] = []
    try:
        for partition in range(settings.broker_partitions):
            tp = TopicPartition(topic, partition)
            _, high = consumer.get_watermark_offsets(tp, timeout=10)
            if not high:
                continue
            consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
            last = -1
            deadline = time.monotonic() + 20
            while last < high - 1 and time.monotonic() < deadline:
                for message in consumer.consume(500, 0.5):
                    assert message.error() is None
                    out.append(((message.key() or b"").decode(), message.value()))
                    last = message.offset() or 0
            assert last == high - 1
    finally:
        consumer.close()
    return out


def test_a_half_written_or_corrupt_snapshot_is_never_read(make_settings: Callable[..., Settings]) -> None:
    settings = _settings(make_settings)
    good = os.urandom(3_000)
    with Changelog(settings, chunk_bytes=1_000) as writer:
        first = writer.write(2, good, {"events": 10})
        topic = writer.topic
    raw = Producer(settings.kafka_config())
    # A writer killed between its chunks and its manifest leaves chunks no manifest names.
    for index in range(2):
        raw.produce(topic, key=f"2/0000000009-dead0000/{index}".encode(), value=b"x" * 1_000, partition=2)
    # A manifest whose chunks do not match its checksum (chunks of two writers mixed up, say).
    raw.produce(topic, key=b"2/0000000010-dead0001/0", value=b"y" * 100, partition=2)
    torn = Manifest(2, "0000000010-dead0001", 1, 100, "0" * 64, {"events": 99}, 0)
    raw.produce(topic, key=b"2/0000000010-dead0001", value=torn.encode(), partition=2)
    # And a manifest whose second chunk never arrived.
    raw.produce(topic, key=b"2/0000000011-dead0002/0", value=b"z" * 10, partition=2)
    short = Manifest(
        2, "0000000011-dead0002", 2, 20, hashlib.sha256(b"z" * 20).hexdigest(), {"events": 98}, 0
    )
    raw.produce(topic, key=b"2/0000000011-dead0002", value=short.encode(), partition=2)
    assert raw.flush(10) == 0

    owner = Changelog(settings, chunk_bytes=1_000)
    restored = owner.restore([2])
    assert restored[2].payload == good and restored[2].manifest == first

    # The next owner's snapshot cleans up: every generation but its own and the good one is tombstoned.
    newer = os.urandom(1_500)
    second = owner.write(2, newer, {"events": 20})
    owner.close()
    last: dict[str, bytes | None] = {}
    for key, value in _raw_messages(settings, topic):
        last[key] = value
    alive = {key.split("/")[1] for key, value in last.items() if value is not None}
    assert alive == {first.generation, second.generation}
    third = Changelog(settings).restore([2])
    assert third[2].payload == newer and third[2].offsets == {"events": 20}


_WRITER = textwrap.dedent(
    """
    import os, sys
    from freshrec.settings import Settings, StreamSettings
    from streams.changelog import Changelog

    settings = Settings(
        kafka_bootstrap=sys.argv[1],
        topic_prefix=sys.argv[2],
        stream=StreamSettings(group_id=sys.argv[3]),
        home=sys.argv[4],
    )
    writer = Changelog(settings, chunk_bytes=2_000)
    writer.restore([0])
    n = 0
    while True:
        n += 1
        payload = n.to_bytes(8, "big") + bytes([n % 256]) * 400_000  # 200 chunks: a kill lands mid-write
        writer.write(0, payload, {"events": n})
        print(n, flush=True)
    """
)


def test_kill_9_of_a_writer_leaves_the_last_complete_snapshot(make_settings: Callable[..., Settings]) -> None:
    settings = _settings(make_settings)
    rng = random.Random(KILL_SEED)
    print(f"kill seed {KILL_SEED} (FRESHREC_FAULT_SEED replays it)")
    args = [settings.bootstrap, settings.topic_prefix, settings.stream.group_id, str(settings.home)]
    acknowledged = 0
    for _round in range(3):
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, *args], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
        )
        assert writer.stdout is not None
        target = rng.randrange(3, 12)
        for line in writer.stdout:
            acknowledged = int(line)
            if acknowledged >= target:
                break
        time.sleep(rng.uniform(0.0, 0.05))  # a seeded point in the next write, not a wait for anything
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        writer.stdout.close()
        restored = Changelog(settings).restore([0])[0]
        n = int.from_bytes(restored.payload[:8], "big")
        # Complete, and at least as new as the last one the writer saw acknowledged.
        assert n >= acknowledged
        assert restored.payload == n.to_bytes(8, "big") + bytes([n % 256]) * 400_000
        assert restored.offsets == {"events": n}

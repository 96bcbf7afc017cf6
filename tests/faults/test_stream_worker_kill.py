"""kill -9 of ``freshrec stream`` at seeded random points, then a restart: the end state equals an
uninterrupted run's.

The seed chooses everything that is chosen: the events, the producer's pauses, where each kill
lands (during start-up, or a random time after a checkpoint was written) and how long after. It is
printed in every assertion message; ``FRESHREC_FAULT_SEED=<seed>`` replays a failing run's choices
(timing on a loaded machine still varies, so a replay explores the same neighbourhood).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]
from support import cli_env, freshrec_cli, sql_json, wait_until

from freshrec.datasets import load_dataset
from freshrec.settings import Settings, StreamSettings
from learners.registry import build_heads
from streams.admin import ensure_topics
from streams.changelog import Changelog
from streams.producer import EventProducer
from streams.worker import StreamWorker

HOUR, DAY = 3_600, 86_400
SEED = int(os.environ.get("FRESHREC_FAULT_SEED", "1207"))
KILLS = 5
TOTAL = 12_000
HELD = 1_500  # produced just before the last kill, so that the final run always has events to replay


def _stream_settings(make_settings: Callable[..., Settings], group: str, worker_id: str) -> Settings:
    base = make_settings()
    stream = StreamSettings(
        group_id=f"{group}-{base.topic_prefix}",
        worker_id=worker_id,
        windows_s=(HOUR, DAY),
        window_buckets=12,
        half_life_s=float(DAY),
        checkpoint_interval_s=0.3,
        batch_size=500,
        batch_timeout_s=0.1,
    )
    return base.model_copy(update={"stream": stream})


def _worker_env(settings: Settings) -> dict[str, str]:
    stream = settings.stream
    return cli_env(settings) | {
        "FRESHREC_STREAM__GROUP_ID": stream.group_id,
        "FRESHREC_STREAM__WORKER_ID": stream.worker_id,
        "FRESHREC_STREAM__WINDOWS_S": orjson.dumps(list(stream.windows_s)).decode(),
        "FRESHREC_STREAM__WINDOW_BUCKETS": str(stream.window_buckets),
        "FRESHREC_STREAM__HALF_LIFE_S": str(stream.half_life_s),
        "FRESHREC_STREAM__CHECKPOINT_INTERVAL_S": str(stream.checkpoint_interval_s),
        "FRESHREC_STREAM__BATCH_SIZE": str(stream.batch_size),
        "FRESHREC_STREAM__BATCH_TIMEOUT_S": str(stream.batch_timeout_s),
    }


def _member_ids(settings: Settings) -> set[str]:
    """Member ids of the stream group's members that have partitions (a restarted worker gets a
    new one)."""
    admin = AdminClient(settings.kafka_config(log_level=3))
    group = settings.stream.effective_group_id
    try:
        description = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
    except KafkaException:
        return set()
    return {m.member_id for m in description.members if m.assignment.topic_partitions}


def _events(seed: int) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs: out of order by up to two hours, some re-sent, some not even JSON."""
    rng = random.Random(seed)
    base_ts = 1_700_000_000_000
    out: list[tuple[bytes, bytes]] = []
    for i in range(TOTAL):
        user = f"u{i % 197}"
        event = {
            "event_id": f"f{i}",
            "user_id": user,
            "item_id": f"i{int(rng.paretovariate(1.1)) % 500}",
            "type": ("view", "click", "purchase")[i % 3],
            "ts": base_ts + i * 1_000 - rng.randint(0, 7_200_000),
        }
        value = orjson.dumps(event)
        out.append((user.encode(), value))
        if rng.random() < 0.01:
            out.append((user.encode(), value))  # a re-send: counted once
        if rng.random() < 0.001:
            out.append((b"x", b"{broken"))
    return out


def test_seeded_kill_9s_of_the_stream_worker_end_like_an_uninterrupted_run(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    seed = SEED
    replay = f"seed {seed} (replay with FRESHREC_FAULT_SEED={seed})"
    rng = random.Random(seed)
    settings = _stream_settings(make_settings, "killed", "killed")
    ensure_topics(settings)
    env = _worker_env(settings)
    records = _events(seed)
    split = len(records) - HELD
    pauses = random.Random(seed + 1)  # the producer thread's own generator: choices stay seeded

    def produce(start: int, stop: int, *, paced: bool) -> None:
        with EventProducer(settings) as producer:
            for n in range(start, stop):
                key, value = records[n]
                producer.produce(settings.topics.events, value, key=key)
                if paced and n % 700 == 699:
                    producer.flush()
                    time.sleep(pauses.uniform(0.05, 0.35))  # arrivals spread across the kills

    producer = threading.Thread(target=produce, args=(0, split), kwargs={"paced": True})
    producer.start()
    checkpoint = settings.home / "stream" / settings.stream.group_id / "killed.ckpt"
    plan: list[str] = []
    try:
        for attempt in range(KILLS):
            last = attempt == KILLS - 1
            during_start = not last and rng.random() < 0.3
            if during_start:
                delay = rng.uniform(0.5, 4.0)
            elif last:  # inside one checkpoint interval (0.3 s) after the burst, so it is left to replay
                delay = rng.uniform(0.0, 0.05)
            else:
                delay = rng.uniform(0.0, 0.6)
            plan.append(f"{'start' if during_start else 'after-checkpoint'}+{delay:.2f}s")
            seen = checkpoint.stat().st_mtime_ns if checkpoint.exists() else 0
            members = _member_ids(settings)
            process = subprocess.Popen(
                [sys.executable, "-m", "freshrec_app", "stream"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                if during_start:
                    time.sleep(delay)  # anywhere in start-up: imports, group join, first batches
                else:
                    # A snapshot after start-up; or, once nothing new arrives (snapshots are taken
                    # of partitions that moved on only), the worker's own membership of the group.
                    wait_until(
                        lambda s=seen, p=process, m=members: (  # type: ignore[misc]
                            (checkpoint.exists() and checkpoint.stat().st_mtime_ns > s)
                            or p.poll() is not None
                            or (not producer.is_alive() and bool(_member_ids(settings) - m))
                        ),
                        timeout_s=120,
                    )
                    if last:
                        # Right after a burst, well inside one checkpoint interval: the final run
                        # must replay what this worker had consumed or not yet read.
                        producer.join(timeout=120)
                        produce(split, len(records), paced=False)
                    time.sleep(delay)
                assert process.poll() is None, f"{replay}, {plan}: the worker exited by itself"
            finally:
                if process.poll() is None:
                    os.kill(process.pid, signal.SIGKILL)
                _, stderr = process.communicate(timeout=60)
            assert process.returncode == -signal.SIGKILL, f"{replay}, {plan}: {stderr.decode()[-2000:]}"
    finally:
        producer.join(timeout=120)
    final = orjson.loads(freshrec_cli("stream", "--until-idle", "2", "--json", env=env, timeout=300).stdout)
    assert final["consumed"] > 0, f"{replay}, {plan}: the last kill must leave events to replay"

    reference_settings = _stream_settings(make_settings, "reference", "ref")
    reference = StreamWorker(reference_settings, heads=build_heads(reference_settings.stream))
    ref_stats = reference.run(until_idle_s=1.5)
    resent = len(records) - TOTAL - sum(1 for _, v in records if v == b"{broken")
    assert (ref_stats.counted, ref_stats.duplicates) == (TOTAL, resent), replay

    restarted = StreamWorker(settings, heads=build_heads(settings.stream))
    restarted.restore()  # the killed group's state, from Kafka alone
    killed = restarted.state
    ref = reference.state
    mismatches: list[str] = []
    if set(killed.counters.items.ids()) != set(ref.counters.items.ids()):
        mismatches.append("item ids")
    for item in ref.counters.items.ids():
        for kind in ("view", "click", "purchase", None):
            got = (
                killed.counters.total(item, kind),
                killed.counters.windowed(item, HOUR, kind),
                killed.counters.windowed(item, DAY, kind),
            )
            want = (
                ref.counters.total(item, kind),
                ref.counters.windowed(item, HOUR, kind),
                ref.counters.windowed(item, DAY, kind),
            )
            if got != want:
                mismatches.append(f"{item}/{kind}: {got} != {want}")
            if not np.isclose(
                killed.counters.decayed(item, kind), ref.counters.decayed(item, kind), rtol=1e-9
            ):
                mismatches.append(f"{item}/{kind} decayed")
    users = {f"u{i}" for i in range(197)}
    mismatches += [f"history {u}" for u in sorted(users) if killed.histories.get(u) != ref.histories.get(u)]
    if sum(killed.offsets.values()) != sum(ref.offsets.values()):
        mismatches.append(f"offsets {sum(killed.offsets.values())} != {sum(ref.offsets.values())}")
    assert not mismatches, f"{replay}, kills {plan}: {len(mismatches)} differences, first {mismatches[:5]}"
    assert all(ref.histories.get(u) for u in users), replay


# ------------------------------------------------------------------------------ live rescaling

CHUNK = 8_000  # ml-100k events per stage


def _scaled_env(settings: Settings, worker_id: str, home: Path) -> dict[str, str]:
    stream = settings.stream.model_copy(update={"worker_id": worker_id})
    return _worker_env(settings.model_copy(update={"stream": stream})) | {
        "FRESHREC_HOME": str(home),
        "FRESHREC_STREAM__HEADS": "[]",
        "FRESHREC_STREAM__SESSION_TIMEOUT_MS": str(stream.session_timeout_ms),
    }


def _snapshotted_events(settings: Settings) -> int:
    """Events the group's changelog snapshots reflect, summed over partitions."""
    with Changelog(settings) as changelog:
        snapshots = changelog.restore()
    return sum(s.offsets.get(settings.topics.events, 0) for s in snapshots.values())


def test_workers_going_1_2_3_2_with_a_kill_end_like_one_uninterrupted_worker(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """During a replay the group grows from one worker to three, one is killed with kill -9 (two
    left), and then a worker with an empty home takes every partition from Kafka alone: the state
    per partition (counters, windows, decayed counts, histories, co-occurrence, recent ids) equals
    that of one worker that read everything at once, and ``state top`` agrees with ClickHouse."""
    rng = random.Random(SEED)
    print(f"seed {SEED} (replay with FRESHREC_FAULT_SEED={SEED})")
    base = _stream_settings(make_settings, "scaled", "w1")
    settings = base.model_copy(
        update={"stream": base.stream.model_copy(update={"heads": (), "session_timeout_ms": 6_000})}
    )
    ensure_topics(settings)
    records = load_dataset(
        "ml-100k", datasets_dir=settings.datasets_dir, cache_dir=settings.cache_dir, limit=5 * CHUNK
    ).records
    produced = 0

    def produce_chunk() -> None:
        nonlocal produced
        with EventProducer(settings) as producer:
            for record in records[produced : produced + CHUNK]:
                producer.produce(settings.topics.events, record.value, key=record.key)
        produced += CHUNK

    workers: dict[str, subprocess.Popen[bytes]] = {}

    def start(worker_id: str) -> None:
        workers[worker_id] = subprocess.Popen(
            [sys.executable, "-m", "freshrec_app", "stream"],
            env=_scaled_env(settings, worker_id, tmp_path / worker_id),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def members(n: int) -> None:
        wait_until(lambda: len(_member_ids(settings)) == n, timeout_s=60, interval_s=0.2)
        assert all(p.poll() is None for p in workers.values())

    try:
        start("w1")
        members(1)
        produce_chunk()
        start("w2")  # joins while w1 is still counting the first chunk
        members(2)
        produce_chunk()
        start("w3")
        members(3)
        produce_chunk()
        time.sleep(rng.uniform(0.0, 1.0))  # a seeded point while the third chunk is being counted
        killed = workers.pop("w1")
        killed.kill()  # kill -9: nothing flushed; its partitions replay from their snapshots
        killed.communicate(timeout=10)
        assert killed.returncode == -signal.SIGKILL
        produce_chunk()
        members(2)  # after the session timeout, w1's partitions move to w2 and w3
        wait_until(lambda: _snapshotted_events(settings) == produced, timeout_s=60, interval_s=0.5)
        for name in ("w2", "w3"):
            workers[name].terminate()  # SIGTERM: a final flush, then exit
        for name in ("w2", "w3"):
            _, stderr = workers[name].communicate(timeout=60)
            assert workers[name].returncode == 0, stderr.decode()[-2000:]
    finally:
        for process in workers.values():
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=60)

    # A worker on a new machine (empty home) restores every partition from Kafka and goes on from
    # exactly there: it reads the last chunk only.
    produce_chunk()
    fresh = StreamWorker(settings.model_copy(update={"home": tmp_path / "empty"}))
    fresh_stats = fresh.run(until_idle_s=2.0)
    assert fresh_stats.restored == settings.broker_partitions
    assert (fresh_stats.consumed, fresh_stats.counted) == (CHUNK, CHUNK)

    reference_settings = _stream_settings(make_settings, "reference", "ref")
    reference = StreamWorker(
        reference_settings.model_copy(
            update={"stream": reference_settings.stream.model_copy(update={"heads": ()})}
        )
    )
    assert reference.run(until_idle_s=2.0).counted == produced == 5 * CHUNK
    assert (
        sorted(fresh.state.stores)
        == sorted(reference.state.stores)
        == list(range(settings.broker_partitions))
    )
    for partition, want in reference.state.stores.items():
        got = fresh.state.stores[partition]
        assert got.offsets == want.offsets, partition
        assert got.counters.items.ids() == want.counters.items.ids(), partition
        for item in want.counters.items.ids():
            for kind in (*want.counters.types.ids(), None):
                assert got.counters.total(item, kind) == want.counters.total(item, kind)
                assert got.counters.windowed(item, HOUR, kind) == want.counters.windowed(item, HOUR, kind)
                assert got.counters.windowed(item, DAY, kind) == want.counters.windowed(item, DAY, kind)
                assert np.isclose(
                    got.counters.decayed(item, kind), want.counters.decayed(item, kind), rtol=1e-9
                )
        assert got.histories.state_dict() == want.histories.state_dict(), partition
        assert got.cooccurrence.state_dict() == want.cooccurrence.state_dict(), partition
        assert got.cooccurrence.pruned > 0  # pruning too is the same, partition by partition
        assert set(got.recent.state_dict()["young"]) == set(want.recent.state_dict()["young"])
    assert fresh.state.counters.top(20) == reference.state.counters.top(20)
    assert fresh.state.counters.top(20, kind=DAY) == reference.state.counters.top(20, kind=DAY)

    # `freshrec state top` from Kafka alone agrees with the audit log in ClickHouse.
    env = cli_env(settings, dsn=f"chdb://{tmp_path / 'audit-db'}")
    freshrec_cli("sink", "--until-idle", "2", env=env)
    rows = sql_json(
        f"SELECT item_id, count() AS n FROM {settings.clickhouse_database}.events GROUP BY item_id", env=env
    )
    expected = sorted(((str(r["item_id"]), int(str(r["n"]))) for r in rows), key=lambda r: (-r[1], r[0]))
    empty_home = cli_env(
        settings.model_copy(update={"home": tmp_path / "operator"}), dsn=env["FRESHREC_CLICKHOUSE_DSN"]
    )
    empty_home["FRESHREC_STREAM__GROUP_ID"] = settings.stream.group_id
    top = orjson.loads(freshrec_cli("state", "top", "--k", "20", "--json", env=empty_home).stdout)
    assert top == [{"item_id": i, "total": n} for i, n in expected[:20]]

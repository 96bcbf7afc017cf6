"""kill -9 of ``freshrec train --once`` at seeded points of a publish: the model chain stays whole.

Six kills, at points the seed orders (each at least once): inside a publish (after its first chunk
reached Kafka, after the commit, after the snapshot was stored, after the record was written, on the
sparse or the dense publish of the cycle), or at a random moment of the whole run. Then one clean cycle. What
must hold, whatever was killed when:

- ``model_updates`` lists 1..N with no gap, and every real version's parent is a listed real version
  (a number whose transaction never committed is listed as ``aborted``);
- each version number has one payload on the model topics, committed or not;
- every committed version is recorded with that payload's checksum, and nothing else is recorded as
  real;
- a replica that followed the topics throughout never held a version the record does not have,
  with the recorded state checksum; a fresh replica reaches the newest version;
- no unfinished snapshot file is left in the store.

``FRESHREC_FAULT_SEED=<seed>`` replays a run; the seed is in every assertion message.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from support import cli_env, freshrec_cli, sql_json, wait_until

from freshrec.faults import FAULT_EXIT_STATUS
from freshrec.settings import Settings
from publishers.chain import ChunkHeader
from publishers.replica import Replica, ReplicaSubscriber
from publishers.snapshots import SnapshotStore
from publishers.updates import ModelVersion

SEED = int(os.environ.get("FRESHREC_FAULT_SEED", "4242"))
KILLS = 6
POINTS = (
    "publisher.after_first_chunk",
    "publisher.after_commit",
    "publisher.after_store",
    "publisher.after_record",
    "random",
)


def test_six_kills_of_a_publishing_trainer_leave_the_chain_whole(settings: Settings, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    why = f"(seed {SEED})"
    env = cli_env(settings, dsn=f"chdb://{tmp_path / 'db'}")
    env.update(
        {
            "FRESHREC_TRAIN__DIM": "16",
            "FRESHREC_TRAIN__BLOCKS": "1",
            "FRESHREC_TRAIN__EPOCHS": "1",
            "FRESHREC_TRAIN__DENSE_EVERY": "1",  # each cycle publishes twice: sparse, then dense
        }
    )
    freshrec_cli("replay", "ml-100k", "--limit", "2000", env=env)
    freshrec_cli("sink", "--until-idle", "2", env=env)
    freshrec_cli("train", "--once", env=env)  # v1, the first snapshot

    held: list[tuple[int, str]] = []
    live = Replica(snapshots=SnapshotStore.for_settings(settings), gap_timeout_s=1.0)
    live.on_version(lambda version: held.append((version.version, version.state_checksum)))
    kills: list[str] = []
    with ReplicaSubscriber(settings, live):
        points = [*POINTS, *rng.choices(POINTS, k=KILLS - len(POINTS))]  # each point at least once
        rng.shuffle(points)
        for point in points:
            kills.append(_train_killed(env, point, rng))
        freshrec_cli("train", "--once", env=env)  # one clean cycle
        newest = max(r["version"] for r in _updates(env) if r["kind"] != "aborted")
        wait_until(lambda: live.version == newest, timeout_s=30)
    why = f"(seed {SEED}, kills {kills})"

    updates = _updates(env)
    versions = [r["version"] for r in updates]
    assert versions == list(range(1, len(versions) + 1)), f"model list has gaps {versions} {why}"
    real = {r["version"]: r for r in updates if r["kind"] != "aborted"}
    for row in real.values():
        assert row["parent"] == 0 or row["parent"] in real, f"v{row['version']}'s parent is not listed {why}"
    assert real[newest]["parent"] != 0 and len(real) >= 4, f"the clean cycles did not publish {why}"

    payloads, committed = _payloads_on_the_topics(settings)
    for version, checksums in payloads.items():
        assert len(checksums) == 1, f"v{version} has {len(checksums)} payloads on the topics {why}"
    assert set(committed) == set(real), f"committed {sorted(committed)} vs recorded {sorted(real)} {why}"
    for version, checksum in committed.items():
        assert real[version]["checksum"] == checksum, f"v{version} recorded with another payload {why}"
    assert set(payloads) == set(versions), f"a recorded number is not on the topics {why}"

    for version, state in held:
        assert version in real and real[version]["state_checksum"] == state, (
            f"the live replica served v{version}, which the chain does not record as it was {why}"
        )
    fresh = Replica(snapshots=None)
    with ReplicaSubscriber(settings, fresh):
        wait_until(lambda: fresh.version == newest, timeout_s=30)
    assert isinstance(fresh.current, ModelVersion)
    assert fresh.current.state_checksum == real[newest]["state_checksum"], why
    assert not [p for p in (settings.home / "models").iterdir() if p.name.startswith(".tmp-")], why


def _train_killed(env: dict[str, str], point: str, rng: random.Random) -> str:
    """One ``train --once`` killed at ``point`` (or at a random moment); returns what happened."""
    if point == "random":
        delay = rng.uniform(2.0, 8.0)  # a run takes about 8 s here
        child = subprocess.Popen(
            [sys.executable, "-m", "freshrec_app", "train", "--once"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            child.wait(delay)
            return f"random {delay:.1f}s: ended by itself ({child.returncode})"
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
            return f"random {delay:.1f}s"
    skip = rng.choice((0, 1))  # die in the sparse publish (0) or the dense one (1)
    faulty = {**env, "FRESHREC_FAULT_POINT": point, "FRESHREC_FAULT_SKIP": str(skip)}
    result = freshrec_cli("train", "--once", env=faulty, check=False)
    assert result.returncode == FAULT_EXIT_STATUS, f"{point} was not reached (seed {SEED}):\n{result.stderr}"
    return f"{point}/{skip}"


def _updates(env: dict[str, str]) -> list[dict[str, object]]:
    return sql_json(
        "SELECT version, parent, kind, checksum, state_checksum FROM model_updates FINAL ORDER BY version",
        env=env,
    )


def _payloads_on_the_topics(settings: Settings) -> tuple[dict[int, set[str]], dict[int, str]]:
    """Every version number on the model topics with the checksums its chunks carry (any
    transaction), and the committed versions with theirs."""
    found: list[dict[int, set[str]]] = []
    for isolation in ("read_uncommitted", "read_committed"):
        consumer = Consumer(
            settings.kafka_config(
                **{
                    "group.id": uuid.uuid4().hex,
                    "enable.auto.commit": False,
                    "enable.partition.eof": True,
                    "isolation.level": isolation,
                }
            )
        )
        topics = [settings.topics.model_sparse, settings.topics.model_dense]
        consumer.assign([TopicPartition(t, 0, OFFSET_BEGINNING) for t in topics])
        checksums: dict[int, set[str]] = defaultdict(set)
        ended: set[str] = set()
        deadline = time.monotonic() + 60
        while len(ended) < len(topics) and time.monotonic() < deadline:
            for message in consumer.consume(500, 0.2):
                error = message.error()
                if error is not None:
                    assert error.code() == KafkaError._PARTITION_EOF, error
                    ended.add(message.topic() or "")
                    continue
                header = ChunkHeader.of(message)
                assert header is not None
                checksums[header.version].add(header.checksum)
        consumer.close()
        assert len(ended) == len(topics), f"model topics not read to their end ({isolation})"
        found.append(checksums)
    every, committed = found
    return every, {version: next(iter(sums)) for version, sums in committed.items()}

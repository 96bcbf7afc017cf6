"""Replays through the real broker: every record delivered, keyed by user, in time order per partition."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
from confluent_kafka import Consumer, KafkaException, TopicPartition
from support import cli_env, freshrec_cli, wait_until

from freshrec.settings import Settings
from streams import replay
from streams.admin import ensure_topics


def _read_all(settings: Settings, expected: int) -> list[tuple[bytes | None, dict[str, object]]]:
    consumer = Consumer(
        settings.kafka_config(
            **{"group.id": f"reader-{settings.topic_prefix}", "auto.offset.reset": "earliest"}
        )
    )
    consumer.subscribe([settings.topics.events])
    out: list[tuple[bytes | None, dict[str, object]]] = []
    deadline = time.monotonic() + 60
    try:
        while len(out) < expected and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.5):
                assert message.error() is None
                out.append((message.key(), orjson.loads(message.value() or b"")))
    finally:
        consumer.close()
    return out


def test_replay_publishes_a_dataset_in_time_order_keyed_by_user(settings: Settings) -> None:
    stats = replay.run(settings, "ml-100k", limit=2000)
    assert stats.published == 2000 and not stats.synthetic_ts
    records = _read_all(settings, 2000)
    assert len(records) == 2000
    assert all(key == str(event["user_id"]).encode() for key, event in records)
    # Per user (hence per partition), events arrive in timestamp order.
    last: dict[bytes | None, int] = {}
    for key, event in records:
        ts = int(event["ts"])  # type: ignore[call-overload]
        assert ts >= last.get(key, 0)
        last[key] = ts
    assert len({event["event_id"] for _, event in records}) == 2000


def test_speed_paces_the_replay_by_the_data_clock(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "paced.jsonl"
    base = 1_700_000_000_000
    lines = [
        orjson.dumps(
            {"event_id": f"p{i}", "user_id": "u", "item_id": "i", "type": "view", "ts": base + i * 1000}
        )
        for i in range(5)
    ]  # four seconds of data time
    path.write_bytes(b"\n".join(lines) + b"\n")
    started = time.monotonic()
    stats = replay.run(settings, str(path), speed=4.0)  # four seconds at 4x: about one second
    elapsed = time.monotonic() - started
    assert stats.published == 5
    assert 0.9 <= elapsed < 10
    assert [event["event_id"] for _, event in _read_all(settings, 5)] == [f"p{i}" for i in range(5)]


def test_a_replay_killed_mid_way_is_resumed_not_repeated(settings: Settings, tmp_path: Path) -> None:
    """kill -9 of `freshrec replay` half-way; then `freshrec run` publishes only what is missing:
    each of the dataset's events is on the topic and in ClickHouse once, no duplicate dead letter."""
    env = cli_env(settings, dsn=f"chdb://{tmp_path / 'db'}")
    total = 100_000
    ensure_topics(settings)
    # Paced (ml-100k spans 7 months of data time: about 19 s at this speed) so the kill lands mid-way.
    process = subprocess.Popen(
        [sys.executable, "-m", "freshrec_app", "replay", "ml-100k", "--speed", "1000000"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _on_topic(settings) >= 20_000 or process.poll() is not None, timeout_s=120)
    finally:
        process.kill()
        process.wait()
    published_before_kill = _on_topic(settings)
    assert 20_000 <= published_before_kill < total, published_before_kill

    result = orjson.loads(freshrec_cli("run", "--until-idle", "3", "--json", env=env, timeout=300).stdout)

    assert result["replayed"] == total - published_before_kill
    assert result["events"] == result["distinct_event_ids"] == total
    assert result["dead_letters"] == 0, result["dead_letters_by_reason"]
    assert _on_topic(settings) == total
    # Complete now: a further run does not publish it again.
    again = orjson.loads(freshrec_cli("run", "--until-idle", "1", "--json", env=env, timeout=300).stdout)
    assert again["replayed"] == 0 and again["events"] == total and again["dead_letters"] == 0


def _on_topic(settings: Settings) -> int:
    """Messages on the events topic (sum of its partitions' high watermarks); a topic created a
    moment ago may have no leader yet, so a failed read is retried for a bounded time."""
    topic = settings.topics.events
    consumer = Consumer(settings.kafka_config(**{"group.id": "watermarks", "enable.auto.commit": False}))
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
                return sum(
                    consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
                    for p in partitions
                )
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        consumer.close()

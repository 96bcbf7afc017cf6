"""The audit sink against the real broker and ClickHouse: nothing lost, nothing doubled, never stuck."""

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

import orjson
from confluent_kafka import Consumer
from support import cli_env, freshrec_cli, sink_committed, sql_json, wait_until

from freshrec.settings import Settings
from freshrec.store import Store
from streams import sink
from streams.admin import ensure_topics
from streams.dedup import RecentIds
from streams.producer import EventProducer

NOW_MS = int(time.time() * 1000)

KILL_SEED = int(os.environ.get("FRESHREC_FAULT_SEED", "3141"))


def valid_event(i: int, *, prefix: str = "e") -> dict[str, object]:
    event: dict[str, object] = {
        "event_id": f"{prefix}{i}",
        "user_id": f"u{i % 97}",
        "item_id": f"i{(i * 7919) % 501}",
        "type": ("view", "click", "purchase", "rating")[i % 4],
        "ts": NOW_MS - 3_600_000 + i,
    }
    if i % 4 == 3:
        event["value"] = float(i % 5 + 1)
    if i % 10 == 0:
        event["request_id"] = f"r{i}"
        event["context"] = {"device": "ios", "position": i % 10, "promo": True}
    return event


def bad_corpus() -> list[tuple[bytes, str]]:
    """(message bytes, expected dead-letter reason) — one of each way to break the contract."""
    ok = valid_event(0, prefix="bad-base-")

    def variant(**changes: object) -> bytes:
        event = {**ok, **changes}
        return orjson.dumps({k: v for k, v in event.items() if v is not _DROP})

    return [
        (b"this is not json", "not_json"),
        (b"", "not_json"),
        (b"\xff\xfe\x00\x80 invalid utf-8", "invalid_utf8"),
        (b"[1, 2, 3]", "not_object"),
        (b'"just a string"', "not_object"),
        (variant(item_id=_DROP), "missing_field"),
        (variant(event_id=_DROP), "missing_field"),
        (variant(user_id=12345, event_id="bad-type-1"), "bad_type"),
        (variant(ts=True, event_id="bad-ts-bool"), "bad_ts"),
        (variant(ts="yesterday", event_id="bad-ts-text"), "bad_ts"),
        (variant(value="5", event_id="bad-value-text"), "bad_type"),
        (b'{"event_id":"nan","user_id":"u","item_id":"i","type":"view","ts":1,"value":NaN}', "not_json"),
        (variant(event_id="x" * 10_000), "bad_value"),
        (variant(event_id="far-future", ts=NOW_MS + 10 * 365 * 86_400_000), "future_ts"),
        (variant(event_id="bad-type-pattern", type="Click!"), "bad_value"),
        (variant(event_id="bad-context", context={"nested": {"a": 1}}), "bad_context"),
        (variant(event_id="unknown-field", item="typo"), "unknown_field"),
        (b'{"pad":"' + b"x" * 70_000 + b'"}', "too_large"),
    ]


_DROP = object()


def produce_raw(settings: Settings, messages: list[bytes], *, keys: list[bytes] | None = None) -> None:
    ensure_topics(settings)
    with EventProducer(settings) as producer:
        for n, value in enumerate(messages):
            producer.produce(settings.topics.events, value, key=keys[n] if keys else f"k{n % 13}".encode())


def test_recent_ids_are_bounded_and_remember_the_latest_half() -> None:
    recent = RecentIds(1000)
    for i in range(10_000):
        recent.add(str(i))
        assert len(recent) <= 1000
    assert all(str(i) in recent for i in range(9_500, 10_000))
    assert "0" not in recent
    disabled = RecentIds(0)
    disabled.add("a")
    assert "a" not in disabled
    restored = RecentIds(10)
    restored.load_state_dict(recent.state_dict())
    assert all(str(i) in restored for i in range(9_500, 10_000)) and len(restored) == len(recent)


def test_every_message_lands_exactly_once_with_a_reason(settings: Settings, store: Store) -> None:
    valid = [orjson.dumps(valid_event(i)) for i in range(3000)]
    corpus = bad_corpus()
    duplicate = valid[17]  # re-sent with the same key: same partition, same event_id
    # Interleave bad messages through the stream so that the sink must survive each and go on.
    messages: list[bytes] = []
    keys: list[bytes] = []
    bad_iter = iter([*corpus, (duplicate, "duplicate_event_id")])
    for n, value in enumerate(valid):
        messages.append(value)
        keys.append(orjson.loads(value)["user_id"].encode())
        if n % 150 == 149:
            bad = next(bad_iter, None)
            if bad is not None:
                messages.append(bad[0])
                keys.append(b"u17" if bad[0] == duplicate else b"bad")
    assert next(bad_iter, None) is None, "every bad message must be in the stream"
    produce_raw(settings, messages, keys=keys)

    stats = sink.run(settings, store, until_idle_s=2.0)

    assert stats.consumed == len(messages)
    assert stats.events == len(valid)
    assert stats.dead_letters == len(corpus) + 1
    (count, final, distinct), = store.rows(
        f"SELECT (SELECT count() FROM {store.table('events')}), "
        f"(SELECT count() FROM {store.table('events')} FINAL), "
        f"(SELECT uniqExact(event_id) FROM {store.table('events')})"
    )  # fmt: skip
    assert count == final == distinct == len(valid)
    # Every (partition, offset) of the topic appears exactly once across the two tables.
    positions = store.rows(
        f"SELECT partition, offset FROM {store.table('events')} UNION ALL "
        f"SELECT partition, offset FROM {store.table('dead_letters')}"
    )
    assert len(positions) == len(set(positions)) == len(messages)
    # Each dead letter keeps its original bytes and the expected reason.
    dead = store.rows(
        f"SELECT hex(payload), reason, detail FROM {store.table('dead_letters')} ORDER BY partition, offset"
    )
    expected = {
        (value.hex().upper(), reason) for value, reason in [*corpus, (duplicate, "duplicate_event_id")]
    }
    assert {(payload, reason) for payload, reason, _ in dead} == expected
    assert all(detail for _, _, detail in dead)
    # A valid event's fields survive the trip, including optional ones.
    (row,) = store.rows(
        f"SELECT user_id, item_id, type, toUnixTimestamp64Milli(ts), value, request_id, context "
        f"FROM {store.table('events')} WHERE event_id = {{id:String}}",
        {"id": "e30"},
    )
    source = valid_event(30)
    assert row[:4] == (source["user_id"], source["item_id"], source["type"], source["ts"])
    assert row[4] is None and row[5] == "r30"
    assert orjson.loads(row[6]) == source["context"]


def test_dead_letters_also_reach_the_dlq_topic_with_their_reason(settings: Settings, store: Store) -> None:
    corpus = bad_corpus()[:5]
    produce_raw(settings, [value for value, _ in corpus])
    sink.run(settings, store, until_idle_s=1.5)

    consumer = Consumer(
        settings.kafka_config(
            **{"group.id": f"dlq-reader-{settings.topic_prefix}", "auto.offset.reset": "earliest"}
        )
    )
    consumer.subscribe([settings.topics.events_dlq])
    seen: list[tuple[bytes, str]] = []
    deadline = time.monotonic() + 30
    while len(seen) < len(corpus) and time.monotonic() < deadline:
        for message in consumer.consume(100, 0.5):
            assert message.error() is None
            headers = dict(message.headers() or [])
            assert headers["source.topic"] == settings.topics.events.encode()
            seen.append((message.value() or b"", headers["reason"].decode()))
    consumer.close()
    assert sorted(seen) == sorted(corpus)


def test_duplicates_are_dead_lettered_across_sink_restarts(settings: Settings, store: Store) -> None:
    batch = [orjson.dumps(valid_event(i, prefix="dup")) for i in range(500)]
    produce_raw(settings, batch)
    first = sink.run(settings, store, until_idle_s=1.5)
    assert first.events == 500
    produce_raw(settings, batch)  # the same events published again, e.g. a replay run twice
    second = sink.run(settings, store, until_idle_s=1.5)  # a new sink: must remember through ClickHouse
    assert second.events == 0
    assert second.duplicates == second.dead_letters == 500
    assert store.rows(f"SELECT count() FROM {store.table('events')}") == [(500,)]


def test_sink_skips_what_clickhouse_holds_when_kafka_offsets_are_lost(
    settings: Settings, store: Store
) -> None:
    """The worst case of a crash between the insert and the commit: no committed offset at all."""
    messages = [orjson.dumps(valid_event(i, prefix="lost")) for i in range(2000)] + [b"not json"] * 3
    produce_raw(settings, messages)
    first = sink.run(settings, store, until_idle_s=1.5)
    assert (first.events, first.dead_letters) == (2000, 3)
    # A new group has no committed offsets: it reads everything again from the beginning.
    again = settings.model_copy(
        update={"sink": settings.sink.model_copy(update={"group_id": "offsets-lost"})}
    )
    second = sink.run(again, store, until_idle_s=1.5)
    assert (second.consumed, second.skipped_already_stored) == (2003, 2003)
    assert (second.events, second.dead_letters, second.duplicates) == (0, 0, 0)
    assert store.rows(f"SELECT count() FROM {store.table('events')}") == [(2000,)]
    assert store.rows(f"SELECT count() FROM {store.table('dead_letters')}") == [(3,)]


def test_sink_survives_sigkill_mid_stream_and_ends_exact(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """kill -9 the sink several times while events keep arriving; the final tables are exact."""
    settings = make_settings(sink=make_settings().sink.model_copy(update={"batch_size": 700}))
    env = cli_env(settings, dsn=f"chdb://{tmp_path / 'killed-sink-db'}")
    total_valid, corpus = 40_000, bad_corpus()
    ensure_topics(settings)

    produced = threading.Event()
    kill_rng = random.Random(KILL_SEED)  # when each kill lands; FRESHREC_FAULT_SEED replays a failure
    print(f"kill seed {KILL_SEED}")  # shown by pytest with a failure

    def produce_slowly() -> None:
        rng = random.Random(7)
        with EventProducer(settings) as producer:
            bad = iter(corpus)
            for i in range(total_valid):
                event = valid_event(i, prefix="k")
                producer.produce(
                    settings.topics.events, orjson.dumps(event), key=str(event["user_id"]).encode()
                )
                if i % 2000 == 1999 and (b := next(bad, None)) is not None:
                    producer.produce(settings.topics.events, b[0], key=b"bad")
                if i % 500 == 0:  # events keep arriving for ~12 s, across all three kills
                    producer.flush()
                    time.sleep(rng.uniform(0.1, 0.2))
        produced.set()

    producer_thread = threading.Thread(target=produce_slowly)
    producer_thread.start()
    kills = 0
    try:
        for target in (3_000, 12_000, 25_000):
            process = subprocess.Popen(
                [sys.executable, "-m", "freshrec_app", "sink"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                wait_until(
                    lambda t=target, p=process: sink_committed(settings) >= t or p.poll() is not None,  # type: ignore[misc]
                    timeout_s=120,
                )
                assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
                time.sleep(kill_rng.uniform(0.0, 0.3))  # land anywhere inside a batch
            finally:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                if process.stderr:
                    process.stderr.close()
            kills += 1
        producer_thread.join(timeout=180)
        assert produced.is_set()
    finally:
        producer_thread.join(timeout=180)
    assert kills == 3

    freshrec_cli("sink", "--until-idle", "3", env=env, timeout=300)

    db = settings.clickhouse_database
    (summary,) = sql_json(
        f"SELECT (SELECT count() FROM {db}.events) AS events, "
        f"(SELECT count() FROM {db}.events FINAL) AS events_final, "
        f"(SELECT uniqExact(event_id) FROM {db}.events) AS ids, "
        f"(SELECT count() FROM {db}.dead_letters) AS dead, "
        "(SELECT uniqExact(partition, offset) FROM "
        f"(SELECT partition, offset FROM {db}.events "
        f"UNION ALL SELECT partition, offset FROM {db}.dead_letters)) AS positions",
        env=env,
    )
    assert summary == {
        "events": total_valid,
        "events_final": total_valid,
        "ids": total_valid,
        "dead": len(corpus),
        "positions": total_valid + len(corpus),
    }
    ids = {row["event_id"] for row in sql_json(f"SELECT event_id FROM {db}.events", env=env)}
    assert ids == {f"k{i}" for i in range(total_valid)}

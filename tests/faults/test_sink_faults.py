"""The audit sink under ClickHouse faults: a kill between its two inserts, and a ClickHouse outage.

Both run on the real broker and the real ClickHouse engine (chDB). The kill is a ``kill -9``
equivalent at a named point (``FRESHREC_FAULT_POINT=sink.after_events_insert``), so the test lands
exactly in the gap it is about; the outage is the engine refusing writes (the table detached), then
accepting them again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from support import cli_env, freshrec_cli, sink_committed, sql_json, started, wait_until

from freshrec.faults import FAULT_EXIT_STATUS
from freshrec.settings import Settings
from freshrec.store import Store
from streams.admin import ensure_topics
from streams.impressions import ServedItem, encode_impression
from streams.producer import EventProducer
from streams.sink import AuditSink

NOW_MS = int(time.time() * 1000)


def event(event_id: str, user: str = "u1") -> bytes:
    return orjson.dumps(
        {"event_id": event_id, "user_id": user, "item_id": "i1", "type": "view", "ts": NOW_MS}
    )


def produce(settings: Settings, messages: list[bytes], key: bytes = b"u1") -> None:
    ensure_topics(settings)
    with EventProducer(settings) as producer:
        for message in messages:
            producer.produce(settings.topics.events, message, key=key)


def test_a_kill_between_the_events_and_dead_letters_inserts_loses_no_dead_letter(
    settings: Settings, tmp_path: Path
) -> None:
    """One batch on one partition: an event, its duplicate, a second event, a broken message. The
    sink dies after writing the batch's `events` rows and before its `dead_letters` rows; the next
    sink must write both dead letters, the duplicate included, and nothing twice."""
    env = cli_env(settings, dsn=f"chdb://{tmp_path / 'db'}") | {"FRESHREC_SINK__LAG_INTERVAL_S": "0"}
    produce(settings, [event("a"), event("a"), event("b"), b"not json"])  # offsets 0..3, one partition

    killed = freshrec_cli(
        "sink", env=env | {"FRESHREC_FAULT_POINT": "sink.after_events_insert"}, check=False, timeout=120
    )
    assert killed.returncode == FAULT_EXIT_STATUS, killed.stderr
    db = settings.clickhouse_database
    # The precondition of the case: the whole batch reached `events` (offsets 0 and 2), no dead letter.
    stored = sql_json(f"SELECT event_id, offset FROM {db}.events ORDER BY offset", env=env)
    assert stored == [{"event_id": "a", "offset": 0}, {"event_id": "b", "offset": 2}]
    assert sql_json(f"SELECT count() AS n FROM {db}.dead_letters", env=env) == [{"n": 0}]

    again = orjson.loads(freshrec_cli("sink", "--until-idle", "2", "--json", env=env).stdout)
    assert (again["events"], again["dead_letters"], again["duplicates"]) == (0, 2, 1)

    dead = sql_json(f"SELECT offset, reason, event_id FROM {db}.dead_letters ORDER BY offset", env=env)
    assert dead == [
        {"offset": 1, "reason": "duplicate_event_id", "event_id": "a"},
        {"offset": 3, "reason": "not_json", "event_id": ""},
    ]
    assert sql_json(f"SELECT count() AS n FROM {db}.events", env=env) == [{"n": 2}]


def test_a_kill_between_the_impressions_and_dead_letters_inserts_loses_and_doubles_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    """The decision log's sink, same gap: one batch, a malformed message then a served response;
    killed after its `impressions` insert (which holds the later offset), the next sink must still
    write the earlier message's dead letter, and no row twice."""
    env = cli_env(settings, dsn=f"chdb://{tmp_path / 'db'}") | {"FRESHREC_SINK__LAG_INTERVAL_S": "0"}
    ensure_topics(settings)
    served = encode_impression(
        request_id="r1", user_id="u1", policy="none", model_version=1, latency_ms=1.0,
        items=[ServedItem(f"i{n}", 1.0 - n / 10, "popular", False, 1.0) for n in range(3)],
    )  # fmt: skip
    with EventProducer(settings) as producer:  # one key: one partition, offsets 0 and 1
        for message in (b"not an impression", served):
            producer.produce(settings.topics.impressions, message, key=b"u1")
    fault = {"FRESHREC_FAULT_POINT": "impressions.after_impressions_insert"}
    killed = freshrec_cli("sink", env=env | fault, check=False, timeout=120)
    assert killed.returncode == FAULT_EXIT_STATUS, killed.stderr
    db = settings.clickhouse_database
    assert sql_json(f"SELECT count() AS n FROM {db}.impressions", env=env) == [{"n": 3}]
    assert sql_json(f"SELECT count() AS n FROM {db}.dead_letters", env=env) == [{"n": 0}]

    freshrec_cli("sink", "--until-idle", "2", env=env)
    rows = sql_json(f"SELECT item_id, offset FROM {db}.impressions ORDER BY position", env=env)
    assert rows == [{"item_id": f"i{n}", "offset": 1} for n in range(3)]  # not written twice
    dead = sql_json(f"SELECT offset, reason FROM {db}.dead_letters", env=env)
    assert dead == [{"offset": 0, "reason": "bad_impression"}]


def test_the_sink_rides_out_a_clickhouse_outage_and_stores_exactly_once(
    make_settings: Callable[..., Settings], store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """ClickHouse refuses the sink's writes for a while (its `events` table detached): the sink
    retries with backoff, logs the outage once and the recovery once, commits no offset of what it
    has not stored, and once ClickHouse accepts writes again stores every event exactly once."""
    base = make_settings()
    settings = make_settings(
        sink=base.sink.model_copy(update={"retry_initial_s": 0.1, "retry_max_s": 0.5, "lag_interval_s": 0})
    )
    first = [event(f"before-{i}", user=f"u{i % 7}") for i in range(300)]
    during = [event(f"during-{i}", user=f"u{i % 7}") for i in range(700)]
    produce(settings, first)
    sink = AuditSink(settings=settings, store=store)

    caplog.set_level(logging.INFO, logger="streams.outage")
    thread, errors = started(sink.run)
    events = store.table("events")
    try:
        wait_until(lambda: store.rows(f"SELECT count() FROM {events}") == [(300,)], timeout_s=60)
        wait_until(lambda: sink_committed(settings) == 300, timeout_s=30)

        store.command(f"DETACH TABLE {events}")
        produce(settings, during)
        wait_until(lambda: sink.retry.retries >= 5 or bool(errors), timeout_s=60)
        assert not errors, errors
        time.sleep(1.5)  # past the sink's 1 s auto-commit: nothing of the unstored batch is committed
        assert sink_committed(settings) == 300

        store.command(f"ATTACH TABLE {events}")
        back = time.monotonic()
        wait_until(lambda: store.rows(f"SELECT count() FROM {events}") == [(1000,)], timeout_s=60)
        recovery_s = time.monotonic() - back
        wait_until(lambda: sink_committed(settings) == 1000, timeout_s=30)
    finally:
        sink.stop()
        thread.join(60)
    assert not errors, errors
    (count, final, distinct), = store.rows(
        f"SELECT count(), (SELECT count() FROM {events} FINAL), uniqExact(event_id) FROM {events}"
    )  # fmt: skip
    assert count == final == distinct == 1000
    assert store.rows(f"SELECT count() FROM {store.table('dead_letters')}") == [(0,)]
    records = [r for r in caplog.records if r.name == "streams.outage"]
    warnings = [r for r in records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "ClickHouse failed" in warnings[0].getMessage()
    assert sum("ClickHouse is back" in r.getMessage() for r in records) == 1
    assert sink.retry.outages == 1
    print(f"sink stored the held batch {recovery_s:.2f} s after ClickHouse accepted writes again")

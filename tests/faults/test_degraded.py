"""Degraded, not dead: the lag sampler, the sink's dead letters and a serving replica come through
broker outages.

The broker is a private one (own home, free ports) that the test stops and starts, so the session's
broker stays up for the other tests.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from support import free_port_pair, sink_committed, started, wait_until

from freshrec.broker import LocalBroker
from freshrec.settings import Settings
from freshrec.store import Store
from serving.server import ServingStack
from streams.admin import ensure_topics
from streams.lag import LagSampler
from streams.sink import AuditSink


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    port, controller = free_port_pair()
    broker = LocalBroker(
        Settings(
            home=tmp_path / "broker-home",
            cache_dir=Settings().cache_dir,
            broker_port=port,
            broker_controller_port=controller,
            broker_heap="384m",
        )
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_the_lag_sampler_recovers_after_a_broker_restart(
    private_broker: LocalBroker,
    make_settings: Callable[..., Settings],
    store: Store,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bootstrap = private_broker.status().bootstrap
    base = make_settings()
    settings = make_settings(
        kafka_bootstrap=bootstrap,
        sink=base.sink.model_copy(update={"group_id": f"sink-{uuid.uuid4().hex[:8]}"}),
    )
    ensure_topics(settings)
    producer = Producer(settings.kafka_config(log_level=0))
    for i in range(10):
        producer.produce(settings.topics.events, b"{}", key=str(i).encode())
    assert producer.flush(30) == 0
    # The sink's group commits 0 of 10: a lag of 10 to sample.
    consumer = Consumer(
        settings.kafka_config(**{"group.id": settings.sink.group_id, "enable.auto.commit": False})
    )
    try:
        consumer.subscribe([settings.topics.events])
        wait_until(lambda: (consumer.poll(0.5), bool(consumer.assignment()))[1], timeout_s=60)
        assigned = consumer.assignment()
        consumer.commit(
            offsets=[TopicPartition(tp.topic, tp.partition, 0) for tp in assigned], asynchronous=False
        )
    finally:
        consumer.close()

    sampler = LagSampler(settings=settings, store=store, interval_s=0.5)
    caplog.set_level(logging.INFO, logger="streams.lag")
    thread = threading.Thread(target=sampler.run, daemon=True)
    table = store.table("consumer_lag")
    group = {"group": settings.sink.group_id}
    where = "consumer_group = {group:String} AND sampled_at > {t:DateTime64(3)}"

    def samples_since(moment: datetime) -> int:
        rows = store.rows(f"SELECT count() FROM {table} WHERE {where}", group | {"t": moment})
        return int(rows[0][0])

    started = datetime.now(UTC)
    thread.start()
    try:
        wait_until(lambda: samples_since(started) > 0, timeout_s=60)
        private_broker.stop()
        wait_until(lambda: any(r.name == "streams.lag" for r in caplog.records), timeout_s=120)
        time.sleep(3)  # the outage goes on: several more failed samples, which must stay quiet
        private_broker.start()
        restarted = datetime.now(UTC)
        back = time.monotonic()
        wait_until(lambda: samples_since(restarted) > 0, timeout_s=90)
        recovery_s = time.monotonic() - back
        wait_until(lambda: any("works again" in r.getMessage() for r in caplog.records), timeout_s=60)
    finally:
        sampler.stop()
        thread.join(60)
    (lag,) = store.rows(f"SELECT sum(lag) FROM {table} WHERE {where}", group | {"t": restarted})
    assert lag[0] > 0
    records = [r for r in caplog.records if r.name == "streams.lag"]
    warnings = [r for r in records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one line for the outage...
    assert warnings[0].exc_info is None and "\n" not in warnings[0].getMessage()  # ...not a traceback
    assert sum("works again" in r.getMessage() for r in records) == 1
    print(f"lag sampling resumed {recovery_s:.1f} s after the broker was back")


def test_the_sink_holds_its_dead_letters_through_a_broker_outage_longer_than_a_minute(
    private_broker: LocalBroker,
    make_settings: Callable[..., Settings],
    store: Store,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Dead letters produced while the broker is away wait for it, however long; the sink neither
    dies (it used to give up after 60 s) nor commits their offsets before the broker has them.

    The sink is held in a ClickHouse outage (its `events` table detached) while the batch holding
    the dead letters is in its hands; the broker is stopped, then ClickHouse let go, so the dead
    letters are produced to a broker that is down."""
    base = make_settings()
    settings = make_settings(
        kafka_bootstrap=private_broker.status().bootstrap,
        sink=base.sink.model_copy(update={"retry_initial_s": 0.1, "retry_max_s": 0.5, "lag_interval_s": 0}),
    )
    ensure_topics(settings)
    first = Producer(settings.kafka_config(log_level=0))
    first.produce(settings.topics.events, _event("first"), key=b"u")
    assert first.flush(30) == 0
    sink = AuditSink(settings=settings, store=store)

    caplog.set_level(logging.INFO, logger="streams.sink")
    thread, errors = started(sink.run)
    events = store.table("events")
    try:
        wait_until(lambda: store.rows(f"SELECT count() FROM {events}") == [(1,)], timeout_s=60)
        store.command(f"DETACH TABLE {events}")
        # One record batch: the valid event first, so the batch waits at its `events` insert.
        first.produce(settings.topics.events, _event("second"), key=b"u")
        for _ in range(3):
            first.produce(settings.topics.events, b"not json", key=b"u")
        assert first.flush(30) == 0
        wait_until(lambda: sink.retry.retries >= 2 or bool(errors), timeout_s=60)
        private_broker.stop()
        store.command(f"ATTACH TABLE {events}")
        dead = store.table("dead_letters")
        # The dead letters are in ClickHouse; their copies to the DLQ topic wait for the broker.
        wait_until(lambda: store.rows(f"SELECT count() FROM {dead}") == [(3,)] or bool(errors), timeout_s=60)
        time.sleep(65)  # the outage goes on past the minute the sink used to allow
        assert not errors, errors
        private_broker.start()
        wait_until(
            lambda: _logged(caplog, "acknowledged the dead letters after") or bool(errors), timeout_s=120
        )
        wait_until(lambda: sink_committed(settings) == 5 or bool(errors), timeout_s=60)
    finally:
        sink.stop()
        thread.join(60)
    assert not errors, errors
    assert store.rows(f"SELECT count() FROM {store.table('dead_letters')}") == [(3,)]
    assert _logged(caplog, "has not acknowledged the dead letters")
    assert _dlq_messages(settings) == 3
    warnings = [r for r in caplog.records if r.name == "streams.sink" and r.levelno >= logging.WARNING]
    assert sum("dead letters" in r.getMessage() for r in warnings) == 1


def _event(event_id: str) -> bytes:
    ts = int(time.time() * 1000)
    return orjson.dumps({"event_id": event_id, "user_id": "u", "item_id": "i", "type": "view", "ts": ts})


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records if r.name == "streams.sink")


def _dlq_messages(settings: Settings) -> int:
    topic = settings.topics.events_dlq
    probe = Consumer(settings.kafka_config(**{"group.id": "dlq-count", "enable.auto.commit": False}))
    try:
        partitions = probe.list_topics(topic, timeout=30).topics[topic].partitions
        return sum(probe.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in partitions)
    finally:
        probe.close()


def test_serve_started_while_the_broker_is_away_listens_at_once_and_gets_ready_when_it_returns(
    private_broker: LocalBroker, make_settings: Callable[..., Settings]
) -> None:
    """A serving replica that starts during a broker outage answers `/healthz` at once and says on
    `/readyz` that Kafka is the reason; neither its model replica nor its stream worker gives up,
    and once the broker is back it becomes ready without a restart."""
    port, _ = free_port_pair()
    settings = make_settings(
        kafka_bootstrap=private_broker.status().bootstrap,
        api_port=port,
        stream=make_settings().stream.model_copy(update={"batch_timeout_s": 0.05, "heads": ()}),
    )
    ensure_topics(settings)
    private_broker.stop()
    stack = ServingStack(settings)
    started = time.monotonic()
    stack.start(timeout_s=5)
    try:
        assert time.monotonic() - started < 10  # listening, not waiting for Kafka
        with httpx.Client(base_url=stack.url, timeout=10) as http:
            assert http.get("/healthz").status_code == 200
            down = http.get("/readyz")
            assert down.status_code == 503 and "kafka" in down.json()["reasons"], down.text
            private_broker.start()
            wait_until(lambda: http.get("/readyz").status_code == 200, timeout_s=120, interval_s=0.5)
            assert stack.subscriber.following and stack.worker.assigned
    finally:
        stack.stop()

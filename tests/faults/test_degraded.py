"""Degraded, not dead: the consumer-lag sampler comes back by itself after a broker restart.

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

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from support import free_port_pair, wait_until

from freshrec.broker import LocalBroker
from freshrec.settings import Settings
from freshrec.store import Store
from streams.admin import ensure_topics
from streams.lag import LagSampler


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

"""Broker stop/start under traffic: the audit sink ends with every event exactly once.

The broker here is a private one (own home, free ports), so that stopping it leaves the session's
broker to the other tests. A producer keeps sending across the outages (librdkafka queues while the
broker is away and delivers after), and a ``freshrec sink`` process runs throughout: it must come
through every restart by itself, and after a drain each acknowledged event is in ``events`` once,
none doubled, and every message on the topic is in exactly one of ``events`` or ``dead_letters``.

One outage is a graceful stop, the other a kill -9 of the broker. The seed chooses when each
starts, how long it lasts, and the producer's keys; it is in every assertion message, and
``FRESHREC_FAULT_SEED=<seed>`` replays it.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition
from support import cli_env, free_port_pair, freshrec_cli, sink_committed, sql_json, wait_until

from freshrec.broker import LocalBroker
from freshrec.settings import Settings, SinkSettings, default_datasets_dir
from streams.admin import ensure_topics
from streams.producer import EventProducer

SEED = int(os.environ.get("FRESHREC_FAULT_SEED", "1207"))
OUTAGES = 2
RATE = 400  # events a second, in bursts of 100


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[tuple[Settings, LocalBroker]]:
    """A broker of this test's own (stopped and started by it), and settings pointing at it."""
    port, controller = free_port_pair()
    run = uuid.uuid4().hex[:10]
    settings = Settings(
        home=tmp_path / "home",
        cache_dir=Settings().cache_dir,
        broker_port=port,
        broker_controller_port=controller,
        broker_heap="512m",
        clickhouse_database=f"test_{run}",
        topic_prefix=f"test-{run}.",
        datasets_dir=default_datasets_dir(),
        sink=SinkSettings(group_id=f"sink-{run}", batch_timeout_s=0.2, session_timeout_ms=6000),
    )
    broker = LocalBroker(settings)
    broker.start()
    try:
        yield settings, broker
    finally:
        broker.stop()


def _kill_broker(broker: LocalBroker) -> None:
    """kill -9 of the broker JVM (the pid file is the broker's own; ``stop`` then only tidies)."""
    pid = int(broker.pid_path.read_text())
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # started by this process: reap it
    broker.stop()


def _messages_on_topic(settings: Settings) -> int:
    """Every message ever written to ``events`` (no transactions, no compaction: the high marks)."""
    consumer = Consumer(settings.kafka_config(**{"group.id": f"probe-{uuid.uuid4().hex}"}))
    try:
        return sum(
            consumer.get_watermark_offsets(TopicPartition(settings.topics.events, p), timeout=30)[1]
            for p in range(settings.broker_partitions)
        )
    finally:
        consumer.close()


def test_broker_restarts_under_traffic_lose_and_double_nothing(
    private_broker: tuple[Settings, LocalBroker], tmp_path: Path
) -> None:
    settings, broker = private_broker
    seed = SEED
    rng = random.Random(seed)
    plan: list[str] = []
    ensure_topics(settings)
    env = cli_env(settings, dsn=f"chdb://{tmp_path / 'sink-db'}")
    sink_log = tmp_path / "sink.log"
    with sink_log.open("wb") as log:  # the child keeps its own descriptor
        sink = subprocess.Popen(
            [sys.executable, "-m", "freshrec_app", "sink"], env=env, stdout=subprocess.DEVNULL, stderr=log
        )

    def sink_said() -> str:
        return sink_log.read_text(errors="replace")[-3000:]

    acked: set[str] = set()
    failed: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    produced: list[int] = [0]
    pacing = random.Random(seed + 1)

    def produce() -> None:
        with EventProducer(settings, log_level=0) as producer:  # outages expected: no log storm
            producer.poll_in_background()
            n = 0
            while not stop.is_set():
                for _ in range(RATE // 4):
                    event_id = f"b{n}"
                    key = f"u{pacing.randrange(300)}".encode()
                    value = orjson.dumps(
                        {
                            "event_id": event_id,
                            "user_id": key.decode(),
                            "item_id": f"i{pacing.randrange(1_000)}",
                            "type": "view",
                            "ts": 1_700_000_000_000 + n,
                        }
                    )

                    def report(error: KafkaError | None, e: str = event_id) -> None:
                        with lock:
                            (acked.add if error is None else failed.append)(e)

                    producer.produce(settings.topics.events, value, key=key, on_delivery=report)
                    n += 1
                produced[0] = n
                time.sleep(0.25)
            # librdkafka holds each record up to message.timeout.ms (5 min), far longer than these
            # outages: every record must be acknowledged, and flush raises if one failed.
            producer.flush(timeout_s=120)

    producer = threading.Thread(target=produce)
    producer.start()

    def progress(after: int) -> int:
        """Wait until the sink stores more than ``after`` (it is consuming); its new position."""
        try:
            wait_until(lambda: sink_committed(settings) > after, timeout_s=120)
        except AssertionError as exc:
            raise AssertionError(
                f"seed {seed}, outages {plan}: the sink stored nothing new; it said:\n{sink_said()}"
            ) from exc
        return sink_committed(settings)

    committed = 0
    try:
        for outage in range(OUTAGES):
            # The sink is consuming before each outage (after the first: it came back by itself).
            committed = progress(committed)
            before = rng.uniform(0.0, 2.0)
            down = rng.uniform(0.5, 6.0)
            how = ("stop", "kill -9")[outage % 2]  # both kinds, every run
            plan.append(f"{before:.1f}s up, {how}, {down:.1f}s down")
            time.sleep(before)
            if how == "stop":
                broker.stop()
            else:
                _kill_broker(broker)
            time.sleep(down)  # the outage itself
            broker.start()
        progress(committed)  # and after the last one
        time.sleep(rng.uniform(0.0, 2.0))  # more traffic after the last restart
    finally:
        stop.set()
        producer.join(timeout=300)
    replay = f"seed {seed} (replay with FRESHREC_FAULT_SEED={seed}), outages {plan}"
    assert not producer.is_alive(), f"{replay}: the producer did not finish"
    assert sink.poll() is None, f"{replay}: the sink died: {sink_said()}"
    total = produced[0]
    assert not failed, f"{replay}: {len(failed)} deliveries failed, e.g. {failed[:5]}"
    assert len(acked) == total, f"{replay}: {total - len(acked)} of {total} events never acknowledged"

    # The long-running sink came through the restarts: let it catch up by itself before stopping it.
    on_topic = _messages_on_topic(settings)
    db = settings.clickhouse_database
    sink.send_signal(signal.SIGTERM)
    sink.wait(timeout=120)
    assert sink.returncode == 0, f"{replay}: sink exit {sink.returncode}: {sink_said()}"
    freshrec_cli("sink", "--until-idle", "3", env=env, timeout=300)

    doubled = sql_json(
        f"SELECT event_id, count() AS n FROM {db}.events GROUP BY event_id HAVING n > 1 LIMIT 10", env=env
    )
    assert doubled == [], f"{replay}: doubled in events: {doubled}"
    stored = {str(r["event_id"]) for r in sql_json(f"SELECT event_id FROM {db}.events", env=env)}
    lost = acked - stored
    assert not lost, f"{replay}: {len(lost)} acknowledged events lost, e.g. {sorted(lost)[:5]}"
    assert stored == acked, f"{replay}: {len(stored - acked)} stored events were never produced"
    (counts,) = sql_json(
        f"SELECT (SELECT count() FROM {db}.events) AS events, "
        f"(SELECT count() FROM {db}.dead_letters) AS dead, "
        "(SELECT uniqExact(partition, offset) FROM "
        f"(SELECT partition, offset FROM {db}.events "
        f"UNION ALL SELECT partition, offset FROM {db}.dead_letters)) AS positions",
        env=env,
    )
    # A message the producer's retries wrote twice is a duplicate dead letter, not a second event.
    assert counts == {"events": total, "dead": on_topic - total, "positions": on_topic}, replay

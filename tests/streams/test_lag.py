"""Consumer lag against the real broker: sampled per group, stored by the sink, read by the dashboards."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from confluent_kafka import Consumer, TopicPartition

from freshrec import queries
from freshrec.settings import Settings
from freshrec.store import Store
from streams import sink
from streams.admin import ensure_topics
from streams.lag import LagSampler
from streams.producer import EventProducer
from streams.worker import StreamWorker

EVENTS = 200


def _produce(settings: Settings) -> None:
    ensure_topics(settings)
    with EventProducer(settings) as producer:
        for i in range(EVENTS):
            event = {"event_id": f"lag-{i}", "user_id": f"u{i % 7}", "item_id": f"i{i % 13}",
                     "type": "view", "ts": 1_700_000_000_000 + i}  # fmt: skip
            producer.produce(settings.topics.events, orjson.dumps(event), key=f"u{i % 7}".encode())


def _commit(settings: Settings, group: str, per_partition: int) -> int:
    """Commit ``per_partition`` (or fewer) messages of each partition of ``events`` for ``group``."""
    consumer = Consumer(settings.kafka_config(**{"group.id": group, "enable.auto.commit": False}))
    committed = []
    for partition in range(settings.broker_partitions):
        low, high = consumer.get_watermark_offsets(TopicPartition(settings.topics.events, partition), 10)
        committed.append(TopicPartition(settings.topics.events, partition, min(high, low + per_partition)))
    consumer.commit(offsets=committed, asynchronous=False)
    consumer.close()
    return sum(tp.offset for tp in committed)


def test_the_lag_of_each_group_is_what_it_has_not_processed(settings: Settings, store: Store) -> None:
    _produce(settings)
    behind = f"{settings.stream.group_id}.counters"
    done = _commit(settings, behind, per_partition=10)
    _commit(settings, "someone-elses-app", per_partition=0)  # not freshrec's: never sampled

    sink.run(settings, store, until_idle_s=1.0)  # samples at its start and once more at its end

    _, rows = queries.run(
        store, "consumer_lag", since=datetime(2000, 1, 1, tzinfo=UTC), until=datetime.now(UTC), bucket_s=3600
    )
    last = {group: lag for _, group, lag in rows}  # one bucket: the highest sample of each group
    assert last[behind] == EVENTS - done
    assert "someone-elses-app" not in last
    # The sink's own group: a sample taken when it stopped, after its commit, says it is caught up.
    ((final,),) = store.rows(
        f"SELECT argMax(total, sampled_at) FROM (SELECT sampled_at, sum(lag) AS total "
        f"FROM {store.table('consumer_lag')} FINAL WHERE consumer_group = {{g:String}} GROUP BY sampled_at)",
        {"g": settings.sink.group_id},
    )
    assert final == 0


def test_a_sample_with_no_committed_group_stores_nothing(settings: Settings, store: Store) -> None:
    ensure_topics(settings)
    sampler = LagSampler(settings=settings, store=store, interval_s=60)
    assert sampler.sample() == [] and sampler.samples == 1
    ((count,),) = store.rows(f"SELECT count() FROM {store.table('consumer_lag')}")
    assert count == 0


def test_a_stream_worker_reports_its_checkpointed_offsets(settings: Settings, store: Store) -> None:
    _produce(settings)
    StreamWorker(settings).run(until_idle_s=1.0)  # its final checkpoint commits, advisory
    rows = LagSampler(settings=settings, store=store, interval_s=60).sample()
    mine = [r for r in rows if r.consumer_group == settings.stream.effective_group_id]
    assert sum(r.committed for r in mine if r.topic == settings.topics.events) == EVENTS
    assert sum(r.lag for r in mine) == 0

"""Consumer lag of freshrec's groups, sampled into ClickHouse ``consumer_lag`` for the dashboards.

Lag is what a group has yet to process: a partition's high watermark minus the group's committed
offset. The dashboards read ClickHouse only, and the stream workers and serving replicas hold no
ClickHouse client, so the audit sink (which has both Kafka and ClickHouse) samples every group of
this deployment beside its own work, every ``FRESHREC_SINK__LAG_INTERVAL_S`` seconds and once more
when it stops: its own group and the impressions sink's (``<sink group>``, ``<sink group>.*``),
the stream roles and the serving replicas (``<stream group>``, ``<stream group>.*``; a replica's
group only while it has a member), on this deployment's topics (``FRESHREC_TOPIC_PREFIX``). Stream
workers commit the offsets of each checkpoint once it is on disk, for this only.

Sampling is best effort and never stops the sink: a failed sample is retried at the next interval
with a new Kafka admin client (one that lived through a broker restart may never answer again:
librdkafka's admin requests kept timing out on it while a new client got answers at once). An
outage is logged once when it starts and once when sampling works again (three good samples in a
row: a restarted broker answers some requests before its group coordinator is ready), not at
every interval.
A group's committed offsets trail its progress by up to its commit interval (1 s for the sink, the
checkpoint interval for stream workers, 5 s by default), so lag reads high by that much.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import ConsumerGroupState, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka import admin as kafka_admin
from confluent_kafka.admin import AdminClient

from freshrec.settings import Settings
from freshrec.store import Store

__all__ = ["COLUMNS", "LagRow", "LagSampler", "sample_lag"]

logger = logging.getLogger(__name__)

_STABLE_SAMPLES = 3  # good samples in a row that end an outage

COLUMNS = ("sampled_at", "consumer_group", "topic", "partition", "committed", "end_offset", "lag")


@dataclass(frozen=True, slots=True)
class LagRow:
    consumer_group: str
    topic: str
    partition: int
    committed: int
    end_offset: int

    @property
    def lag(self) -> int:
        return max(0, self.end_offset - self.committed)


def _ours(settings: Settings, group: str, state: ConsumerGroupState) -> bool:
    """This deployment's group. Serving replicas' groups count only while a member is in them: a
    replica's group outlives the replica, and its lag would grow for ever after it is gone."""
    if not any(
        group == prefix or group.startswith(f"{prefix}.")
        for prefix in (settings.sink.group_id, settings.stream.group_id)
    ):
        return False
    return ".serve-" not in group or state != ConsumerGroupState.EMPTY


def sample_lag(settings: Settings, admin: AdminClient, *, timeout_s: float = 10.0) -> list[LagRow]:
    """One sample: every partition this deployment's groups have committed offsets for."""
    listed = admin.list_consumer_groups(request_timeout=timeout_s).result()
    if listed.errors:  # some broker did not answer: an empty or partial list would read as no lag
        raise KafkaException(listed.errors[0])
    groups = sorted(g.group_id for g in listed.valid if _ours(settings, g.group_id, g.state))
    committed: dict[tuple[str, str, int], int] = {}
    for group in groups:
        futures = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group)], request_timeout=timeout_s
        )
        for result in futures.values():
            for tp in result.result().topic_partitions or []:
                if tp.offset >= 0 and tp.topic.startswith(settings.topic_prefix):
                    committed[(group, tp.topic, tp.partition)] = tp.offset
    partitions = {(topic, partition) for _, topic, partition in committed}
    if not partitions:
        return []
    ends = admin.list_offsets(
        {TopicPartition(t, p): _latest() for t, p in partitions},
        request_timeout=timeout_s,
    )
    end_of = {(tp.topic, tp.partition): future.result().offset for tp, future in ends.items()}
    return [
        LagRow(group, topic, partition, offset, end_of[(topic, partition)])
        for (group, topic, partition), offset in sorted(committed.items())
    ]


def _latest() -> Any:
    """``OffsetSpec.latest()`` (the high watermark); the module does not re-export its type."""
    return kafka_admin.OffsetSpec.latest()  # type: ignore[attr-defined,no-untyped-call]


class LagSampler:
    """Samples :func:`sample_lag` into ``consumer_lag`` every ``interval_s`` on its own thread."""

    def __init__(self, *, settings: Settings, store: Store, interval_s: float) -> None:
        self._settings = settings
        self._store = store
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._admin: AdminClient | None = None
        self._failing_since: float | None = None  # monotonic start of the current outage
        self._good_since_failure = 0  # consecutive samples since the last failure
        self.samples = 0
        self.failures = 0

    def sample(self) -> list[LagRow]:
        """Take one sample and store it; return its rows."""
        if self._admin is None:
            self._admin = AdminClient(self._settings.kafka_config(log_level=3))
        rows = sample_lag(self._settings, self._admin)
        if rows:
            now = datetime.now(UTC)
            columns: list[list[Any]] = [
                [now] * len(rows),
                [r.consumer_group for r in rows],
                [r.topic for r in rows],
                [r.partition for r in rows],
                [r.committed for r in rows],
                [r.end_offset for r in rows],
                [r.lag for r in rows],
            ]
            self._store.insert("consumer_lag", columns, column_names=COLUMNS)
        self.samples += 1
        return rows

    def run(self) -> None:
        """Sample now, then every ``interval_s`` until :meth:`stop`, and once more when stopped
        (after the sinks' last commits)."""
        self._sample_logged()
        while not self._stop.wait(self._interval_s):
            self._sample_logged()
        self._sample_logged()

    def _sample_logged(self) -> None:
        try:
            self.sample()
        except Exception as exc:  # best effort: a broker or ClickHouse outage costs samples, no more
            self.failures += 1
            self._good_since_failure = 0
            self._admin = None  # a new client for the next try
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                logger.warning(
                    "consumer lag sampling failed (%s); retrying every %g s with a new Kafka client",
                    " ".join(str(exc).split())[:300], self._interval_s,
                )  # fmt: skip
            return
        self._good_since_failure += 1
        # A restarted broker flaps for a moment (its group coordinator is still loading): the
        # outage ends after a few good samples in a row, not at the first.
        if self._failing_since is not None and self._good_since_failure >= _STABLE_SAMPLES:
            logger.info(
                "consumer lag sampling works again after %.1f s", time.monotonic() - self._failing_since
            )
            self._failing_since = None

    def stop(self) -> None:
        self._stop.set()

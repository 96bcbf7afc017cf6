"""The decision log: the ``impressions`` topic → ClickHouse ``impressions``, one row per served item.

Each message is one response of the API (:func:`encode_impression`): request id, user, policy, model
version, latency, and the items in order with their score, source, explore flag and propensity. The
sink writes one row per item, exactly once across crashes by the same rule as the audit sink: rows
carry their Kafka ``(topic, partition, offset)``, and on assignment the sink skips what the table
already holds. A message that is not a well-formed impression (only freshrec writes this topic, so a
bug or a stranger) goes to ``dead_letters`` with reason ``bad_impression``: nothing is lost.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import Consumer, Message, TopicPartition

from freshrec.settings import Settings
from freshrec.store import Store
from streams.admin import check_consume_error, ensure_topics

__all__ = ["IMPRESSION_COLUMNS", "ImpressionSink", "encode_impression", "impression_rows"]

logger = logging.getLogger(__name__)

IMPRESSION_COLUMNS = (
    "request_id", "user_id", "position", "item_id", "score", "source", "explore", "propensity",
    "policy", "model_version", "latency_ms", "served_at", "topic", "partition", "offset",
)  # fmt: skip


def encode_impression(
    *,
    request_id: str,
    user_id: str,
    policy: str,
    model_version: int,
    latency_ms: float,
    items: list[dict[str, Any]],
    served_at_ms: int | None = None,
) -> bytes:
    """One response as the JSON message of the ``impressions`` topic."""
    return orjson.dumps(
        {
            "request_id": request_id,
            "user_id": user_id,
            "policy": policy,
            "model_version": model_version,
            "latency_ms": latency_ms,
            "served_at": served_at_ms or int(time.time() * 1000),
            "items": items,
        }
    )


def impression_rows(value: bytes) -> list[tuple[Any, ...]]:
    """The table rows (without Kafka coordinates) of one message; ``ValueError`` if malformed."""
    try:
        data = orjson.loads(value)
        served = datetime.fromtimestamp(int(data["served_at"]) / 1000, UTC)
        return [
            (
                str(data["request_id"]),
                str(data["user_id"]),
                position,
                str(item["item_id"]),
                float(item["score"]),
                str(item["source"]),
                bool(item["explore"]),
                float(item["propensity"]),
                str(data["policy"]),
                int(data["model_version"]),
                float(data["latency_ms"]),
                served,
            )
            for position, item in enumerate(data["items"])
        ]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not an impression: {exc}") from exc


class ImpressionSink:
    """``impressions`` → ClickHouse, exactly once; see the module docstring."""

    def __init__(self, *, settings: Settings, store: Store) -> None:
        self._settings = settings
        self._store = store
        self._topic = settings.topics.impressions
        self._stop = threading.Event()
        self._stored: dict[int, int] = {}
        self._assigned_at = 0.0
        self.rows = 0
        self.bad = 0

    def stop(self) -> None:
        self._stop.set()

    def run(self, *, until_idle_s: float | None = None) -> int:
        ensure_topics(self._settings)
        consumer = Consumer(
            self._settings.kafka_config(
                **{
                    "group.id": f"{self._settings.sink.group_id}.impressions",
                    "auto.offset.reset": "earliest",
                    "enable.auto.commit": True,
                    "enable.auto.offset.store": False,
                    "session.timeout.ms": self._settings.sink.session_timeout_ms,
                    "log_level": 3,
                }
            )
        )
        consumer.subscribe([self._topic], on_assign=self._on_assign)
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                messages = consumer.consume(
                    self._settings.sink.batch_size, self._settings.sink.batch_timeout_s
                )
                if messages:
                    self._process(consumer, messages)
                    last = time.monotonic()
                elif (
                    until_idle_s is not None
                    and time.monotonic() - max(last, self._assigned_at) >= until_idle_s
                    and consumer.assignment()
                ):
                    break
        finally:
            consumer.close()
        return self.rows

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned_at = time.monotonic()
        rows = self._store.rows(
            f"SELECT partition, max(offset) FROM {self._store.table('impressions')} "
            "WHERE topic = {topic:String} AND partition IN {p:Array(UInt32)} GROUP BY partition",
            {"topic": self._topic, "p": [tp.partition for tp in partitions]},
        )
        self._stored.update({int(p): int(o) for p, o in rows})

    def _process(self, consumer: Consumer, messages: list[Message]) -> None:
        columns: list[list[Any]] = [[] for _ in IMPRESSION_COLUMNS]
        dead: list[list[Any]] = [[] for _ in range(10)]
        offsets: dict[int, int] = {}
        now = datetime.now(UTC)
        for message in messages:
            error = message.error()
            if error is not None:
                check_consume_error(error)
                continue
            partition: int = message.partition()  # type: ignore[assignment]
            offset: int = message.offset()  # type: ignore[assignment]
            offsets[partition] = offset + 1
            if offset <= self._stored.get(partition, -1):
                continue
            value = message.value() or b""
            try:
                rows = impression_rows(value)
            except ValueError as exc:
                self.bad += 1
                row = (self._topic, partition, offset, message.key() or b"", value, "bad_impression",
                       str(exc)[:500], "", max(message.timestamp()[1], 0), now)  # fmt: skip
                for column, cell in zip(dead, row, strict=True):
                    column.append(cell)
                continue
            for row in rows:
                for column, cell in zip(columns, (*row, self._topic, partition, offset), strict=True):
                    column.append(cell)
        if columns[0]:
            self._store.insert("impressions", columns, column_names=IMPRESSION_COLUMNS)
            self.rows += len(columns[0])
        if dead[0]:
            self._store.insert(
                "dead_letters",
                dead,
                column_names=[
                    "topic", "partition", "offset", "key", "payload", "reason", "detail", "event_id",
                    "kafka_ts", "received_at",
                ],
            )  # fmt: skip
        if offsets:
            consumer.store_offsets(offsets=[TopicPartition(self._topic, p, o) for p, o in offsets.items()])

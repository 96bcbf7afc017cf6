"""Publish a dataset to the ``events`` topic in timestamp order, optionally paced; resume when cut.

``--speed X`` replays X times faster than the data's own clock (1 = real time); without it, as fast
as the producer goes. Keys are user ids, so a user's events stay ordered within a partition.

**Resuming an interrupted replay.** Before its first record, a replay writes a small ledger in
``$FRESHREC_HOME/replay/`` (fsynced, replaced atomically): the topic, the dataset (and ``--limit``),
its record count, and the topic's end offset in each partition at that moment. Once every record is
acknowledged the ledger is marked complete. A replay that finds an incomplete ledger for the same
topic and dataset (the previous one was killed, or the broker failed it) does not start over: it
reads the topic from the recorded offsets to its current end, and publishes only the dataset's
records whose exact bytes are not there. A record is on the topic or not, whatever the killed
producer knew of its acknowledgement, so the resumed replay publishes each record exactly once: no
``duplicate_event_id`` dead letter follows a kill, not even for the batch that was in flight.
(Another producer publishing the very same bytes meanwhile would be taken for the replay's own.)

A complete ledger does not stop an explicit ``freshrec replay``: publishing a dataset again is a
legitimate test of deduplication. ``freshrec run`` reads the ledger (:func:`replay_state`) to replay
a dataset once, resume it if cut, and skip it once complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from confluent_kafka import Consumer, KafkaException, TopicPartition

from freshrec.datasets import load_dataset
from freshrec.errors import KafkaUnavailable
from freshrec.faults import fault_point
from freshrec.settings import Settings
from streams.admin import ensure_topics
from streams.producer import EventProducer

__all__ = ["ReplayStats", "ledger_path", "replay_state", "run"]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (done, total)
ReplayState = Literal["new", "interrupted", "complete"]

_SCAN_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class ReplayStats:
    dataset: str
    published: int
    seconds: float
    synthetic_ts: bool
    resumed_after: int = 0  # records found already on the topic when an interrupted replay resumed

    @property
    def rate(self) -> float:
        return self.published / self.seconds if self.seconds > 0 else 0.0


def ledger_path(settings: Settings, dataset: str, limit: int | None = None) -> Path:
    """Where the replay of ``dataset`` (first ``limit`` records) to this deployment's topic is recorded."""
    key = f"{settings.topics.events}\0{dataset}\0{limit}"
    digest = hashlib.blake2b(key.encode(), digest_size=6).hexdigest()
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(dataset).name)[:60]
    return settings.home / "replay" / f"{readable}-{digest}.json"


def replay_state(settings: Settings, dataset: str, limit: int | None = None) -> ReplayState:
    """``new`` (never started here), ``interrupted`` (started, not every record acknowledged) or
    ``complete``."""
    ledger = _read_ledger(ledger_path(settings, dataset, limit))
    if ledger is None:
        return "new"
    return "complete" if ledger.get("complete") else "interrupted"


def run(
    settings: Settings,
    dataset: str,
    *,
    limit: int | None = None,
    speed: float | None = None,
    progress: Progress | None = None,
) -> ReplayStats:
    """Publish ``dataset`` (a known name or a JSONL path) and wait until every record is delivered;
    resume an interrupted replay of the same dataset instead of repeating it."""
    data = load_dataset(
        dataset, datasets_dir=settings.datasets_dir, cache_dir=settings.cache_dir, limit=limit
    )
    if data.synthetic_ts:
        logger.info("%s has no timestamps: they are synthesised, monotone in file order", data.name)
    ensure_topics(settings)
    topic = settings.topics.events
    total = len(data.records)
    path = ledger_path(settings, dataset, limit)
    ledger = _read_ledger(path)
    on_topic: Counter[bytes] = Counter()
    if ledger is not None and not ledger.get("complete") and ledger.get("records") == total:
        on_topic = _digests_on_topic(settings, {int(p): int(o) for p, o in ledger["start_offsets"].items()})
        logger.info(
            "resuming an interrupted replay of %s: %d messages of it are on %s already",
            data.name, on_topic.total(), topic,
        )  # fmt: skip
    else:
        ledger = {
            "topic": topic,
            "dataset": data.name,
            "limit": limit,
            "records": total,
            "start_offsets": {str(p): o for p, o in _end_offsets(settings).items()},
            "complete": False,
        }
        _write_ledger(path, ledger)
    started = time.monotonic()
    first_ts: int | None = None
    published = resumed_after = 0
    with EventProducer(settings) as producer:
        for done, record in enumerate(data.records, start=1):
            if on_topic:
                digest = _digest(record.value)
                if on_topic[digest] > 0:  # a multiset: a dataset may hold the same bytes twice
                    on_topic[digest] -= 1
                    resumed_after += 1
                    continue
            if speed is not None and record.ts_ms is not None:
                first_ts = record.ts_ms if first_ts is None else first_ts
                ahead = (record.ts_ms - first_ts) / 1000.0 / speed - (time.monotonic() - started)
                if ahead > 0.001:
                    time.sleep(ahead)
            producer.produce(topic, record.value, key=record.key)
            published += 1
            if progress is not None and (done % 2000 == 0 or done == total):
                progress(done, total)
        fault_point("replay.before_flush")
    # Leaving the block flushed the producer and raised if any record was not delivered.
    _write_ledger(path, {**ledger, "complete": True})
    elapsed = time.monotonic() - started
    logger.info("published %d events of %s in %.1f s", published, data.name, elapsed)
    return ReplayStats(
        dataset=data.name,
        published=published,
        seconds=elapsed,
        synthetic_ts=data.synthetic_ts,
        resumed_after=resumed_after,
    )


def _digest(value: bytes) -> bytes:
    return hashlib.blake2b(value, digest_size=16).digest()


def _consumer(settings: Settings) -> Consumer:
    # Assigned partitions, never a subscription: the group id is only what librdkafka requires.
    return Consumer(
        settings.kafka_config(
            **{"group.id": "freshrec-replay-scan", "enable.auto.commit": False, "log_level": 3}
        )
    )


def _end_offsets(settings: Settings, *, timeout_s: float = 30.0) -> dict[int, int]:
    """The high watermark of each partition of ``events``: where this replay's records begin.
    Retried for ``timeout_s``: a topic created a moment ago may have no leader yet."""
    topic = settings.topics.events
    consumer = _consumer(settings)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                metadata = consumer.list_topics(topic, timeout=timeout_s)
                partitions = sorted(metadata.topics[topic].partitions)
                return {
                    p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[1]
                    for p in partitions
                }
            except (KafkaException, KeyError) as exc:
                if time.monotonic() > deadline:
                    raise KafkaUnavailable(f"cannot read the end offsets of {topic}: {exc}") from exc
                time.sleep(0.2)
    finally:
        consumer.close()


def _digests_on_topic(settings: Settings, start_offsets: dict[int, int]) -> Counter[bytes]:
    """Digests of the messages on ``events`` from ``start_offsets`` to the current end, counted."""
    topic = settings.topics.events
    ends = _end_offsets(settings)
    wanted = {p: (start, ends.get(p, 0)) for p, start in start_offsets.items() if ends.get(p, 0) > start}
    digests: Counter[bytes] = Counter()
    if not wanted:
        return digests
    consumer = _consumer(settings)
    try:
        consumer.assign([TopicPartition(topic, p, start) for p, (start, _) in wanted.items()])
        remaining = set(wanted)
        deadline = time.monotonic() + _SCAN_TIMEOUT_S
        while remaining:
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"could not read back {topic} within {_SCAN_TIMEOUT_S:.0f} s to resume the replay"
                )
            for message in consumer.consume(10_000, 0.5):
                if message.error() is None:  # else partition EOF or a transient error
                    digests[_digest(message.value() or b"")] += 1
            # Positions, not the last offset seen: they also step over transaction markers.
            positions = consumer.position([TopicPartition(topic, p) for p in remaining])
            remaining -= {tp.partition for tp in positions if tp.offset >= wanted[tp.partition][1]}
    finally:
        consumer.close()
    return digests


def _read_ledger(path: Path) -> dict[str, Any] | None:
    try:
        ledger: dict[str, Any] = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except orjson.JSONDecodeError:
        logger.warning("ignoring an unreadable replay ledger %s", path)
        return None
    return ledger


def _write_ledger(path: Path, ledger: dict[str, Any]) -> None:
    """Replace the ledger atomically and durably: a kill leaves the old one or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    with tmp.open("wb") as file:
        file.write(orjson.dumps(ledger, option=orjson.OPT_INDENT_2))
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)

"""Publish a dataset to the ``events`` topic in timestamp order, optionally paced.

``--speed X`` replays X times faster than the data's own clock (1 = real time); without it, as fast
as the producer goes. Keys are user ids, so a user's events stay ordered within a partition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from freshrec.datasets import load_dataset
from freshrec.settings import Settings
from streams.admin import ensure_topics
from streams.producer import EventProducer

__all__ = ["ReplayStats", "run"]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True, slots=True)
class ReplayStats:
    dataset: str
    published: int
    seconds: float
    synthetic_ts: bool

    @property
    def rate(self) -> float:
        return self.published / self.seconds if self.seconds > 0 else 0.0


def run(
    settings: Settings,
    dataset: str,
    *,
    limit: int | None = None,
    speed: float | None = None,
    progress: Progress | None = None,
) -> ReplayStats:
    """Publish ``dataset`` (a known name or a JSONL path) and wait until every record is delivered."""
    data = load_dataset(
        dataset, datasets_dir=settings.datasets_dir, cache_dir=settings.cache_dir, limit=limit
    )
    if data.synthetic_ts:
        logger.info("%s has no timestamps: they are synthesised, monotone in file order", data.name)
    ensure_topics(settings)
    topic = settings.topics.events
    total = len(data.records)
    started = time.monotonic()
    first_ts: int | None = None
    with EventProducer(settings) as producer:
        for done, record in enumerate(data.records, start=1):
            if speed is not None and record.ts_ms is not None:
                first_ts = record.ts_ms if first_ts is None else first_ts
                ahead = (record.ts_ms - first_ts) / 1000.0 / speed - (time.monotonic() - started)
                if ahead > 0.001:
                    time.sleep(ahead)
            producer.produce(topic, record.value, key=record.key)
            if progress is not None and (done % 2000 == 0 or done == total):
                progress(done, total)
    elapsed = time.monotonic() - started
    logger.info("published %d events of %s in %.1f s", total, data.name, elapsed)
    return ReplayStats(dataset=data.name, published=total, seconds=elapsed, synthetic_ts=data.synthetic_ts)

"""``freshrec state top``: the items counted most, from the stream state in Kafka alone.

An operator's view of what the stream workers hold: every partition's newest complete snapshot is
read from the changelog (:mod:`streams.changelog`), so it works on any machine with an empty
``FRESHREC_HOME``, whether the workers run or not, and each item's total is summed over partitions.
It counts what the workers had applied at their last snapshot (at most a checkpoint interval behind
``events``), every event type together, each ``event_id`` once: what
``SELECT item_id, count() FROM events GROUP BY item_id`` gives once the workers have snapshotted the
same events. Ties go by item id, so the list is the same on every run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from freshrec.errors import ConfigError
from freshrec.settings import Settings
from streams.changelog import Changelog, changelog_topic

__all__ = ["ItemTotal", "run", "top_items"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ItemTotal:
    item_id: str
    total: int


def top_items(settings: Settings, *, k: int = 10) -> list[ItemTotal]:
    """The ``k`` items with the highest total count over every partition's snapshot, highest first,
    ties by item id. Raises :class:`ConfigError` when the configured roles keep no counters."""
    if k < 1:
        raise ConfigError(f"--k must be at least 1, not {k}")
    if "counters" not in settings.stream.roles:
        raise ConfigError(
            f"FRESHREC_STREAM__ROLES is {list(settings.stream.roles)}: no counters to read. Name the "
            "roles of the group that keeps them (all roles by default, or counters)."
        )
    totals: dict[str, int] = {}
    with Changelog(settings) as changelog:
        snapshots = changelog.restore()
    for partition, snapshot in sorted(snapshots.items()):
        counters = snapshot.state()["counters"]
        ids: list[str] = counters["items"]["ids"]
        used = len(counters["types"]["ids"])
        column_totals = np.asarray(counters["total"])[:used].sum(axis=0)
        for item, total in zip(ids, column_totals.tolist(), strict=True):
            if item and total:
                totals[item] = totals.get(item, 0) + int(total)
        logger.debug("partition %d: %d items", partition, len(ids))
    if not snapshots:
        logger.warning("no stream state in %s yet: have the stream workers run?", changelog_topic(settings))
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [ItemTotal(item, total) for item, total in ranked]


def run(settings: Settings, *, k: int = 10) -> list[dict[str, object]]:
    """What ``freshrec state top --k K --json`` prints: ``[{"item_id": ..., "total": n}, ...]``."""
    return [{"item_id": row.item_id, "total": row.total} for row in top_items(settings, k=k)]

"""A stream worker's state and how its snapshots leave the process.

:class:`StreamState` holds a :class:`~streams.stores.PartitionStore` per owned partition of ``events``
and the merged views readers use; :class:`StreamStats` counts what the worker did. A snapshot is
encoded in a forked child (:func:`fork_writer`), so ingestion pauses only for the fork, and handed to
the worker's uploader through a local file (:class:`CheckpointStore`), never read back as state:
the state's home is the changelog in Kafka (:mod:`streams.changelog`).
"""

from __future__ import annotations

import copy
import os
import pickle
import signal
import sys
import tempfile
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freshrec.processes import die_with_parent
from freshrec.settings import Settings
from streams.clicks import ClickThrough
from streams.cooccurrence import CoOccurrence
from streams.counters import CounterConfig, ItemCounters
from streams.dedup import RecentIds
from streams.heads import Head
from streams.histories import UserHistories
from streams.state_codec import encode_state, gc_paused
from streams.stores import (
    MergedClicks,
    MergedCoOccurrence,
    MergedCounters,
    MergedHistories,
    MergedRecent,
    PartitionStore,
    RoutedHead,
)

__all__ = ["CAN_FORK", "CheckpointStore", "StreamState", "StreamStats", "encode_stores", "fork_writer"]


@dataclass(slots=True)
class StreamStats:
    consumed: int = 0
    counted: int = 0
    invalid: int = 0
    duplicates: int = 0
    batches: int = 0
    checkpoints: int = 0
    restored: int = 0  # partitions restored from the changelog
    bootstrapped: int = 0  # of those, restored from another group's changelog (``bootstrap``)
    flushed: int = 0  # partition snapshots written on revocation or exit


class StreamState:
    """A worker's state: a :class:`~streams.stores.PartitionStore` per owned partition of
    ``events`` (``stores``), read merged through ``counters``, ``histories``, ``cooccurrence``,
    ``clicks``, ``recent`` and ``heads``; see :mod:`streams.stores`."""

    def __init__(self, settings: Settings, *, heads: Mapping[str, Head] | None = None) -> None:
        config = settings.stream
        self._settings = settings
        self._topics = settings.topics
        self.counter_config = CounterConfig(
            half_life_s=config.half_life_s,
            windows_s=config.windows_s,
            buckets=config.window_buckets,
            max_items=config.max_items,
        )
        self.stores: dict[int, PartitionStore] = {}
        self._prototypes = {name: copy.deepcopy(head) for name, head in (heads or {}).items()}
        self.counters = MergedCounters(self.stores, self.counter_config)
        self.histories = MergedHistories(self.stores, max_len=config.history_len)
        self.cooccurrence = MergedCoOccurrence(self.stores, min_count=config.cooccurrence_min_count)
        defaults = ClickThrough()
        self.clicks = MergedClicks(self.stores, alpha=defaults.alpha, beta=defaults.beta)
        self.recent = MergedRecent(self.stores)
        self.heads: dict[str, RoutedHead] = {
            name: RoutedHead(name, head, self.stores, settings.broker_partitions)
            for name, head in self._prototypes.items()
        }

    def set_partition_count(self, partitions: int) -> None:
        """How many partitions ``events`` has: what routes a user to their partition's head."""
        for head in self.heads.values():
            head.partitions = partitions

    def new_store(self) -> PartitionStore:
        """An empty store, configured as this worker's settings say."""
        config = self._settings.stream
        return PartitionStore(
            counters=ItemCounters(self.counter_config),
            recent=RecentIds(config.dedup_horizon),
            histories=UserHistories(max_len=config.history_len, max_users=config.max_users),
            cooccurrence=CoOccurrence(min_count=config.cooccurrence_min_count),
            clicks=ClickThrough(),
            heads={name: copy.deepcopy(head) for name, head in self._prototypes.items()},
        )

    def store(self, partition: int) -> PartitionStore:
        """The store of ``partition``, created empty if this worker has none yet."""
        store = self.stores.get(partition)
        if store is None:
            store = self.stores[partition] = self.new_store()
        return store

    @property
    def offsets(self) -> dict[tuple[str, int], int]:
        """The next offset to read per (topic, partition), over every store."""
        return {
            (topic, partition): offset
            for partition, store in self.stores.items()
            for topic, offset in store.offsets.items()
        }

    @offsets.setter
    def offsets(self, offsets: Mapping[tuple[str, int], int]) -> None:
        for (topic, partition), offset in offsets.items():
            self.store(partition).offsets[topic] = offset

    def state_dict(self) -> dict[str, Any]:
        return {"partitions": {partition: store.state_dict() for partition, store in self.stores.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stores.clear()
        for partition, store_state in state["partitions"].items():
            self.store(int(partition)).load_state_dict(store_state)


class CheckpointStore:
    """The local hand-off file of a forked snapshot, replaced atomically (temporary file, fsync,
    rename). Written by the child, read by the worker's uploader; never read back as state."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        # A write interrupted by kill -9 leaves its temporary file behind; it was never a snapshot.
        for stale in self.path.parent.glob(f".{self.path.name}-*"):
            stale.unlink(missing_ok=True)
        try:
            with self.path.open("rb") as handle:
                state: dict[str, Any] = pickle.load(handle)  # our own file: a dict of bytes payloads
        except FileNotFoundError:
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=self.path.parent, prefix=f".{self.path.name}-", delete=False
        ) as tmp:
            pickle.dump(state, tmp, protocol=pickle.HIGHEST_PROTOCOL)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


CAN_FORK = sys.platform == "linux"


def encode_stores(stores: Mapping[int, PartitionStore], partitions: Collection[int]) -> dict[int, bytes]:
    with gc_paused():
        return {partition: encode_state(stores[partition].state_dict()) for partition in partitions}


def fork_writer(
    store: CheckpointStore, stores: Mapping[int, PartitionStore], partitions: Collection[int]
) -> int:
    """Fork a child that encodes ``partitions`` (as of now) into ``store`` and exits; returns its pid.

    The child only encodes and writes: it takes no lock, logs nothing and touches no Kafka client,
    so the threads the fork leaves behind cannot deadlock it. It dies with the worker.
    """
    parent = os.getpid()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+ warns about forking with threads
        pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        if not die_with_parent(parent, signal.SIGKILL):  # the worker died before the fork's request
            os._exit(1)
        store.save({"payloads": encode_stores(stores, partitions)})
        code = 0
    finally:
        os._exit(code)

"""Stream workers: ``events`` → validated → real-time counters, exactly once across ``kill -9``.

**Exactly-once state.** A worker's state (counters, the recent-id set) and the Kafka offsets it
reflects are written together, atomically, to one checkpoint file under
``$FRESHREC_HOME/stream/<group>/<worker_id>.ckpt`` (write to a temporary file, fsync, rename). On start
the worker loads it and seeks every assigned partition to the checkpointed offset, so the events
after the checkpoint are applied exactly once more, and since the counters' final state does not
depend on batching or order (see :mod:`streams.counters`), the result equals an uninterrupted run's.
Kafka's committed offsets are not used for this: they could never be atomic with a local file.
After each checkpoint is on disk the worker commits its offsets to Kafka asynchronously, for
monitoring only (``consumer_lag``, :mod:`streams.lag`): positions always come from the checkpoint,
or the beginning of the partition without one, never from the committed offsets.

Why a local file rather than ClickHouse or a compacted topic: the checkpoint is the worker's
private, fast, whole-state snapshot (tens of MB of numpy arrays), written every few seconds and read
only by the same worker on restart; a file rename is the cheapest atomic write there is. The cost is
that a worker's state lives on its disk: workers are stateful (a volume per worker in the
docker-compose stack) and use **static group membership** (``group.instance.id`` = the worker id), so a
restarted worker gets its own partitions back at once instead of after a session timeout.

**Limitation (by design, for now)**: state is per worker, not per partition. A stable set of workers
keeps its partitions (static membership, and the assignor is deterministic), and then each worker's
counters cover exactly its partitions: the union over workers is the whole stream. Changing the
number of workers moves partitions whose counts stay with their old owner; the fix is per-partition
state (counts kept per partition and merged at read time), planned with the read API.

**Duplicates**: an ``event_id`` already counted, within the last ``dedup_horizon``/2 to
``dedup_horizon`` ids, is not counted again; the id set is part of the checkpoint.
**Bad events** are skipped and counted (the audit sink dead-letters them); they never stop a worker.
**Late events** count in ``total`` always, in a window only while their bucket is in it.
**Heads** (river models, given by whoever builds the worker) learn from every counted event and are
checkpointed with the rest: no event is learned twice or lost across a crash. Unlike the counters,
SGD depends on the order of events, and the interleaving of partitions differs between runs, so after
a replay a head's weights equal an uninterrupted run's only when the topic has one partition (each
user's own order is always kept).

**Roles**: a worker keeps ``counters`` (item counters, CTR), ``sequences`` (histories,
co-occurrence) and ``heads`` (river), or any subset (``FRESHREC_STREAM__ROLES``). A subset is its own
consumer group (``<group>.<roles>``) that reads every partition, so each role scales on its own
cores: one process doing everything is bound by one core (see ``docs/benchmarks.md``), and the
heads, the costliest per event, no longer delay what the counters make visible.
:class:`~streams.reader.StateReader` reads each part from the worker that keeps it.

Why confluent-kafka and not faust here: this is the per-event hot path; see ``docs/benchmarks.md``.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from freshrec.errors import InvalidEvent
from freshrec.events import Event, parse_event
from freshrec.processes import die_with_parent
from freshrec.settings import Settings
from streams.admin import check_consume_error, ensure_topics
from streams.clicks import ClickThrough
from streams.cooccurrence import CoOccurrence
from streams.counters import CounterConfig, ItemCounters
from streams.dedup import RecentIds
from streams.heads import Head
from streams.histories import UserHistories

__all__ = ["CheckpointStore", "StreamState", "StreamStats", "StreamWorker", "run"]

logger = logging.getLogger(__name__)

_CHECKPOINT_VERSION = 1


@dataclass(slots=True)
class StreamStats:
    consumed: int = 0
    counted: int = 0
    invalid: int = 0
    duplicates: int = 0
    batches: int = 0
    checkpoints: int = 0


class StreamState:
    """What a worker checkpoints: counters, histories, co-occurrence, CTR, heads, recent ids, offsets."""

    def __init__(
        self,
        *,
        counters: ItemCounters,
        recent: RecentIds,
        histories: UserHistories | None = None,
        heads: dict[str, Head] | None = None,
        cooccurrence: CoOccurrence | None = None,
        clicks: ClickThrough | None = None,
    ) -> None:
        self.counters = counters
        self.recent = recent
        # ``is None``, not ``or``: an empty state is falsy (it has a length), and ``or`` replaced the
        # configured one (history length, co-occurrence threshold) with the defaults.
        self.histories = histories if histories is not None else UserHistories()
        self.cooccurrence = cooccurrence if cooccurrence is not None else CoOccurrence()
        self.clicks = clicks if clicks is not None else ClickThrough()
        self.heads = heads if heads is not None else {}
        self.offsets: dict[tuple[str, int], int] = {}  # next offset to read, per (topic, partition)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _CHECKPOINT_VERSION,
            "counters": self.counters.state_dict(),
            "recent": self.recent.state_dict(),
            "histories": self.histories.state_dict(),
            "cooccurrence": self.cooccurrence.state_dict(),
            "clicks": self.clicks.state_dict(),
            "heads": {name: head.state_dict() for name, head in self.heads.items()},
            "offsets": dict(self.offsets),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {state.get('version')} is not {_CHECKPOINT_VERSION}")
        self.counters.load_state_dict(state["counters"])
        self.recent.load_state_dict(state["recent"])
        self.histories.load_state_dict(state["histories"])
        self.cooccurrence.load_state_dict(state["cooccurrence"])
        self.clicks.load_state_dict(state["clicks"])
        if set(state["heads"]) != set(self.heads):
            raise ValueError(
                f"checkpoint has heads {sorted(state['heads'])}, this worker {sorted(self.heads)}"
            )
        for name, head in self.heads.items():
            head.load_state_dict(state["heads"][name])
        self.offsets = dict(state["offsets"])


class CheckpointStore:
    """One file per worker, replaced atomically (temporary file, fsync, rename, fsync of the folder)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        # A write interrupted by kill -9 leaves its temporary file behind; it was never the checkpoint.
        for stale in self.path.parent.glob(f".{self.path.name}-*"):
            stale.unlink(missing_ok=True)
        try:
            with self.path.open("rb") as handle:
                state: dict[str, Any] = pickle.load(handle)  # our own file, written by save()
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


_CAN_FORK = sys.platform == "linux"


def _fork_writer(store: CheckpointStore, state: StreamState) -> int:
    """Fork a child that writes ``state`` (as of now) to ``store`` and exits; returns its pid.

    The child only pickles and writes: it takes no lock, logs nothing and touches no Kafka client,
    so the threads the fork leaves behind cannot deadlock it. It dies with the worker (a
    ``kill -9`` of the worker must not let an old snapshot land after a restart's newer one).
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
        store.save(state.state_dict())
        code = 0
    finally:
        os._exit(code)


def _observe_served(observe: Callable[[str, str, str | None], None], value: bytes) -> None:
    """Count each item of one served response (an ``impressions`` message) as an impression."""
    try:
        response = orjson.loads(value)
        request_id = str(response["request_id"])
        items = [str(item["item_id"]) for item in response["items"]]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        logger.warning("malformed impressions message skipped (the sink dead-letters it): %s", exc)
        return
    for item in items:
        observe("impression", item, request_id)


class StreamWorker:
    """Consume ``events`` as part of a group and keep :class:`StreamState` up to date."""

    def __init__(self, settings: Settings, *, heads: Mapping[str, Head] | None = None) -> None:
        """``heads``: the incremental models this worker feeds (``learners.registry.build_heads``
        builds the ones the settings name); none when omitted or without the ``heads`` role."""
        self._settings = settings
        config = settings.stream
        self._topic = settings.topics.events
        self._impressions = settings.topics.impressions
        self.state = StreamState(
            counters=ItemCounters(
                CounterConfig(
                    half_life_s=config.half_life_s,
                    windows_s=config.windows_s,
                    buckets=config.window_buckets,
                    max_items=config.max_items,
                )
            ),
            recent=RecentIds(config.dedup_horizon),
            histories=UserHistories(max_len=config.history_len, max_users=config.max_users),
            heads=dict(heads or {}) if "heads" in config.roles else {},
            cooccurrence=CoOccurrence(min_count=config.cooccurrence_min_count),
        )
        self.roles = frozenset(config.roles)
        group = config.effective_group_id
        self.store = CheckpointStore(settings.home / "stream" / group / f"{config.worker_id}.ckpt")
        self.stats = StreamStats()
        self._stop = threading.Event()
        self._assigned_at = 0.0
        self._lock = threading.Lock()  # readers take it to see whole batches only
        self.assigned: frozenset[int] = frozenset()  # partitions currently owned
        self._checkpoint_s = 0.0  # what the last checkpoint's snapshot cost the worker thread
        self._writer: threading.Thread | None = None
        self._child: int | None = None  # pid of a forked checkpoint writer still running
        self._consumer: Consumer | None = None
        self._written: dict[tuple[str, int], int] | None = None  # offsets of the checkpoint being written
        self._write_ok = False  # the thread writer (no fork) succeeded
        self._newest_ms: int | None = None  # newest event time applied (the TTL's clock)
        self._closing = False

    def stop(self) -> None:
        self._stop.set()

    @property
    def lock(self) -> threading.Lock:
        """Held while a batch is applied: hold it to read a consistent state."""
        return self._lock

    def run(self, *, until_idle_s: float | None = None) -> StreamStats:
        saved = self.store.load()
        if saved is not None:
            self.state.load_state_dict(saved)
            logger.info("resumed from %s at offsets %s", self.store.path, self.state.offsets)
        ensure_topics(self._settings)
        config = self._settings.stream
        consumer = Consumer(
            self._settings.kafka_config(
                **{
                    "group.id": config.effective_group_id,
                    "group.instance.id": f"{config.effective_group_id}-{config.worker_id}",
                    "enable.auto.commit": False,  # positions come from the checkpoint
                    "auto.offset.reset": "earliest",
                    "session.timeout.ms": 30_000,
                    "log_level": 3,
                }
            )
        )
        # The counters role also reads the decision log: served impressions feed the CTR posteriors.
        topics = [self._topic, self._impressions] if "counters" in self.roles else [self._topic]
        consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._consumer = consumer
        last_message = last_checkpoint = time.monotonic()
        try:
            while not self._stop.is_set():
                messages = consumer.consume(config.batch_size, config.batch_timeout_s)
                now = time.monotonic()
                if messages:
                    self._apply(messages)
                    last_message = now
                if now - last_checkpoint >= max(config.checkpoint_interval_s, 10 * self._checkpoint_s):
                    self.checkpoint()
                    last_checkpoint = time.monotonic()
                if (
                    not messages
                    and until_idle_s is not None
                    and now - max(last_message, self._assigned_at) >= until_idle_s
                    and consumer.assignment()
                ):
                    logger.info("no message for %.1f s: drained, stopping", until_idle_s)
                    break
            self.checkpoint(wait=True)
        finally:
            self._previous_checkpoint_done(wait=True)
            self._closing = True  # the revoke that close() triggers is not a move
            self._consumer = None
            consumer.close()
        return self.stats

    def checkpoint(self, *, wait: bool = False) -> None:
        """Write state and offsets together, pausing ingestion as briefly as possible.

        On Linux the worker **forks** under the lock (as Redis's BGSAVE does): the child owns a
        copy-on-write image of the state at this instant, pickles it, writes and fsyncs the file and
        exits, while the worker goes on at once; the pause is the fork (page tables), not a copy of
        the state. Elsewhere the snapshot (``state_dict``, independent copies) is taken under the lock
        and written by a thread. While a write is still going a new checkpoint is skipped (``wait``
        waits instead, as the final one does). The loop spaces checkpoints at least ten times the
        pause apart, so checkpointing costs the worker at most ~10% however large the state grows.
        """
        if not self._previous_checkpoint_done(wait=wait):
            return
        started = time.monotonic()
        with self._lock:
            ttl_s, newest = self._settings.stream.user_ttl_s, self._newest_ms
            if ttl_s is not None and newest is not None:
                self.state.histories.expire(before_ms=newest - int(ttl_s * 1000))
            self._written = dict(self.state.offsets)
            if _CAN_FORK:
                self._child = _fork_writer(self.store, self.state)
            else:
                state = self.state.state_dict()
        self._checkpoint_s = time.monotonic() - started
        if not _CAN_FORK:

            def write() -> None:
                self._write_ok = False
                self.store.save(state)
                self.stats.checkpoints += 1
                self._write_ok = True

            self._writer = threading.Thread(target=write, name="freshrec-checkpoint")
            self._writer.start()
        if wait:
            self._previous_checkpoint_done(wait=True)

    def _previous_checkpoint_done(self, *, wait: bool) -> bool:
        """Whether the last checkpoint's write has finished (waiting for it when ``wait``)."""
        writer = self._writer
        if writer is not None and writer.is_alive():
            if not wait:
                return False
            writer.join()
        if writer is not None:
            self._writer = None
            if self._write_ok:
                self._commit_written(wait=wait)
        if self._child is not None:
            pid, status = os.waitpid(self._child, 0 if wait else os.WNOHANG)
            if pid == 0:
                return False
            self._child = None
            if os.waitstatus_to_exitcode(status) == 0:
                self.stats.checkpoints += 1
                self._commit_written(wait=wait)
            else:
                # The previous file stays (the rename is the commit): no state is lost, the next
                # checkpoint tries again.
                logger.error("checkpoint writer exited with %d", os.waitstatus_to_exitcode(status))
        return True

    def _commit_written(self, *, wait: bool) -> None:
        """Tell Kafka the offsets of the checkpoint now on disk: for monitoring (consumer lag) only,
        never read back (see the module docstring). Best effort: a failed commit costs nothing."""
        offsets, consumer = self._written, self._consumer
        self._written = None
        if not offsets or consumer is None:
            return
        partitions = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            if wait:
                consumer.commit(offsets=partitions, asynchronous=False)
            else:
                consumer.commit(offsets=partitions, asynchronous=True)
        except KafkaException as exc:
            logger.debug("advisory offset commit failed: %s", exc)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Idleness counts from the (re)assignment: a slow group join is not an empty topic.
        self._assigned_at = time.monotonic()
        for tp in partitions:
            tp.offset = self.state.offsets.get((tp.topic, tp.partition), OFFSET_BEGINNING)
        consumer.assign(partitions)
        self.assigned = frozenset(tp.partition for tp in partitions if tp.topic == self._topic)
        logger.info("assigned %s", [(tp.partition, tp.offset) for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        counted = revoked & set(self.state.offsets)
        if counted and not self._closing:
            # Per-worker state cannot hand these partitions' counts to their next owner; see the
            # module docstring: workers are meant to keep their partitions (static membership).
            logger.warning("partitions %s, already counted here, move to another worker", sorted(counted))
        self.assigned = self.assigned - {p for (t, p) in revoked if t == self._topic}

    def _apply(self, messages: list[Message]) -> None:
        now_ms = int(time.time() * 1000)
        skew = self._settings.max_future_skew_ms
        recent = self.state.recent
        learned: list[Event] = []
        users: list[str] = []
        items: list[str] = []
        types: list[str] = []
        stamps: list[int] = []
        offsets: dict[tuple[str, int], int] = {}
        served: list[bytes] = []  # messages of the impressions topic
        stats = self.stats
        for message in messages:
            error = message.error()
            if error is not None:
                check_consume_error(error)
                continue
            stats.consumed += 1
            # partition() and offset() are never None once error() is None; the stubs cannot know.
            topic = message.topic()
            offsets[(topic, message.partition())] = message.offset() + 1  # type: ignore[index,operator]
            if topic == self._impressions:
                served.append(message.value() or b"")
                continue
            kafka_ts = message.timestamp()[1]
            reference_ms = kafka_ts if 0 < kafka_ts < now_ms else now_ms  # as the sink: replay-stable
            try:
                event = parse_event(message.value() or b"", now_ms=reference_ms, max_future_skew_ms=skew)
            except InvalidEvent:
                stats.invalid += 1
                continue
            if event.event_id in recent:
                stats.duplicates += 1
                continue
            recent.add(event.event_id)
            learned.append(event)
            users.append(event.user_id)
            items.append(event.item_id)
            types.append(event.type)
            stamps.append(event.ts_ms)
        roles = self.roles
        with self._lock:
            if "counters" in roles:
                self.state.counters.update(items, types, stamps)
                observe_click = self.state.clicks.observe
                for value in served:  # impressions first: a batch's clicks then find theirs
                    _observe_served(observe_click, value)
                for event in learned:
                    if event.type == "impression" or event.type == "click":
                        observe_click(event.type, event.item_id, event.request_id)
            if "sequences" in roles:
                histories = self.state.histories
                self.state.cooccurrence.observe_batch(users, items, histories.recent_items)
                histories.append(users, items, types, stamps)
            for head in self.state.heads.values():
                learn = head.learn_one
                for event in learned:
                    learn(event)
            self.state.offsets.update(offsets)
        stats.counted += len(items)
        if stamps:
            self._newest_ms = max(self._newest_ms or 0, max(stamps))
        stats.batches += 1


def run(
    settings: Settings, *, heads: Mapping[str, Head] | None = None, until_idle_s: float | None = None
) -> tuple[StreamWorker, StreamStats]:
    """Run a stream worker in this thread; SIGINT/SIGTERM checkpoint and stop it."""
    worker = StreamWorker(settings, heads=heads)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %d: checkpointing and stopping", signum)
        worker.stop()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, _stop)
    try:
        return worker, worker.run(until_idle_s=until_idle_s)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

"""Serving replicas: follow the version chain from Kafka and swap in each version atomically.

A :class:`Replica` holds one :class:`~publishers.updates.ModelVersion` at a time. Readers take
``replica.current`` (one reference read) and use it for as long as they like: versions are immutable
and an update builds a new one beside the old, so **a reader sees the old or the new version, never a
mix**. The replica applies **only the next version in the chain** (its parent is the current
version); an update that arrives early waits. It heals from the
:class:`~publishers.snapshots.SnapshotStore` (the newest whole version) when:

- a gap stays open longer than ``gap_timeout_s`` (an update was lost, or expired from the topic);
- an update's bytes fail their sha256, or the model built from them fails its state checksum.

A snapshot on ``model.dense`` (first publish, rollback) also replaces whatever the replica had.

:class:`ReplicaSubscriber` feeds a replica from ``model.sparse`` and ``model.dense`` on a thread of its
own: it reassembles chunks, bootstraps from the snapshot store, and starts reading the topics a little
before that snapshot was made, so nothing published after it is missed.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, TopicPartition

from freshrec.errors import KafkaUnavailable
from freshrec.settings import Settings
from publishers.chain import CHUNK_HEADER, ChunkAssembler, ChunkHeader
from publishers.snapshots import SnapshotStore
from publishers.updates import ChecksumMismatch, ModelUpdate, ModelVersion, apply, decode
from streams.admin import check_consume_error, ensure_topics

__all__ = ["Applied", "Replica", "ReplicaStats", "ReplicaSubscriber"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Applied:
    """One version that became current: how, and how long after the publisher made it."""

    version: int
    kind: str  # sparse, dense, snapshot, or heal (from the snapshot store)
    rows: int
    lag_ms: int


@dataclass
class ReplicaStats:
    applied: int = 0
    healed: int = 0
    rejected: int = 0  # updates that failed a checksum
    ignored: int = 0  # versions at or below the current one
    history: collections.deque[Applied] = field(default_factory=lambda: collections.deque(maxlen=10_000))


class Replica:
    """One model version at a time, advanced along the chain; see the module docstring."""

    def __init__(self, *, snapshots: SnapshotStore | None = None, gap_timeout_s: float = 2.0) -> None:
        self.snapshots = snapshots
        self.gap_timeout_s = gap_timeout_s
        self.stats = ReplicaStats()
        self._current: ModelVersion | None = None
        self._pending: dict[int, ModelUpdate] = {}
        self._gap_since: float | None = None
        self._lock = threading.Lock()  # one applier at a time; readers never take it
        self._listeners: list[Callable[[ModelVersion], None]] = []

    @property
    def current(self) -> ModelVersion | None:
        """The version to serve from: immutable, whole, never mixed."""
        return self._current

    @property
    def version(self) -> int:
        current = self._current
        return 0 if current is None else current.version

    def on_version(self, listener: Callable[[ModelVersion], None]) -> None:
        """Call ``listener`` with every version that becomes current (e.g. to refresh an index)."""
        self._listeners.append(listener)

    def receive(self, update: ModelUpdate) -> None:
        """Take an update from the topics: apply it (and what waited on it), or keep it for later."""
        with self._lock:
            if update.version <= self.version:
                self.stats.ignored += 1
                return
            self._pending[update.version] = update
            self._drain()

    def reject(self, version: int, reason: str) -> None:
        """An update that could not be used (bad bytes): heal from the snapshot store."""
        with self._lock:
            self.stats.rejected += 1
            logger.warning("update v%d rejected (%s): healing from the snapshot store", version, reason)
            self._heal()
            self._drain()

    def check_gap(self) -> None:
        """Heal if the next version has been missing for longer than ``gap_timeout_s``."""
        with self._lock:
            if self._gap_since is not None and time.monotonic() - self._gap_since >= self.gap_timeout_s:
                logger.warning(
                    "v%d missing for %.1f s: healing from the snapshot store",
                    self.version + 1,
                    self.gap_timeout_s,
                )
                self._heal()
                self._drain()

    def bootstrap(self) -> None:
        """Start from the newest version in the snapshot store, if there is one."""
        with self._lock:
            self._heal()

    def _set(self, version: ModelVersion, kind: str, rows: int) -> None:
        self._current = version
        lag = int(time.time() * 1000) - version.created_at_ms
        self.stats.history.append(Applied(version.version, kind, rows, lag))
        for listener in self._listeners:
            try:
                listener(version)
            except Exception:  # a listener's failure must not stop the replica following the chain
                logger.exception("listener failed on v%d", version.version)

    def _heal(self) -> None:
        if self.snapshots is None:
            return
        try:
            latest = self.snapshots.latest()
        except Exception:  # pruned under us, unreadable, corrupt: keep serving what we have
            logger.exception("cannot heal from the snapshot store %s; keeping v%d", self.snapshots.directory,
                             self.version)  # fmt: skip
            self._gap_since = None
            return
        if latest is not None and latest.version > self.version:
            self._set(latest, "heal", len(latest.item_ids))
            self.stats.healed += 1
        self._gap_since = None

    def _drain(self) -> None:
        while True:
            current = self._current
            for stale in [v for v in self._pending if v <= self.version]:
                del self._pending[stale]
            if not self._pending:
                self._gap_since = None
                return
            update = self._pending.get(self.version + 1)
            if update is None or (update.kind != "snapshot" and update.parent != self.version):
                # The chain skips a number whose transaction was aborted: follow the parent links.
                update = next(
                    (
                        u
                        for v, u in sorted(self._pending.items())
                        if u.kind != "snapshot" and u.parent == self.version
                    ),
                    None,
                )
            if update is None:
                # A snapshot further ahead needs no parent: jump to the newest one.
                snapshots = [v for v, u in self._pending.items() if u.kind == "snapshot"]
                if snapshots:
                    update = self._pending[max(snapshots)]
                else:
                    if self._gap_since is None:
                        self._gap_since = time.monotonic()
                    return
            del self._pending[update.version]
            try:
                built = apply(None if update.kind == "snapshot" else current, update)
            except (ChecksumMismatch, ValueError) as exc:
                self.stats.rejected += 1
                logger.warning("update v%d failed (%s): healing from the snapshot store", update.version, exc)
                self._heal()
                continue
            self._set(built, update.kind, update.rows)
            self.stats.applied += 1


class ReplicaSubscriber:
    """Feeds a :class:`Replica` from the model topics on a background thread."""

    def __init__(self, settings: Settings, replica: Replica, *, rewind_s: float = 60.0) -> None:
        self._settings = settings
        self.replica = replica
        self._rewind_s = rewind_s
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, *, wait: bool = True) -> ReplicaSubscriber:
        """Follow the topics on a thread of its own. ``wait``: return once subscribed (raise after
        60 s without Kafka); else return at once, the thread subscribing whenever Kafka answers."""
        self._thread = threading.Thread(target=self._run, name="freshrec-replica", daemon=True)
        self._thread.start()
        if not wait:
            return self
        if not self._ready.wait(60):
            self.stop()
            raise KafkaUnavailable("the replica could not subscribe to the model topics within 60 s")
        if self.error is not None:
            self.stop()
            raise self.error
        return self

    @property
    def alive(self) -> bool:
        """Whether the subscriber thread runs (following, or waiting for Kafka to subscribe): what
        ``/healthz`` reports. It ends only on an error that following cannot recover from."""
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    @property
    def following(self) -> bool:
        """Whether it is subscribed and following the model topics: what ``/readyz`` asks."""
        return self.alive and self._ready.is_set() and self.error is None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def __enter__(self) -> ReplicaSubscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        delay, waiting_since = 0.5, None
        while not self._stop.is_set():
            try:
                self._loop()
                return
            except (KafkaUnavailable, KafkaException) as exc:
                if self._ready.is_set():  # it had subscribed: a fatal consumer error, not an outage
                    self._fail(exc)
                    return
                if waiting_since is None:  # Kafka is away at start: wait for it, one line
                    waiting_since = time.monotonic()
                    logger.warning("the model replica waits for Kafka to subscribe: %s", exc)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
            except BaseException as exc:  # reported to start() or logged; the thread must not die silently
                self._fail(exc)
                return

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        logger.error("replica subscriber stopped: %s", exc, exc_info=exc)
        self._ready.set()

    def _loop(self) -> None:
        settings = self._settings
        ensure_topics(settings)
        self.replica.bootstrap()
        consumer = Consumer(
            settings.kafka_config(
                **{
                    "group.id": f"freshrec-replica-{uuid.uuid4().hex}",  # positions are not shared
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "isolation.level": "read_committed",  # a version exists once its transaction commits
                    "fetch.max.bytes": 64 << 20,
                    "log_level": 3,
                }
            )
        )
        topics = [settings.topics.model_sparse, settings.topics.model_dense]
        current = self.replica.current
        try:
            if current is None:
                consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING) for topic in topics])
            else:
                since = current.created_at_ms - int(self._rewind_s * 1000)
                found = consumer.offsets_for_times([TopicPartition(t, 0, since) for t in topics], timeout=30)
                consumer.assign(
                    [TopicPartition(tp.topic, 0, tp.offset if tp.offset >= 0 else OFFSET_END) for tp in found]
                )
            self._ready.set()
            assembler = ChunkAssembler()
            while not self._stop.is_set():
                for message in consumer.consume(100, 0.1):
                    error = message.error()
                    if error is not None:
                        check_consume_error(error)
                        continue
                    try:
                        header = ChunkHeader.of(message)
                    except ValueError:
                        logger.warning("malformed %s header on %s ignored", CHUNK_HEADER, message.topic())
                        continue
                    if header is None:
                        logger.warning(
                            "message without %s header on %s ignored", CHUNK_HEADER, message.topic()
                        )
                        continue
                    version = header.version
                    payload, problem = assembler.add(header, message.value() or b"")
                    if problem is not None:
                        self.replica.reject(version, problem)
                    elif payload is not None:
                        try:
                            update = decode(payload)
                        except (ValueError, KeyError, TypeError) as exc:
                            self.replica.reject(version, f"undecodable: {exc!r}")
                            continue
                        try:
                            self.replica.receive(update)
                        except Exception as exc:  # e.g. an unknown kind: reject it, keep following
                            logger.exception("update v%d could not be applied", update.version)
                            self.replica.reject(update.version, repr(exc))
                self.replica.check_gap()
        finally:
            consumer.close()

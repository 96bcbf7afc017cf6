"""Stream workers: ``events`` → validated → real-time state per partition, exactly once across
``kill -9`` and across workers joining and leaving.

**State per partition.** A worker keeps one state store per partition of ``events`` it owns
(:class:`~streams.stores.PartitionStore`: counters, CTR, histories, co-occurrence, recent ids,
heads, and the input offsets they reflect); readers see them merged (:class:`StreamState`). Each
store is a deterministic function of the prefix of its partition it has applied: the counters do
not depend on batching or order (see :mod:`streams.counters`), a user's history and co-occurrence
follow the order of the user's partition, which is the same on every read, and a head learns its
partition's events in that order. That is what lets a partition move to any worker and resume
exactly.

**Changelog: Kafka is the source of truth.** Every ``checkpoint_interval_s`` (and at least ten
times the snapshot's pause apart) the partitions that moved on are snapshotted, with the offsets
they reflect, to the compacted topic ``state.<roles>`` (:mod:`streams.changelog`). When a partition
is assigned, its newest complete snapshot is restored from that topic and the partition is read
from the snapshot's offsets: the events after it are applied once more, and since the state is a
function of the applied prefix, the result equals an uninterrupted run's. A worker with an empty
``FRESHREC_HOME``, on a new machine, restores the same way. When partitions are revoked (a worker
joins or leaves), the worker first flushes their snapshot synchronously, so their next owner starts
where it stopped; a worker killed with ``kill -9`` flushes nothing, and its partitions' next owner
replays from the last snapshot. Kafka's committed offsets are advisory (``consumer_lag``): positions
always come from the snapshot, or the beginning of the partition without one.

On Linux the worker **forks** to snapshot (as Redis's BGSAVE does): the child owns a copy-on-write
image of the state, encodes each changed partition and writes them to a local hand-off file
(``$FRESHREC_HOME/stream/<group>/<worker_id>.ckpt``), which a thread of the worker then sends to the
changelog; the pause is the fork, not a copy of the state. The file is never read back as state.

**Bootstrap.** A worker may also be given other groups' changelogs to start from, read only
(``bootstrap``): each partition then starts from the newest snapshot, by the offsets it reflects,
among its own group's and those. A serving replica, whose worker is a group of its own, starts from
the stream workers' snapshots rather than from offset 0, and a replica restarted with its worker id
from its own snapshot when that is further on. Any such snapshot is as good as its own group's,
since a partition's state is a function of the prefix applied; heads a snapshot holds beyond the
worker's are dropped, and one lacking a head the worker keeps is not used. When the roles run as
separate groups, each part (role) is restored from its own group's snapshot, and the worker reads
from the lowest of their offsets, applying each event only to the parts that have not seen it
(:meth:`~streams.stores.PartitionStore.load_parts`); such a store is snapshotted once every part
has caught up.

**Rescaling.** Workers join and leave a group at any time (``docker-compose up --scale
stream-counters=3``, each replica with its own ``FRESHREC_STREAM__WORKER_ID``: two workers with one
id fence each other): the group rebalances, revoked partitions are flushed, assigned ones restored;
no volume is needed. The
assignor is Kafka's default range assignor, which gives the same partition of ``events`` and of
``impressions`` (keyed alike, by user) to the same worker, as a partition's CTR join needs;
cooperative-sticky assignment would not keep them together. A worker that gets back a partition it
held until the rebalance keeps its state in memory instead of restoring it. Static membership
(``group.instance.id`` = the worker id) lets a restarted worker take its partitions back at once.

**Duplicates**: an ``event_id`` already counted in its partition, within the last
``dedup_horizon``/2 to ``dedup_horizon`` ids of that partition, is not counted again (re-sends carry
the same key, so land in the same partition).
**Bad events** are skipped and counted (the audit sink dead-letters them); they never stop a worker.
**Late events** count in ``total`` always, in a window only while their bucket is in its
partition's window.
**Heads** (river models, given by whoever builds the worker) are kept **one per partition**: each
partition's copy learns that partition's events in their order, so heads too resume exactly and move
with their partition. A head's score for a user comes from the head of the user's partition
(:class:`~streams.stores.RoutedHead`). The cost: each copy learns item factors from its partition's
users only.

**Roles**: a worker keeps ``counters`` (item counters, CTR), ``sequences`` (histories,
co-occurrence) and ``heads`` (river), or any subset (``FRESHREC_STREAM__ROLES``). A subset is its own
consumer group (``<group>.<roles>``) with its own changelog, so each role scales on its own cores.
:class:`~streams.reader.StateReader` reads each part from the worker that keeps it.

Why confluent-kafka and not faust here: this is the per-event hot path; see ``docs/benchmarks.md``.
"""

from __future__ import annotations

import logging
import operator
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from freshrec.errors import FreshrecError, InvalidEvent
from freshrec.events import Event, parse_event
from freshrec.settings import Settings
from streams.admin import check_consume_error, ensure_topics
from streams.changelog import Changelog
from streams.consume import consume_loop, stop_on_signals
from streams.heads import Head
from streams.impressions import decode_impression
from streams.restore import Candidate, bootstrap_candidates, load_newest
from streams.state_codec import encode_state, gc_paused
from streams.stores import (
    PartitionStore,
)
from streams.worker_state import (
    CAN_FORK,
    CheckpointStore,
    StreamState,
    StreamStats,
    encode_stores,
    fork_writer,
)

__all__ = ["StreamWorker", "run"]

logger = logging.getLogger(__name__)

_TS_MS = operator.attrgetter("ts_ms")


def _observe_served(observe: Callable[[str, str, str | None], None], value: bytes) -> None:
    """Count each item of one served response (an ``impressions`` message) as an impression."""
    try:
        response = decode_impression(value, exploration=False)
    except ValueError as exc:
        logger.warning("malformed impressions message skipped (the sink dead-letters it): %s", exc)
        return
    for item in response.items:
        observe("impression", item.item_id, response.request_id)


@dataclass(slots=True)
class _Batch:
    """One partition's share of a consumed batch, parsed outside the lock."""

    events: list[Event]
    served: list[bytes]  # messages of the impressions topic
    offsets: dict[str, int]
    # The offset of each event and served message, kept only while a part of the store is ahead.
    event_offsets: list[int] | None = None
    served_offsets: list[int] | None = None


class StreamWorker:
    """Consume ``events`` as part of a group and keep a :class:`StreamState` per partition."""

    def __init__(
        self,
        settings: Settings,
        *,
        heads: Mapping[str, Head] | None = None,
        bootstrap: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        """``heads``: the incremental models this worker feeds, one copy per partition
        (``learners.registry.build_heads`` builds the ones the settings name); none when omitted
        or without the ``heads`` role.

        ``bootstrap``: changelog topics of other groups that keep (at least) this worker's roles
        and heads, read but never written: a partition is restored from the newest snapshot, by the
        offsets it reflects, among this group's changelog and these. A serving replica names the
        stream workers' changelog here, so that a new replica starts where they are instead of at
        offset 0, and a restarted one from its own snapshot when that is newer."""
        self._settings = settings
        config = settings.stream
        self._topic = settings.topics.events
        self._impressions = settings.topics.impressions
        self.roles = frozenset(config.roles)
        self.state = StreamState(settings, heads=heads if "heads" in config.roles else None)
        group = config.effective_group_id
        self.store = CheckpointStore(settings.home / "stream" / group / f"{config.worker_id}.ckpt")
        self.stats = StreamStats()
        self._stop = threading.Event()
        self._assigned_at = 0.0
        self._lock = threading.Lock()  # readers take it to see whole batches only
        self.assigned: frozenset[int] = frozenset()  # partitions of ``events`` currently owned
        self._checkpoint_s = 0.0  # what the last snapshot's pause cost the worker thread
        self._uploader: threading.Thread | None = None
        self._uploaded: dict[int, dict[str, int]] = {}  # set by the uploader: what reached the changelog
        self._snapshotted: dict[int, dict[str, int]] = {}  # offsets of each partition's newest snapshot
        self._flushed: frozenset[int] = frozenset()  # flushed at the last revocation, still in memory
        self._changelog: Changelog | None = None
        self._bootstrap = {topic: frozenset(roles) for topic, roles in (bootstrap or {}).items()}
        self._sources: dict[str, Changelog] = {}  # bootstrap changelogs found on the broker
        self._consumer: Consumer | None = None
        self._newest_ms: int | None = None  # newest event time applied (the TTL's clock)
        self._closing = False

    def stop(self) -> None:
        self._stop.set()

    @property
    def lock(self) -> threading.Lock:
        """Held while a batch is applied: hold it to read a consistent state."""
        return self._lock

    @property
    def changelog(self) -> Changelog:
        """The changelog of this worker's group (created on first use: it needs Kafka)."""
        if self._changelog is None:
            self._changelog = Changelog(self._settings)
        return self._changelog

    def restore(self, partitions: Collection[int] | None = None) -> dict[int, dict[str, int]]:
        """Load the newest snapshot of ``partitions`` (every partition with one, when None) from the
        changelog, or from a ``bootstrap`` changelog when its snapshot is further on, into this
        worker's state; partitions without one start empty. Returns the offsets each restored
        partition reflects."""
        own = self.changelog.restore(partitions)
        candidates: dict[int, list[Candidate]] = {
            p: [Candidate(snapshot, self.roles, own=True)] for p, snapshot in own.items()
        }
        for candidate in bootstrap_candidates(self._settings, self._bootstrap, self._sources, partitions):
            candidates.setdefault(candidate.snapshot.partition, []).append(candidate)
        restored: dict[int, dict[str, int]] = {}
        stores: dict[int, PartitionStore] = {}
        wanted = set(candidates) if partitions is None else set(partitions)
        for partition in sorted(wanted):
            store, used = load_newest(
                partition,
                candidates.get(partition, []),
                roles=self.roles,
                new_store=self.state.new_store,
                events=self._topic,
                impressions=self._impressions,
            )
            stores[partition] = store
            if used:
                restored[partition] = dict(store.offsets)
                self.stats.bootstrapped += any(not c.own for c in used)
        with self._lock:
            self.state.stores.update(stores)
        for partition in stores:
            # What this group's changelog holds: a bootstrapped partition is snapshotted here next.
            self._snapshotted[partition] = dict(own[partition].offsets) if partition in own else {}
        self.stats.restored += len(restored)
        return restored

    def run(self, *, until_idle_s: float | None = None) -> StreamStats:
        ensure_topics(self._settings)
        config = self._settings.stream
        consumer = Consumer(
            self._settings.kafka_config(
                **{
                    "group.id": config.effective_group_id,
                    "group.instance.id": f"{config.effective_group_id}-{config.worker_id}",
                    "enable.auto.commit": False,  # positions come from the snapshots
                    "auto.offset.reset": "earliest",
                    "session.timeout.ms": config.session_timeout_ms,
                    "log_level": 3,
                }
            )
        )
        try:
            metadata = consumer.list_topics(self._topic, timeout=30)
            self.state.set_partition_count(len(metadata.topics[self._topic].partitions))
        except KafkaException as exc:
            logger.warning("could not read the partition count of %s: %s", self._topic, exc)
        # The counters role also reads the decision log: served impressions feed the CTR posteriors.
        topics = [self._topic, self._impressions] if "counters" in self.roles else [self._topic]
        consumer.subscribe(
            topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        self._consumer = consumer
        last_checkpoint = time.monotonic()

        def after_poll(now: float) -> None:
            nonlocal last_checkpoint
            if now - last_checkpoint >= max(config.checkpoint_interval_s, 10 * self._checkpoint_s):
                self.checkpoint()
                last_checkpoint = time.monotonic()

        try:
            consume_loop(
                consumer,
                batch_size=config.batch_size,
                timeout_s=config.batch_timeout_s,
                stop=self._stop,
                on_batch=self._apply,
                until_idle_s=until_idle_s,
                assigned_at=lambda: self._assigned_at,
                after_poll=after_poll,
            )
            self._flush(self.state.stores)
        finally:
            self._upload_done(wait=True)
            self._closing = True  # the revoke that close() triggers flushes nothing new
            self._consumer = None
            consumer.close()
            if self._changelog is not None:
                self._changelog.close()
        return self.stats

    # ------------------------------------------------------------------ snapshots

    def _dirty(self, partitions: Collection[int]) -> list[int]:
        stores = self.state.stores
        # A store whose parts are at different offsets (``ahead``) is not one snapshot's worth yet.
        return sorted(
            p
            for p in partitions
            if p in stores and not stores[p].ahead and stores[p].offsets != self._snapshotted.get(p)
        )

    def checkpoint(self, *, wait: bool = False) -> None:
        """Snapshot the partitions that moved on since their last snapshot to the changelog,
        pausing ingestion as briefly as possible.

        On Linux the worker forks under the lock and a thread sends what the child encoded; elsewhere
        the state is encoded under the lock and sent by a thread. While a snapshot is still on its way a
        new one is skipped (``wait`` waits for it instead). The loop spaces snapshots at least ten
        times the pause apart, so they cost the worker at most ~10% however large the state grows.
        """
        if not self._settings.stream.changelog or not self._upload_done(wait=wait):
            return
        started = time.monotonic()
        with self._lock:
            ttl_s, newest = self._settings.stream.user_ttl_s, self._newest_ms
            if ttl_s is not None and newest is not None:
                for store in self.state.stores.values():
                    store.histories.expire(before_ms=newest - int(ttl_s * 1000))
            dirty = self._dirty(self.state.stores)
            if not dirty:
                return
            offsets = {p: dict(self.state.stores[p].offsets) for p in dirty}
            child = 0
            payloads: dict[int, bytes] | None = None
            if CAN_FORK:
                child = fork_writer(self.store, self.state.stores, dirty)
            else:
                payloads = encode_stores(self.state.stores, dirty)
        self._checkpoint_s = time.monotonic() - started
        changelog = self.changelog

        def upload() -> None:
            data = payloads
            if data is None:
                _, status = os.waitpid(child, 0)
                if os.waitstatus_to_exitcode(status) != 0:
                    logger.error("snapshot writer exited with %d", os.waitstatus_to_exitcode(status))
                    return
                saved = self.store.load()
                if saved is None:
                    return
                data = saved["payloads"]
            try:
                for partition, payload in data.items():
                    changelog.write(partition, payload, offsets[partition])
                    self._uploaded[partition] = offsets[partition]
            except FreshrecError as exc:  # the previous snapshots stay; the next round tries again
                logger.error("snapshot not written to the changelog: %s", exc)

        self._uploader = threading.Thread(target=upload, name="freshrec-snapshot")
        self._uploader.start()
        if wait:
            self._upload_done(wait=True)

    def _upload_done(self, *, wait: bool) -> bool:
        """Whether the last snapshot has reached the changelog (waiting for it when ``wait``)."""
        uploader = self._uploader
        if uploader is not None:
            if uploader.is_alive() and not wait:
                return False
            uploader.join()
            self._uploader = None
            uploaded, self._uploaded = self._uploaded, {}
            if uploaded:
                self._snapshotted.update(uploaded)
                self.stats.checkpoints += 1
                self._commit(uploaded)
        return True

    def _flush(self, partitions: Collection[int]) -> None:
        """Snapshot ``partitions`` now, on this thread (a revocation, the end of a run), after any
        snapshot on its way, so that their next owner starts where this worker stopped."""
        if not self._settings.stream.changelog:
            return
        self._upload_done(wait=True)
        dirty = self._dirty(partitions)
        for partition in dirty:
            store = self.state.stores[partition]
            offsets = dict(store.offsets)
            with gc_paused():
                payload = encode_state(store.state_dict())
            self.changelog.write(partition, payload, offsets)
            self._snapshotted[partition] = offsets
        self.stats.flushed += len(dirty)
        if dirty:
            self._commit({p: self._snapshotted[p] for p in dirty}, wait=True)

    def _commit(self, offsets: Mapping[int, Mapping[str, int]], *, wait: bool = False) -> None:
        """Tell Kafka the offsets of the snapshots now in the changelog: for monitoring (consumer lag)
        only, never read back. Best effort: a failed commit costs nothing."""
        consumer = self._consumer
        if consumer is None or self._closing:
            return
        partitions = [TopicPartition(t, p, o) for p, by_topic in offsets.items() for t, o in by_topic.items()]
        try:
            if wait:
                consumer.commit(offsets=partitions, asynchronous=False)
            else:
                consumer.commit(offsets=partitions, asynchronous=True)
        except KafkaException as exc:
            logger.debug("advisory offset commit failed: %s", exc)

    # ------------------------------------------------------------------ rebalancing

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        owned = {tp.partition for tp in partitions if tp.topic == self._topic}
        kept = owned & self._flushed  # held until this rebalance, flushed: memory is the newest
        with self._lock:
            for partition in set(self.state.stores) - kept:
                del self.state.stores[partition]
        for partition in set(self._snapshotted) - kept:
            del self._snapshotted[partition]
        wanted = sorted(owned - kept)
        if self._settings.stream.changelog and wanted:
            started = time.monotonic()
            restored = self.restore(wanted)
            logger.info(
                "restored partitions %s from %s in %.2f s (%s without a snapshot)",
                sorted(restored),
                ", ".join([self.changelog.topic, *self._bootstrap]),
                time.monotonic() - started,
                sorted(set(wanted) - set(restored)),
            )
        else:
            with self._lock:
                for partition in wanted:
                    self.state.store(partition)
        for tp in partitions:
            store = self.state.stores.get(tp.partition)
            if store is None:  # an impressions partition whose events partition went elsewhere
                logger.warning(
                    "partition %d of %s assigned without its events partition", tp.partition, tp.topic
                )
                tp.offset = OFFSET_BEGINNING
                continue
            tp.offset = store.offsets.get(tp.topic, OFFSET_BEGINNING)
        consumer.assign(partitions)
        # Idleness counts from the (re)assignment, restores done: a slow join is not an empty topic.
        self._assigned_at = time.monotonic()
        self._flushed = frozenset()
        self.assigned = frozenset(owned)
        logger.info("assigned %s", [(tp.topic, tp.partition, tp.offset) for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {tp.partition for tp in partitions if tp.topic == self._topic}
        held = revoked & set(self.state.stores)
        if held and not self._closing:
            try:
                self._flush(held)
            except FreshrecError as exc:
                # Not fatal: the next owner restores the last complete snapshot and replays from it.
                logger.error("could not flush revoked partitions %s: %s", sorted(held), exc)
                held = set()
        self._flushed = frozenset(held)
        self.assigned = self.assigned - revoked

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions taken away without a revocation (this worker missed its session): another
        worker may own them already, so nothing is flushed and their state here is dropped."""
        lost = {tp.partition for tp in partitions if tp.topic == self._topic}
        logger.warning("partitions %s lost (session expired): dropping their state", sorted(lost))
        with self._lock:
            for partition in lost:
                self.state.stores.pop(partition, None)
        for partition in lost:
            self._snapshotted.pop(partition, None)
        self._flushed = frozenset()
        self.assigned = self.assigned - lost

    # ------------------------------------------------------------------ applying

    def _apply(self, messages: list[Message]) -> None:
        now_ms = int(time.time() * 1000)
        skew = self._settings.max_future_skew_ms
        stats = self.stats
        batches: dict[int, _Batch] = {}
        stores = self.state.stores
        for message in messages:
            error = message.error()
            if error is not None:
                check_consume_error(error)
                continue
            stats.consumed += 1
            # partition() and offset() are never None once error() is None; the stubs cannot know.
            topic: str = message.topic()  # type: ignore[assignment]
            partition: int = message.partition()  # type: ignore[assignment]
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = _Batch([], [], {})
                if partition not in stores:
                    with self._lock:
                        self.state.store(partition)
                if stores[partition].ahead:
                    batch.event_offsets, batch.served_offsets = [], []
            offset: int = message.offset()  # type: ignore[assignment]
            batch.offsets[topic] = offset + 1
            if topic == self._impressions:
                batch.served.append(message.value() or b"")
                if batch.served_offsets is not None:
                    batch.served_offsets.append(offset)
                continue
            kafka_ts = message.timestamp()[1]
            reference_ms = kafka_ts if 0 < kafka_ts < now_ms else now_ms  # as the sink: replay-stable
            try:
                event = parse_event(message.value() or b"", now_ms=reference_ms, max_future_skew_ms=skew)
            except InvalidEvent:
                stats.invalid += 1
                continue
            recent = stores[partition].recent
            if event.event_id in recent:
                stats.duplicates += 1
                continue
            recent.add(event.event_id)
            batch.events.append(event)
            if batch.event_offsets is not None:
                batch.event_offsets.append(offset)
        counted = 0
        newest = self._newest_ms
        with self._lock:
            for partition, batch in batches.items():
                store = stores[partition]
                learned = batch.events
                if learned:
                    counted += len(learned)
                    top = max(map(_TS_MS, learned))
                    newest = top if newest is None else max(newest, top)
                if batch.event_offsets is None or batch.served_offsets is None:
                    _apply_parts(store, self.roles, learned, batch.served)
                else:
                    self._apply_behind(store, batch)
                store.offsets.update(batch.offsets)
        stats.counted += counted
        self._newest_ms = newest
        stats.batches += 1

    def _apply_behind(self, store: PartitionStore, batch: _Batch) -> None:
        """Apply a batch to a store whose parts were restored at different offsets (see
        :meth:`~streams.stores.PartitionStore.load_parts`): each part gets only the events and
        served messages at or after its own offset; a part that has caught up leaves ``ahead``."""
        assert batch.event_offsets is not None and batch.served_offsets is not None
        for role in self.roles:
            ahead = store.ahead.get(role, {})
            after = ahead.get(self._topic, 0)
            events = [e for e, o in zip(batch.events, batch.event_offsets, strict=True) if o >= after]
            after = ahead.get(self._impressions, 0)
            served = [v for v, o in zip(batch.served, batch.served_offsets, strict=True) if o >= after]
            _apply_parts(store, frozenset({role}), events, served)
        offsets = {**store.offsets, **batch.offsets}
        for role, by_topic in list(store.ahead.items()):
            if all(offsets.get(topic, 0) >= offset for topic, offset in by_topic.items()):
                del store.ahead[role]


def _apply_parts(
    store: PartitionStore, roles: Collection[str], learned: list[Event], served: list[bytes]
) -> None:
    """Apply one partition's valid, deduplicated events (and served messages) to the parts of
    ``store`` that ``roles`` keep."""
    if learned:
        users = [event.user_id for event in learned]
        items = [event.item_id for event in learned]
        types = [event.type for event in learned]
        stamps = [event.ts_ms for event in learned]
    else:
        users, items, types, stamps = [], [], [], []
    if "counters" in roles:
        store.counters.update(items, types, stamps)
        observe_click = store.clicks.observe
        for value in served:  # impressions first: a batch's clicks then find theirs
            _observe_served(observe_click, value)
        for event in learned:
            if event.type == "impression" or event.type == "click":
                observe_click(event.type, event.item_id, event.request_id)
    if "sequences" in roles and learned:
        histories = store.histories
        store.cooccurrence.observe_batch(users, items, histories.recent_items)
        histories.append(users, items, types, stamps)
    if "heads" in roles:
        for head in store.heads.values():
            learn = head.learn_one
            for event in learned:
                learn(event)


def run(
    settings: Settings, *, heads: Mapping[str, Head] | None = None, until_idle_s: float | None = None
) -> tuple[StreamWorker, StreamStats]:
    """Run a stream worker in this thread; SIGINT/SIGTERM snapshot and stop it."""
    worker = StreamWorker(settings, heads=heads)
    with stop_on_signals(worker.stop, what="snapshotting and stopping"):
        return worker, worker.run(until_idle_s=until_idle_s)

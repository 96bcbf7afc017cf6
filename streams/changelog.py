"""Stream state per partition in Kafka: a compacted changelog topic of chunked, checksummed snapshots.

In Kafka Streams' words: each input partition has a **state store** (its counters, histories,
co-occurrence, CTR and heads), and the store's **changelog** is a compacted topic,
``<prefix>state.<roles>`` (``state.<group>.<roles>`` for a group other than the default), from which
any worker that is assigned the partition **restores** it, then resumes the input exactly at the
offsets the snapshot reflects. Unlike Kafka Streams, the changelog holds whole-partition snapshots
written every few seconds, not one record per key change: the state is numpy arrays and dicts
updated a batch at a time at ~100k events/s, and a record per change would cost more than the work.

**Layout.** The changelog has as many partitions as ``events``; the snapshots of input partition
``p`` go to changelog partition ``p`` (modulo the changelog's partition count), so restoring one
partition reads one changelog partition. A snapshot of generation ``g`` is written as:

- chunks, key ``<p>/<g>/<i>``, each at most ``chunk_bytes`` (512 KiB by default: well under the
  broker's ``message.max.bytes``, as model updates are chunked);
- then, once every chunk is acknowledged, its **manifest**, key ``<p>/<g>``: the chunk count, the
  size and sha256 of the whole payload, and the input offsets (per topic) the state reflects;
- then tombstones for the keys of every older generation of ``p`` but the previous complete one,
  which compaction then removes.

A generation is ``<sequence>-<writer token>``: two writers never share a key, so compaction can
never mix the chunks of two snapshots. **Restore** reads the changelog partitions to their high
watermark and takes, per input partition, the newest manifest (in log order) whose chunks are all
there and whose payload matches its checksum. So a snapshot half-written when its writer was killed
(chunks without a manifest, or a manifest whose chunks a newer writer tombstoned) is never read, and
the previous complete one is still there to fall back on.

**Why manifests and not Kafka transactions.** A partition's state is a deterministic function of the
prefix of the partition's log it has applied (the counters do not depend on batching, a user's
history is in the order of their partition; see :mod:`streams.worker`), so two snapshots of one
partition are interchangeable as long as each carries the offsets it reflects: any complete one is a
correct starting point, and the worst a zombie writer (one that lost the partition but did not know
yet) can do is publish an older correct one, which costs a replay of a few seconds, not a wrong
count. Transactions would fence such zombies, but they need a ``transactional.id`` per input
partition (a producer per partition per worker) and ``read_committed`` readers, to prevent what
cannot go wrong here; a manifest written last is the commit point, as a file rename is for a file.

**What it is not.** The checksum guards against torn and mixed writes, not against someone who can
write to the topic: anyone who can produce to it can change the state (heads serialise themselves
with pickle), so give the topic the ACLs of the ``events`` topic.

The payload codec (:mod:`streams.state_codec`) writes a state dict as JSON (orjson)
with its numpy arrays and byte strings as raw buffers after it, so no pickle is needed for the
counters, histories, co-occurrence and CTR.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from freshrec.errors import KafkaUnavailable
from freshrec.settings import Settings, StreamSettings
from streams.admin import check_consume_error
from streams.state_codec import decode_state

__all__ = [
    "Changelog",
    "Manifest",
    "Snapshot",
    "changelog_topic",
    "ensure_changelog",
]

logger = logging.getLogger(__name__)

CHUNK_BYTES: Final = 512 * 1024
_TOPIC_MAX_MESSAGE: Final = 8 * 1024 * 1024
_TOPIC_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]")
# What a topic created a moment ago answers until its partitions have leaders.
_NOT_READY: Final = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_PARTITION,
    }
)


def changelog_topic(settings: Settings) -> str:
    """The changelog of the stream group ``settings`` describes: one per group and set of roles, so
    that two groups (a test's reference run, a role kept apart) never read each other's state.

    ``<prefix>state.<roles>`` for the default group (roles joined by ``-``, as topic names allow
    no ``+``), ``<prefix>state.<group>.<roles>`` for another."""
    stream = settings.stream
    roles = "-".join(stream.roles)
    default_group = StreamSettings.model_fields["group_id"].default
    group = (
        "" if stream.group_id == default_group else _TOPIC_UNSAFE.sub("_", stream.group_id).strip(".") + "."
    )
    return f"{settings.topic_prefix}state.{group}{roles}"


def ensure_changelog(settings: Settings, topic: str, *, timeout_s: float = 30.0, create: bool = True) -> int:
    """Create the compacted changelog ``topic`` if it does not exist, with as many partitions as
    ``events`` has; return its partition count. With ``create`` off, a missing topic is left
    missing and its count is 0 (a reader of another group's state must not create it)."""
    admin = AdminClient(settings.kafka_config(log_level=3))
    try:
        topics = admin.list_topics(timeout=timeout_s).topics
    except KafkaException as exc:
        raise KafkaUnavailable(
            f"cannot reach Kafka at {settings.bootstrap} to find the state changelog: {exc}. "
            "Is the broker running (`freshrec broker start`)?"
        ) from exc
    if topic in topics:
        return len(topics[topic].partitions)
    if not create:
        return 0
    events = topics.get(settings.topics.events)
    partitions = len(events.partitions) if events is not None else settings.broker_partitions
    config = {
        "cleanup.policy": "compact",
        "max.message.bytes": str(_TOPIC_MAX_MESSAGE),
        # Compaction only cleans closed segments: roll them often enough that old generations go.
        "segment.ms": str(10 * 60 * 1000),
    }
    new = NewTopic(topic, num_partitions=partitions, replication_factor=-1, config=config)
    try:
        admin.create_topics([new], operation_timeout=timeout_s)[topic].result()
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # a concurrent creator won the race
            raise KafkaUnavailable(f"cannot create the state changelog {topic}: {exc}") from exc
        return ensure_changelog(settings, topic, timeout_s=timeout_s)
    logger.info("created state changelog %s (%d partitions)", topic, partitions)
    return partitions


# ---------------------------------------------------------------------------------------- codec


@dataclass(frozen=True, slots=True)
class Manifest:
    """What makes a snapshot exist: written after its chunks, it names them and the state's offsets."""

    partition: int
    generation: str
    chunks: int
    size: int
    sha256: str
    offsets: dict[str, int]  # input topic -> next offset to read in this partition
    written_at_ms: int

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "partition": self.partition,
                "generation": self.generation,
                "chunks": self.chunks,
                "size": self.size,
                "sha256": self.sha256,
                "offsets": self.offsets,
                "written_at_ms": self.written_at_ms,
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> Manifest:
        """Raises ``ValueError`` on anything that is not a manifest."""
        try:
            data = orjson.loads(raw)
            return cls(
                partition=int(data["partition"]),
                generation=str(data["generation"]),
                chunks=int(data["chunks"]),
                size=int(data["size"]),
                sha256=str(data["sha256"]),
                offsets={str(topic): int(offset) for topic, offset in data["offsets"].items()},
                written_at_ms=int(data["written_at_ms"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a state manifest: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One partition's complete, verified snapshot: its manifest and its payload."""

    manifest: Manifest
    payload: bytes

    @property
    def partition(self) -> int:
        return self.manifest.partition

    @property
    def offsets(self) -> dict[str, int]:
        return self.manifest.offsets

    def state(self) -> dict[str, Any]:
        return decode_state(self.payload)


@dataclass(slots=True)
class _Generation:
    """A generation of one partition as seen on the changelog: its chunk indices and manifest."""

    chunks: set[int] = field(default_factory=set)
    manifest: Manifest | None = None


def _sequence(generation: str) -> int:
    head = generation.split("-", 1)[0]
    return int(head) if head.isdigit() else -1


class Changelog:
    """Writes and restores per-partition snapshots on one changelog topic (see the module docstring).

    Thread-safe: a worker restores on assignment in its consumer's thread and writes from another.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        topic: str | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        timeout_s: float = 30.0,
        create: bool = True,
    ) -> None:
        """``topic``: this group's changelog by default. ``create`` off opens another group's
        changelog to read only: a missing topic is not created, and restores nothing (``partitions``
        is 0) until it exists."""
        if not 1 <= chunk_bytes <= _TOPIC_MAX_MESSAGE // 2:
            raise ValueError(f"chunk_bytes must be between 1 and {_TOPIC_MAX_MESSAGE // 2}")
        self._settings = settings
        self.topic = topic or changelog_topic(settings)
        self.partitions = ensure_changelog(settings, self.topic, timeout_s=timeout_s, create=create)
        self.chunk_bytes = chunk_bytes
        self.read_only = not create
        self._timeout_s = timeout_s
        self._token = uuid.uuid4().hex[:8]
        self._lock = threading.Lock()
        # Per input partition, the generations on the topic in log order (what the next write cleans).
        self._live: dict[int, dict[str, _Generation]] = {}
        self._good: dict[int, str] = {}  # per input partition, the newest generation known complete
        self._producer: Producer | None = None
        self.bytes_written = 0

    def _changelog_partition(self, partition: int) -> int:
        return partition % self.partitions

    # ------------------------------------------------------------------ writing

    def write(self, partition: int, payload: bytes, offsets: Mapping[str, int]) -> Manifest:
        """Write one snapshot of ``partition`` reflecting ``offsets``; return its manifest once the
        broker has acknowledged it (chunks, then manifest), after which older generations are
        tombstoned. Raises :class:`KafkaUnavailable` when the broker does not acknowledge in time:
        the previous snapshot then stays the newest."""
        if self.read_only:
            raise ValueError(f"{self.topic} was opened to read another group's state, not to write it")
        with self._lock:
            generations = self._live.setdefault(partition, {})
            sequence = max((_sequence(g) for g in generations), default=0) + 1
            generation = f"{sequence:010d}-{self._token}"
            target = self._changelog_partition(partition)
            count = max(1, -(-len(payload) // self.chunk_bytes))
            view = memoryview(payload)
            errors: list[KafkaError] = []
            produced = _Generation()
            generations[generation] = produced
            for index in range(count):
                chunk = view[index * self.chunk_bytes : (index + 1) * self.chunk_bytes]
                self._produce(target, f"{partition}/{generation}/{index}", bytes(chunk), errors)
                produced.chunks.add(index)
            self._flush(errors, what=f"state chunks of partition {partition}")
            manifest = Manifest(
                partition=partition,
                generation=generation,
                chunks=count,
                size=len(payload),
                sha256=hashlib.sha256(payload).hexdigest(),
                offsets=dict(offsets),
                written_at_ms=int(time.time() * 1000),
            )
            self._produce(target, f"{partition}/{generation}", manifest.encode(), errors)
            self._flush(errors, what=f"the state manifest of partition {partition}")
            produced.manifest = manifest
            self.bytes_written += len(payload)
            self._tombstone_older(partition, keep=generation)
            return manifest

    def _tombstone_older(self, partition: int, *, keep: str) -> None:
        """Tombstone every generation of ``partition`` but ``keep`` and the newest one known to be
        complete before it (restored or written here: the fall-back should ``keep`` prove
        unreadable). Not waited for: a tombstone that is lost leaves garbage the next write cleans."""
        generations = self._live[partition]
        previous = self._good.get(partition)
        kept = {keep} if previous is None else {keep, previous}
        self._good[partition] = keep
        target = self._changelog_partition(partition)
        errors: list[KafkaError] = []
        for generation in [g for g in generations if g not in kept]:
            seen = generations.pop(generation)
            for index in sorted(seen.chunks):
                self._produce(target, f"{partition}/{generation}/{index}", None, errors)
            self._produce(target, f"{partition}/{generation}", None, errors)
        producer = self._producer
        if producer is not None:
            producer.poll(0)

    def _produce(self, target: int, key: str, value: bytes | None, errors: list[KafkaError]) -> None:
        producer = self._producer
        if producer is None:
            producer = self._producer = Producer(
                self._settings.kafka_config(
                    **{
                        "enable.idempotence": True,  # chunks land once and in order
                        "compression.type": "lz4",
                        "linger.ms": 5,
                        "message.max.bytes": _TOPIC_MAX_MESSAGE,
                        "log_level": 3,
                    }
                )
            )

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                errors.append(error)

        while True:
            try:
                producer.produce(
                    self.topic, value=value, key=key.encode(), partition=target, on_delivery=delivered
                )
                return
            except BufferError:  # the local queue is full: let it drain
                producer.poll(0.1)

    def _flush(self, errors: list[KafkaError], *, what: str) -> None:
        producer = self._producer
        remaining = producer.flush(self._timeout_s) if producer is not None else 0
        if remaining or errors:
            reason = errors[0] if errors else f"{remaining} messages unacknowledged after {self._timeout_s} s"
            raise KafkaUnavailable(
                f"could not write {what} to {self.topic}: {reason}. The previous snapshot stays the "
                "newest; check the broker (`freshrec broker status`)."
            )

    # ------------------------------------------------------------------ restoring

    def restore(self, partitions: Collection[int] | None = None) -> dict[int, Snapshot]:
        """The newest complete snapshot of each of ``partitions`` (every partition when None) that
        has one, read from the changelog to its high watermark. Also learns which generations are
        on the topic, so that this writer's next snapshot of these partitions cleans them up."""
        if not self.partitions:  # a topic opened without creating it: is it there now?
            self.partitions = ensure_changelog(
                self._settings, self.topic, timeout_s=self._timeout_s, create=False
            )
            if not self.partitions:
                return {}
        wanted = None if partitions is None else set(partitions)
        targets = (
            sorted(range(self.partitions))
            if wanted is None
            else sorted({self._changelog_partition(p) for p in wanted})
        )
        seen: dict[int, dict[str, _Generation]] = {}
        chunks: dict[tuple[int, str], dict[int, bytes]] = {}
        for message in self._read(targets):
            try:
                key = (message.key() or b"").decode()
                parts = key.split("/")
                partition = int(parts[0])
            except (UnicodeDecodeError, ValueError):
                logger.warning("ignoring a message with key %r on %s", message.key(), self.topic)
                continue
            if (wanted is not None and partition not in wanted) or len(parts) not in (2, 3):
                continue
            generation, value = parts[1], message.value()
            generations = seen.setdefault(partition, {})
            if len(parts) == 3:
                index = int(parts[2]) if parts[2].isdigit() else -1
                if value is None:
                    chunks.get((partition, generation), {}).pop(index, None)
                    if generation in generations:
                        generations[generation].chunks.discard(index)
                    continue
                chunks.setdefault((partition, generation), {})[index] = value
                generations.setdefault(generation, _Generation()).chunks.add(index)
            elif value is None:
                entry = generations.get(generation)
                if entry is not None:
                    entry.manifest = None
                    if not entry.chunks:
                        del generations[generation]
            else:
                try:
                    manifest = Manifest.decode(value)
                except ValueError as exc:
                    logger.warning("ignoring a bad manifest %s on %s: %s", key, self.topic, exc)
                    continue
                # Re-inserted: the dict's order is the log order of the manifests.
                entry = generations.pop(generation, None) or _Generation()
                entry.manifest = manifest
                generations[generation] = entry
        restored: dict[int, Snapshot] = {}
        for partition, generations in seen.items():
            for generation in reversed([g for g, entry in generations.items() if entry.manifest]):
                found = generations[generation].manifest
                assert found is not None
                snapshot = _assemble(found, chunks.get((partition, generation), {}))
                if snapshot is not None:
                    restored[partition] = snapshot
                    break
                logger.warning(
                    "snapshot %s of partition %d on %s is incomplete or corrupt: trying an older one",
                    generation,
                    partition,
                    self.topic,
                )
        with self._lock:
            for partition, generations in seen.items():
                self._live[partition] = generations
                if partition in restored:
                    self._good[partition] = restored[partition].manifest.generation
                else:
                    self._good.pop(partition, None)
        return restored

    def _read(self, targets: list[int]) -> Iterator[Message]:
        """Every message of the changelog partitions ``targets``, up to their high watermarks."""
        consumer = Consumer(
            self._settings.kafka_config(
                **{
                    "group.id": f"{self.topic}.restore",  # never joined, never committed
                    "enable.auto.commit": False,
                    "enable.partition.eof": False,
                    "fetch.max.bytes": 64 * 1024 * 1024,
                    "log_level": 3,
                }
            )
        )
        try:
            ends: dict[int, int] = {}
            deadline = time.monotonic() + self._timeout_s
            for target in targets:
                low, high = self._watermarks(consumer, target, deadline)
                if high > low:
                    ends[target] = high
            if not ends:
                return
            consumer.assign([TopicPartition(self.topic, t, OFFSET_BEGINNING) for t in ends])
            pending = dict(ends)
            while pending:
                if time.monotonic() > deadline:
                    raise KafkaUnavailable(
                        f"restoring from {self.topic} did not reach its end within {self._timeout_s} s "
                        f"(partitions {sorted(pending)} left); is the broker overloaded?"
                    )
                for message in consumer.consume(1000, 0.2):
                    error = message.error()
                    if error is not None:
                        check_consume_error(error)
                        continue
                    where, offset = message.partition(), message.offset()
                    assert where is not None and offset is not None  # set once error() is None
                    if where in pending:
                        yield message
                        if offset + 1 >= pending[where]:
                            del pending[where]
                if pending:  # a compacted tail can end before the high watermark: ask for the position
                    for tp in consumer.position([TopicPartition(self.topic, t) for t in pending]):
                        if tp.offset >= pending.get(tp.partition, 0):
                            pending.pop(tp.partition, None)
        finally:
            consumer.close()

    def _watermarks(self, consumer: Consumer, target: int, deadline: float) -> tuple[int, int]:
        """Low and high watermarks of a changelog partition, retrying while a new topic's leaders
        are still being elected."""
        while True:
            try:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, target), timeout=max(deadline - time.monotonic(), 0.1)
                )
                return int(low), int(high)
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if (not error.retriable() and error.code() not in _NOT_READY) or time.monotonic() > deadline:
                    raise KafkaUnavailable(
                        f"cannot read the state changelog {self.topic}: {exc}. Is the broker up?"
                    ) from exc
                time.sleep(0.1)

    def close(self) -> None:
        """Deliver what is queued (tombstones) and release the producer."""
        if self._producer is not None:
            self._producer.flush(self._timeout_s)
            self._producer = None

    def __enter__(self) -> Changelog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _assemble(manifest: Manifest, chunks: Mapping[int, bytes]) -> Snapshot | None:
    """The snapshot if every chunk is there and the payload matches its checksum, else None."""
    if any(index not in chunks for index in range(manifest.chunks)):
        return None
    payload = b"".join(chunks[index] for index in range(manifest.chunks))
    if len(payload) != manifest.size or hashlib.sha256(payload).hexdigest() != manifest.sha256:
        return None
    return Snapshot(manifest, payload)

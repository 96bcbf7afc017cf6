"""The model chain's log on Kafka: where a version is committed, and how to read it back.

**The commit point.** A version exists when the Kafka transaction that carries all of its chunks
commits on ``model.sparse`` or ``model.dense``; nothing else makes it exist. Replicas read both
topics ``read_committed``, so a publisher killed before its commit leaves nothing any replica can
apply (the broker aborts the open transaction when the next publisher with the same
``transactional.id`` starts, or after ``transaction.timeout.ms``). The snapshot store and the
``model_updates`` table are written after the commit and are *derived*: each publisher, before every
publish, reads the log back (:func:`read_log`) and rolls forward whatever a killed publisher
committed but did not store or record. Hence, whatever is killed when:

- **one payload per number**: the next number is one more than the highest number on the topics,
  committed *or not*, in the store or in the record; a number that reached the log, even in an aborted
  transaction, is never used again;
- **no gaps**: a number whose transaction was aborted is recorded as ``kind = 'aborted'``, so
  ``model list`` counts 1, 2, 3… and every real version's parent is a listed real version;
- **a replica serves only what the chain records**: it sees only committed versions, and every
  committed version reaches the store and the record at the next publish at the latest;
- **one head**: every publisher of a chain uses one ``transactional.id``; starting one fences the
  previous one, whose next commit fails instead of forking the chain.

Each chunk of an update carries a header (:class:`ChunkHeader`): the version, its parent, its kind,
the chunk's index and count, and the sha256 of the whole payload.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from freshrec.errors import KafkaUnavailable
from freshrec.settings import Settings
from publishers.updates import ModelUpdate, decode, payload_checksum
from streams.admin import check_consume_error

__all__ = [
    "CHUNK_HEADER",
    "ChunkAssembler",
    "ChunkHeader",
    "Committed",
    "ModelLog",
    "read_log",
    "transactional_id",
]

logger = logging.getLogger(__name__)

CHUNK_HEADER = "freshrec-update"


def transactional_id(settings: Settings) -> str:
    """The one ``transactional.id`` of a chain's publishers (its topic prefix names the chain)."""
    return f"{settings.topic_prefix}freshrec.model-publisher"


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """The Kafka header of one chunk: ``version:parent:kind:index:count:sha256``."""

    version: int
    parent: int
    kind: str
    index: int
    count: int
    checksum: str

    def encode(self) -> bytes:
        fields = (self.version, self.parent, self.kind, self.index, self.count, self.checksum)
        return ":".join(str(field) for field in fields).encode()

    @classmethod
    def parse(cls, raw: bytes | str) -> ChunkHeader:
        """Raises ``ValueError`` on a header that is not six colon-separated fields."""
        text = raw.decode() if isinstance(raw, bytes) else raw
        version, parent, kind, index, count, checksum = text.split(":")
        return cls(int(version), int(parent), kind, int(index), int(count), checksum)

    @classmethod
    def of(cls, message: Message) -> ChunkHeader | None:
        """The header of a chunk message; None when it has none (not written by a publisher)."""
        raw = dict(message.headers() or []).get(CHUNK_HEADER)
        return None if raw is None else cls.parse(raw)


class ChunkAssembler:
    """Joins the chunks of each update; hands back whole payloads whose sha256 matches."""

    def __init__(self, *, max_partial: int = 8) -> None:
        self._parts: dict[tuple[int, str], dict[int, bytes]] = {}
        self._max_partial = max_partial

    def add(self, header: ChunkHeader, value: bytes) -> tuple[bytes | None, str | None]:
        """Add one chunk. Returns (the payload once complete, an error when that payload is bad)."""
        key = (header.version, header.checksum)
        parts = self._parts.setdefault(key, {})
        parts[header.index] = value
        if len(parts) < header.count:
            while len(self._parts) > self._max_partial:  # an update whose publisher died mid-way
                del self._parts[min(self._parts)]
            return None, None
        del self._parts[key]
        payload = b"".join(parts[i] for i in range(header.count))
        if payload_checksum(payload) != header.checksum:
            return None, "payload sha256 mismatch"
        return payload, None


@dataclass(frozen=True, slots=True)
class Committed:
    """One whole committed update read back from the log, with what ``model_updates`` records."""

    update: ModelUpdate
    topic: str
    bytes: int
    chunks: int
    checksum: str


@dataclass(frozen=True, slots=True)
class ModelLog:
    """What the model topics hold from some point on."""

    committed: tuple[Committed, ...]  # whole, checksum-verified, committed updates, in version order
    headers: dict[int, ChunkHeader] = field(default_factory=dict)  # a header of every number seen
    highest: int = 0  # the highest version number on the topics, committed or not (0: none)


def read_log(
    settings: Settings, *, since_ms: int | None, known: Collection[int] = (), timeout_s: float = 60.0
) -> ModelLog:
    """Read both model topics from ``since_ms`` (producer time; None: from the beginning) to their ends.

    Two passes over the same range: ``read_uncommitted`` for every number that ever reached the log
    (aborted transactions included), then ``read_committed`` for the updates that exist. The second
    pass is skipped when every number found is in ``known`` (the caller has them all already), so
    a publisher's steady-state check reads the payloads once, not twice.
    """
    headers: dict[int, ChunkHeader] = {}
    for message in _messages(settings, "read_uncommitted", since_ms, timeout_s):
        header = _header(message)
        if header is not None:
            headers.setdefault(header.version, header)
    if all(version in known for version in headers):
        return ModelLog(committed=(), headers=headers, highest=max(headers, default=0))
    assembler = ChunkAssembler(max_partial=1 << 20)  # keep every partial: it is a bounded read
    committed: dict[int, Committed] = {}
    for message in _messages(settings, "read_committed", since_ms, timeout_s):
        header = _header(message)
        if header is None:
            continue
        payload, problem = assembler.add(header, message.value() or b"")
        if problem is not None:
            logger.warning("committed v%d on %s is corrupt (%s)", header.version, message.topic(), problem)
        if payload is None:
            continue
        committed[header.version] = Committed(
            update=decode(payload),
            topic=message.topic() or "",
            bytes=len(payload),
            chunks=header.count,
            checksum=header.checksum,
        )
    ordered = tuple(committed[v] for v in sorted(committed))
    return ModelLog(committed=ordered, headers=headers, highest=max(headers, default=0))


def _header(message: Message) -> ChunkHeader | None:
    try:
        return ChunkHeader.of(message)
    except ValueError:
        logger.warning("malformed %s header on %s ignored", CHUNK_HEADER, message.topic())
        return None


def _messages(
    settings: Settings, isolation: str, since_ms: int | None, timeout_s: float
) -> Iterator[Message]:
    """Every message of the model topics from ``since_ms`` to the end as of now, in offset order per
    topic. The end is the partition's end for ``isolation`` (for ``read_committed``, the last stable
    offset), signalled by librdkafka's partition-EOF event."""
    topics = [settings.topics.model_sparse, settings.topics.model_dense]
    consumer = Consumer(
        settings.kafka_config(
            **{
                "group.id": f"freshrec-chain-{uuid.uuid4().hex}",  # reads only; positions are not kept
                "enable.auto.commit": False,
                "isolation.level": isolation,
                "enable.partition.eof": True,
                "fetch.wait.max.ms": 10,  # the end is reached when a fetch comes back empty: soon
                "fetch.max.bytes": 64 << 20,
                "log_level": 3,
            }
        )
    )
    deadline = time.monotonic() + timeout_s
    try:
        if since_ms is None:
            start = [TopicPartition(topic, 0, OFFSET_BEGINNING) for topic in topics]
        else:
            wanted = [TopicPartition(topic, 0, max(0, since_ms)) for topic in topics]
            start = consumer.offsets_for_times(wanted, timeout=timeout_s)
        consumer.assign(start)
        ended: set[str] = set()
        while len(ended) < len(topics):
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"could not read the model topics to their end within {timeout_s:.0f} s "
                    f"({isolation}; done: {sorted(ended)}). Is Kafka at {settings.bootstrap} up?"
                )
            for message in consumer.consume(500, 0.05):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        ended.add(message.topic() or "")
                    else:
                        check_consume_error(error)
                    continue
                yield message
    finally:
        consumer.close()

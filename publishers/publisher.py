"""Publishing model versions: sparse deltas often, dense parameters less often, snapshots on demand.

Each publish makes the next version in the chain (parent = the head of the chain) and then, in this
order (see :mod:`publishers.chain` for why this order survives a kill at any line):

1. **sync**: reads the model topics back from a little before the head was made, rolls forward
   into the snapshot store and ``model_updates`` any version a killed publisher committed but did not
   store or record, records as ``aborted`` any number whose transaction never committed, and takes
   the next number above every number found anywhere;
2. **commit**: sends the update cut into chunks under the topic's message limit (``model.sparse``
   for sparse deltas, ``model.dense`` for dense updates and snapshots; one partition each, so a chain
   stays in order) in one Kafka transaction, and commits it: *this* is when the version exists;
3. **store**: writes the whole version to the :class:`~publishers.snapshots.SnapshotStore` (what
   replicas heal to and rollback reads);
4. **record**: inserts the update into ClickHouse ``model_updates`` (when ClickHouse is down the
   publish still succeeds, and the next publish's sync records it).

**One head**: the chain's publishers share one ``transactional.id``, so starting a publisher (e.g.
``freshrec model rollback`` beside a running trainer) fences the previous one. A publisher whose
sync finds that the head moved adopts it and raises :class:`~freshrec.errors.VersionConflict`; the
fine-tune's retry warm-starts from it. A fenced publisher gets a new producer and tries once more.

**What a sparse delta holds**: the rows the trainer says it touched (its delta tracker), with their
current values, and the new item id of rows assigned or evicted since the last publish; the dense
parameters of the new version stay those last published. So between dense publishes the served model
is the newest embeddings over the last published dense layers (Monolith's split of sparse and dense
update frequencies).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from confluent_kafka import KafkaException, Producer

from freshrec.errors import ConfigError, KafkaUnavailable, VersionConflict
from freshrec.faults import fault_point
from freshrec.settings import Settings
from freshrec.store import Store
from publishers.chain import CHUNK_HEADER, ChunkHeader, Committed, read_log, transactional_id
from publishers.snapshots import SnapshotStore
from publishers.updates import (
    ModelUpdate,
    ModelVersion,
    apply,
    check_rows,
    dense_child,
    dense_update,
    encode,
    payload_checksum,
    snapshot_update,
    sparse_child,
    sparse_update,
)
from streams.admin import ensure_topics

__all__ = ["CHUNK_HEADER", "MODEL_UPDATE_COLUMNS", "Published", "Publisher", "list_updates"]

logger = logging.getLogger(__name__)

Array = npt.NDArray[Any]
MODEL_KEY = b"freshrec-model"
MODEL_UPDATE_COLUMNS = (
    "version", "parent", "kind", "topic", "bytes", "rows", "chunks", "checksum", "state_checksum",
    "rollback_of", "run_id", "created_at",
)  # fmt: skip
# How far before the head's creation the sync starts reading the topics: covers the head's own
# chunks (produced after it was built) and clocks of publishers on other hosts that run this far behind.
SYNC_SLACK_MS = 120_000
# A publish (all chunks and the commit) must finish within this, or the broker aborts it.
TRANSACTION_TIMEOUT_MS = 300_000


@dataclass(frozen=True, slots=True)
class Published:
    """One update as sent: what ``model_updates`` records."""

    version: int
    parent: int
    kind: str
    topic: str
    bytes: int
    rows: int
    chunks: int
    checksum: str
    seconds: float


class Publisher:
    """Turns trainer parameters into the next version and commits it; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        snapshots: SnapshotStore,
        store: Store | None = None,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        if not 1024 <= chunk_bytes <= 7 << 20:
            raise ConfigError("chunk_bytes must be between 1 KiB and 7 MiB (the topics take 8 MiB)")
        self._settings = settings
        self.snapshots = snapshots
        self.store = store
        self.chunk_bytes = chunk_bytes
        ensure_topics(settings)
        self._producer = self._new_producer()  # fences any earlier publisher of this chain
        snapshots.clean()  # its temporary files, if it died writing one
        self.latest: ModelVersion | None = None
        self._highest = 0
        self._sync(adopt=True)

    @property
    def next_version(self) -> int:
        """One more than every number in the log (committed or not), the store and the record."""
        return max(self._highest, 0 if self.latest is None else self.latest.version) + 1

    # -- the three kinds ---------------------------------------------------------------------------

    def publish_snapshot(
        self,
        params: Mapping[str, Array],
        item_ids: Sequence[str | None],
        *,
        config: Mapping[str, Any],
        sparse_tables: Sequence[str],
        run_id: str = "",
        rollback_of: int | None = None,
    ) -> Published:
        """The whole model as the next version (first publish, bootstrap on demand, rollback).
        ``sparse_tables`` names the embedding tables later versions publish by rows."""

        def build(version: int) -> tuple[ModelUpdate, ModelVersion]:
            parent = 0 if self.latest is None else self.latest.version
            model = ModelVersion.build(
                version,
                params,
                item_ids,
                config=config,
                rollback_of=rollback_of,
                sparse_tables=sparse_tables,
            )
            return snapshot_update(model, parent=parent, run_id=run_id), model

        return self._publish(build)

    def publish_sparse(
        self,
        params: Mapping[str, Array],
        item_ids: Sequence[str | None],
        rows: npt.NDArray[np.int64],
        *,
        run_id: str = "",
    ) -> Published:
        """Rows ``rows`` of the tables in ``params`` (and the ids of rows that changed hands)."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        check_rows(self._require_latest(), params, item_ids)

        def build(version: int) -> tuple[ModelUpdate, ModelVersion]:
            base = self._require_latest()
            model = sparse_child(base, version, params, item_ids, rows)
            return sparse_update(base, model, rows=rows, run_id=run_id), model

        return self._publish(build)

    def publish_dense(self, params: Mapping[str, Array], *, run_id: str = "") -> Published:
        """Every parameter that is not an embedding table."""

        def build(version: int) -> tuple[ModelUpdate, ModelVersion]:
            base = self._require_latest()
            model = dense_child(base, version, params)
            return dense_update(base, model, run_id=run_id), model

        return self._publish(build)

    def rollback(self, to: int) -> Published:
        """Publish version ``to``'s parameters again, as a new snapshot at the head of the chain."""
        old = self.snapshots.load(to)
        return self.publish_snapshot(
            old.params, old.item_ids, config=old.config, sparse_tables=old.sparse_tables, rollback_of=to
        )

    def close(self) -> None:
        """Release the Kafka client (the publisher cannot be used after). Every publish has already
        committed or aborted, so nothing is queued."""
        if hasattr(self, "_producer"):
            self._producer.flush(30)
            del self._producer  # the librdkafka client goes now, not whenever a cycle is collected

    # -- the chain ---------------------------------------------------------------------------------

    def _new_producer(self) -> Producer:
        producer = Producer(
            self._settings.kafka_config(
                **{
                    "transactional.id": transactional_id(self._settings),
                    "transaction.timeout.ms": TRANSACTION_TIMEOUT_MS,
                    "enable.idempotence": True,
                    "acks": "all",
                    "message.max.bytes": self.chunk_bytes + 64 * 1024,
                    "linger.ms": 5,
                    "log_level": 3,
                }
            )
        )
        try:
            producer.init_transactions(60)  # aborts what a killed publisher left open
        except KafkaException as exc:
            raise KafkaUnavailable(
                f"cannot start a model publisher's Kafka transactions at {self._settings.bootstrap}: {exc}"
            ) from exc
        return producer

    def _require_latest(self) -> ModelVersion:
        if self.latest is None:
            raise ConfigError("nothing published yet: the first publish must be a snapshot")
        return self.latest

    def _sync(self, *, adopt: bool = False) -> None:
        """Bring the snapshot store and the record up to the log, and learn the highest number used.

        Raises :class:`VersionConflict` (after adopting the head) when the head is not the version
        this publisher last left, unless ``adopt`` (at start, when it has none yet).
        """
        mine = 0 if self.latest is None else self.latest.version
        stored = self.snapshots.latest_version()
        # This publisher's own head is in memory: read the store only when another one moved it.
        head = self.latest if stored is not None and stored == mine else self.snapshots.latest()
        recorded = self._recorded()
        since = None if head is None else head.created_at_ms - SYNC_SLACK_MS
        if recorded is not None:
            known: set[int] = {
                v for v, kind in recorded.items() if kind != "aborted" and (head is None or v <= head.version)
            }
        else:
            known = set() if head is None else set(range(1, head.version + 1))
        log = read_log(self._settings, since_ms=since, known=known)
        for entry in log.committed:
            update = entry.update
            if head is None or update.version > head.version:
                try:
                    model = apply(None if update.kind == "snapshot" else head, update)
                except ValueError as exc:  # its parent is not the head: the store lost versions
                    raise KafkaUnavailable(
                        f"v{update.version} is committed on {entry.topic} but cannot be rolled forward "
                        f"onto v{0 if head is None else head.version}: {exc}. Restore the snapshot store "
                        f"{self.snapshots.directory}."
                    ) from exc
                self.snapshots.save(model)
                head = model
                logger.warning(
                    "v%d was committed but not stored (its publisher died): rolled forward", update.version
                )
            if recorded is not None and recorded.get(update.version) not in (update.kind, None):
                recorded.pop(update.version)  # recorded as aborted while its commit was under way
            if recorded is not None and update.version not in recorded:
                self._record(update, _published(entry))
                recorded[update.version] = update.kind
        committed = {entry.update.version for entry in log.committed}
        for version, header in sorted(log.headers.items()):
            if recorded is not None and version not in committed and version not in recorded:
                self._record_aborted(header)
                recorded[version] = "aborted"
        highest_recorded = max(recorded, default=0) if recorded else 0
        self._highest = max(log.highest, highest_recorded, 0 if head is None else head.version)
        if head is not None and head.version != mine:
            self.latest = head
            if not adopt:
                raise VersionConflict(
                    f"the model chain is at v{head.version}, not at v{mine} as this publisher last left "
                    "it (a rollback or another trainer published); adopted it, retry to build on it"
                )

    def _publish(self, build: Callable[[int], tuple[ModelUpdate, ModelVersion]]) -> Published:
        for attempt in (1, 2):
            self._sync()
            update, model = build(self.next_version)
            try:
                return self._send(update, model)
            except _Fenced as exc:
                if attempt == 2:
                    raise KafkaUnavailable(f"model publisher fenced twice in a row: {exc}") from exc
                logger.warning("this publisher was fenced by a newer one (%s): new producer, once more", exc)
                self._producer = self._new_producer()
        raise AssertionError("unreachable")

    def _send(self, update: ModelUpdate, model: ModelVersion) -> Published:
        started = time.monotonic()
        payload = encode(update)
        checksum = payload_checksum(payload)
        topics = self._settings.topics
        topic = topics.model_sparse if update.kind == "sparse" else topics.model_dense
        step = self.chunk_bytes
        chunks = [payload[i : i + step] for i in range(0, len(payload), step)] or [b""]
        producer = self._producer
        try:
            producer.begin_transaction()
            for index, chunk in enumerate(chunks):
                header = ChunkHeader(update.version, update.parent, update.kind, index, len(chunks), checksum)
                while True:
                    try:
                        producer.produce(
                            topic, value=chunk, key=MODEL_KEY, headers=[(CHUNK_HEADER, header.encode())]
                        )
                        break
                    except BufferError:  # the local queue is full: let deliveries drain it
                        producer.poll(0.1)
                if index == 0:
                    producer.flush(60)  # the number is now in the log, even if the commit never comes
                    fault_point("publisher.after_first_chunk")
            producer.commit_transaction(60)
        except KafkaException as exc:
            error = exc.args[0]
            if error.fatal():
                raise _Fenced(str(error)) from exc
            try:
                producer.abort_transaction(30)
            except KafkaException:
                logger.exception("could not abort v%d's transaction", update.version)
            raise KafkaUnavailable(
                f"model version {update.version} was not committed to {topic}: {exc}"
            ) from exc
        fault_point("publisher.after_commit")
        published = Published(
            version=update.version,
            parent=update.parent,
            kind=update.kind,
            topic=topic,
            bytes=len(payload),
            rows=update.rows,
            chunks=len(chunks),
            checksum=checksum,
            seconds=time.monotonic() - started,
        )
        self.snapshots.save(model)
        self.latest = model
        self._highest = max(self._highest, model.version)
        fault_point("publisher.after_store")
        if self.store is not None:
            self._record(update, published)
        fault_point("publisher.after_record")
        logger.info(
            "published v%d (%s, parent v%d): %d rows, %d bytes in %d chunks",
            update.version,
            update.kind,
            update.parent,
            published.rows,
            published.bytes,
            published.chunks,
        )
        return published

    # -- the record --------------------------------------------------------------------------------

    def _recorded(self) -> dict[int, str] | None:
        """Every recorded version and its kind; None without ClickHouse (or while it is down)."""
        if self.store is None:
            return None
        try:
            rows = self.store.rows(f"SELECT version, kind FROM {self.store.table('model_updates')} FINAL")
        except Exception as exc:  # ClickHouse down: the next sync records what this one cannot
            logger.warning("model_updates unreadable (%s): the record catches up at a later publish", exc)
            return None
        return {int(version): str(kind) for version, kind in rows}

    def _record(self, update: ModelUpdate, published: Published) -> None:
        self._insert(
            published.version,
            published.parent,
            published.kind,
            published.topic,
            published.bytes,
            published.rows,
            published.chunks,
            published.checksum,
            update.state_checksum,
            update.rollback_of,
            update.run_id,
            datetime.fromtimestamp(update.created_at_ms / 1000, UTC),
        )

    def _record_aborted(self, header: ChunkHeader) -> None:
        """A number that reached the log in a transaction that never committed: listed, never reused."""
        logger.warning("v%d never committed (its publisher died or was fenced): recorded as aborted",
                       header.version)  # fmt: skip
        self._insert(
            header.version, header.parent, "aborted", "", 0, 0, header.count, header.checksum, "", None, "",
            datetime.now(UTC),
        )  # fmt: skip

    def _insert(self, *values: Any) -> None:
        assert self.store is not None
        try:
            self.store.insert("model_updates", [[v] for v in values], column_names=MODEL_UPDATE_COLUMNS)
        except Exception as exc:  # the version is committed; the next publish's sync records it
            logger.warning("could not record v%s in model_updates (%s): recorded at a later publish",
                           values[0], exc)  # fmt: skip


class _Fenced(Exception):
    """A newer publisher of the chain took over this one's transactional id."""


def _published(entry: Committed) -> Published:
    update = entry.update
    return Published(
        version=update.version,
        parent=update.parent,
        kind=update.kind,
        topic=entry.topic,
        bytes=entry.bytes,
        rows=update.rows,
        chunks=entry.chunks,
        checksum=entry.checksum,
        seconds=0.0,
    )


def list_updates(store: Store) -> list[dict[str, Any]]:
    """Every recorded update, oldest first: what ``freshrec model list`` prints."""
    columns, rows = store.query(
        "SELECT version, parent, kind, bytes, rows, created_at, rollback_of, chunks, checksum "
        f"FROM {store.table('model_updates')} FINAL ORDER BY version"
    )
    return [dict(zip(columns, row, strict=True)) for row in rows]

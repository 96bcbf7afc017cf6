"""Publishing model versions: sparse deltas often, dense parameters less often, snapshots on demand.

Each publish makes the next version in the chain (parent = the version published before it), then,
in this order: sends the update to Kafka cut into chunks under the topic's message limit
(``model.sparse`` for sparse deltas, ``model.dense`` for dense updates and snapshots; one partition
each, so a chain stays in order) and waits for the broker to acknowledge every chunk; writes the
whole version to the :class:`~publishers.snapshots.SnapshotStore` (what replicas heal to and
rollback reads); records the update in ClickHouse ``model_updates``. A version whose delivery failed
is therefore never in the store for a replica to heal to.

**One head**: before building a version the publisher checks that the store's newest version is the
one it last published; if another publisher moved the chain on (``freshrec model rollback`` beside a
running trainer), it adopts that head and raises
:class:`~freshrec.errors.VersionConflict`, and the fine-tune's retry warm-starts from it, instead of
two versions with one number.

**What a sparse delta holds**: the rows the trainer says it touched (its delta tracker), with their
current values, and the new item id of rows assigned or evicted since the last publish; the dense
parameters of the new version stay those last published. So between dense publishes the served model
is the newest embeddings over the last published dense layers (Monolith's split of sparse and dense
update frequencies).

**Delivery**: a publish returns only once Kafka has every chunk (``acks=all``, idempotent producer);
a failure raises and the version is neither stored nor recorded (the next publish reuses its
number; a replica that saw part of it discards the incomplete chunks).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from confluent_kafka import KafkaError, Message, Producer

from freshrec.errors import ConfigError, KafkaUnavailable, VersionConflict
from freshrec.settings import Settings
from freshrec.store import Store
from learners.sasrec import SPARSE_TABLES
from publishers.snapshots import SnapshotStore
from publishers.updates import (
    ModelUpdate,
    ModelVersion,
    dense_update,
    encode,
    payload_checksum,
    snapshot_update,
    sparse_update,
)
from streams.admin import ensure_topics

__all__ = ["CHUNK_HEADER", "MODEL_UPDATE_COLUMNS", "Published", "Publisher", "list_updates"]

logger = logging.getLogger(__name__)

Array = npt.NDArray[Any]
# Kafka headers of every chunk: which version, which chunk, and the checksum of the whole payload.
CHUNK_HEADER = "freshrec-update"
MODEL_KEY = b"freshrec-model"
MODEL_UPDATE_COLUMNS = (
    "version", "parent", "kind", "topic", "bytes", "rows", "chunks", "checksum", "state_checksum",
    "rollback_of", "run_id", "created_at",
)  # fmt: skip


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
    """Turns trainer parameters into the next version and sends it; see the module docstring."""

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
        self._producer = Producer(
            settings.kafka_config(
                **{
                    "enable.idempotence": True,
                    "acks": "all",
                    "message.max.bytes": chunk_bytes + 64 * 1024,
                    "linger.ms": 5,
                    "log_level": 3,
                }
            )
        )
        self.latest: ModelVersion | None = snapshots.latest()

    @property
    def next_version(self) -> int:
        return 1 if self.latest is None else self.latest.version + 1

    # -- the three kinds ---------------------------------------------------------------------------

    def publish_snapshot(
        self,
        params: Mapping[str, Array],
        item_ids: Sequence[str | None],
        *,
        config: Mapping[str, Any],
        run_id: str = "",
        rollback_of: int | None = None,
    ) -> Published:
        """The whole model as the next version (first publish, bootstrap on demand, rollback)."""
        self._check_head()
        parent = 0 if self.latest is None else self.latest.version
        model = ModelVersion.build(
            self.next_version, params, item_ids, config=config, rollback_of=rollback_of
        )
        return self._send(snapshot_update(model, parent=parent, run_id=run_id), model)

    def publish_sparse(
        self,
        params: Mapping[str, Array],
        item_ids: Sequence[str | None],
        rows: npt.NDArray[np.int64],
        *,
        run_id: str = "",
    ) -> Published:
        """Rows ``rows`` of the tables in ``params`` (and the ids of rows that changed hands)."""
        self._check_head()
        base = self._require_latest()
        child_params = dict(base.params)
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        size = len(item_ids)
        for table in SPARSE_TABLES:
            source = params[table]
            if source.shape[0] != size:
                raise ValueError(f"{table} has {source.shape[0]} rows but item_ids has {size}")
            old = base.params[table]
            grown = np.zeros((size, *old.shape[1:]), dtype=np.float32)
            grown[: min(size, old.shape[0])] = old[:size]
            grown[rows] = source[rows]
            child_params[table] = grown
        ids = (list(base.item_ids) + [None] * size)[:size]
        for row in rows.tolist():
            ids[row] = item_ids[row]
        model = ModelVersion.build(self.next_version, child_params, ids, config=base.config)
        return self._send(sparse_update(base, model, rows=rows, run_id=run_id), model)

    def publish_dense(self, params: Mapping[str, Array], *, run_id: str = "") -> Published:
        """Every parameter that is not an embedding table."""
        self._check_head()
        base = self._require_latest()
        child_params = dict(base.params)
        for name, value in params.items():
            if name not in SPARSE_TABLES:
                child_params[name] = value
        model = ModelVersion.build(self.next_version, child_params, base.item_ids, config=base.config)
        return self._send(dense_update(base, model, run_id=run_id), model)

    def rollback(self, to: int) -> Published:
        """Publish version ``to``'s parameters again, as a new snapshot at the head of the chain."""
        old = self.snapshots.load(to)
        return self.publish_snapshot(old.params, old.item_ids, config=old.config, rollback_of=to)

    def close(self) -> None:
        """Deliver what is queued and release the Kafka client (the publisher cannot be used after)."""
        if hasattr(self, "_producer"):
            self._producer.flush(30)
            del self._producer  # the librdkafka client goes now, not whenever a cycle is collected

    # -- sending -----------------------------------------------------------------------------------

    def _require_latest(self) -> ModelVersion:
        if self.latest is None:
            raise ConfigError("nothing published yet: the first publish must be a snapshot")
        return self.latest

    def _check_head(self) -> None:
        """Raise :class:`VersionConflict` (after adopting it) if the chain's head moved under us."""
        newest = self.snapshots.latest_version()
        mine = 0 if self.latest is None else self.latest.version
        if newest is not None and newest != mine:
            self.latest = self.snapshots.load(newest)
            raise VersionConflict(
                f"the model chain is at v{newest}, not at v{mine} as this publisher last left it "
                "(a rollback or another trainer published); adopted it, retry to build on it"
            )

    def _send(self, update: ModelUpdate, model: ModelVersion) -> Published:
        started = time.monotonic()
        payload = encode(update)
        checksum = payload_checksum(payload)
        topics = self._settings.topics
        topic = topics.model_sparse if update.kind == "sparse" else topics.model_dense
        chunks = [payload[i : i + self.chunk_bytes] for i in range(0, len(payload), self.chunk_bytes)] or [
            b""
        ]
        errors: list[KafkaError] = []

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                errors.append(error)

        for index, chunk in enumerate(chunks):
            header = f"{update.version}:{update.parent}:{update.kind}:{index}:{len(chunks)}:{checksum}"
            while True:
                try:
                    self._producer.produce(
                        topic,
                        value=chunk,
                        key=MODEL_KEY,
                        headers=[(CHUNK_HEADER, header.encode())],
                        on_delivery=delivered,
                    )
                    break
                except BufferError:  # the local queue is full: let deliveries drain it
                    self._producer.poll(0.1)
        remaining = self._producer.flush(60)
        if remaining or errors:
            raise KafkaUnavailable(
                f"model version {update.version} was not fully delivered to {topic}: "
                f"{remaining} chunks pending, errors {errors[:3]}"
            )
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
        if self.store is not None:
            self._record(update, published)
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

    def _record(self, update: ModelUpdate, published: Published) -> None:
        assert self.store is not None
        self.store.insert(
            "model_updates",
            [
                [published.version],
                [published.parent],
                [published.kind],
                [published.topic],
                [published.bytes],
                [published.rows],
                [published.chunks],
                [published.checksum],
                [update.state_checksum],
                [update.rollback_of],
                [update.run_id],
                [datetime.fromtimestamp(update.created_at_ms / 1000, UTC)],
            ],
            column_names=MODEL_UPDATE_COLUMNS,
        )


def list_updates(store: Store) -> list[dict[str, Any]]:
    """Every recorded update, oldest first: what ``freshrec model list`` prints."""
    columns, rows = store.query(
        "SELECT version, parent, kind, bytes, rows, created_at, rollback_of, chunks, checksum "
        f"FROM {store.table('model_updates')} FINAL ORDER BY version"
    )
    return [dict(zip(columns, row, strict=True)) for row in rows]

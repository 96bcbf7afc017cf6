"""Model versions and updates without Kafka: wire format, application, checksums, the snapshot store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freshrec.errors import ConfigError
from publishers.chain import ChunkAssembler, ChunkHeader
from publishers.replica import Replica
from publishers.snapshots import SnapshotStore
from publishers.updates import (
    ChecksumMismatch,
    ModelVersion,
    apply,
    decode,
    dense_update,
    encode,
    payload_checksum,
    snapshot_update,
    sparse_update,
)

TABLE = "item_emb.weight"


def _version(version: int, rows: int = 6, dim: int = 4, seed: int = 0) -> ModelVersion:
    rng = np.random.default_rng(seed)
    params = {
        TABLE: rng.normal(size=(rows, dim)).astype(np.float32),
        "w": rng.normal(size=3).astype(np.float32),
    }
    return ModelVersion.build(
        version,
        params,
        [None, *(f"i{r}" for r in range(1, rows))],
        config={"dim": dim},
        sparse_tables=[TABLE],
    )


def _edit(base: ModelVersion, version: int, rows: list[int], grow: int = 0) -> ModelVersion:
    table = np.array(base.params[TABLE])
    table = np.concatenate([table, np.zeros((grow, table.shape[1]), np.float32)])
    table[rows] += 1.0
    ids = [*base.item_ids, *([None] * grow)]
    for row in rows:
        if row >= len(base.item_ids):
            ids[row] = f"new{row}"
    return ModelVersion.build(
        version, {**base.params, TABLE: table}, ids, config=base.config, sparse_tables=base.sparse_tables
    )


@settings(max_examples=40, deadline=None)
@given(st.sets(st.integers(1, 9), max_size=9), st.integers(0, 4))
def test_sparse_update_round_trips_to_the_same_version(rows: set[int], grow: int) -> None:
    base = _version(1, rows=10)
    child = _edit(base, 2, sorted(r for r in rows if r < 10) + list(range(10, 10 + grow)), grow=grow)
    changed = [
        r
        for r in range(child.params[TABLE].shape[0])
        if r >= 10 or (child.params[TABLE][r] != base.params[TABLE][r]).any()
    ]
    update = decode(encode(sparse_update(base, child, rows=np.array(changed, dtype=np.int64))))
    assert update.rows == len(changed)
    rebuilt = apply(base, update)
    assert rebuilt.state_checksum == child.state_checksum
    assert np.array_equal(rebuilt.params[TABLE], child.params[TABLE]) and rebuilt.item_ids == child.item_ids


def test_dense_and_snapshot_updates() -> None:
    base = _version(1)
    child = ModelVersion.build(
        2,
        {**base.params, "w": np.ones(3, np.float32)},
        base.item_ids,
        config=base.config,
        sparse_tables=base.sparse_tables,
    )
    assert apply(base, decode(encode(dense_update(base, child)))).state_checksum == child.state_checksum
    snap = decode(encode(snapshot_update(child, parent=1)))
    assert apply(None, snap).state_checksum == child.state_checksum


def test_a_missing_row_is_caught_by_the_state_checksum() -> None:
    base = _version(1)
    child = _edit(base, 2, [1, 2])
    partial = sparse_update(base, child, rows=np.array([1]))  # row 2 left out
    with pytest.raises(ChecksumMismatch):
        apply(base, partial)
    with pytest.raises(ValueError, match="applies on 2"):
        apply(_version(3), sparse_update(child, _edit(child, 3, [1]), rows=np.array([1])))
    with pytest.raises(ValueError, match="not a model update"):
        decode(b"garbage")


def test_versions_are_read_only() -> None:
    version = _version(1)
    with pytest.raises(ValueError):
        version.params[TABLE][1, 0] = 5.0


def test_chunks_reassemble_and_bad_bytes_are_flagged() -> None:
    payload = encode(snapshot_update(_version(1), parent=0))
    checksum = payload_checksum(payload)
    parts = [payload[i : i + 100] for i in range(0, len(payload), 100)]
    assembler = ChunkAssembler()
    results = [
        assembler.add(ChunkHeader.parse(f"1:0:snapshot:{i}:{len(parts)}:{checksum}"), p)
        for i, p in reversed(list(enumerate(parts)))
    ]
    assert results[-1] == (payload, None) and all(r[0] is None for r in results[:-1])
    bad = ChunkAssembler().add(ChunkHeader(2, 1, "sparse", 0, 1, checksum), b"x" * 10)
    assert bad == (None, "payload sha256 mismatch")


def test_snapshot_store_keeps_the_newest(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=2)
    for version in (1, 2, 3):
        store.save(_version(version, seed=version))
    assert store.versions() == [2, 3]
    assert store.load(3).state_checksum == _version(3, seed=3).state_checksum
    with pytest.raises(ConfigError, match="keeps the newest 2"):
        store.load(1)


def test_replica_applies_in_order_and_heals_a_gap(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    v1 = _version(1)
    v2 = _edit(v1, 2, [1])
    v3 = _edit(v2, 3, [2])
    v4 = _edit(v3, 4, [3])
    for v in (v1, v2, v3, v4):
        store.save(v)
    replica = Replica(snapshots=store, gap_timeout_s=0.0)
    replica.receive(snapshot_update(v1, parent=0))
    replica.receive(sparse_update(v2, v3, rows=np.array([2])))  # early: waits for v2
    assert replica.version == 1
    replica.receive(sparse_update(v1, v2, rows=np.array([1])))  # v2, then the waiting v3
    assert replica.version == 3 and replica.stats.applied == 3
    replica.receive(sparse_update(v1, v2, rows=np.array([1])))  # old news
    assert replica.stats.ignored == 1
    # v4 is lost; v5 arrives: a gap, healed from the store once the timeout passes.
    v5 = _edit(v4, 5, [4])
    store.save(v5)
    replica.receive(sparse_update(v4, v5, rows=np.array([4])))
    replica.check_gap()
    assert replica.version == 5 and replica.stats.healed == 1
    assert replica.current is not None and replica.current.state_checksum == v5.state_checksum

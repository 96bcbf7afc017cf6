"""Model versions and the updates between them: what a delta is, on the wire and when applied.

A **version** (:class:`ModelVersion`) is an immutable, whole model: every parameter as a read-only
float32 array, the item id of every row of the item table, the model's configuration, and a checksum
of all of it. Versions form a chain: each **update** (:class:`ModelUpdate`) names its version and its
parent, and applying it to the parent gives exactly the new version:

- ``sparse``: only the item-table rows that changed (values, plus the new item id of rows that were
  assigned or evicted) and the table's size (it grows with the catalogue). Cost ∝ rows touched.
- ``dense``: every parameter that is not an embedding table (attention, feed-forward, norms,
  positions), which all change every step and are small.
- ``snapshot``: the whole model, for bootstrapping a replica, healing it after a gap, and rollback.

On the wire an update is one uncompressed ``.npz`` (numpy arrays, no pickle: a replica never runs
code it receives) holding a JSON header; its sha256 travels beside it, and ``state_checksum`` in the
header is the checksum of the version it produces, so a replica verifies both the bytes it received
and the model it built from them.

>>> import numpy as np
>>> v1 = ModelVersion.build(1, {"item_emb.weight": np.zeros((3, 2), np.float32), "w": np.ones(2, np.float32)},
...                         [None, "a", "b"], config={}, sparse_tables=["item_emb.weight"])
>>> table = np.array(v1.params["item_emb.weight"]); table[2] = 7
>>> v2 = ModelVersion.build(2, {**v1.params, "item_emb.weight": table}, [None, "a", "c"], config={},
...                         sparse_tables=v1.sparse_tables)
>>> update = sparse_update(v1, v2, rows=np.array([2]))
>>> again = apply(v1, decode(encode(update)))
>>> again.state_checksum == v2.state_checksum, again.item_ids
(True, (None, 'a', 'c'))
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson

__all__ = [
    "ChecksumMismatch",
    "ModelUpdate",
    "ModelVersion",
    "UpdateKind",
    "apply",
    "check_rows",
    "decode",
    "dense_child",
    "dense_update",
    "encode",
    "payload_checksum",
    "snapshot_update",
    "sparse_child",
    "sparse_update",
    "state_checksum",
]

UpdateKind = Literal["sparse", "dense", "snapshot"]
Array = npt.NDArray[Any]


class ChecksumMismatch(ValueError):
    """An update's bytes or the model built from it do not match their checksum."""


def state_checksum(params: Mapping[str, Array], item_ids: Sequence[str | None]) -> str:
    """blake2b of every parameter (by name) and the row → item id map."""
    digest = hashlib.blake2b(digest_size=20)
    for name in sorted(params):
        array = np.ascontiguousarray(params[name])
        digest.update(name.encode())
        digest.update(str(array.shape).encode())
        digest.update(array.data)
    digest.update(orjson.dumps(list(item_ids)))
    return digest.hexdigest()


def payload_checksum(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _frozen(array: Array) -> Array:
    out = np.array(array, dtype=np.float32, copy=True)
    out.flags.writeable = False
    return out


@dataclass(frozen=True)
class ModelVersion:
    """One whole, immutable model version (see the module docstring)."""

    version: int
    params: Mapping[str, Array]
    item_ids: tuple[str | None, ...]
    config: Mapping[str, Any]
    state_checksum: str
    created_at_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    rollback_of: int | None = None
    # The embedding tables, published by rows (the trainer names them; sparse deltas carry them and
    # dense ones carry everything else). Every update's header lists them, as ``table_rows``.
    sparse_tables: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        version: int,
        params: Mapping[str, Array],
        item_ids: Sequence[str | None],
        *,
        config: Mapping[str, Any],
        rollback_of: int | None = None,
        created_at_ms: int | None = None,
        sparse_tables: Sequence[str] = (),
    ) -> ModelVersion:
        frozen = {name: _frozen(value) for name, value in params.items()}
        ids = tuple(item_ids)
        return cls(
            version=version,
            params=frozen,
            item_ids=ids,
            config=dict(config),
            state_checksum=state_checksum(frozen, ids),
            created_at_ms=created_at_ms or int(time.time() * 1000),
            rollback_of=rollback_of,
            sparse_tables=tuple(sparse_tables),
        )

    @property
    def nbytes(self) -> int:
        return sum(int(array.nbytes) for array in self.params.values())


@dataclass(frozen=True)
class ModelUpdate:
    """The step from ``parent`` to ``version``; see the module docstring for the kinds."""

    version: int
    parent: int
    kind: UpdateKind
    state_checksum: str
    created_at_ms: int
    arrays: Mapping[str, Array]  # dense/snapshot: parameters; sparse: rows/<table>, values/<table>
    table_rows: Mapping[str, int]  # size of each table after applying
    id_rows: Array  # rows whose item id is (re)set, int64
    ids: tuple[str | None, ...]  # their ids
    config: Mapping[str, Any] | None = None
    rollback_of: int | None = None
    run_id: str = ""

    @property
    def rows(self) -> int:
        """Embedding rows carried."""
        if self.kind == "sparse":
            return sum(len(self.arrays[f"rows/{t}"]) for t in self.table_rows)
        if self.kind == "snapshot":
            return sum(self.table_rows.values())
        return 0


def check_rows(base: ModelVersion, params: Mapping[str, Array], item_ids: Sequence[str | None]) -> None:
    """Raise ``ValueError`` unless every sparse table of ``params`` has one row per item id."""
    for table in base.sparse_tables:
        if params[table].shape[0] != len(item_ids):
            raise ValueError(f"{table} has {params[table].shape[0]} rows but item_ids has {len(item_ids)}")


def sparse_child(
    base: ModelVersion,
    version: int,
    params: Mapping[str, Array],
    item_ids: Sequence[str | None],
    rows: Array,
) -> ModelVersion:
    """``base`` with rows ``rows`` of its sparse tables (and their item ids) taken from ``params``;
    the tables grow or shrink to ``len(item_ids)`` rows. Every other parameter stays ``base``'s: what a
    replica holds after a sparse delta, whatever else the trainer has moved."""
    size = len(item_ids)
    child_params = dict(base.params)
    for table in base.sparse_tables:
        old = base.params[table]
        grown = np.zeros((size, *old.shape[1:]), dtype=np.float32)
        grown[: min(size, old.shape[0])] = old[:size]
        grown[rows] = params[table][rows]
        child_params[table] = grown
    ids = (list(base.item_ids) + [None] * size)[:size]
    for row in np.asarray(rows, dtype=np.int64).tolist():
        ids[row] = item_ids[row]
    return ModelVersion.build(
        version, child_params, ids, config=base.config, sparse_tables=base.sparse_tables
    )


def dense_child(base: ModelVersion, version: int, params: Mapping[str, Array]) -> ModelVersion:
    """``base`` with every parameter that is not a sparse table taken from ``params``."""
    child_params = dict(base.params)
    child_params.update((name, value) for name, value in params.items() if name not in base.sparse_tables)
    return ModelVersion.build(
        version, child_params, base.item_ids, config=base.config, sparse_tables=base.sparse_tables
    )


def sparse_update(parent: ModelVersion, child: ModelVersion, *, rows: Array, run_id: str = "") -> ModelUpdate:
    """Rows ``rows`` of every table of ``child`` (``child``'s dense parameters must equal ``parent``'s)."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    arrays: dict[str, Array] = {}
    sizes: dict[str, int] = {}
    for table in child.sparse_tables:
        values = child.params[table]
        arrays[f"rows/{table}"] = rows
        arrays[f"values/{table}"] = values[rows]
        sizes[table] = int(values.shape[0])
    old = parent.item_ids
    changed = [int(r) for r in rows if r >= len(old) or old[r] != child.item_ids[r]]
    return ModelUpdate(
        version=child.version,
        parent=parent.version,
        kind="sparse",
        state_checksum=child.state_checksum,
        created_at_ms=child.created_at_ms,
        arrays=arrays,
        table_rows=sizes,
        id_rows=np.asarray(changed, dtype=np.int64),
        ids=tuple(child.item_ids[r] for r in changed),
        run_id=run_id,
    )


def dense_update(parent: ModelVersion, child: ModelVersion, *, run_id: str = "") -> ModelUpdate:
    """Every non-table parameter of ``child`` (its tables must equal ``parent``'s)."""
    return ModelUpdate(
        version=child.version,
        parent=parent.version,
        kind="dense",
        state_checksum=child.state_checksum,
        created_at_ms=child.created_at_ms,
        arrays={name: value for name, value in child.params.items() if name not in child.sparse_tables},
        table_rows={table: int(child.params[table].shape[0]) for table in child.sparse_tables},
        id_rows=np.zeros(0, dtype=np.int64),
        ids=(),
        run_id=run_id,
    )


def snapshot_update(child: ModelVersion, *, parent: int, run_id: str = "") -> ModelUpdate:
    """The whole of ``child``."""
    return ModelUpdate(
        version=child.version,
        parent=parent,
        kind="snapshot",
        state_checksum=child.state_checksum,
        created_at_ms=child.created_at_ms,
        arrays=dict(child.params),
        table_rows={table: int(child.params[table].shape[0]) for table in child.sparse_tables},
        id_rows=np.arange(len(child.item_ids), dtype=np.int64),
        ids=child.item_ids,
        config=child.config,
        rollback_of=child.rollback_of,
        run_id=run_id,
    )


def apply(base: ModelVersion | None, update: ModelUpdate) -> ModelVersion:
    """The version ``update`` produces from ``base`` (its parent; ignored for a snapshot).

    Builds new arrays and never touches ``base``, so readers holding ``base`` are undisturbed.
    Raises :class:`ChecksumMismatch` when the result is not the version the publisher had.
    """
    if update.kind == "snapshot":
        params = dict(update.arrays)
        ids = list(update.ids)
        config: Mapping[str, Any] = update.config or {}
        tables = tuple(update.table_rows)
    else:
        if base is None or base.version != update.parent:
            have = None if base is None else base.version
            raise ValueError(f"update {update.version} applies on {update.parent}, not on {have}")
        params = dict(base.params)
        ids = list(base.item_ids)
        config = base.config
        tables = base.sparse_tables
        if update.kind == "dense":
            params.update(update.arrays)
        else:
            for table, size in update.table_rows.items():
                old = base.params[table]
                table_array = np.zeros((size, *old.shape[1:]), dtype=old.dtype)
                kept = min(size, old.shape[0])
                table_array[:kept] = old[:kept]
                table_array[update.arrays[f"rows/{table}"]] = update.arrays[f"values/{table}"]
                params[table] = table_array
            size = max(update.table_rows.values(), default=len(ids))
            ids = (ids + [None] * size)[:size]
        for row, item in zip(update.id_rows.tolist(), update.ids, strict=True):
            ids[row] = item
    version = ModelVersion.build(
        update.version,
        params,
        ids,
        config=config,
        rollback_of=update.rollback_of,
        created_at_ms=update.created_at_ms,
        sparse_tables=tables,
    )
    if version.state_checksum != update.state_checksum:
        raise ChecksumMismatch(
            f"version {update.version} built from {update.kind} update does not match its state checksum"
        )
    return version


def encode(update: ModelUpdate) -> bytes:
    """The update as one uncompressed ``.npz`` (arrays plus a JSON header), loadable without pickle."""
    names = sorted(update.arrays)
    header: dict[str, Any] = {
        "version": update.version,
        "parent": update.parent,
        "kind": update.kind,
        "state_checksum": update.state_checksum,
        "created_at_ms": update.created_at_ms,
        "table_rows": dict(update.table_rows),
        "ids": list(update.ids),
        "config": None if update.config is None else dict(update.config),
        "rollback_of": update.rollback_of,
        "run_id": update.run_id,
        "arrays": names,
    }
    arrays: dict[str, Any] = {f"a{index}": update.arrays[name] for index, name in enumerate(names)}
    arrays["header"] = np.frombuffer(orjson.dumps(header), dtype=np.uint8)
    arrays["id_rows"] = np.asarray(update.id_rows, dtype=np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode(payload: bytes) -> ModelUpdate:
    """Inverse of :func:`encode`; raises ``ValueError`` on anything that is not such an update."""
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as data:
            header = orjson.loads(data["header"].tobytes())
            arrays = {name: data[f"a{index}"] for index, name in enumerate(header["arrays"])}
            id_rows = data["id_rows"]
    except (OSError, KeyError, orjson.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"not a model update: {exc}") from exc
    return ModelUpdate(
        version=int(header["version"]),
        parent=int(header["parent"]),
        kind=header["kind"],
        state_checksum=header["state_checksum"],
        created_at_ms=int(header["created_at_ms"]),
        arrays=arrays,
        table_rows={k: int(v) for k, v in header["table_rows"].items()},
        id_rows=id_rows,
        ids=tuple(header["ids"]),
        config=header["config"],
        rollback_of=header["rollback_of"],
        run_id=header["run_id"],
    )

"""A model sink that keeps its versions in memory, for experiments beside the real chain.

:class:`MemorySink` satisfies the fine-tuner's ``ModelSink`` protocol as the Kafka publisher does,
and builds each version exactly as a replica would after the same updates (a sparse publish moves
only the given rows, a dense one only the dense parameters), but sends nothing and stores nothing.
The replay evaluation trains its freshness control with one: a second fine-tuner that gets the
same schedule and the same amount of training as the served transformer, on the oldest window of
the stream instead of the freshest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from publishers.updates import ModelVersion, check_rows, dense_child, sparse_child

__all__ = ["MemoryReceipt", "MemorySink"]

Array = npt.NDArray[Any]


@dataclass(frozen=True, slots=True)
class MemoryReceipt:
    """One publish to a :class:`MemorySink` (``bytes`` is the version's parameter size)."""

    version: int
    parent: int
    kind: str
    bytes: int
    rows: int


class MemorySink:
    """Versions 1, 2, … in memory; ``on_version`` listeners are told of each one."""

    def __init__(self, start: ModelVersion | None = None) -> None:
        self.latest: ModelVersion | None = start
        self._listeners: list[Callable[[ModelVersion], None]] = []

    def on_version(self, listener: Callable[[ModelVersion], None]) -> None:
        self._listeners.append(listener)

    def publish_snapshot(
        self,
        params: Mapping[str, Array],
        item_ids: Sequence[str | None],
        *,
        config: Mapping[str, Any],
        sparse_tables: Sequence[str],
        run_id: str = "",
    ) -> MemoryReceipt:
        model = ModelVersion.build(self._next, params, item_ids, config=config, sparse_tables=sparse_tables)
        return self._keep(model, "snapshot", rows=len(item_ids))

    def publish_sparse(
        self,
        params: Mapping[str, Array],
        item_ids: Sequence[str | None],
        rows: npt.NDArray[np.int64],
        *,
        run_id: str = "",
    ) -> MemoryReceipt:
        base = self._base()
        check_rows(base, params, item_ids)
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        return self._keep(sparse_child(base, self._next, params, item_ids, rows), "sparse", rows=len(rows))

    def publish_dense(self, params: Mapping[str, Array], *, run_id: str = "") -> MemoryReceipt:
        return self._keep(dense_child(self._base(), self._next, params), "dense", rows=0)

    def close(self) -> None:
        """Nothing to release."""

    @property
    def _next(self) -> int:
        return 1 if self.latest is None else self.latest.version + 1

    def _base(self) -> ModelVersion:
        if self.latest is None:
            raise ValueError("no version yet: the first publish must be a snapshot")
        return self.latest

    def _keep(self, model: ModelVersion, kind: str, *, rows: int) -> MemoryReceipt:
        parent = 0 if self.latest is None else self.latest.version
        self.latest = model
        for listener in self._listeners:
            listener(model)
        return MemoryReceipt(version=model.version, parent=parent, kind=kind, bytes=model.nbytes, rows=rows)

"""A model version made servable: user states from the transformer, and an exact, confident index.

**Retrieval is exact**: every indexed item is scored against the user's state in one scan of the
item table (brute force at this scale beats approximate indexes on recall and sits near the
memory-bandwidth floor; measured in ``bench/serving_latency.py``). The scan is
:class:`serving.scan.ExactScan`: int8 products with a per-row error bound, and an fp32 re-score
of a shortlist that is certified to hold the exact top-n.

**Index construction keeps the index confident** (Shopee's lesson): an item whose embedding row is
young — carried by few versions since its item got the row — is *not* put in the main index, so a
half-trained vector cannot crowd out the ones the model knows. Those items form the **exploration
pool** that retrieval spends its exploration budget on (:mod:`serving.recommender`). Row ages come
from :class:`RowStats`, which follows the versions a replica applies: a row counts one update for
each version that changed it, and starts again at one when its item changes (eviction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from learners.sasrec import SASRec, SASRecConfig
from publishers.updates import ModelVersion
from serving.scan import ExactScan, ScanCounts

__all__ = ["RowStats", "ServingIndex"]

TABLE = "item_emb.weight"
FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


class RowStats:
    """Per-row update counts across the versions a replica applied; see the module docstring.

    The first version seen is taken as trained (``initial`` updates per row: a model that was
    published whole was trained on its items); rows that appear or change items later start at 1.
    """

    def __init__(self, *, initial: int = 4) -> None:
        self.initial = initial
        self.updates = np.zeros(0, dtype=np.int64)
        self.since = np.zeros(0, dtype=np.int64)  # per row: the version that gave it its item
        self._previous: ModelVersion | None = None

    def observe(self, version: ModelVersion) -> None:
        table = version.params[TABLE]
        rows = table.shape[0]
        previous = self._previous
        if previous is None:
            self.updates = np.where(
                np.array([i is not None for i in version.item_ids], dtype=bool), self.initial, 0
            ).astype(np.int64)
            self.since = np.full(rows, version.version, dtype=np.int64)
        else:
            old_table = previous.params[TABLE]
            grown = np.zeros(rows, dtype=np.int64)
            kept = min(rows, len(self.updates))
            grown[:kept] = self.updates[:kept]
            common = min(rows, old_table.shape[0])
            changed = np.zeros(rows, dtype=bool)
            changed[:common] = np.any(table[:common] != old_table[:common], axis=1)
            changed[common:] = True
            old_ids = previous.item_ids
            moved = np.array(
                [r >= len(old_ids) or old_ids[r] != item for r, item in enumerate(version.item_ids)],
                dtype=bool,
            )
            grown[moved] = 0
            since = np.full(rows, version.version, dtype=np.int64)
            kept_since = min(rows, len(self.since))
            since[:kept_since] = np.where(moved[:kept_since], version.version, self.since[:kept_since])
            self.since = since
            grown[changed] += 1
            grown[np.array([i is None for i in version.item_ids], dtype=bool)] = 0
            self.updates = grown
        self._previous = version

    def uncertainty(self) -> FloatArray:
        """Per row, in [0, 1]: ``1 / sqrt(updates)`` (1 for a row never trained)."""
        return (1.0 / np.sqrt(np.maximum(self.updates, 1))).astype(np.float32)


@dataclass(frozen=True)
class ServingIndex:
    """Everything retrieval needs from one version, built once per version and then read-only."""

    version: ModelVersion
    model: SASRec
    row_of: dict[str, int]
    item_of: tuple[str | None, ...]
    uncertainty: FloatArray  # per row: how young its embedding is (RowStats)
    index_rows: IntArray  # confident rows: the main index
    index_vectors: FloatArray  # (len(index_rows), D), contiguous
    scan: ExactScan  # exact top-n over index_vectors
    pool_rows: IntArray  # uncertain rows: the exploration pool
    # The pool's ``max_pool`` newest items (by the version that gave their row its item; then the
    # least trained) and their uncertainties: what one request's exploration draw considers, listed
    # once per version so that a request's work stays bounded.
    pool_items: tuple[str, ...]
    pool_uncertainty: tuple[float, ...]

    @classmethod
    def build(
        cls,
        version: ModelVersion,
        stats: RowStats,
        *,
        max_uncertainty: float,
        max_pool: int = 256,
        quantized: bool = True,
        scan_counts: ScanCounts | None = None,
    ) -> ServingIndex:
        """``quantized`` and ``scan_counts`` go to :class:`ExactScan` (counts can outlive versions)."""
        config = SASRecConfig.from_dict(dict(version.config))
        model = SASRec(config, rows=version.params[TABLE].shape[0])
        model.load_state_dict(
            {name: torch.from_numpy(np.array(value)) for name, value in version.params.items()}
        )
        model.eval()
        with torch.no_grad():
            vectors = model.item_vectors().numpy()  # (N, D): the output vectors (tied table)
        uncertainty = stats.uncertainty()
        has_item = np.array([item is not None for item in version.item_ids], dtype=bool)
        confident = has_item & (uncertainty <= max_uncertainty)
        index_rows = np.flatnonzero(confident).astype(np.int64)
        index_vectors = np.ascontiguousarray(vectors[index_rows])
        pool_rows = np.flatnonzero(has_item & ~confident).astype(np.int64)
        # Newest items first (the version that gave the row its item), then the least trained: a
        # row's index says nothing of its age, since rows are reused after eviction.
        order = np.lexsort((-uncertainty[pool_rows], -stats.since[pool_rows]))
        drawn = pool_rows[order[:max_pool]]
        return cls(
            version=version,
            model=model,
            row_of={item: row for row, item in enumerate(version.item_ids) if item is not None},
            item_of=version.item_ids,
            uncertainty=uncertainty,
            index_rows=index_rows,
            index_vectors=index_vectors,
            scan=ExactScan(index_vectors, quantized=quantized, counts=scan_counts),
            pool_rows=pool_rows,
            pool_items=tuple(str(version.item_ids[row]) for row in drawn.tolist()),
            pool_uncertainty=tuple(uncertainty[drawn].tolist()),
        )

    def user_vector(self, history: Sequence[str]) -> FloatArray | None:
        """The transformer's state after ``history`` (oldest first), or None when it knows none of it."""
        rows = [row for item in history if (row := self.row_of.get(item)) is not None]
        if not rows:
            return None
        seq = torch.tensor(rows[-self.model.config.max_len :], dtype=torch.int64)  # (T,), unpadded
        with torch.inference_mode():
            vector: FloatArray = self.model.state(seq).numpy()  # (D,)
        return vector

    def top(self, user: FloatArray, n: int, *, exclude: set[str]) -> list[tuple[str, float]]:
        """The ``n`` best indexed items for ``user`` by exact inner product, ``exclude`` left out."""
        if not len(self.index_rows) or n <= 0:
            return []
        want = n + len(exclude)
        positions, values = self.scan.top(user, want)  # best first
        out: list[tuple[str, float]] = []
        item_of = self.item_of
        # Rows gathered in one numpy step, not a numpy scalar index per item (about half the cost).
        for row, score in zip(self.index_rows[positions].tolist(), values.tolist(), strict=True):
            item = item_of[row]
            if item is not None and item not in exclude:
                out.append((item, score))
                if len(out) == n:
                    break
        return out

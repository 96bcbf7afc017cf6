"""Retrieval: row ages across versions, the confident index, and the exact top-n."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from learners.sasrec import SPARSE_TABLES, SASRec, SASRecConfig
from publishers.updates import ModelVersion
from serving.retrieval import TABLE, RowStats, ServingIndex
from serving.scan import QUANTIZE_FROM


def _version(items: int, *, number: int = 1, dim: int = 16, seed: int = 0) -> ModelVersion:
    torch.manual_seed(seed)
    model = SASRec(SASRecConfig(dim=dim, blocks=1), rows=items + 1)
    model.init_rows(torch.arange(1, items + 1))
    params = {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}
    return ModelVersion.build(
        number,
        params,
        [None, *(f"i{n}" for n in range(items))],
        config=model.config.to_dict(),
        sparse_tables=SPARSE_TABLES,
    )


def _next(version: ModelVersion, *, changed: list[int], ids: list[str | None] | None = None) -> ModelVersion:
    params = {name: np.array(value) for name, value in version.params.items()}
    params[TABLE][changed] += 0.5
    return ModelVersion.build(
        version.version + 1,
        params,
        ids or list(version.item_ids),
        config=dict(version.config),
        sparse_tables=version.sparse_tables,
    )


def test_row_ages_count_the_versions_that_changed_them_and_restart_with_a_new_item() -> None:
    stats = RowStats(initial=4)
    first = _version(6)
    stats.observe(first)
    assert stats.updates.tolist() == [0, 4, 4, 4, 4, 4, 4]  # row 0 is padding
    second = _next(first, changed=[1, 2])
    stats.observe(second)
    assert stats.updates.tolist() == [0, 5, 5, 4, 4, 4, 4]
    ids = list(second.item_ids)
    ids[3] = "new-item"  # row 3 evicted and given to another item, with a fresh vector
    third = _next(second, changed=[3], ids=ids)
    stats.observe(third)
    assert stats.updates.tolist() == [0, 5, 5, 1, 4, 4, 4]
    assert stats.uncertainty()[3] == 1.0 and stats.uncertainty()[1] == pytest.approx(1 / np.sqrt(5))

    index = ServingIndex.build(third, stats, max_uncertainty=0.5)
    assert index.index_rows.tolist() == [1, 2, 4, 5, 6]  # the young row is explored, not indexed
    assert index.pool_rows.tolist() == [3]
    assert (index.pool_items, index.pool_uncertainty) == (("new-item",), (1.0,))


def test_a_request_draws_from_the_youngest_rows_of_a_large_pool() -> None:
    stats = RowStats(initial=4)
    version = _version(8)
    stats.observe(version)
    ids = list(version.item_ids)
    ids[1:7] = [f"new-{row}" for row in range(1, 7)]  # six rows given to new items: each starts at 1
    version = _next(version, changed=[1, 2, 3, 4, 5, 6], ids=ids)
    stats.observe(version)
    for changed in ([3, 4, 5, 6], [5, 6]):  # then trained on, some more than others
        version = _next(version, changed=changed)
        stats.observe(version)
    assert stats.updates.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    index = ServingIndex.build(version, stats, max_uncertainty=0.5, max_pool=3)
    assert index.pool_rows.tolist() == [1, 2, 3, 4, 5, 6]  # all young, none indexed
    assert [index.row_of[i] for i in index.pool_items] == [1, 2, 3]  # the least trained first
    assert index.pool_uncertainty == pytest.approx((1.0, 1.0, 1 / np.sqrt(2)))
    ids = list(version.item_ids)
    ids[7] = "newest"  # a later item on a row numbered after the others: it comes first
    version = _next(version, changed=[7], ids=ids)
    stats.observe(version)
    index = ServingIndex.build(version, stats, max_uncertainty=0.5, max_pool=3)
    assert index.pool_items == ("newest", "new-1", "new-2")
    ids = list(version.item_ids)
    ids[1] = "newer-on-an-old-row"  # a row reused after eviction is as new as its item
    version = _next(version, changed=[1], ids=ids)
    stats.observe(version)
    index = ServingIndex.build(version, stats, max_uncertainty=0.5, max_pool=3)
    assert index.pool_items == ("newer-on-an-old-row", "newest", "new-2")


@pytest.mark.parametrize("items", [20_000, QUANTIZE_FROM + 10])
def test_top_is_the_exact_inner_product_order(items: int) -> None:
    version = _version(items, dim=32)
    stats = RowStats()
    stats.observe(version)
    index = ServingIndex.build(version, stats, max_uncertainty=0.5)
    assert index.scan.quantized == (items >= QUANTIZE_FROM)  # the int8 scan, or fp32 alone
    rng = np.random.default_rng(3)
    for _ in range(20):
        user = rng.normal(size=32).astype(np.float32)
        scores = index.index_vectors.astype(np.float64) @ user
        order = np.argsort(-scores, kind="stable")
        exclude = {index.item_of[int(index.index_rows[r])] or "" for r in order[:5:2]}
        got = index.top(user, 50, exclude=exclude)
        expected = [index.item_of[int(index.index_rows[r])] for r in order[:60]]
        expected = [item for item in expected if item not in exclude][:50]
        assert [item for item, _ in got] == expected
        # Scores are the float32 products.
        rows = [index.row_of[item] for item, _ in got]
        exact = [
            float(np.float32(index.index_vectors[np.searchsorted(index.index_rows, r)] @ user)) for r in rows
        ]
        assert [score for _, score in got] == pytest.approx(exact, rel=1e-5, abs=1e-5)
    counts = index.scan.counts
    quantized = items >= QUANTIZE_FROM
    assert (counts.certified, counts.fallback, counts.fp32) == ((20, 0, 0) if quantized else (0, 0, 20))

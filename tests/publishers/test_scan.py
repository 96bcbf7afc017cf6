"""The retrieval scan: int8 products, a sound per-row bound, a certified shortlist, exact answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from publishers.scan import QUANTIZE_FROM, ExactScan, block_topk

ROWS = QUANTIZE_FROM + 4_321  # quantised, and not a whole number of blocks


def _table(kind: str, rows: int = ROWS, dim: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(rows, dim)).astype(np.float32)
    if kind == "lognormal-norms":  # popular items often have long vectors
        table *= rng.lognormal(0.0, 0.8, size=(rows, 1)).astype(np.float32)
    elif kind == "outliers":  # a few huge entries, many rows near zero, some exactly zero
        table[rng.integers(0, rows, 50), rng.integers(0, dim, 50)] = 40.0
        table[: rows // 3] *= 1e-3
        table[rows // 3 : rows // 3 + 100] = 0.0
    return table


def _exact_order(table: np.ndarray, query: np.ndarray, n: int) -> list[int]:
    return np.argsort(-(table.astype(np.float64) @ query.astype(np.float64)), kind="stable")[:n].tolist()


@pytest.mark.parametrize("kind", ["gaussian", "lognormal-norms", "outliers"])
def test_the_bound_is_above_every_rows_true_score(kind: str) -> None:
    table = _table(kind)
    scan = ExactScan(table)
    rng = np.random.default_rng(1)
    for query in [rng.normal(size=24), rng.normal(size=24) * (rng.random(24) < 0.2), np.eye(24)[3] * 7]:
        u = torch.from_numpy(query.astype(np.float32))
        found = scan.bounds(u)
        assert found is not None
        su, bound, _ = found
        true = table.astype(np.float64) @ query.astype(np.float32).astype(np.float64)
        assert np.all(su * bound.numpy().astype(np.float64) >= true - 1e-9)
        # ... and not uselessly loose: on average within a tenth of the scores' spread (5-7% here).
        assert np.mean(su * bound.numpy() - true) < 0.1 * np.std(true)


def test_the_bound_holds_where_rounding_errors_all_add_up() -> None:
    # A query and rows built so that every entry's rounding error is near half a step and they all
    # push the true score above the int8 one: the bound must still hold, and is nearly reached.
    rng = np.random.default_rng(5)
    dim, rows, su, sw = 24, ROWS, 0.01, 0.02
    signs = rng.choice([-1.0, 1.0], size=dim - 1)
    q = rng.integers(1, 100, size=dim - 1) * signs
    query = np.concatenate([[127 * su], su * (q + 0.499 * signs)]).astype(np.float32)  # e_u along c
    codes = rng.integers(1, 100, size=(rows, dim - 1)) * signs
    table = np.concatenate([np.full((rows, 1), 127 * sw), sw * (codes + 0.499 * signs)], axis=1)
    table = table.astype(np.float32)  # entry 0 fixes both scales; e_w along u
    found = ExactScan(table).bounds(torch.from_numpy(query))
    assert found is not None
    scale, bound, _ = found
    true = table.astype(np.float64) @ query.astype(np.float64)
    upper = scale * bound.numpy().astype(np.float64)
    assert np.all(upper >= true)
    approx = su * sw * (127 * 127 + codes @ q)  # the int8 products' own estimate
    assert np.min((true - approx) / (upper - approx)) > 0.75  # the error nearly reaches the bound


@pytest.mark.parametrize("kind", ["gaussian", "lognormal-norms", "outliers"])
def test_top_is_the_exact_order_and_certified(kind: str) -> None:
    table = _table(kind)
    scan = ExactScan(table)
    assert scan.quantized
    rng = np.random.default_rng(2)
    queries = 0
    for n in (1, 10, 300):
        for _ in range(5):
            query = rng.normal(size=24).astype(np.float32)
            positions, values = scan.top(query, n)
            queries += 1
            assert positions.tolist() == _exact_order(table, query, n)
            np.testing.assert_allclose(values, table[positions] @ query, rtol=1e-5, atol=1e-5)
    # The bound is tight enough that these tables never need the fp32 scan.
    assert (scan.counts.certified, scan.counts.fallback) == (queries, 0)


def test_an_uncertifiable_query_is_scanned_again_in_fp32() -> None:
    # Rows that differ by far less than an int8 step: the bound cannot separate them.
    rng = np.random.default_rng(3)
    base = rng.normal(size=16).astype(np.float32)
    table = (base + 1e-5 * rng.normal(size=(ROWS, 16))).astype(np.float32)
    scan = ExactScan(table)
    query = rng.normal(size=16).astype(np.float32)
    _, values = scan.top(query, 10)
    assert (scan.counts.certified, scan.counts.fallback) == (0, 1)
    # Exact up to fp32 rounding, which reorders scores this close: compare the scores.
    best = np.sort(table.astype(np.float64) @ query.astype(np.float64))[::-1][:10]
    np.testing.assert_allclose(values, best, rtol=0, atol=1e-5)


def test_edges_zero_query_small_tables_and_switched_off() -> None:
    table = _table("gaussian")
    scan = ExactScan(table)
    positions, values = scan.top(np.zeros(24, dtype=np.float32), 5)  # no scale: the fp32 scan
    assert len(positions) == 5 and np.all(values == 0) and scan.counts.fallback == 1
    assert scan.top(np.ones(24, dtype=np.float32), 0)[0].size == 0
    small = table[:1_000]
    assert not ExactScan(small).quantized  # below QUANTIZE_FROM the fp32 scan is as fast
    assert ExactScan(small).top(np.ones(24, dtype=np.float32), 5_000)[0].size == 1_000
    off = ExactScan(table, quantized=False)
    assert not off.quantized
    off.top(np.ones(24, dtype=np.float32), 3)
    assert (off.counts.certified, off.counts.fallback, off.counts.fp32) == (0, 0, 1)
    query = np.random.default_rng(4).normal(size=24)  # float64 is taken too
    assert ExactScan(table, quantized=False).top(query, 7)[0].tolist() == _exact_order(table, query, 7)


@pytest.mark.parametrize("length", [1, 63, 64, 10_000, 100_003])
def test_block_topk_is_topk(length: int) -> None:
    rng = np.random.default_rng(length)
    ints = torch.from_numpy(rng.integers(-50, 50, size=length).astype(np.int32))  # many ties
    floats = torch.from_numpy(rng.normal(size=length).astype(np.float32))
    for scores in (ints, floats):
        for m in (1, 7, 100):
            values, positions = block_topk(scores, m)
            expected = torch.topk(scores, min(m, length)).values
            assert torch.equal(values, expected)
            assert torch.equal(scores[positions], values) and len(set(positions.tolist())) == len(positions)

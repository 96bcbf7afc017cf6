"""The retrieval scan: int8 products, a sound per-row bound, a certified shortlist, exact answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.scan import PROBATION, QUANTIZE_FROM, QUANTIZE_MAX_DIM, ExactScan, block_topk

ROWS = QUANTIZE_FROM + 4_321  # quantised, and not a whole number of blocks


def _table(kind: str, rows: int = ROWS, dim: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(rows, dim)).astype(np.float32)
    if kind == "lognormal-norms":  # popular items often have long vectors
        table *= rng.lognormal(0.0, 0.8, size=(rows, 1)).astype(np.float32)
    elif kind == "outliers":  # a few huge entries, many rows near zero, some zero or subnormal
        table[rng.integers(0, rows, 50), rng.integers(0, dim, 50)] = 40.0
        table[: rows // 3] *= 1e-3
        table[rows // 3 : rows // 3 + 100] = 0.0
        table[rows // 3 + 100 : rows // 3 + 200] *= 1e-40
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
        assert np.all(su * bound.numpy().astype(np.float64) >= true)
        # ... and not uselessly loose: on average within a tenth of the scores' spread (5-7% here).
        assert np.mean(su * bound.numpy() - true) < 0.1 * np.std(true)


@pytest.mark.parametrize("dim", [24, QUANTIZE_MAX_DIM])
def test_the_bound_holds_where_every_rounding_error_adds_up(dim: int) -> None:
    # Every entry sits half a step off the grid and rounds away from zero (ties go to the even
    # code), with u_i w_i < 0: all three error terms push the true score above the int8 estimate.
    # The largest entries (which fix the scales, exactly) sit on different coordinates.
    rng = np.random.default_rng(5)
    rows, su, sw = 500, 2.0**-7, 2.0**-6
    a = 2 * rng.integers(40, 63, size=dim) + 1  # odd: a + 0.5 rounds up to a + 1
    b = 2 * rng.integers(40, 63, size=(rows, dim)) + 1
    query = su * (a + 0.5)
    query[0], query[1] = 127 * su, -0.5 * su
    table = -sw * (b + 0.5)
    table[:, 0], table[:, 1] = 0.5 * sw, -127 * sw
    query, table = query.astype(np.float32), np.ascontiguousarray(table, dtype=np.float32)
    found = ExactScan(table, min_rows=1).bounds(torch.from_numpy(query))
    assert found is not None
    scale, bound, _ = found
    assert scale == su
    true = table.astype(np.float64) @ query.astype(np.float64)
    upper = scale * bound.numpy().astype(np.float64)
    assert np.all(upper >= true)
    q = np.rint(query.astype(np.float64) / su)
    codes = np.rint(table.astype(np.float64) / sw)
    approx = su * sw * (codes @ q)  # the int8 products' own estimate
    assert np.min((true - approx) / (upper - approx)) > 0.99  # the bound is all but reached


@pytest.mark.parametrize("kind", ["gaussian", "lognormal-norms", "outliers"])
def test_top_is_the_exact_order_and_certified(kind: str) -> None:
    table = _table(kind)
    table[-1] = 3 * np.abs(table).max()  # the best row for a positive query is the very last
    scan = ExactScan(table)
    assert scan.quantized
    rng = np.random.default_rng(2)
    queries = 0
    for n in (1, 10, 33, 300):
        for query in [rng.normal(size=24).astype(np.float32) for _ in range(5)] + [np.ones(24, np.float32)]:
            positions, values = scan.top(query, n)
            queries += 1
            assert positions.tolist() == _exact_order(table, query, n)
            np.testing.assert_allclose(values, table[positions] @ query, rtol=1e-5, atol=1e-5)
    assert scan.top(np.ones(24, np.float32), 1)[0].tolist() == [ROWS - 1]
    # The bound is tight enough that these tables never need the fp32 scan.
    assert (scan.counts.certified, scan.counts.fallback) == (queries + 1, 0)


def test_a_shortlist_as_long_as_the_table_goes_straight_to_fp32() -> None:
    table = _table("gaussian", rows=500, dim=20)  # a dimension that is no multiple of 8
    scan = ExactScan(table, min_rows=1)
    query = np.random.default_rng(6).normal(size=20).astype(np.float32)
    assert scan.top(query, 40)[0].tolist() == _exact_order(table, query, 40)  # 2n + 64 < rows
    for n in (218, 500, 900):  # 2n + 64 >= rows: re-scoring every row is the fp32 scan
        assert scan.top(query, n)[0].tolist() == _exact_order(table, query, min(n, 500))
    assert (scan.counts.certified, scan.counts.fallback, scan.counts.fp32) == (1, 0, 3)


def test_uncertifiable_queries_are_scanned_again_in_fp32_until_int8_is_given_up() -> None:
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
    for _ in range(PROBATION + 5):
        scan.top(query, 10)
    # Every query paid for two scans until the probation ended; since then, one fp32 scan each.
    assert (scan.counts.fallback, scan.counts.fp32) == (PROBATION, 6) and not scan.quantized


def test_int8_is_given_up_by_window_not_by_lifetime() -> None:
    # Near-duplicate long rows along +b (no query along +b can be certified) and Gaussian rows
    # (queries along -b rank those first and certify).
    rng = np.random.default_rng(9)
    base = rng.normal(size=16).astype(np.float32)
    table = rng.normal(size=(ROWS, 16)).astype(np.float32)
    table[:5_000] = 10 * base + 1e-4 * rng.normal(size=(5_000, 16))
    scan = ExactScan(table)
    for _ in range(PROBATION + 36):
        scan.top(-base + 0.1 * rng.normal(size=16).astype(np.float32), 10)
    assert scan.counts.certified == PROBATION + 36 and scan.counts.fallback == 0
    for _ in range(40):
        scan.top(base, 10)
    # The second window ends after 28 fallbacks (28 > 16 of 64): int8 is given up there, however
    # many queries certified before.
    counts = scan.counts
    assert (counts.fallback, counts.fp32, scan.quantized) == (28, 12, False)


def test_tables_and_queries_that_are_not_quantised() -> None:
    table = _table("gaussian")
    scan = ExactScan(table)
    positions, values = scan.top(np.zeros(24, dtype=np.float32), 5)  # a zero query: no scale
    assert len(positions) == 5 and np.all(values == 0)
    tiny = (1e-38 * np.random.default_rng(7).normal(size=24)).astype(np.float32)
    assert scan.top(tiny, 10)[0].tolist() == _exact_order(table, tiny, 10)
    assert (scan.counts.certified, scan.counts.fallback, scan.counts.fp32) == (0, 0, 2)
    assert scan.top(np.ones(24, dtype=np.float32), 0)[0].size == 0

    small = table[:1_000]
    assert not ExactScan(small).quantized  # below QUANTIZE_FROM the fp32 scan is as fast
    assert ExactScan(small).top(np.ones(24, dtype=np.float32), 5_000)[0].size == 1_000
    wide = np.random.default_rng(8).normal(size=(QUANTIZE_FROM, QUANTIZE_MAX_DIM + 1)).astype(np.float32)
    assert not ExactScan(wide).quantized  # the bound would rarely certify
    broken = table.copy()
    broken[17, 3] = np.nan
    assert not ExactScan(broken).quantized  # NaN would poison the bound: fp32, NaN and all
    huge = table * np.float32(1e31)  # finite, but bounds past fp32's range would certify anything
    assert not ExactScan(huge).quantized

    off = ExactScan(table, quantized=False)
    assert not off.quantized
    query = np.random.default_rng(4).normal(size=24)  # float64 is taken too
    assert off.top(query, 7)[0].tolist() == _exact_order(table, query, 7)
    assert (off.counts.certified, off.counts.fallback, off.counts.fp32) == (0, 0, 1)


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
        scores[-1] = scores.max() + 1  # the best score in the tail, past the last whole block
        assert int(block_topk(scores, 3)[1][0]) == length - 1

"""Item counters: exact against direct computation on ml-100k, independent of order and batching."""

from __future__ import annotations

import gzip
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freshrec.settings import default_datasets_dir
from streams.counters import CounterConfig, ItemCounters, top_rows

HOUR, DAY, WEEK = 3_600, 86_400, 604_800


def ml_100k() -> tuple[list[str], list[str], np.ndarray]:
    data_dir = default_datasets_dir()
    assert data_dir is not None, "the shared datasets (../shared/data) must be beside the checkout"
    lines = gzip.decompress((data_dir / "ml-100k" / "u.data.gz").read_bytes()).decode().splitlines()
    rows = [line.split("\t") for line in lines]
    types = ["rating" if int(r[2]) >= 3 else "view" for r in rows]  # two types, to exercise both axes
    return [r[1] for r in rows], types, np.array([int(r[3]) * 1000 for r in rows], dtype=np.int64)


def apply_in_batches(
    counters: ItemCounters, items: list[str], types: list[str], ts: np.ndarray, seed: int
) -> None:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)  # arrival order unrelated to event time
    at = 0
    rng = random.Random(seed + 1)
    while at < len(order):
        size = rng.randint(1, 5000)
        chosen = order[at : at + size]
        counters.update([items[i] for i in chosen], [types[i] for i in chosen], ts[chosen])
        at += size


def test_counts_equal_a_direct_computation_on_ml_100k() -> None:
    items, types, ts = ml_100k()
    config = CounterConfig(half_life_s=7 * DAY, windows_s=(HOUR, DAY, WEEK), buckets=60)
    counters = ItemCounters(config)
    apply_in_batches(counters, items, types, ts, seed=3)

    totals = Counter(zip(items, types, strict=True))
    for (item, kind), count in totals.items():
        assert counters.total(item, kind) == count
    assert sum(counters.total(item) for item in set(items)) == 100_000

    newest = int(ts.max())
    assert counters.now_ms == newest
    for window in (HOUR, DAY, WEEK):
        width = window * 1000 // config.buckets
        live = ts // width > newest // width - config.buckets
        expected = Counter(np.array(items)[live].tolist())
        assert sum(expected.values()) > 0 or window == HOUR
        for item in set(items):
            assert counters.windowed(item, window) == expected.get(item, 0), (window, item)

    weights = np.exp2(-(newest - ts) / (config.half_life_s * 1000))
    direct: dict[str, float] = {}
    for item, weight in zip(items, weights, strict=True):
        direct[item] = direct.get(item, 0.0) + float(weight)
    for item, value in direct.items():
        assert counters.decayed(item) == pytest.approx(value, rel=1e-9, abs=1e-12)

    by_total = Counter(items).most_common(5)
    assert [(i, int(s)) for i, s in counters.top(5)] == [(i, c) for i, c in by_total]
    assert counters.top(3, kind="decayed")[0][0] == max(direct, key=direct.__getitem__)


events = st.lists(
    st.tuples(st.sampled_from("abcdefgh"), st.sampled_from(["view", "click"]), st.integers(0, 50_000_000)),
    min_size=1,
    max_size=200,
)


@settings(max_examples=150, deadline=None)
@given(events, st.randoms(use_true_random=False))
def test_state_does_not_depend_on_order_or_batching(
    batch: list[tuple[str, str, int]], rnd: random.Random
) -> None:
    config = CounterConfig(half_life_s=3600.0, windows_s=(60, 3600), buckets=6, max_types=4)
    first, second = ItemCounters(config), ItemCounters(config)
    first.update([e[0] for e in batch], [e[1] for e in batch], [e[2] for e in batch])
    shuffled = batch[:]
    rnd.shuffle(shuffled)
    while shuffled:
        size = rnd.randint(1, len(shuffled))
        part, shuffled = shuffled[:size], shuffled[size:]
        second.update([e[0] for e in part], [e[1] for e in part], [e[2] for e in part])
    for item in "abcdefgh":
        for kind in ("view", "click", None):
            assert first.total(item, kind) == second.total(item, kind)
            assert first.windowed(item, 60, kind) == second.windowed(item, 60, kind)
            assert first.windowed(item, 3600, kind) == second.windowed(item, 3600, kind)
            assert first.decayed(item, kind) == pytest.approx(
                second.decayed(item, kind), rel=1e-9, abs=1e-300
            )


def test_state_dict_round_trip_resumes_exactly() -> None:
    items, types, ts = ml_100k()
    config = CounterConfig(half_life_s=DAY, windows_s=(HOUR, DAY), buckets=12)
    whole = ItemCounters(config)
    whole.update(items, types, ts)
    resumed = ItemCounters(config)
    resumed.update(items[:40_000], types[:40_000], ts[:40_000])
    restored = ItemCounters()
    restored.load_state_dict(resumed.state_dict())
    restored.update(items[40_000:], types[40_000:], ts[40_000:])
    for kind in ("total", HOUR, DAY):
        assert np.array_equal(whole.scores(kind), restored.scores(kind))  # same first-seen rows
    assert np.allclose(whole.scores("decayed"), restored.scores("decayed"), rtol=1e-9)


def test_caps_bound_memory_and_count_the_overflow() -> None:
    counters = ItemCounters(CounterConfig(max_items=10, max_types=2, windows_s=(60,), buckets=6))
    counters.update([f"i{n}" for n in range(25)], ["view"] * 20 + ["click"] * 4 + ["skip"], list(range(25)))
    assert len(counters.items) == 10 and counters.items.overflow == 15
    assert counters.types.overflow == 1  # "skip" is a third type with max_types=2
    counters.update(["i0"], ["purchase"], [30])  # and so is "purchase": not counted
    assert counters.types.overflow == 2 and counters.total("i0") == 1
    assert counters.nbytes() < 10_000
    assert counters.top(3) == [("i0", 1.0), ("i1", 1.0), ("i2", 1.0)]
    assert counters.total("never-seen") == 0 and counters.decayed("never-seen") == 0.0
    with pytest.raises(ValueError, match="no 3600 s window"):
        counters.windowed("i0", 3600)
    restored = ItemCounters()
    restored.load_state_dict(counters.state_dict())  # a small state into fresh, larger arrays
    assert restored.top(3) == counters.top(3) and restored.windowed("i0", 60) == counters.windowed("i0", 60)


def test_at_the_cap_the_least_recently_seen_items_make_room() -> None:
    counters = ItemCounters(CounterConfig(max_items=4, windows_s=(60,), buckets=6))  # 10 s buckets
    counters.update(["a", "b"], ["view"] * 2, [1_000, 1_000])
    counters.update(["c", "d"], ["view"] * 2, [2_000, 2_000])
    counters.update(["a"], ["view"], [3_000])  # a is recent again: b is now the stalest
    b_row = counters.items.lookup("b")
    counters.update(["e"], ["click"], [4_000])  # full: b's row is cleared and given to e
    assert "b" not in counters.items and counters.items.lookup("e") == b_row
    assert counters.total("b") == 0 and counters.total("e") == 1 and counters.total("e", "view") == 0
    assert counters.decayed("e", "view") == 0.0 and counters.windowed("e", 60) == 1
    assert counters.evicted == 1 and counters.items.overflow == 0
    assert counters.newest(3) == ["e", "d", "c"]
    restored = ItemCounters()
    restored.load_state_dict(counters.state_dict())
    # b's window record went with it: when that bucket expires, e's count is not taken down twice.
    for state in (counters, restored):
        state.update(["a", "f"], ["view"] * 2, [200_000, 200_000])  # f evicts c (d ties, higher row)
        assert state.windowed("e", 60) == 0 and state.windowed("a", 60) == 1
        assert "c" not in state.items and state.total("f") == 1 and state.evicted == 2
        assert state.top(10) == [("a", 3.0), ("e", 1.0), ("f", 1.0), ("d", 1.0)]  # ties by row


def test_a_batch_that_crosses_the_cap_before_the_arrays_grew_evicts_cleanly() -> None:
    counters = ItemCounters(CounterConfig(max_items=1500, windows_s=(60,), buckets=6))
    counters.update([f"i{j}" for j in range(1000)], ["view"] * 1000, [1000] * 1000)
    counters.update([f"k{j}" for j in range(600)], ["view"] * 600, [2000] * 600)  # 100 do not fit
    assert counters.items.used == 1500 and counters.items.overflow == 0
    assert all(counters.total(f"k{j}") == 1 for j in range(600))
    assert counters.evicted == 100 and sum(counters.total(f"i{j}") for j in range(1000)) == 900


def test_newest_lists_each_item_once() -> None:
    counters = ItemCounters(CounterConfig(max_items=2, windows_s=(60,), buckets=6))
    for n, item in enumerate("abca"):  # a is evicted by c, then comes back
        counters.update([item], ["view"], [1000 * (n + 1)])
    assert counters.newest(5) == ["a", "c"] and counters.newest(0) == []


def test_an_evicting_batch_never_evicts_its_own_items() -> None:
    counters = ItemCounters(CounterConfig(max_items=3, windows_s=(60,), buckets=6))
    counters.update(["x", "y", "z"], ["view"] * 3, [1, 2, 3])
    counters.update(["x", "new1", "new2"], ["view"] * 3, [10, 10, 10])  # x stays: it is in the batch
    assert set(counters.items.ids()) == {"x", "new1", "new2"}
    assert counters.total("x") == 2 and counters.items.overflow == 0


@given(
    st.lists(st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.0, 3.25, 7.0, 1e9]), min_size=1, max_size=400),
    st.integers(min_value=0, max_value=60),
    st.integers(min_value=1, max_value=400),
)
@settings(max_examples=300, deadline=None)
def test_top_rows_is_exact_with_ties_by_row(values: list[float], k: int, repeat: int) -> None:
    # Repeating the list makes long arrays (the sampled-cut path) with many ties.
    array = np.tile(np.array(values, dtype=np.float64), repeat)
    expected = sorted(range(len(array)), key=lambda row: (-array[row], row))[:k]
    assert top_rows(array, k).tolist() == expected


def test_top_rows_on_long_skewed_and_sparse_arrays_is_exact() -> None:
    values = np.random.default_rng(0).zipf(1.3, size=1_000_000).astype(np.float64)
    expected = np.lexsort((np.arange(len(values)), -values))[:200]
    assert top_rows(values, 200).tolist() == expected.tolist()
    sparse = np.zeros(1_000_000)  # mostly zeros: the cut ties with most rows
    sparse[np.random.default_rng(1).choice(1_000_000, 50, replace=False)] = 3.0
    expected = np.lexsort((np.arange(len(sparse)), -sparse))[:200]
    assert top_rows(sparse, 200).tolist() == expected.tolist()

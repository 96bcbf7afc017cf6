"""The transformer, its item map and its trainer: causality, growth, eviction, exact delta tracking."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learners.item_rows import ItemRows
from learners.sasrec import SASRec, SASRecConfig
from learners.sequences import leave_last_out, sequences_from_events, windows
from learners.training import SequenceTrainer, TrainConfig, rank_metrics

SMALL = SASRecConfig(max_len=8, dim=16, blocks=2, heads=2, dropout=0.0, negatives=16, loss="sampled")


def test_attention_is_causal_and_padding_is_inert() -> None:
    torch.manual_seed(0)
    model = SASRec(SMALL, rows=20)
    model.init_rows(torch.arange(1, 20))
    model.eval()
    seq = torch.tensor([[0, 0, 0, 3, 4, 5, 6, 7]])
    changed_future = torch.tensor([[0, 0, 0, 3, 4, 5, 6, 19]])
    with torch.no_grad():
        a, b = model.hidden(seq), model.hidden(changed_future)
    # Positions before the change see nothing of it; the last one does.
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-6)
    assert not torch.allclose(a[:, -1], b[:, -1])
    # More left padding does not change the state of a history.
    with torch.no_grad():
        shorter = model.user_vectors(torch.tensor([[0, 0, 0, 0, 0, 5, 6, 7]]))
        same = model.user_vectors(torch.tensor([[0, 0, 0, 0, 0, 5, 6, 7]]))
    assert torch.isfinite(shorter).all() and torch.equal(shorter, same)


@settings(max_examples=40, deadline=None)
@given(
    block=st.sampled_from(["sasrec", "hstu"]),
    heads=st.sampled_from([1, 2, 4]),
    blocks=st.integers(1, 3),
    cosine=st.booleans(),
    length=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_the_serving_state_equals_the_batched_forward(
    block: str, heads: int, blocks: int, cosine: bool, length: int, seed: int
) -> None:
    torch.manual_seed(seed)
    config = SASRecConfig(max_len=8, dim=16, heads=heads, blocks=blocks, cosine=cosine, block=block)
    model = SASRec(config, rows=30)
    model.init_rows(torch.arange(1, 30))
    model.eval()
    rows = torch.randint(1, 30, (length,))
    padded = torch.cat([torch.zeros(8 - length, dtype=torch.int64), rows]).view(1, -1)
    with torch.no_grad():
        expected = model.user_vectors(padded)[0]  # left-padded to max_len, as training sees it
        assert torch.allclose(model.state(rows), expected, atol=1e-5)


def test_item_rows_grow_then_evict_the_stalest() -> None:
    rows = ItemRows(capacity=4, initial_rows=2)
    first = rows.assign(["a", "b"], step=1)
    assert first.rows.tolist() == [1, 2] and rows.allocated == 3
    grown = rows.assign(["c"], step=2)
    assert grown.rows.tolist() == [3] and rows.allocated == 4  # grew by half
    rows.assign(["d"], step=3)
    assert rows.allocated == 5 and len(rows) == 4  # capacity reached
    rows.assign(["b"], step=4)  # "a" is now the stalest
    change = rows.assign(["e"], step=5)
    assert change.evicted == ["a"] and change.rows.tolist() == [1]
    assert rows.lookup(["a", "e", "b"]).tolist() == [0, 1, 2]
    restored = ItemRows.from_ids(rows.ids(), capacity=4)
    assert restored.lookup(["b", "c", "d", "e"]).tolist() == rows.lookup(["b", "c", "d", "e"]).tolist()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=0, max_size=40), st.integers(1, 10))
def test_windows_learn_every_transition_once(items: list[int], max_len: int) -> None:
    inputs, targets = windows([items], max_len=max_len)
    pairs = sorted(
        (int(i), int(t))
        for row_in, row_t in zip(inputs, targets, strict=True)
        for i, t in zip(row_in, row_t, strict=True)
        if t
    )
    assert pairs == sorted(itertools.pairwise(items))
    assert inputs.shape[1:] == (max_len,) if len(inputs) else True


def test_leave_last_out_and_time_order() -> None:
    seqs = sequences_from_events([("u", "b", 20), ("u", "a", 10), ("u", "c", 30), ("u", "d", 30)])
    assert seqs == {"u": ["a", "b", "c", "d"]}  # ties keep arrival order
    split = leave_last_out(seqs)
    assert split.train["u"] == ["a", "b"] and split.valid["u"] == "c" and split.test["u"] == "d"


def test_rank_metrics() -> None:
    hr, ndcg = rank_metrics(np.array([0, 1, 10, 50]), k=10)
    assert hr == pytest.approx(0.5)
    assert ndcg == pytest.approx((1 / np.log2(2) + 1 / np.log2(3)) / 4)


def _synthetic(users: int = 60, items: int = 30, length: int = 12, seed: int = 0) -> dict[str, list[str]]:
    """Users walk the catalogue in steps of one: the next item is predictable from the last."""
    rng = np.random.default_rng(seed)
    out = {}
    for user in range(users):
        start = int(rng.integers(items))
        out[f"u{user}"] = [f"i{(start + step) % items}" for step in range(length)]
    return out


def test_training_learns_a_sequential_pattern() -> None:
    seqs = _synthetic()
    trainer = SequenceTrainer(config=SMALL, train=TrainConfig(lr=5e-3, batch_size=32))
    rows = trainer.rows_for(seqs)
    hist, target = [r[:-1] for r in rows], [r[-1] for r in rows]
    before = trainer.evaluate(hist, target)
    trainer.fit([r[:-1] for r in rows], epochs=30)
    after = trainer.evaluate(hist, target)
    # A popularity-free pattern: only a sequential model can get it (10 of 30 items ≈ 0.33 by chance).
    assert after.hr > 0.9 and after.hr > before.hr + 0.4


def test_touched_rows_are_exactly_the_rows_that_moved() -> None:
    trainer = SequenceTrainer(config=SMALL, train=TrainConfig(lr=1e-2))
    rows = trainer.rows_for(_synthetic(users=10, items=200, length=6))
    trainer.clear_touched()
    before = trainer.params()["item_emb.weight"]
    trainer.fit(rows[:3], epochs=1)
    after = trainer.params()["item_emb.weight"]
    moved = np.flatnonzero((before != after).any(axis=1))
    touched = trainer.touched_rows()
    assert set(moved.tolist()) <= set(touched.tolist())  # nothing moves untracked
    assert len(touched) < trainer.model.rows / 2  # and the delta is far from the whole table


def test_new_items_grow_the_table_and_are_tracked() -> None:
    trainer = SequenceTrainer(config=SMALL, train=TrainConfig(capacity=5000))
    trainer.rows_for({"u": [f"i{n}" for n in range(10)]})
    trainer.clear_touched()
    allocated = trainer.model.rows
    trainer.rows_for({"v": [f"new{n}" for n in range(allocated + 10)]})
    assert trainer.model.rows > allocated
    new_rows = trainer.items.lookup([f"new{n}" for n in range(allocated + 10)])
    assert set(new_rows.tolist()) <= set(trainer.touched_rows().tolist())
    table = trainer.params()["item_emb.weight"]
    assert np.abs(table[new_rows]).sum(axis=1).min() > 0  # initialised, not zero


def test_full_softmax_option_trains() -> None:
    config = SASRecConfig(max_len=8, dim=16, blocks=1, dropout=0.0, negatives=0)
    trainer = SequenceTrainer(config=config, train=TrainConfig(lr=5e-3))
    rows = trainer.rows_for(_synthetic(users=20, items=15))
    first = trainer.fit(rows, epochs=1).loss
    trainer.fit(rows, epochs=10)
    assert trainer.fit(rows, epochs=1).loss < first
    # The full softmax moves every row that holds an item, and no spare row of the table.
    assert trainer.touched_rows().tolist() == list(range(1, len(trainer.items) + 1))
    assert not trainer.params()["item_emb.weight"][len(trainer.items) + 1 :].any()


def test_a_short_window_without_padding_gives_the_padded_state() -> None:
    torch.manual_seed(1)
    model = SASRec(SMALL, rows=20)
    model.init_rows(torch.arange(1, 20))
    model.eval()
    with torch.no_grad():
        padded = model.user_vectors(torch.tensor([[0, 0, 0, 0, 5, 6, 7, 8]]))
        trimmed = model.user_vectors(torch.tensor([[5, 6, 7, 8]]))
    assert torch.allclose(padded, trimmed, atol=1e-5)

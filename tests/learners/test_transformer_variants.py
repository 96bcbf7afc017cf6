"""The stronger transformer's parts: the full and sampled softmax losses, the HSTU block, the loss
chosen by catalogue size, configs from settings, and deltas that ship only rows that drifted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from freshrec.settings import TrainSettings
from learners.sasrec import SASRec, SASRecConfig
from learners.training import SequenceTrainer, TrainConfig, configs_from_settings


def _model(config: SASRecConfig, rows: int = 12, seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    model = SASRec(config, rows=rows)
    model.init_rows(torch.arange(1, rows))
    model.eval()  # no dropout: the loss is a deterministic function of the parameters
    return model


def test_the_full_softmax_loss_is_the_cross_entropy_over_every_item() -> None:
    model = _model(SASRecConfig(max_len=4, dim=8, blocks=1, dropout=0.0, loss="full"))
    seq = torch.tensor([[0, 3, 5, 7], [0, 0, 2, 9]])
    target = torch.tensor([[0, 5, 7, 1], [0, 0, 9, 4]])
    with torch.no_grad():
        loss = model.loss(seq, target, None)
        h = model.hidden(seq)  # (B, T, D)
        table = model.item_emb.weight  # (N, D)
        terms = []
        for b, t in [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]:  # the real targets
            logits = [float(h[b, t] @ table[row]) for row in range(1, model.rows)]  # padding excluded
            z = math.log(sum(math.exp(x) for x in logits))
            terms.append(z - logits[int(target[b, t]) - 1])
    assert float(loss) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_the_sampled_loss_subtracts_log_s_q_from_each_negative() -> None:
    model = _model(SASRecConfig(max_len=4, dim=8, blocks=1, dropout=0.0, negatives=3, loss="sampled"))
    seq = torch.tensor([[0, 3, 5, 7]])
    target = torch.tensor([[0, 0, 0, 2]])
    negatives = torch.tensor([4, 2, 9])  # 2 is the target: masked out
    q = torch.tensor([0.5, 0.2, 0.01])  # a popular, a middling and a rare draw
    with torch.no_grad():
        loss = model.loss(seq, target, negatives, torch.log(q))
        h = model.hidden(seq)[0, 3]
        table = model.item_emb.weight
        pos = float(h @ table[2])
        corrected = [float(h @ table[row]) - math.log(3 * float(p)) for row, p in [(4, 0.5), (9, 0.01)]]
        expected = math.log(math.exp(pos) + sum(math.exp(x) for x in corrected)) - pos
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # With uniform draws over the table (log_q omitted), the correction is log(S / (N - 1)).
    with torch.no_grad():
        uniform = model.loss(seq, target, negatives)
        shift = math.log(3 / (model.rows - 1))
        plain = [float(h @ table[row]) - shift for row in (4, 9)]
        expected_uniform = math.log(math.exp(pos) + sum(math.exp(x) for x in plain)) - pos
    assert float(uniform) == pytest.approx(expected_uniform, rel=1e-5)


def test_the_sampled_loss_estimates_the_full_one() -> None:
    """Averaged over popularity-skewed draws, the corrected loss is near the full softmax's."""
    rows = 200
    model = _model(SASRecConfig(max_len=4, dim=8, blocks=1, dropout=0.0, negatives=64), rows=rows)
    with torch.no_grad():
        model.item_emb.weight[1:] *= 4  # spread the logits so that the correction matters
    seq = torch.tensor([[0, 3, 5, 7]])
    target = torch.tensor([[0, 5, 7, 11]])
    q = torch.arange(1, rows, dtype=torch.float64) ** 1.0
    q = q / q.sum()  # row r drawn ∝ r
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        full = float(model.loss(seq, target, None))
        draws = [torch.multinomial(q, 64, replacement=True, generator=generator) for _ in range(200)]
        sampled = np.mean([float(model.loss(seq, target, d + 1, torch.log(q[d]).float())) for d in draws])
    assert sampled == pytest.approx(full, abs=0.1 * full)


def test_the_hstu_block_is_causal() -> None:
    model = _model(SASRecConfig(max_len=8, dim=16, blocks=2, heads=2, block="hstu"), rows=20)
    seq = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8]])
    for position in range(2, 8):
        changed = seq.clone()
        changed[0, position] = 19
        with torch.no_grad():
            a, b = model.hidden(seq), model.hidden(changed)
        assert torch.allclose(a[:, :position], b[:, :position], atol=1e-6)  # earlier: untouched
        assert not torch.allclose(a[:, position:], b[:, position:])
    with torch.no_grad():  # and a short unpadded history gives its padded state
        padded = model.user_vectors(torch.tensor([[0, 0, 0, 0, 5, 6, 7, 8]]))
        trimmed = model.user_vectors(torch.tensor([[5, 6, 7, 8]]))
    assert torch.allclose(padded, trimmed, atol=1e-5)


def test_the_loss_follows_the_catalogue_size() -> None:
    auto = SASRecConfig(full_softmax_max_items=1_000)
    assert auto.full_softmax(1_000) and not auto.full_softmax(1_001)
    assert SASRecConfig(loss="full", full_softmax_max_items=10).full_softmax(10**6)
    assert not SASRecConfig(loss="sampled").full_softmax(10)
    assert SASRecConfig(loss="sampled", negatives=0).full_softmax(10**6)  # 0 negatives: full, as before
    with pytest.raises(ValueError, match="block="):
        SASRecConfig(block="gru")


def test_configs_round_trip_and_come_from_settings() -> None:
    settings = TrainSettings(
        block="hstu",
        loss="sampled",
        dropout=0.3,
        sample_alpha=0.5,
        device="cpu",
        delta_min_change=1e-3,
        batch_size=64,
    )
    model, train = configs_from_settings(settings, max_epochs=7)
    assert (model.block, model.loss, model.dropout, model.sample_alpha) == ("hstu", "sampled", 0.3, 0.5)
    assert (train.device, train.delta_min_change, train.max_epochs, train.batch_size) == ("cpu", 1e-3, 7, 64)
    assert SASRecConfig.from_dict(model.to_dict()) == model
    # A version published before these fields existed loads as the SASRec block.
    old = {k: v for k, v in model.to_dict().items() if k not in ("block", "loss", "sample_alpha")}
    assert SASRecConfig.from_dict(old).block == "sasrec"


def _walks(users: int, items: int, length: int = 8) -> dict[str, list[str]]:
    rng = np.random.default_rng(0)
    return {
        f"u{u}": [f"i{(start + step) % items}" for step in range(length)]
        for u, start in enumerate(rng.integers(items, size=users).tolist())
    }


def test_popularity_sampling_draws_popular_rows_more_and_trains() -> None:
    config = SASRecConfig(
        max_len=8, dim=16, blocks=1, dropout=0.0, negatives=64, loss="sampled", sample_alpha=1.0
    )
    trainer = SequenceTrainer(config=config, train=TrainConfig(lr=5e-3))
    seqs = _walks(40, 30)
    seqs["fan"] = ["i0"] * 200  # i0 is by far the most frequent target
    rows = trainer.rows_for(seqs)
    from learners.sequences import windows

    _, targets = windows(rows, max_len=8)
    draw = trainer._sampler(targets, len(trainer.items))
    drawn, log_q = draw()
    popular = int(trainer.items.lookup(["i0"])[0])
    expected_q = ((targets == popular).sum() + 1) / ((targets > 0).sum() + len(trainer.items))
    assert expected_q > 0.3  # i0 is about 40% of the targets, 1/30 of the catalogue
    assert (drawn == popular).mean() > 0.2
    assert np.allclose(np.exp(log_q[drawn == popular]), expected_q, rtol=1e-4)
    first = trainer.fit(rows, epochs=1).loss
    assert trainer.fit(rows, epochs=5).loss < first


def test_a_delta_ships_only_rows_that_drifted_and_keeps_the_rest_pending() -> None:
    config = SASRecConfig(max_len=8, dim=16, blocks=1, dropout=0.0, loss="full")
    trainer = SequenceTrainer(config=config, train=TrainConfig(lr=1e-2, delta_min_change=0.015))
    trainer.rows_for(_walks(40, 300))
    trainer.clear_touched()
    published = trainer.params()["item_emb.weight"]
    window = trainer.rows_for(_walks(3, 300))
    trainer.fit(window, epochs=1)  # one Adam step moves a coordinate by at most lr = 0.01
    touched = np.flatnonzero(trainer._touched)
    assert len(touched) == len(trainer.items)  # the full softmax moved every row...
    assert len(trainer.touched_rows()) == 0  # ...none by more than 0.015: nothing ships yet
    trainer.clear_touched(trainer.touched_rows())
    # More steps: the drift accumulates against the published value, not the last cycle's.
    shipped = 0
    for _ in range(10):
        trainer.fit(window, epochs=1)
        delta = trainer.touched_rows()
        now = trainer.params()["item_emb.weight"]
        pending = np.setdiff1d(np.flatnonzero(trainer._touched), delta)
        if len(delta):
            assert np.abs(now[delta] - published[delta]).max(axis=1).min() > 0.015
        if len(pending):
            assert np.abs(now[pending] - published[pending]).max() <= 0.015  # replicas lag by ≤ 0.015
        shipped += len(delta)
        trainer.clear_touched(delta)
        published[delta] = now[delta]
        assert set(np.flatnonzero(trainer._touched).tolist()) == set(pending.tolist())
    assert shipped > 0
    # Rows that change hands always ship, however little they moved.
    change = trainer.rows_for({"new": ["brand-new-a", "brand-new-b"]})
    assert set(change[0]) <= set(trainer.touched_rows().tolist())


def test_a_window_softmax_moves_only_the_window_rows() -> None:
    """The fine-tune's full softmax normalises over the window's items: nothing else moves or ships."""
    config = SASRecConfig(max_len=8, dim=16, blocks=1, dropout=0.0, loss="full")
    trainer = SequenceTrainer(config=config, train=TrainConfig(lr=1e-2, softmax_over="window"))
    trainer.rows_for(_walks(40, 300))
    trainer.clear_touched()
    before = trainer.params()["item_emb.weight"]
    window = trainer.rows_for(_walks(3, 300))
    in_window = sorted({row for rows in window for row in rows})
    first = trainer.fit(window, epochs=1).loss
    assert trainer.touched_rows().tolist() == in_window
    after = trainer.params()["item_emb.weight"]
    moved = np.flatnonzero((before != after).any(axis=1))
    assert set(moved.tolist()) == set(in_window)
    assert trainer.fit(window, epochs=10).loss < first
    # The loss is the cross-entropy over the window's items: S rows, each with q = 1/S.
    rows = torch.tensor(in_window)
    seq, target = torch.tensor([[0, 0, 0, 0, 0, *window[0][:3]]]), torch.tensor([[0] * 5 + window[0][1:4]])
    trainer.model.eval()
    with torch.no_grad():
        log_q = torch.full((len(rows),), -math.log(len(rows)))
        sampled = trainer.model.loss(seq, target, rows, log_q)
        h = trainer.model.hidden(seq)[0, 5:]
        logits = h @ trainer.model.item_emb.weight[rows].T  # (3, S)
        labels = torch.tensor([in_window.index(t) for t in window[0][1:4]])
        expected = torch.nn.functional.cross_entropy(logits, labels)
    assert float(sampled) == pytest.approx(float(expected), rel=1e-5)

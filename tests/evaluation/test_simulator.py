"""The closed-loop simulator drives the real stack and reports what it promises."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from support import free_port_pair

from evaluation import simulator
from freshrec.settings import Settings


def test_a_short_simulation_runs_every_policy_end_to_end(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    config = simulator.SimConfig(requests=60, users=20, new_items=8, finetune_every=30, widely=2)
    plot = tmp_path / "simulation.png"
    port, _ = free_port_pair()
    summaries = simulator.run(
        settings, config, policies=("none", "uncertainty"), seeds=(3,), port=port, plot=plot
    )
    assert [(s["policy"], s["seed"], s["requests"]) for s in summaries] == [
        ("none", 3, 60),
        ("uncertainty", 3, 60),
    ]
    for summary in summaries:
        assert 0 < summary["clicks_per_request"] < 10 and 0 < summary["coverage"] <= 1  # users do click
        assert summary["good_new_items"] == 2  # a quarter of the released items are good
    # Exploration shows more of the catalogue than the fused ranking alone.
    assert summaries[1]["coverage"] > summaries[0]["coverage"]
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # One seed: the paired comparison has its mean and no bounded interval.
    (against,) = simulator.paired(summaries)
    ratio = summaries[1]["clicks_per_request"] / summaries[0]["clicks_per_request"] - 1
    assert against["policy"] == "uncertainty" and against["seeds"] == 1
    assert against["mean"] == pytest.approx(ratio) and against["high"] == float("inf")


def test_paired_differences_and_their_interval() -> None:
    rows = [
        {"policy": policy, "seed": seed, "clicks_per_request": value}
        for policy, seed, value in [
            ("none", 0, 1.00), ("none", 1, 1.10), ("none", 2, 0.90), ("none", 3, 1.00),
            ("uncertainty", 0, 0.98), ("uncertainty", 1, 1.10), ("uncertainty", 2, 0.85),
            ("uncertainty", 3, 0.97),
            ("epsilon", 0, 0.95), ("epsilon", 9, 2.0),  # seed 9 has no baseline: not paired
        ]
    ]  # fmt: skip
    by_policy = {c["policy"]: c for c in simulator.paired(rows)}
    ratios = np.array([0.98 / 1.00, 1.10 / 1.10, 0.85 / 0.90, 0.97 / 1.00]) - 1
    half = 3.183 * ratios.std(ddof=1) / 2  # t(0.975, 3 df) = 3.1824, rounded up; sd / sqrt(4)
    unc = by_policy["uncertainty"]
    assert unc["seeds"] == 4 and unc["mean"] == pytest.approx(ratios.mean())
    assert (unc["low"], unc["high"]) == pytest.approx((ratios.mean() - half, ratios.mean() + half))
    assert all(type(unc[key]) is float for key in ("mean", "low", "high"))  # JSON numbers, not numpy
    assert by_policy["epsilon"]["seeds"] == 1 and by_policy["epsilon"]["mean"] == pytest.approx(-0.05)

    # A seed run twice pairs its runs in order; a zero baseline is left out; no pairs: NaN.
    twice = [
        {"policy": policy, "seed": 0, "clicks_per_request": value}
        for policy, value in [("none", 1.0), ("none", 2.0), ("uncertainty", 1.1), ("uncertainty", 2.2)]
    ]
    (again,) = simulator.paired(twice)
    assert again["seeds"] == 2 and again["mean"] == pytest.approx(0.1) and again["high"] == pytest.approx(0.1)
    zero = [{"policy": "none", "seed": 0, "clicks_per_request": 0.0},
            {"policy": "epsilon", "seed": 0, "clicks_per_request": 0.5},
            {"policy": "epsilon", "seed": 5, "clicks_per_request": 0.5}]  # fmt: skip
    (alone,) = simulator.paired(zero)
    assert alone["seeds"] == 0 and np.isnan(alone["mean"]) and np.isnan(alone["low"])

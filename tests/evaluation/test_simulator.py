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


def test_off_policy_estimates_come_with_the_truth_of_each_target_run_on_policy(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    config = simulator.SimConfig(requests=60, users=20, new_items=8, finetune_every=30, widely=2)
    port, _ = free_port_pair()
    targets: tuple[tuple[str, dict[str, float]], ...] = (("none", {}), ("uncertainty", {"ucb_c": 1.0}))
    plot = tmp_path / "ope.png"
    report = simulator.ope(settings, config, seeds=(3,), port=port, targets=targets, plot=plot)
    rows = report["ope"]
    assert [(r["seed"], r["logging"], r["target"], r["estimator"]) for r in rows] == [
        (3, "uncertainty", target, estimator)
        for target in ("none", "uncertainty")
        for estimator in ("ips", "snips", "dr")
    ]
    assert rows[3]["params"] == {"ucb_c": 1.0}
    for row in rows:
        assert 0 < row["truth"] < 1 and row["ci95"][0] <= row["estimate"] <= row["ci95"][1]
        assert 0 < row["ess"] <= 600 and 0 < row["logged_ctr"] < 1  # 60 requests of 10 slots
    # The truth is the target's own run: one per target, beside the logging run.
    assert [(r["policy"], r["role"], r["requests"]) for r in report["runs"]] == [
        ("uncertainty", "logging", 60), ("none", "target", 60), ("uncertainty", "target", 60)
    ]  # fmt: skip
    for target in range(2):
        run = report["runs"][1 + target]
        assert rows[3 * target]["truth"] == pytest.approx(run["clicks_per_request"] / 10)
    assert [s["estimator"] for s in report["summary"]] == ["ips", "snips", "dr"]
    assert all(s["cases"] == 2 and 0 <= s["covered"] <= 2 for s in report["summary"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

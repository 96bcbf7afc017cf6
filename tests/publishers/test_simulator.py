"""The closed-loop simulator drives the real stack and reports what it promises."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from support import free_port_pair

from freshrec.settings import Settings
from publishers import simulator


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
        assert 0 <= summary["clicks_per_request"] <= 10 and 0 < summary["coverage"] <= 1
        assert summary["good_new_items"] == 2  # a quarter of the released items are good
    # Exploration shows more of the catalogue than the fused ranking alone.
    assert summaries[1]["coverage"] > summaries[0]["coverage"]
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""``training_runs``: one row per training run (a fine-tune cycle, an offline evaluation), failed
runs included with their error, so the dashboards show what was tried as well as what shipped."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from freshrec.store import Store

__all__ = ["record_run"]


def record_run(
    store: Store,
    *,
    run_id: str,
    kind: str,
    dataset: str,
    events: int,
    steps: int,
    loss: float,
    metrics: dict[str, Any],
    params: dict[str, Any],
    started_at: datetime,
    version: int | None,
    status: str = "ok",
    error: str = "",
) -> None:
    """One row of ``training_runs``."""
    hr = metrics.get("hr@10")
    ndcg = metrics.get("ndcg@10")
    store.insert(
        "training_runs",
        [
            [run_id],
            [kind],
            [dataset],
            [status],
            [error],
            [events],
            [steps],
            [float(loss)],
            [None if hr is None else float(hr)],
            [None if ndcg is None else float(ndcg)],
            [version],
            [orjson.dumps(metrics).decode()],
            [orjson.dumps(params).decode()],
            [started_at],
            [datetime.now(UTC)],
        ],
        column_names=[
            "run_id",
            "kind",
            "source",
            "status",
            "error",
            "events",
            "steps",
            "loss",
            "hr_at_10",
            "ndcg_at_10",
            "published_version",
            "metrics",
            "params",
            "started_at",
            "finished_at",
        ],
    )

"""Offline training and evaluation of the transformer on a dataset (``freshrec train --offline``).

The protocol of the HSTU repository: each user's history in time order; the last item is the test
target, the one before the validation target, the rest trains. Training stops early when validation
NDCG@10 has not improved for ``patience`` epochs, and the best epoch's parameters are evaluated on
test, against the full catalogue with the user's seen items excluded. The popularity baseline ranks
by counts over the training part under the same protocol. The run is recorded in ClickHouse
``training_runs``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from freshrec.datasets import load_dataset
from freshrec.settings import Settings
from freshrec.store import Store
from learners.runs import record_run
from learners.sasrec import SASRecConfig
from learners.sequences import leave_last_out, sequences_from_records
from learners.training import Metrics, SequenceTrainer, TrainConfig, rank_metrics

__all__ = ["OfflineResult", "popularity_metrics", "run"]

logger = logging.getLogger(__name__)


@dataclass
class OfflineResult:
    dataset: str
    run_id: str
    valid: Metrics
    test: Metrics
    popularity: Metrics
    epochs: int
    best_epoch: int
    wall_s: float
    users: int
    items: int
    interactions: int
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` shape of ``freshrec train --offline``."""
        return {
            "dataset": self.dataset,
            "hr@10": self.test.hr,
            "ndcg@10": self.test.ndcg,
            "popularity": {"hr@10": self.popularity.hr, "ndcg@10": self.popularity.ndcg},
            "wall_s": self.wall_s,
            "valid": {"hr@10": self.valid.hr, "ndcg@10": self.valid.ndcg},
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "users": self.users,
            "items": self.items,
            "interactions": self.interactions,
            "run_id": self.run_id,
        }


def popularity_metrics(
    train: list[list[int]], histories: list[list[int]], targets: list[int], *, rows: int, k: int = 10
) -> Metrics:
    """Rank by training-part counts, seen items excluded; ties broken against the target (strict >)."""
    counts = np.zeros(rows, dtype=np.float64)
    np.add.at(counts, np.concatenate([np.asarray(s, dtype=np.int64) for s in train if s]), 1.0)
    counts[0] = -np.inf
    ranks = np.empty(len(targets), dtype=np.int64)
    for index, (history, target) in enumerate(zip(histories, targets, strict=True)):
        scores = counts.copy()
        scores[np.asarray(history, dtype=np.int64)] = -np.inf
        ranks[index] = int((scores > counts[target]).sum())
    hr, ndcg = rank_metrics(ranks, k=k)
    return Metrics(hr=hr, ndcg=ndcg, users=len(targets))


def run(
    settings: Settings,
    dataset: str,
    *,
    config: SASRecConfig,
    train: TrainConfig,
    store: Store | None = None,
    on_epoch: Callable[[int, float, Metrics], None] | None = None,
) -> OfflineResult:
    """Train on ``dataset`` with early stopping, evaluate on test, record in ``training_runs``."""
    started = time.monotonic()
    started_at = datetime.now(UTC)
    data = load_dataset(dataset, datasets_dir=settings.datasets_dir, cache_dir=settings.cache_dir)
    sequences = sequences_from_records(data.records)
    split = leave_last_out(sequences)
    trainer = SequenceTrainer(config=config, train=train)
    full = trainer.rows_for(sequences)  # every item gets its row up front: the catalogue is closed
    user_rows = dict(zip(sequences, full, strict=True))
    train_rows = [user_rows[user][: len(split.train[user])] for user in sequences]
    evaluated = list(split.test)
    valid_hist = [user_rows[u][:-2] for u in evaluated]
    valid_target = [user_rows[u][-2] for u in evaluated]
    test_hist = [user_rows[u][:-1] for u in evaluated]
    test_target = [user_rows[u][-1] for u in evaluated]

    optimisers = trainer._optimisers()
    best: tuple[float, int, dict[str, Any]] | None = None
    history: list[dict[str, float]] = []
    epoch = 0
    for epoch in range(1, train.max_epochs + 1):
        fitted = trainer.fit(train_rows, epochs=1, optimisers=optimisers)
        valid = trainer.evaluate(valid_hist, valid_target)
        history.append(
            {
                "epoch": epoch,
                "loss": fitted.loss,
                "hr@10": valid.hr,
                "ndcg@10": valid.ndcg,
                "seconds": fitted.seconds,
            }
        )
        logger.info(
            "epoch %d loss %.4f valid HR@10 %.4f NDCG@10 %.4f", epoch, fitted.loss, valid.hr, valid.ndcg
        )
        if on_epoch is not None:
            on_epoch(epoch, fitted.loss, valid)
        if best is None or valid.ndcg > best[0]:
            best = (valid.ndcg, epoch, {k: v.clone() for k, v in trainer.model.state_dict().items()})
        elif epoch - best[1] >= train.patience:
            break
    assert best is not None
    trainer.model.load_state_dict(best[2])
    valid = trainer.evaluate(valid_hist, valid_target)
    test = trainer.evaluate(test_hist, test_target)
    popularity = popularity_metrics(train_rows, test_hist, test_target, rows=trainer.model.rows)
    result = OfflineResult(
        dataset=dataset,
        run_id=uuid.uuid4().hex,
        valid=valid,
        test=test,
        popularity=popularity,
        epochs=epoch,
        best_epoch=best[1],
        wall_s=time.monotonic() - started,
        users=len(sequences),
        items=len(trainer.items),
        interactions=sum(len(s) for s in sequences.values()),
        history=history,
    )
    if store is not None:
        record_run(
            store,
            run_id=result.run_id,
            kind="offline",
            dataset=dataset,
            events=result.interactions,
            steps=trainer.step,
            loss=history[best[1] - 1]["loss"] if history else float("nan"),
            metrics=result.to_json(),
            params={"model": config.to_dict(), "train": train.to_dict(), "history": history},
            started_at=started_at,
            version=None,
        )
    return result

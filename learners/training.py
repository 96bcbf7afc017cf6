"""Training the sequential transformer: epochs, full-catalogue evaluation, warm-started fine-tunes.

:class:`SequenceTrainer` owns a :class:`~learners.sasrec.SASRec`, its :class:`~learners.item_rows.ItemRows`
map and the set of table rows changed since the last publish (the delta tracker: TorchRec's idea of
tracking touched ids, which with a sparse table and ``SparseAdam`` is exactly the set of rows that
moved). Offline training (:mod:`evaluation.offline`) and the scheduled fine-tune
(:mod:`learners.finetune`) both drive it.

Evaluation follows the HSTU repository's protocol: the score of every item in the catalogue, the
user's seen items excluded, the rank of the held-out item; HR@k counts ranks below k, NDCG@k adds
``1 / log2(rank + 2)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from freshrec.settings import TrainSettings
from learners.item_rows import ItemRows
from learners.sasrec import SPARSE_TABLES, SASRec, SASRecConfig
from learners.sequences import Sequences, last_window, windows

__all__ = [
    "EpochResult",
    "Metrics",
    "SequenceTrainer",
    "TrainConfig",
    "configs_from_settings",
    "rank_metrics",
    "resolve_device",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-3  # Adam's step for dense parameters and SparseAdam's for the item table
    batch_size: int = 32  # training windows per step (ml-100k learned better than with 128)
    max_epochs: int = 200  # offline: upper bound before early stopping ends training
    # offline: epochs without a better validation NDCG@10 before stopping. The validation set is
    # small and noisy (943 targets on ml-100k): at 5 or 10 one seed stopped at epoch 16 (test HR@10
    # 0.149); at 20 all three seeds trained to epochs 57-68 and reached 0.215-0.219.
    patience: int = 20
    seed: int = 0  # initialisation, shuffling and negative sampling
    capacity: int = 1_000_000  # most items the table holds before stale rows are evicted
    threads: int = 0  # torch intra-op threads (0: torch's default)
    device: str = "auto"  # "cpu", "cuda", or "auto": CUDA when torch finds it, else the CPU
    # Sparse deltas publish a touched row only once it has drifted more than this (largest absolute
    # change of a coordinate) from what was last published; 0: every touched row.
    delta_min_change: float = 0.0
    # Where the full softmax normalises: over the whole "catalogue" (offline), or over the items of
    # the "window" being trained (the fine-tune): rows outside the window then never move, so a
    # cycle's sparse delta holds the window's items, not the whole table.
    softmax_over: str = "catalogue"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Metrics:
    hr: float
    ndcg: float
    users: int


@dataclass(frozen=True, slots=True)
class EpochResult:
    loss: float
    steps: int
    windows: int
    seconds: float
    stopped_by_budget: bool


def configs_from_settings(
    settings: TrainSettings, *, max_epochs: int | None = None
) -> tuple[SASRecConfig, TrainConfig]:
    """The model and training configuration that ``FRESHREC_TRAIN__*`` settings describe."""
    model = SASRecConfig(
        max_len=settings.max_len,
        dim=settings.dim,
        blocks=settings.blocks,
        dropout=settings.dropout,
        negatives=settings.negatives,
        block=settings.block,
        loss=settings.loss,
        full_softmax_max_items=settings.full_softmax_max_items,
        sample_alpha=settings.sample_alpha,
    )
    train = TrainConfig(
        lr=settings.lr,
        batch_size=settings.batch_size,
        capacity=settings.capacity,
        device=settings.device,
        delta_min_change=settings.delta_min_change,
    )
    return model, train if max_epochs is None else replace(train, max_epochs=max_epochs)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when torch finds a GPU, else the CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def rank_metrics(ranks: npt.NDArray[np.int64], *, k: int = 10) -> tuple[float, float]:
    """HR@k and NDCG@k from 0-based ranks of the held-out items."""
    if not len(ranks):
        return 0.0, 0.0
    hits = ranks < k
    return float(hits.mean()), float((hits / np.log2(ranks + 2.0)).mean())


class SequenceTrainer:
    """A SASRec model, its item map, its optimisers and its touched-row tracker."""

    def __init__(self, *, config: SASRecConfig, train: TrainConfig | None = None) -> None:
        self.config = config
        self.train_config = train or TrainConfig()
        if self.train_config.threads:
            torch.set_num_threads(self.train_config.threads)
        self.generator = torch.Generator().manual_seed(self.train_config.seed)
        self.rng = np.random.default_rng(self.train_config.seed)
        self.items = ItemRows(capacity=self.train_config.capacity)
        torch.manual_seed(self.train_config.seed)
        self.device = resolve_device(self.train_config.device)
        self.model = SASRec(config, rows=self.items.allocated).to(self.device)
        self.step = 0
        self._touched = np.zeros(self.items.allocated, dtype=bool)
        self._reassigned = np.zeros(self.items.allocated, dtype=bool)  # rows whose item changed
        self._published = self._table()  # the table as last published (what replicas hold)

    # -- the item map -----------------------------------------------------------------------------

    def rows_for(self, sequences: Sequences) -> list[list[int]]:
        """Each history as table rows, giving new items rows (growing or evicting as needed)."""
        flat = [item for items in sequences.values() for item in items]
        unique = list(dict.fromkeys(flat))
        assignment = self.items.assign(unique, step=self.step)
        if self.items.allocated > self.model.rows:
            self.model.grow(self.items.allocated)
            extra = self.items.allocated - len(self._touched)
            self._touched = np.concatenate([self._touched, np.zeros(extra, dtype=bool)])
            self._reassigned = np.concatenate([self._reassigned, np.zeros(extra, dtype=bool)])
            self._published = np.concatenate(
                [self._published, np.zeros((extra, self.config.dim), dtype=np.float32)]
            )
        if len(assignment.new_rows):
            self.model.init_rows(torch.from_numpy(assignment.new_rows), self.generator)
            self._touched[assignment.new_rows] = True
            self._reassigned[assignment.new_rows] = True
        if assignment.evicted:
            logger.info("evicted %d stale items to make room", len(assignment.evicted))
        row_of = dict(zip(unique, assignment.rows.tolist(), strict=True))
        return [[row_of[item] for item in items] for items in sequences.values()]

    def _table(self) -> npt.NDArray[np.float32]:
        return self.model.item_emb.weight.detach().cpu().numpy().copy()

    def touched_rows(self) -> npt.NDArray[np.int64]:
        """Rows of the item table to publish (sorted): the rows that changed since last published.

        With ``delta_min_change`` 0, every row a step touched. Above 0, only touched rows whose
        largest coordinate change since the last publish exceeds it, and every row that changed
        hands: a full softmax moves every row a little each step, and shipping them all would make
        each delta as large as the model. A row left out keeps its drift pending (it is compared
        with the published value, not the previous cycle's), so a replica's rows never differ from
        the trainer's by more than ``delta_min_change`` in any coordinate.
        """
        threshold = self.train_config.delta_min_change
        candidates = np.flatnonzero(self._touched).astype(np.int64)
        if threshold <= 0 or not len(candidates):
            return candidates
        table = self.model.item_emb.weight.detach()
        rows = torch.from_numpy(candidates).to(table.device)
        change = np.abs(table[rows].cpu().numpy() - self._published[candidates]).max(axis=1)
        keep = (change > threshold) | self._reassigned[candidates]
        kept: npt.NDArray[np.int64] = candidates[keep]
        return kept

    def clear_touched(self, rows: npt.NDArray[np.int64] | None = None) -> None:
        """Mark ``rows`` (default: every row) as published; other touched rows stay pending."""
        if rows is None:
            self._touched[:] = False
            self._reassigned[:] = False
            self._published = self._table()
            return
        self._touched[rows] = False
        self._reassigned[rows] = False
        self._published[rows] = self._table()[rows]

    # -- training ---------------------------------------------------------------------------------

    def _optimisers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        sparse = [p for name, p in self.model.named_parameters() if name in SPARSE_TABLES]
        dense = [p for name, p in self.model.named_parameters() if name not in SPARSE_TABLES]
        lr = self.train_config.lr
        return torch.optim.SparseAdam(sparse, lr=lr), torch.optim.Adam(dense, lr=lr)

    def fit(
        self,
        row_sequences: Sequence[Sequence[int]],
        *,
        epochs: int,
        budget_s: float | None = None,
        optimisers: tuple[torch.optim.Optimizer, torch.optim.Optimizer] | None = None,
    ) -> EpochResult:
        """Train ``epochs`` passes over the windows of ``row_sequences`` (or until ``budget_s``)."""
        started = time.monotonic()
        inputs, targets = windows(row_sequences, max_len=self.config.max_len)
        sparse_opt, dense_opt = optimisers or self._optimisers()
        usable = max(1, self.items.used)  # negatives among rows that hold items, never spare rows
        full = self.config.full_softmax(usable)
        sampler = None if full else self._sampler(targets, usable)
        if full and self.train_config.softmax_over == "window":
            sampler = self._window_rows(inputs, targets)
        device = self.device
        self.model.train()
        total, steps, stopped = 0.0, 0, False
        batch = self.train_config.batch_size
        for _ in range(epochs):
            order = self.rng.permutation(len(inputs))
            for start in range(0, len(order), batch):
                if budget_s is not None and time.monotonic() - started >= budget_s:
                    stopped = True
                    break
                index = order[start : start + batch]
                seq = torch.from_numpy(inputs[index]).to(device)  # (B, T)
                target = torch.from_numpy(targets[index]).to(device)  # (B, T)
                negatives, log_q = None, None  # the full softmax, which moves every used row
                drawn = np.zeros(0, dtype=np.int64)
                if sampler is not None:
                    drawn, drawn_log_q = sampler()
                    negatives = torch.from_numpy(drawn).to(device)  # (S,)
                    log_q = torch.from_numpy(drawn_log_q).to(device)  # (S,)
                loss = self.model.loss(seq, target, negatives, log_q, used=usable)
                sparse_opt.zero_grad(set_to_none=True)
                dense_opt.zero_grad(set_to_none=True)
                loss.backward()
                sparse_opt.step()
                dense_opt.step()
                self.step += 1
                steps += 1
                total += loss.item()
                if negatives is None:
                    touched = np.arange(1, usable + 1, dtype=np.int64)
                else:
                    touched = np.unique(
                        np.concatenate([inputs[index].ravel(), targets[index].ravel(), drawn])
                    )
                self._touched[touched] = True
                self.items.touch(touched, step=self.step)
            if stopped:
                break
        self._touched[0] = False  # padding never moves (its gradient is masked)
        return EpochResult(
            loss=total / max(steps, 1),
            steps=steps,
            windows=len(inputs),
            seconds=time.monotonic() - started,
            stopped_by_budget=stopped,
        )

    @staticmethod
    def _window_rows(
        inputs: npt.NDArray[np.int64], targets: npt.NDArray[np.int64]
    ) -> Callable[[], tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
        """Every row of the window as the "negatives", each with ``q = 1/S``: a log-Q correction of
        zero, so the sampled loss is exactly the softmax over the window's items."""
        rows = np.unique(np.concatenate([inputs.ravel(), targets.ravel()]))
        rows = rows[rows > 0]
        log_q = np.full(len(rows), -np.log(len(rows)), dtype=np.float32)
        return lambda: (rows, log_q)

    def _sampler(
        self, targets: npt.NDArray[np.int64], usable: int
    ) -> Callable[[], tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
        """Draws of ``negatives`` rows among 1..usable and their log-probabilities.

        Probabilities ∝ (count among this fit's targets + 1)^``sample_alpha``: 0 is uniform; towards
        1, popular items are drawn more often (harder negatives), which the log-Q correction in
        :meth:`SASRec.loss` accounts for. One cumulative table per fit, a binary search per draw.
        """
        size = self.config.negatives
        alpha = self.config.sample_alpha
        if alpha == 0:
            log_q = np.full(size, -np.log(usable), dtype=np.float32)
            return lambda: (self.rng.integers(1, usable + 1, size=size, dtype=np.int64), log_q)
        counts = np.bincount(targets.ravel(), minlength=usable + 1)[1 : usable + 1].astype(np.float64)
        weights = (counts + 1.0) ** alpha
        q = weights / weights.sum()
        cdf = np.cumsum(q)
        cdf[-1] = 1.0

        def draw() -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
            index = np.searchsorted(cdf, self.rng.random(size), side="right").clip(max=usable - 1)
            return index.astype(np.int64) + 1, np.log(q[index]).astype(np.float32)

        return draw

    # -- evaluation -------------------------------------------------------------------------------

    @torch.no_grad()
    def ranks(
        self, histories: Sequence[Sequence[int]], targets: Sequence[int], *, batch_size: int = 256
    ) -> npt.NDArray[np.int64]:
        """0-based rank of each target among all catalogue items, the history's items excluded."""
        self.model.eval()
        valid_rows = np.array([item is not None for item in self.items.ids()], dtype=bool)
        invalid = torch.from_numpy(~valid_rows[: self.model.rows])
        out = np.empty(len(targets), dtype=np.int64)
        for start in range(0, len(targets), batch_size):
            hist = histories[start : start + batch_size]
            seq = torch.from_numpy(np.stack([last_window(h, max_len=self.config.max_len) for h in hist]))
            scores = self.model.score_all(seq.to(self.device)).cpu()  # (B, N)
            scores[:, invalid] = float("-inf")
            target = torch.as_tensor(targets[start : start + batch_size], dtype=torch.int64)  # (B,)
            target_scores = scores.gather(1, target.view(-1, 1))  # (B, 1)
            for row, items in enumerate(hist):
                seen = torch.as_tensor(list(items), dtype=torch.int64)
                scores[row, seen] = float("-inf")
            out[start : start + len(hist)] = (scores > target_scores).sum(1).numpy()
        return out

    def evaluate(self, histories: Sequence[Sequence[int]], targets: Sequence[int], *, k: int = 10) -> Metrics:
        hr, ndcg = rank_metrics(self.ranks(histories, targets), k=k)
        return Metrics(hr=hr, ndcg=ndcg, users=len(targets))

    # -- state ------------------------------------------------------------------------------------

    def params(self) -> dict[str, npt.NDArray[np.float32]]:
        """Every parameter as an independent float32 array (what is published)."""
        return {name: t.detach().cpu().numpy().copy() for name, t in self.model.state_dict().items()}

    def load_params(self, params: dict[str, npt.NDArray[np.float32]], item_ids: Sequence[str | None]) -> None:
        """Adopt published parameters and the item map that goes with them (a warm start)."""
        self.items = ItemRows.from_ids(item_ids, capacity=self.train_config.capacity)
        rows = len(item_ids)
        if rows != self.model.rows:
            self.model = SASRec(self.config, rows=rows).to(self.device)
        self.model.load_state_dict({name: torch.from_numpy(np.array(v)) for name, v in params.items()})
        self._touched = np.zeros(rows, dtype=bool)
        self._reassigned = np.zeros(rows, dtype=bool)
        self._published = self._table()

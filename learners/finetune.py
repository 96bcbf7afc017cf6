"""One fine-tune cycle: warm start, train on the freshest window, publish the delta.

A cycle (:meth:`FineTuner.cycle`):

1. **Warm start** from the latest published version (the snapshot store), unless this trainer is
   already what was published last (then its newer dense layers, not yet published, carry on).
2. **Freshest window**: the last ``window_events`` events of the learned types, from a
   :data:`WindowSource` — by default ClickHouse ``events`` (the sink's table), so ``--once`` works
   with no stream worker running; an in-process caller can pass the workers' histories instead.
3. **Train** ``epochs`` passes, stopping at ``budget_s`` of wall time. New items get rows (the table
   grows, then evicts its stalest rows).
4. **Publish**: the first cycle ever publishes a snapshot; later ones a sparse delta of the touched
   rows, plus the dense parameters every ``dense_every``-th cycle. Where the catalogue is small
   enough for the full softmax, a cycle normalises over the window's items only, so the rows it
   moves (and ships) are the window's, not the whole table's. With ``delta_min_change`` above
   0, only rows that drifted more than it from their published value (and rows that changed hands)
   ship; the others stay pending until they do. That keeps a full-softmax cycle's delta, which
   touches every row, from growing to the whole table.
5. **Record** the run in ``training_runs`` (failed runs too, with their error).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from freshrec.errors import NothingToTrain
from freshrec.settings import Settings
from freshrec.store import Store
from learners.runs import record_run
from learners.sasrec import SPARSE_TABLES, SASRecConfig
from learners.sequences import Sequences, sequences_from_store
from learners.training import SequenceTrainer, configs_from_settings

__all__ = [
    "CycleResult",
    "FineTuner",
    "ModelSink",
    "PublishedModel",
    "Receipt",
    "WindowSource",
    "store_window",
]

logger = logging.getLogger(__name__)

# Returns the freshest histories and how many events they hold.
WindowSource = Callable[[], tuple[Sequences, int]]


Array = npt.NDArray[Any]


class PublishedModel(Protocol):
    """The newest version a sink holds, as a fine-tuner warm-starts from it."""

    @property
    def version(self) -> int: ...
    @property
    def params(self) -> Mapping[str, Array]: ...
    @property
    def item_ids(self) -> Sequence[str | None]: ...
    @property
    def config(self) -> Mapping[str, Any]: ...


class Receipt(Protocol):
    """What a sink reports of one publish (a row of ``model_updates``)."""

    @property
    def version(self) -> int: ...
    @property
    def parent(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def bytes(self) -> int: ...
    @property
    def rows(self) -> int: ...


class ModelSink(Protocol):
    """Where a cycle's parameters go: the first as a whole model, then sparse rows of the embedding
    tables (``sparse_tables``) often and every other parameter less often. The publisher
    (``publishers.publisher.Publisher``) is the sink in production; this package never imports it."""

    @property
    def latest(self) -> PublishedModel | None: ...

    def publish_snapshot(
        self,
        params: Mapping[str, Array],
        item_ids: Sequence[str | None],
        *,
        config: Mapping[str, Any],
        sparse_tables: Sequence[str],
        run_id: str = "",
    ) -> Receipt: ...

    def publish_sparse(
        self,
        params: Mapping[str, Array],
        item_ids: Sequence[str | None],
        rows: npt.NDArray[np.int64],
        *,
        run_id: str = "",
    ) -> Receipt: ...

    def publish_dense(self, params: Mapping[str, Array], *, run_id: str = "") -> Receipt: ...

    def close(self) -> None:
        """Release what the sink holds (its Kafka client); it cannot be used after."""


def store_window(store: Store, *, last_events: int) -> WindowSource:
    """The freshest window read from ClickHouse ``events``."""
    return lambda: sequences_from_store(store, last_events=last_events)


@dataclass
class CycleResult:
    run_id: str
    events: int
    users: int
    steps: int
    loss: float
    train_s: float
    stopped_by_budget: bool
    warm_started_from: int | None
    published: list[Receipt] = field(default_factory=list)

    @property
    def version(self) -> int | None:
        return self.published[-1].version if self.published else None


class FineTuner:
    """Owns a trainer across cycles and publishes what each cycle learned."""

    def __init__(
        self,
        settings: Settings,
        *,
        publisher: ModelSink,
        source: WindowSource,
        store: Store | None = None,
    ) -> None:
        self._settings = settings
        self.config, train_config = configs_from_settings(settings.train)
        # A full softmax over the catalogue would move every row each cycle (a delta as large as the
        # table); over the window's items, only the rows the window holds move and ship.
        self.train_config = replace(train_config, softmax_over="window")
        self.publisher = publisher
        self.source = source
        self.store = store
        self.trainer: SequenceTrainer | None = None
        self.cycles = 0
        self._mine: int | None = None  # the version this trainer last published

    def cycle(self) -> CycleResult:
        run_id = uuid.uuid4().hex
        started_at = datetime.now(UTC)
        try:
            result = self._cycle(run_id)
        except Exception as exc:
            self._record(run_id, started_at, None, error=f"{type(exc).__name__}: {exc}")
            raise
        self._record(run_id, started_at, result)
        return result

    def _record(
        self, run_id: str, started_at: datetime, result: CycleResult | None, *, error: str = ""
    ) -> None:
        """The cycle's row of ``training_runs`` (a failed one too, with its error)."""
        if self.store is None:
            return
        record_run(
            self.store,
            run_id=run_id,
            kind="finetune",
            dataset="events",
            events=0 if result is None else result.events,
            steps=0 if result is None else result.steps,
            loss=float("nan") if result is None else result.loss,
            metrics={}
            if result is None
            else {
                "users": result.users,
                "train_s": result.train_s,
                "stopped_by_budget": result.stopped_by_budget,
                "published": [p.kind for p in result.published],
            },
            params={"model": self.config.to_dict(), "train": self.train_config.to_dict()},
            started_at=started_at,
            version=None if result is None else result.version,
            status="failed" if result is None else "ok",
            error=error,
        )

    def _warm_start(self) -> int | None:
        latest = self.publisher.latest
        if self.trainer is not None and latest is not None and latest.version == self._mine:
            return None  # this trainer is the newest: keep its unpublished dense progress
        self.trainer = SequenceTrainer(config=self.config, train=self.train_config)
        if latest is None:
            return None
        config = SASRecConfig.from_dict(dict(latest.config)) if latest.config else self.config
        if config != self.config:
            logger.warning("published model has config %s; fine-tuning it as it is", config)
            self.trainer = SequenceTrainer(config=config, train=self.train_config)
        self.trainer.load_params(dict(latest.params), latest.item_ids)
        self.trainer.step = latest.version  # keeps eviction's recency ordered across restarts
        logger.info("warm start from v%d", latest.version)
        return latest.version

    def _cycle(self, run_id: str) -> CycleResult:
        warm = self._warm_start()
        trainer = self.trainer
        assert trainer is not None
        sequences, events = self.source()
        if not any(len(items) >= 2 for items in sequences.values()):
            raise NothingToTrain(
                f"the freshest window has {events} events and no history of two or more: nothing to learn "
                "yet. Publish events (e.g. `freshrec replay ml-100k`) and let the sink store them."
            )
        train = self._settings.train
        started = time.monotonic()
        rows = trainer.rows_for(sequences)
        epoch = trainer.fit(rows, epochs=train.epochs, budget_s=train.budget_s)
        train_s = time.monotonic() - started
        self.cycles += 1
        params = trainer.params()
        ids = trainer.items.ids()
        published: list[Receipt] = []
        if self.publisher.latest is None:
            published.append(
                self.publisher.publish_snapshot(
                    params, ids, config=trainer.config.to_dict(), sparse_tables=SPARSE_TABLES, run_id=run_id
                )
            )
            trainer.clear_touched()
        else:
            # Rows that drifted past delta_min_change (all touched rows at 0); the rest stay pending.
            delta_rows = trainer.touched_rows()
            published.append(self.publisher.publish_sparse(params, ids, delta_rows, run_id=run_id))
            if self.cycles % train.dense_every == 0:
                published.append(self.publisher.publish_dense(params, run_id=run_id))
            trainer.clear_touched(delta_rows)
        self._mine = published[-1].version
        logger.info(
            "fine-tune %s: %d events, %d steps in %.1f s (loss %.4f), published %s",
            run_id[:8],
            events,
            epoch.steps,
            train_s,
            epoch.loss,
            ", ".join(f"v{p.version} {p.kind}" for p in published),
        )
        return CycleResult(
            run_id=run_id,
            events=events,
            users=len(sequences),
            steps=epoch.steps,
            loss=epoch.loss,
            train_s=train_s,
            stopped_by_budget=epoch.stopped_by_budget,
            warm_started_from=warm,
            published=published,
        )

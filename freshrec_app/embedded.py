"""``freshrec run``: the embedded mode, everything in one process on the local defaults.

This process owns the chDB path (chDB allows one process per path), starts the local broker when
no cluster is configured, publishes a dataset once (a run killed mid-replay resumes it on the next
start, publishing only the records missing from the topic; see :mod:`streams.replay`), and runs the audit
sink (events and the decision log). With ``until_idle_s`` it stops once the topics are drained and
prints what ClickHouse holds; with ``show`` as well (``make run``), it then closes the loop once:
a stream worker counts the topic, one fine-tune publishes a model version, and the recommender that
``GET /v1/recommendations`` runs answers for a few users. Without it, it keeps running and also
hosts the serving stack (the HTTP API with its stream worker and model replica) and the fine-tune
schedule, until SIGINT/SIGTERM: the whole system in one process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from freshrec.broker import LocalBroker
from freshrec.queries import log_summary
from freshrec.settings import Settings
from freshrec.store import Store, open_store
from streams import replay, sink
from streams.replay import Progress

__all__ = ["RunResult", "Shown", "first_recommendations", "run"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Shown:
    """One user's top k, as served, for a person to read."""

    user_id: str
    history: int  # events of this user in the audit log
    model_version: int
    items: list[dict[str, Any]]  # item_id, title, score, source, explore


@dataclass(frozen=True, slots=True)
class RunResult:
    replayed: int
    sink: sink.SinkStats
    summary: dict[str, Any]
    shown: list[Shown]


def run(
    settings: Settings,
    *,
    dataset: str | None,
    until_idle_s: float | None,
    progress: Progress | None = None,
    show: int = 0,
) -> RunResult:
    """Start what is missing, replay ``dataset`` if ClickHouse lacks it, sink until idle or stopped;
    with ``until_idle_s``, then recommend for ``show`` users (see the module docstring)."""
    if settings.uses_local_broker:
        LocalBroker(settings).start()
    store = open_store(settings)
    try:
        replayed = 0
        if dataset is not None:
            replayed = _replay_once(settings, store, dataset, progress)
        shown: list[Shown] = []
        if until_idle_s is not None:
            stats = sink.run(settings, store, until_idle_s=until_idle_s)
            if show:
                shown = first_recommendations(settings, store, dataset=dataset, users=show)
        else:
            stats = _serve_everything(settings, store)
        return RunResult(replayed=replayed, sink=stats, summary=log_summary(store), shown=shown)
    finally:
        store.close()


def _serve_everything(settings: Settings, store: Store) -> sink.SinkStats:
    """The sink on this thread; the API, its worker and replica, and the fine-tune schedule beside it.

    SIGINT/SIGTERM stop the sink (``sink.run`` installs the handlers), then everything else.
    """
    from learners.scheduler import FineTuneSchedule
    from publishers.tuner import build_tuner  # torch: only when serving
    from serving.server import ServingStack

    # The dashboard's own client of the same chDB path (this process owns it; queries from the
    # API's threads then never share a client with the sink's inserts).
    dashboard_store = open_store(settings, migrate=False)
    stack = ServingStack(settings, store=dashboard_store).start()
    tuner = build_tuner(settings, store)
    schedule = FineTuneSchedule(tuner, interval_s=settings.train.interval_s, retry_s=settings.train.retry_s)
    schedule.start()
    logger.info("serving on %s; fine-tuning every %g s", stack.url, settings.train.interval_s)
    try:
        return sink.run(settings, store, until_idle_s=None)
    finally:
        schedule.stop()
        tuner.publisher.close()
        stack.stop()
        dashboard_store.close()


def first_recommendations(
    settings: Settings, store: Store, *, dataset: str | None, users: int, k: int = 10
) -> list[Shown]:
    """The loop once, in this process: a stream worker of its own counts the topic (resuming from
    its checkpoint on later runs), a fine-tune trains on the freshest window and publishes the next
    model version, a replica loads it, and the serving recommender answers for the ``users`` most
    recently active users."""
    from freshrec.datasets import item_titles
    from learners.registry import build_heads
    from publishers.replica import Replica
    from publishers.snapshots import SnapshotStore
    from publishers.tuner import build_tuner  # torch: only when asked
    from serving.recommender import Recommender
    from streams.reader import StateReader
    from streams.worker import StreamWorker

    stream = settings.stream.model_copy(
        update={"group_id": f"{settings.stream.group_id}.run", "worker_id": "run"}
    )
    worker = StreamWorker(settings.model_copy(update={"stream": stream}), heads=build_heads(stream))
    worker.run(until_idle_s=2.0)
    tuner = build_tuner(settings, store)
    try:
        tuner.cycle()
    finally:
        tuner.publisher.close()
    replica = Replica(snapshots=SnapshotStore.for_settings(settings))
    recommender = Recommender(settings=settings.serve, replica=replica, reader=StateReader(worker))
    replica.bootstrap()
    titles = {}
    if dataset is not None:
        titles = item_titles(dataset, datasets_dir=settings.datasets_dir, cache_dir=settings.cache_dir)
    active = store.rows(
        f"SELECT user_id, count() FROM {store.table('events')} GROUP BY user_id "
        "ORDER BY max(ts) DESC, user_id LIMIT {n:UInt32}",
        {"n": users},
    )
    shown = []
    for user_id, history in active:
        result = recommender.recommend(str(user_id), k)
        items = [
            {"item_id": i.item_id, "title": titles.get(i.item_id, ""), "score": round(i.score, 4),
             "source": i.source, "explore": i.explore}
            for i in result.items
        ]  # fmt: skip
        shown.append(Shown(str(user_id), int(history), result.model_version, items))
    return shown


def _replay_once(settings: Settings, store: Store, dataset: str, progress: Progress | None) -> int:
    """Publish ``dataset`` once per deployment: resume it if a previous run was cut mid-replay
    (only the records not yet on the topic are published), skip it once complete. Without a
    replay ledger (a deployment older than it), events of the dataset in ClickHouse mean done."""
    state = replay.replay_state(settings, dataset)
    if state == "complete":
        logger.info("%s was replayed to %s before: not replaying", dataset, settings.topics.events)
        return 0
    if state == "new" and (already := _rows_of_dataset(store, dataset)):
        logger.info("ClickHouse already holds %d events of %s: not replaying", already, dataset)
        return 0
    return replay.run(settings, dataset, progress=progress).published


def _rows_of_dataset(store: Store, dataset: str) -> int:
    """Events of a named dataset already stored (their ids start with ``"<dataset>:"``)."""
    rows = store.rows(
        f"SELECT count() FROM {store.table('events')} WHERE startsWith(event_id, {{prefix:String}})",
        {"prefix": f"{dataset}:"},
    )
    return int(rows[0][0])

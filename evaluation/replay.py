"""Replay evaluation: score what the system serves, request by request, in event time.

A dataset is replayed in time order into a one-partition topic of the run's own and consumed back.
For every event, **before** anything learns from it, each method ranks the user's top ``k`` with the
items the user already interacted with left out, and the event's item is scored: a hit when it is
in the top ``k``, NDCG@k ``1 / log2(rank + 2)``. Then the event is learned, through the very code a
stream worker runs on a batch (:meth:`streams.worker.StreamWorker._apply`, one message at a time).

What is scored is the real serving path, not a re-implementation of it: ``served`` and
``served_explore`` are :meth:`serving.recommender.Recommender.recommend` (policies ``none`` and
``uncertainty``) over a :class:`~streams.reader.StateReader` of that worker and the newest version a
:class:`~publishers.replica.Replica` applied from the model topics. The transformer is fine-tuned in
**event time**: every ``finetune_every`` events a :class:`~learners.finetune.FineTuner` trains on the
freshest window of the events seen so far and publishes through the real
:class:`~publishers.publisher.Publisher`; the replica, fed from Kafka by a
:class:`~publishers.replica.ReplicaSubscriber`, must have applied that version before the next
request is scored (a bounded wait), as a serving replica would between two requests.

Methods, all on the same requests:

- ``popularity``: all-time counts of the stream state, ties broken by first appearance of the item
  (the protocol and numbers of ``freshrec eval prequential``'s popularity);
- ``decayed_popularity``: the stream state's forward-decayed counts (``FRESHREC_STREAM__HALF_LIFE_S``);
- ``cooccurrence``: summed co-occurrence with the user's last 10 history items, as serving asks it;
- ``mf``: the stream worker's MF head over the whole catalogue;
- ``transformer``: the serving index of the newest applied version (fine-tuned as the replay goes);
- ``transformer_frozen``: the first version (trained once on the first ``finetune_every`` events),
  never updated;
- ``transformer_stale``: the freshness control. From the first version on, a second fine-tuner
  runs at every fine-tune with the same settings (epochs, budget, warm start, sparse and dense
  publishes, to an in-memory sink) on a window of the same size as the served transformer's, but
  holding the *oldest* events instead of the freshest. Against ``transformer_frozen`` the served
  transformer gains from both more training and fresher data; against ``transformer_stale`` only
  from fresher data (the first windows are the same events, so the two part only once the stream
  has outgrown one window). ``freshness_control=False`` skips it (it doubles the fine-tunes' cost)
  and the method then scores nothing;
- ``served``, ``served_explore``: the lists the API returns, ranked by the configured fusion
  (``FRESHREC_SERVE__FUSION``; the result's ``fusion`` says which).

Single sources rank the whole catalogue seen so far (ties by first appearance); the transformer
ranks its confident index; ``served`` is scored on the list as returned. An event whose item was never
seen before, or that the user already interacted with, cannot be recommended by anyone: it is a miss
for every method and stays in the denominator (as in ``eval prequential``). ``--sample F`` scores a
seeded subset of the events (every event is still learned), the same subset for every method.

Intervals (``ci95``): the normal approximation of the mean over per-event outcomes,
``mean ± 1.96 sd / sqrt(n)`` (for HR, the Wald interval of a proportion). Paired differences between
two methods on the same requests are reported the same way over per-event differences, which is
much tighter than comparing two separate intervals.

Serving's popularity list is cached for 0.5 s of wall clock; in event time that would make the list
depend on how fast the machine replays, so the cache is cleared before each request.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import orjson
from confluent_kafka import Consumer

from evaluation.replay_scoring import METHODS, ReplayConfig, ReplayEvaluator
from freshrec.errors import NothingToTrain
from freshrec.settings import Settings
from freshrec.store import Store
from learners.finetune import FineTuner
from publishers.memory import MemorySink
from publishers.publisher import Publisher
from publishers.replica import Replica, ReplicaSubscriber
from publishers.snapshots import SnapshotStore
from streams import replay

__all__ = ["METHODS", "ReplayConfig", "ReplayEvaluator", "run"]

logger = logging.getLogger(__name__)

_EVAL_COLUMNS: Final = (
    "run_id", "dataset", "protocol", "method", "events", "k", "hr", "ndcg", "params",
    "started_at", "finished_at",
)  # fmt: skip


def run(
    settings: Settings,
    store: Store | None,
    dataset: str,
    *,
    limit: int | None = None,
    config: ReplayConfig | None = None,
    plot: Path | None = None,
    workdir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Replay ``dataset`` through its own topics and the real serving stack; see the module docstring.

    Records one ``eval_runs`` row per method (protocol ``replay``) when ``store`` is given, and
    writes the quality-over-time plot to ``plot`` when given. The run's models live in ``workdir``
    (kept; by default a folder under ``$FRESHREC_HOME/eval`` deleted at the end) and are not
    recorded in ``model_updates``: an evaluation is not the deployment's model chain.
    """
    config = config or ReplayConfig()
    run_id = uuid.uuid4().hex[:12]
    home = workdir if workdir is not None else settings.home / "eval" / f"replay-{run_id}"
    eval_settings = settings.model_copy(
        update={
            "topic_prefix": f"{settings.topic_prefix}replay-{run_id}.",
            "broker_partitions": 1,  # one partition: the global time order the protocol needs
            "home": home,
            "stream": settings.stream.model_copy(update={"group_id": f"replay-{run_id}"}),
        }
    )
    started = time.time()
    try:
        evaluator = _replay(eval_settings, dataset, limit, config, run_id, progress)
    finally:
        if workdir is None:
            shutil.rmtree(home, ignore_errors=True)
    finished = time.time()
    scored = len(evaluator.timeline)
    methods = evaluator.summary()
    result: dict[str, Any] = {
        "dataset": dataset,
        "events": evaluator.events,
        "scored": scored,
        "scorable": evaluator.scorable,
        "run_id": run_id,
        "ci": "95%, normal approximation over per-event outcomes (Wald for HR)",
        "fusion": settings.serve.fusion,
        "methods": methods,
        "paired": evaluator.paired(),
        "finetunes": evaluator.finetunes,
        "frozen": evaluator.frozen_state(),
        "stale": evaluator.stale_state(),
        "served_seen_share": {
            m: evaluator.seen_slots[m] / evaluator.slots[m] if evaluator.slots[m] else 0.0
            for m in evaluator.slots
        },
        "over_time": evaluator.over_time(),
        "wall_s": round(finished - started, 1),
    }
    if store is not None:
        params = {
            "limit": limit,
            "sample": config.sample,
            "seed": config.seed,
            "finetune_every": config.finetune_every,
            "first_epochs": config.first_epochs,
            "first_budget_s": config.first_budget_s,
            "events": evaluator.events,
            "scorable": evaluator.scorable,
            "versions": [f["version"] for f in evaluator.finetunes],
            "train": settings.train.model_dump(mode="json"),
        }
        _record(store, run_id, dataset, config.k, scored, methods, params, started, finished)
    if plot is not None:
        _plot(result, plot)
        result["plot"] = str(plot)
    logger.info(
        "replay %s: %d events, %d scored, in %.1f s", dataset, evaluator.events, scored, finished - started
    )
    return result


def _replay(
    settings: Settings,
    dataset: str,
    limit: int | None,
    config: ReplayConfig,
    run_id: str,
    progress: Callable[[int, int], None] | None,
) -> ReplayEvaluator:
    """Publish the dataset, then consume it back through the evaluator, fine-tuning as it goes."""
    published = replay.run(settings, dataset, limit=limit).published
    snapshots = SnapshotStore.for_settings(settings)
    publisher = Publisher(settings, snapshots=snapshots, store=None)
    replica = Replica(snapshots=snapshots)
    evaluator = ReplayEvaluator(settings, config=config, replica=replica)
    tuner = FineTuner(settings, publisher=publisher, source=evaluator.freshest)
    first_train = settings.train.model_copy(
        update={
            "epochs": config.first_epochs or settings.train.epochs,
            "budget_s": config.first_budget_s or settings.train.budget_s,
        }
    )
    first = FineTuner(
        settings.model_copy(update={"train": first_train}), publisher=publisher, source=evaluator.freshest
    )

    control_sink = MemorySink()
    control_sink.on_version(evaluator.on_stale_version)
    control = (
        FineTuner(settings, publisher=control_sink, source=evaluator.stale_window)
        if config.freshness_control
        else None
    )

    def finetune(at_event: int) -> int | None:
        # The first cycle trains longer; the next ones warm-start from what it published. The
        # control starts from that first version and then trains beside the served transformer.
        try:
            if publisher.latest is None:
                version = first.cycle().version
                if publisher.latest is not None and control is not None:
                    control_sink.latest = publisher.latest
                    evaluator.on_stale_version(publisher.latest)
                return version
            version = tuner.cycle().version
            if control is not None:
                control.cycle()
            return version
        except NothingToTrain as exc:
            logger.info("no fine-tune at event %d: %s", at_event, exc)
            return None

    evaluator.finetune = finetune
    consumer = Consumer(
        settings.kafka_config(
            **{
                "group.id": f"replay-eval-{run_id}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
    )
    try:
        with ReplicaSubscriber(settings, replica):
            consumer.subscribe([settings.topics.events])
            consumed = 0
            while consumed < published:
                for message in consumer.consume(1000, 1.0):
                    if message.error() is not None:
                        continue
                    consumed += 1
                    evaluator.step(message)
                    if progress is not None and consumed % 1000 == 0:
                        progress(consumed, published)
    finally:
        consumer.close()
        publisher.close()
    return evaluator


def _record(
    store: Store,
    run_id: str,
    dataset: str,
    k: int,
    scored: int,
    methods: dict[str, dict[str, Any]],
    params: dict[str, Any],
    started: float,
    finished: float,
) -> None:
    """One ``eval_runs`` row per method; ``events`` is the number scored (HR's denominator), the
    interval and the run's parameters are in ``params``."""
    n = len(methods)
    store.insert(
        "eval_runs",
        [
            [run_id] * n,
            [dataset] * n,
            ["replay"] * n,
            list(methods),
            [scored] * n,
            [k] * n,
            [m["hr@10"] for m in methods.values()],
            [m["ndcg@10"] for m in methods.values()],
            [
                orjson.dumps(params | {"ci95": m["ci95"], "ndcg_ci95": m["ndcg_ci95"]}).decode()
                for m in methods.values()
            ],
            [int(started * 1000)] * n,
            [int(finished * 1000)] * n,
        ],
        column_names=_EVAL_COLUMNS,
    )


def _plot(result: dict[str, Any], path: Path) -> None:
    """HR@k of each method over event time, with the fine-tunes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["over_time"]
    figure, axis = plt.subplots(figsize=(10, 5))
    x = [p["to_event"] for p in points]
    for method in METHODS:
        style = "-" if method.startswith("served") else "--"
        axis.plot(x, [p[method] for p in points], style, marker=".", label=method)
    for cycle in result["finetunes"]:
        axis.axvline(cycle["at_event"], color="grey", alpha=0.3, linewidth=0.8)
    axis.set_xlabel("event (time order); grey lines: fine-tunes")
    axis.set_ylabel("HR@10 over the slice")
    axis.set_title(f"replay {result['dataset']}: {result['scored']:,} of {result['events']:,} events scored")
    axis.legend(fontsize="small", ncol=2)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    logger.info("plot written to %s", path)

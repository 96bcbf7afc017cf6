"""``freshrec train`` and ``freshrec model ...``: the transformer's training and its versions."""

from __future__ import annotations

import logging
from typing import Any

import click

from freshrec.settings import Settings
from freshrec_app.cli_common import (
    emit_json,
    ensure_kafka,
    err,
    errors,
    fail,
    load_settings,
    print_table,
)

__all__ = ["model", "train"]

logger = logging.getLogger(__name__)


@click.command()
@click.option("--offline", is_flag=True, help="Train from --dataset and evaluate leave-last-out.")
@click.option("--dataset", help="With --offline: ml-100k, ml-latest-small, amazon-games or a JSONL path.")
@click.option(
    "--max-epochs",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="With --offline: most epochs before early stopping ends training.",
)
@click.option("--once", is_flag=True, help="Run one fine-tune cycle, publish, and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def train(offline: bool, dataset: str | None, max_epochs: int, once: bool, as_json: bool) -> None:
    """The transformer: offline training, one fine-tune (--once), or the fine-tune schedule."""
    from freshrec.store import open_store

    settings = load_settings()
    if offline and once:
        fail("--offline and --once are different modes: pick one")
    if offline and dataset is None:
        fail("--offline needs --dataset (ml-100k, ml-latest-small, amazon-games or a JSONL path)")
    if dataset is not None and not offline:
        fail("--dataset is for --offline; the fine-tune reads the freshest events from ClickHouse")
    if not offline:
        ensure_kafka(settings, check=once)
    with errors():
        store = open_store(settings)
        try:
            if offline:
                assert dataset is not None
                _train_offline(settings, store, dataset, max_epochs, as_json)
            elif once:
                _train_once(settings, store, as_json)
            else:
                _train_scheduled(settings, store)
        finally:
            store.close()


def _train_offline(settings: Settings, store: Any, dataset: str, max_epochs: int, as_json: bool) -> None:
    from evaluation import offline
    from learners.training import configs_from_settings

    config, train = configs_from_settings(settings.train, max_epochs=max_epochs)
    result = offline.run(
        settings,
        dataset,
        config=config,
        train=train,
        store=store,
        on_epoch=lambda epoch, loss, valid: err.print(
            f"epoch {epoch}: loss {loss:.4f}, valid HR@10 {valid.hr:.4f} NDCG@10 {valid.ndcg:.4f}",
            highlight=False,
        ),
    )
    data = result.to_json()
    if as_json:
        emit_json({k: data[k] for k in ("dataset", "hr@10", "ndcg@10", "popularity", "wall_s")})
        return
    rows = [
        ("SASRec (test)", f"{result.test.hr:.4f}", f"{result.test.ndcg:.4f}"),
        ("popularity (test)", f"{result.popularity.hr:.4f}", f"{result.popularity.ndcg:.4f}"),
    ]
    print_table(
        ["model", "HR@10", "NDCG@10"],
        rows,
        title=f"{dataset}: {result.users:,} users, {result.items:,} items, best epoch {result.best_epoch} "
        f"of {result.epochs}, {result.wall_s:.0f} s",
    )


def _cycle_json(result: Any) -> dict[str, Any]:
    return {
        "run_id": result.run_id,
        "events": result.events,
        "users": result.users,
        "steps": result.steps,
        "loss": result.loss,
        "train_s": result.train_s,
        "warm_started_from": result.warm_started_from,
        "published": [
            {"version": p.version, "parent": p.parent, "kind": p.kind, "bytes": p.bytes, "rows": p.rows}
            for p in result.published
        ],
    }


def _train_once(settings: Settings, store: Any, as_json: bool) -> None:
    from publishers.tuner import build_tuner

    tuner = build_tuner(settings, store)
    try:
        result = tuner.cycle()
    finally:
        tuner.publisher.close()
    data = _cycle_json(result)
    if as_json:
        emit_json(data)
        return
    published = ", ".join(
        f"v{p['version']} {p['kind']} ({p['rows']:,} rows, {p['bytes']:,} B)" for p in data["published"]
    )
    print_table(
        ["", ""],
        [
            ("events", f"{result.events:,}"),
            ("steps", result.steps),
            ("loss", f"{result.loss:.4f}"),
            ("train s", f"{result.train_s:.1f}"),
            ("published", published),
        ],
        title="fine-tune",
    )


def _train_scheduled(settings: Settings, store: Any) -> None:
    import signal
    import threading

    from learners.scheduler import FineTuneSchedule
    from publishers.tuner import build_tuner

    tuner = build_tuner(settings, store)
    schedule = FineTuneSchedule(tuner, interval_s=settings.train.interval_s, retry_s=settings.train.retry_s)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    schedule.start()
    err.print(f"fine-tuning every {settings.train.interval_s:g} s; Ctrl-C stops", highlight=False)
    try:
        stop.wait()
    finally:
        schedule.stop()
        tuner.publisher.close()


@click.group()
def model() -> None:
    """The published model versions."""


@model.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def model_list(as_json: bool) -> None:
    """Every published version: kind, parent, size."""
    from freshrec.store import open_store
    from publishers.publisher import list_updates

    settings = load_settings()
    with errors():
        store = open_store(settings)
        try:
            updates = list_updates(store)
        finally:
            store.close()
    if as_json:
        emit_json(
            [
                {k: u[k] for k in ("version", "parent", "kind", "bytes", "rows")}
                | {"created_at": u["created_at"].isoformat()}
                for u in updates
            ]
        )
        return
    print_table(
        ["version", "parent", "kind", "bytes", "rows", "created_at", "rollback_of"],
        [
            [u[k] for k in ("version", "parent", "kind", "bytes", "rows", "created_at", "rollback_of")]
            for u in updates
        ],
    )


@model.command("rollback")
@click.option("--to", "to", type=click.IntRange(min=1), required=True, help="The version to restore.")
@click.option("--json", "as_json", is_flag=True, help="Print the new version as JSON.")
def model_rollback(to: int, as_json: bool) -> None:
    """Publish version V's parameters again as the newest version; replicas follow."""
    from freshrec.store import open_store
    from publishers.publisher import Publisher
    from publishers.snapshots import SnapshotStore

    settings = load_settings()
    ensure_kafka(settings)
    with errors():
        store = open_store(settings)
        try:
            publisher = Publisher(settings, snapshots=SnapshotStore.for_settings(settings), store=store)
            try:
                published = publisher.rollback(to)
            finally:
                publisher.close()
        finally:
            store.close()
    data = {
        "version": published.version,
        "parent": published.parent,
        "kind": published.kind,
        "rollback_of": to,
        "bytes": published.bytes,
        "rows": published.rows,
    }
    if as_json:
        emit_json(data)
    else:
        err.print(f"published v{published.version}: the parameters of v{to}", highlight=False)

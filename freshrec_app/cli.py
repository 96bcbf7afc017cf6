"""The ``freshrec`` command line: each subcommand parses its arguments, builds the settings and calls
one ``run(settings, ...)`` function. Results are tables for people, or JSON with ``--json``; logs and
progress go to stderr so that stdout stays parseable.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click
import orjson
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from freshrec.errors import FreshrecError
from freshrec.settings import Settings

__all__ = ["main", "settings_problem"]

logger = logging.getLogger(__name__)
_out = Console()
_err = Console(stderr=True)


#: Exit status of a command whose configuration is wrong (as for a usage error): fix, do not retry.
EXIT_CONFIG = 2


def _settings() -> Settings:
    """The settings from the environment, or exit 2 with one line naming each bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        _fail(settings_problem(exc), code=EXIT_CONFIG)
    except SettingsError as exc:  # a JSON-valued variable that is not JSON, before validation
        _fail(settings_problem(exc), code=EXIT_CONFIG)


def settings_problem(exc: ValidationError | SettingsError, *, prefix: str = "FRESHREC_") -> str:
    """One line saying which environment variable is wrong and why, without echoing secrets.

    >>> from freshrec.settings import SinkSettings
    >>> try:
    ...     SinkSettings(batch_size=0)
    ... except ValidationError as exc:
    ...     print(settings_problem(exc, prefix="FRESHREC_SINK__"))
    FRESHREC_SINK__BATCH_SIZE=0: Input should be greater than or equal to 1
    """
    if isinstance(exc, SettingsError):
        field = re.search(r'field "([^"]+)"', str(exc))
        name = f"{prefix}{field.group(1).upper()}" if field else f"a {prefix}* variable"
        cause = exc.__cause__ or exc.__context__
        why = f"not valid JSON ({cause})" if cause is not None else str(exc)
        return f'{name} is {why}; it takes a JSON value, e.g. {name}=\'{{"key": "value"}}\''
    problems = []
    for error in exc.errors():
        name = prefix + "__".join(str(part).upper() for part in error["loc"])
        value = error.get("input")
        secret = any(hint in name.lower() for hint in ("password", "secret", "token", "key", "options"))
        shown = "" if secret or isinstance(value, dict) or len(repr(value)) > 60 else f"={value}"
        problems.append(f"{name}{shown}: {error['msg']}")
    return "; ".join(problems)


def _fail(message: str, *, code: int = 1) -> NoReturn:
    # One line however wide the terminal, and the message taken literally (no rich markup).
    _err.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True, highlight=False)
    sys.exit(code)


def _emit_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except FreshrecError as exc:
        _fail(str(exc))


def _kafka(settings: Settings, *, check: bool = True) -> None:
    """Make sure a command that needs Kafka has one. Without ``FRESHREC_KAFKA_BOOTSTRAP`` the local
    broker is started when it is not running (as ``freshrec run`` does; ``freshrec broker stop``
    stops it). A configured cluster is asked for its topics, with ``check``, and a cluster that does
    not answer within 5 s ends the command with one line saying what to do (instead of librdkafka
    retrying for ever); the long-running roles pass ``check=False`` and wait for it instead."""
    from freshrec.broker import LocalBroker
    from streams.admin import ensure_topics

    with _errors():
        if settings.uses_local_broker:
            broker = LocalBroker(settings)
            if not broker.status().running:
                _err.print(
                    f"starting the local Kafka broker at {settings.bootstrap} "
                    "(`freshrec broker stop` stops it)",
                    highlight=False,
                )
                broker.start()
        elif check:
            ensure_topics(settings, timeout_s=5.0)


@contextmanager
def _progress(description: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_err, transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    table = Table(*columns, title=title, show_lines=False)
    for row in rows:
        table.add_row(*("NULL" if value is None else str(value) for value in row))
    _out.print(table)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="freshrec")
def main(verbose: int) -> None:
    """freshrec: a streaming, online-learning recommender on Kafka.

    Configuration comes from FRESHREC_* environment variables (see the README).
    """
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose + 1, 2)]
    logging.basicConfig(
        level=level,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=_err, show_path=False, rich_tracebacks=True)],
    )


# ---------------------------------------------------------------------------- broker


@main.group()
def broker() -> None:
    """The local Apache Kafka broker (KRaft, single node)."""


@broker.command("start")
def broker_start() -> None:
    """Start the local broker (idempotent) and print its bootstrap address."""
    from freshrec.broker import LocalBroker

    settings = _settings()
    if not settings.uses_local_broker:
        _err.print(f"FRESHREC_KAFKA_BOOTSTRAP is set: using the cluster at {settings.bootstrap}")
        click.echo(settings.bootstrap)
        return
    with _errors():
        status = LocalBroker(settings).start()
    _err.print(f"local Kafka broker running (pid {status.pid}), data in {status.data_dir}")
    click.echo(status.bootstrap)


@broker.command("stop")
def broker_stop() -> None:
    """Stop the local broker."""
    from freshrec.broker import LocalBroker

    with _errors():
        stopped = LocalBroker(_settings()).stop()
    click.echo("stopped" if stopped else "not running")


@broker.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def broker_status(as_json: bool) -> None:
    """Say whether the local broker runs, and its bootstrap address. Exit 3 when it does not."""
    from freshrec.broker import LocalBroker

    status = LocalBroker(_settings()).status()
    if as_json:
        _emit_json({"running": status.running, "pid": status.pid, "bootstrap": status.bootstrap})
    else:
        state = f"running (pid {status.pid})" if status.running else "stopped"
        click.echo(f"{state} {status.bootstrap}")
    if not status.running:
        sys.exit(3)


# ---------------------------------------------------------------------------- data in and out


@main.command()
@click.argument("dataset")
@click.option("--limit", type=click.IntRange(min=1), help="Publish only the first N events (in time order).")
@click.option(
    "--speed", type=click.FloatRange(min=0, min_open=True), help="Pace at X times the data's clock."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def replay(dataset: str, limit: int | None, speed: float | None, as_json: bool) -> None:
    """Publish DATASET (ml-100k, ml-latest-small, amazon-games, or a JSONL path) to `events`.

    An interrupted replay of the same DATASET is resumed: only records not yet on the topic are sent.
    """
    from streams import replay as replay_module

    settings = _settings()
    _kafka(settings)
    with _errors(), _progress(f"replay {dataset}", sys.stderr.isatty()) as progress:
        stats = replay_module.run(settings, dataset, limit=limit, speed=speed, progress=progress)
    result = {
        "dataset": stats.dataset,
        "published": stats.published,
        "already_on_topic": stats.resumed_after,
        "seconds": round(stats.seconds, 3),
        "events_per_s": round(stats.rate),
        "synthetic_ts": stats.synthetic_ts,
        "topic": settings.topics.events,
    }
    if as_json:
        _emit_json(result)
    else:
        _print_table(["", ""], [(k, v) for k, v in result.items()], title="replay")


@main.command()
@click.option(
    "--until-idle",
    type=click.FloatRange(min=0),
    help="Exit once no message has arrived for S seconds (the topic is drained).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the final counters as JSON.")
def sink(until_idle: float | None, as_json: bool) -> None:
    """Run the Kafka → ClickHouse audit sink (events and dead letters)."""
    from freshrec.store import open_store
    from streams import sink as sink_module

    settings = _settings()
    _kafka(settings, check=until_idle is not None)
    with _errors():
        store = open_store(settings)
        try:
            stats = sink_module.run(settings, store, until_idle_s=until_idle)
        finally:
            store.close()
    result = {
        "consumed": stats.consumed,
        "events": stats.events,
        "dead_letters": stats.dead_letters,
        "duplicates": stats.duplicates,
        "skipped_already_stored": stats.skipped_already_stored,
        "batches": stats.batches,
        "reasons": stats.reasons,
    }
    if as_json:
        _emit_json(result)
    else:
        _print_table(["", ""], [(k, v) for k, v in result.items()], title="sink")


@main.command()
@click.option("--until-idle", type=click.FloatRange(min=0), help="Exit once drained for S seconds.")
@click.option(
    "--top", type=click.IntRange(min=0), default=10, show_default=True, help="Items in the summary."
)
@click.option(
    "--role",
    "roles",
    multiple=True,
    type=click.Choice(["counters", "sequences", "heads"]),
    help="Keep only this part of the state (repeatable); default: every role.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
def stream(until_idle: float | None, top: int, roles: tuple[str, ...], as_json: bool) -> None:
    """Run a stream worker: counters, sequences and heads (or some), checkpointed with their offsets."""
    from freshrec.settings import StreamSettings
    from learners.registry import build_heads
    from streams import worker as worker_module

    settings = _settings()
    if roles:
        try:
            stream_settings = StreamSettings(**{**settings.stream.model_dump(), "roles": roles})
        except ValidationError as exc:
            _fail(settings_problem(exc, prefix="--role / FRESHREC_STREAM__"), code=EXIT_CONFIG)
        settings = settings.model_copy(update={"stream": stream_settings})
    _kafka(settings, check=until_idle is not None)
    with _errors():
        worker, stats = worker_module.run(
            settings, heads=build_heads(settings.stream), until_idle_s=until_idle
        )
    counters = worker.state.counters
    result = {
        "worker_id": settings.stream.worker_id,
        "roles": list(settings.stream.roles),
        "group": settings.stream.effective_group_id,
        "consumed": stats.consumed,
        "counted": stats.counted,
        "invalid": stats.invalid,
        "duplicates": stats.duplicates,
        "items": counters.items.used,
        "counter_bytes": counters.nbytes(),
        "checkpoint": str(worker.store.path),
        "top_total": counters.top(top),
        "top_decayed": counters.top(top, kind="decayed"),
    }
    if as_json:
        _emit_json(result)
    else:
        _print_table(["", ""], [(k, v) for k, v in result.items()], title="stream worker")


@main.group("eval")
def eval_() -> None:
    """Evaluate the recommenders."""


@eval_.command("prequential")
@click.argument("dataset")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N events.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_prequential(dataset: str, limit: int | None, as_json: bool) -> None:
    """Test-then-train HR@10 / NDCG@10 of each method over DATASET, replayed through Kafka."""
    from evaluation import prequential
    from freshrec.store import open_store

    settings = _settings()
    _kafka(settings)
    with _errors(), _progress(f"prequential {dataset}", sys.stderr.isatty()) as progress:
        store = open_store(settings)
        try:
            result = prequential.run(settings, store, dataset, limit=limit, progress=progress)
        finally:
            store.close()
    if as_json:
        _emit_json({k: result[k] for k in ("dataset", "events", "methods")})
        return
    rows = [(m, f"{v['hr@10']:.4f}", f"{v['ndcg@10']:.4f}") for m, v in result["methods"].items()]
    _print_table(
        ["method", "HR@10", "NDCG@10"], rows, title=f"prequential {dataset}, {result['events']:,} events"
    )


@main.command()
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

    settings = _settings()
    if offline and once:
        _fail("--offline and --once are different modes: pick one")
    if offline and dataset is None:
        _fail("--offline needs --dataset (ml-100k, ml-latest-small, amazon-games or a JSONL path)")
    if dataset is not None and not offline:
        _fail("--dataset is for --offline; the fine-tune reads the freshest events from ClickHouse")
    if not offline:
        _kafka(settings, check=once)
    with _errors():
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
        on_epoch=lambda epoch, loss, valid: _err.print(
            f"epoch {epoch}: loss {loss:.4f}, valid HR@10 {valid.hr:.4f} NDCG@10 {valid.ndcg:.4f}",
            highlight=False,
        ),
    )
    data = result.to_json()
    if as_json:
        _emit_json({k: data[k] for k in ("dataset", "hr@10", "ndcg@10", "popularity", "wall_s")})
        return
    rows = [
        ("SASRec (test)", f"{result.test.hr:.4f}", f"{result.test.ndcg:.4f}"),
        ("popularity (test)", f"{result.popularity.hr:.4f}", f"{result.popularity.ndcg:.4f}"),
    ]
    _print_table(
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
        _emit_json(data)
        return
    published = ", ".join(
        f"v{p['version']} {p['kind']} ({p['rows']:,} rows, {p['bytes']:,} B)" for p in data["published"]
    )
    _print_table(
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
    _err.print(f"fine-tuning every {settings.train.interval_s:g} s; Ctrl-C stops", highlight=False)
    try:
        stop.wait()
    finally:
        schedule.stop()
        tuner.publisher.close()


@main.command()
@click.option(
    "--workers",
    type=click.IntRange(min=1, max=64),
    default=None,
    help="Serving processes behind the port (default: FRESHREC_SERVE__WORKERS, 1).",
)
def serve(workers: int | None) -> None:
    """The HTTP API: recommendations from the newest model version and the live stream state."""
    import signal
    import threading

    from serving import server

    settings = _settings()
    _kafka(settings, check=False)  # serving waits for a cluster that is away; /readyz says so
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    count = workers or settings.serve.workers
    url = f"http://{settings.api_host}:{settings.api_port}"
    _err.print(
        f"serving on {url} with {count} process(es) (OpenAPI: {url}/docs, dashboard: {url}/dashboard); "
        "Ctrl-C stops",
        highlight=False,
    )
    with _errors():
        code = server.serve(settings, workers=count, stop=stop)
    sys.exit(code)


@main.command()
@click.option(
    "--requests", type=click.IntRange(min=10), default=1_500, show_default=True, help="Per policy run."
)
@click.option("--users", type=click.IntRange(min=2), default=200, show_default=True)
@click.option("--seed", "seeds", type=int, multiple=True, help="Repeatable; default: 0 and 1.")
@click.option(
    "--policy",
    "policies",
    type=click.Choice(["none", "epsilon", "uncertainty"]),
    multiple=True,
    help="Repeatable; default: all three.",
)
@click.option("--plot", type=click.Path(dir_okay=False), default="simulation.png", show_default=True)
@click.option(
    "--ope",
    is_flag=True,
    help="Off-policy check: log with uncertainty, estimate none, epsilon (0.05, 0.2) and uncertainty "
    "(ucb_c 1, 3) from that log, run each on-policy for the truth (--policy is ignored).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summaries as JSON.")
def simulate(
    requests: int,
    users: int,
    seeds: tuple[int, ...],
    policies: tuple[str, ...],
    plot: str,
    ope: bool,
    as_json: bool,
) -> None:
    """Closed loop: simulated users with hidden tastes against the real stack, policy by policy."""
    from pathlib import Path

    from evaluation import simulator

    settings = _settings()
    _kafka(settings)
    config = simulator.SimConfig(requests=requests, users=users)
    if ope:
        with _errors():
            report = simulator.ope(
                settings, config, seeds=seeds or (0, 1, 2), port=settings.api_port, plot=Path(plot)
            )
        if as_json:
            _emit_json(report)
            return
        _print_table(
            ["seed", "target", "params", "estimator", "estimate", "95% CI", "truth", "ESS"],
            [
                [r["seed"], r["target"], ", ".join(f"{k}={v:g}" for k, v in r["params"].items()),
                 r["estimator"], f"{r['estimate']:.4f}", f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]",
                 f"{r['truth']:.4f}", f"{r['ess']:,.0f}"]
                for r in report["ope"]
            ],
            title="off-policy estimates from the uncertainty log against each target run on-policy",
        )  # fmt: skip
        _print_table(
            ["estimator", "truth inside the 95% CI", "mean relative error"],
            [[s["estimator"], f"{s['covered']} of {s['cases']}", f"{s['mean_relative_error']:.1%}"]
             for s in report["summary"]],
            title="per estimator",
        )  # fmt: skip
        _err.print(f"plot: {plot}", highlight=False)
        return
    with _errors():
        summaries = simulator.run(
            settings,
            config,
            policies=policies or ("none", "epsilon", "uncertainty"),
            seeds=seeds or (0, 1),
            port=settings.api_port,
            plot=Path(plot),
        )
    comparison = simulator.paired(summaries) if "none" in {s["policy"] for s in summaries} else []
    if as_json:
        _emit_json({"runs": summaries, "against_none": comparison})
        return
    columns = ["policy", "seed", "clicks_per_request", "coverage", "good_new_served_widely",
               "median_requests_to_widely"]  # fmt: skip
    _print_table(columns, [[s[c] for c in columns] for s in summaries], title="closed-loop simulation")
    if comparison:
        _print_table(
            ["policy", "seeds", "clicks/request vs none", "95% interval"],
            [
                [c["policy"], c["seeds"], f"{c['mean']:+.1%}", f"[{c['low']:+.1%}, {c['high']:+.1%}]"]
                for c in comparison
            ],
            title="paired by seed",
        )
    _err.print(f"plot: {plot}", highlight=False)


@main.group()
def model() -> None:
    """The published model versions."""


@model.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def model_list(as_json: bool) -> None:
    """Every published version: kind, parent, size."""
    from freshrec.store import open_store
    from publishers.publisher import list_updates

    settings = _settings()
    with _errors():
        store = open_store(settings)
        try:
            updates = list_updates(store)
        finally:
            store.close()
    if as_json:
        _emit_json(
            [
                {k: u[k] for k in ("version", "parent", "kind", "bytes", "rows")}
                | {"created_at": u["created_at"].isoformat()}
                for u in updates
            ]
        )
        return
    _print_table(
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

    settings = _settings()
    _kafka(settings)
    with _errors():
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
        _emit_json(data)
    else:
        _err.print(f"published v{published.version}: the parameters of v{to}", highlight=False)


@eval_.command("replay")
@click.argument("dataset")
@click.option("--limit", type=click.IntRange(min=1), help="Replay only the first N events.")
@click.option(
    "--sample",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=1.0,
    show_default=True,
    help="Share of the events scored (one seeded subset for every method); every event is learned.",
)
@click.option(
    "--finetune-every",
    type=click.IntRange(min=0),
    default=10_000,
    show_default=True,
    help="Events between two fine-tunes of the transformer, in event order (0: never).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample and of exploration.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default="replay.png",
    show_default=True,
    help="Where the plot of HR@10 over event time goes.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_replay(
    dataset: str, limit: int | None, sample: float, finetune_every: int, seed: int, plot: str, as_json: bool
) -> None:
    """HR@10 / NDCG@10 of the served list and of each source, each event scored before it is learned."""
    from evaluation import replay as replay_eval
    from freshrec.store import open_store

    settings = _settings()
    _kafka(settings)
    with _errors(), _progress(f"eval replay {dataset}", sys.stderr.isatty()) as progress:
        config = replay_eval.ReplayConfig(finetune_every=finetune_every, sample=sample, seed=seed)
        store = open_store(settings)
        try:
            result = replay_eval.run(
                settings, store, dataset, limit=limit, config=config, plot=Path(plot), progress=progress
            )
        finally:
            store.close()
    if as_json:
        keys = ("dataset", "events", "scored", "methods", "paired", "over_time")
        _emit_json({k: result[k] for k in keys})
        return
    rows = [
        (m, f"{v['hr@10']:.4f}", f"[{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]", f"{v['ndcg@10']:.4f}")
        for m, v in result["methods"].items()
    ]
    title = f"replay {dataset}: {result['scored']:,} of {result['events']:,} events scored"
    _print_table(["method", "HR@10", "95% CI", "NDCG@10"], rows, title=title)
    _err.print(f"plot: {plot}", highlight=False)


@eval_.command("ips")
@click.option(
    "--policy",
    type=click.Choice(["logging", "none", "epsilon", "uncertainty"]),
    default="logging",
    show_default=True,
    help="Target policy. logging: the one that served (a check of the log); the others are "
    "evaluated from each response's logged exploration record.",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="Repeatable: a target parameter over the logged one "
    "(epsilon; explore_fraction, ucb_c, temperature).",
)
@click.option(
    "--estimator",
    "estimators",
    type=click.Choice(["ips", "snips", "dr"]),
    multiple=True,
    help="Repeatable; default: all three.",
)
@click.option("--logged-by", help="Only responses served by this policy (uncertainty, epsilon, none).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_ips(
    policy: str, params: tuple[str, ...], estimators: tuple[str, ...], logged_by: str | None, as_json: bool
) -> None:
    """Off-policy estimate of a policy's click rate per slot, from the decision log alone."""
    from evaluation import ips
    from freshrec.errors import ConfigError
    from freshrec.store import open_store

    settings = _settings()
    with _errors():
        values: dict[str, float] = {}
        for param in params:
            name, sep, value = param.partition("=")
            try:
                values[name.strip()] = float(value)
            except ValueError:
                sep = ""
            if not sep:
                raise ConfigError(f"--param {param!r}: write NAME=NUMBER, e.g. --param ucb_c=1.5")
        if policy == "logging" and (values or estimators):
            raise ConfigError(
                "--param and --estimator apply to a target policy: add --policy none|epsilon|uncertainty"
            )
        store = open_store(settings)
        try:
            if policy == "logging":
                estimate = ips.evaluate(store, policy=logged_by)
            else:
                target = ips.evaluate_policy(
                    store,
                    policy=policy,
                    params=values,
                    estimators=estimators or ("ips", "snips", "dr"),
                    logging_policy=logged_by,
                )
        finally:
            store.close()
    if policy != "logging":
        if as_json:
            _emit_json(target.to_json())
            return
        table = [
            (r.estimator, f"{r.estimate:.4f}", f"[{r.ci_low:.4f}, {r.ci_high:.4f}]", f"{r.ess:,.0f}")
            for r in target.results
        ]
        params_text = ", ".join(f"{k}={v:g}" for k, v in target.params.items()) or "no parameters"
        title = (
            f"{policy} ({params_text}) from {target.responses:,} responses logged by {target.logging}; "
            f"observed CTR {target.observed_ctr:.4f}, unsupported {target.unsupported:.1%}"
        )
        _print_table(["estimator", "click rate per slot", "95% CI", "effective slots"], table, title=title)
        return
    if as_json:
        _emit_json(estimate.to_json())
        return
    rows = [
        ("slots", f"{estimate.slots:,}"),
        ("clicks", f"{estimate.clicks:,}"),
        ("observed CTR", f"{estimate.observed_ctr:.4f}"),
        ("IPS (95% CI)", f"{estimate.ips:.4f} [{estimate.ci_low:.4f}, {estimate.ci_high:.4f}]"),
        ("SNIPS", f"{estimate.snips:.4f}"),
        ("explore / exploit CTR", f"{estimate.explore_ctr} / {estimate.exploit_ctr}"),
    ]
    _print_table(["", ""], rows, title=f"IPS, target: {estimate.target}")


@main.command()
@click.argument("query")
@click.option("--json", "as_json", is_flag=True, help="Print rows as a JSON list of objects.")
def sql(query: str, as_json: bool) -> None:
    """Run QUERY on the configured ClickHouse (in database `freshrec` by default) and print the rows."""
    from freshrec.store import open_store

    settings = _settings()
    with _errors():
        store = open_store(settings)
        try:
            columns, rows = store.query(query)
        except Exception as exc:  # a user's SQL error is an answer, not a crash
            if isinstance(exc, FreshrecError):
                raise
            _fail(str(exc))
        finally:
            store.close()
    if as_json:
        _emit_json([dict(zip(columns, row, strict=True)) for row in rows])
    else:
        _print_table(columns, rows)


class _Iso8601(click.ParamType):
    """An ISO 8601 date or time (``2024-05-01``, ``2024-05-01T12:00:00+02:00``, ``...Z``), in UTC.

    Without an offset the time is taken as UTC, the clock of every time ClickHouse stores here.
    """

    name = "ISO8601"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 date or time, e.g. 2024-05-01 or 2024-05-01T12:00:00Z")
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@main.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("freshrec-report"),
    show_default=True,
    help="Directory for report.html and report.png (created if needed).",
)
@click.option("--since", type=_Iso8601(), help="Window start (inclusive); default: the data's first row.")
@click.option("--until", type=_Iso8601(), help="Window end (exclusive); default: the data's last row.")
@click.option("--json", "as_json", is_flag=True, help="Print the paths and headline numbers as JSON.")
def report(out: Path, since: datetime | None, until: datetime | None, as_json: bool) -> None:
    """Write a self-contained HTML (and PNG) summary of the run: volumes, freshness, quality, exploration."""
    from freshrec.store import open_store
    from freshrec_app import report as report_module

    if since is not None and until is not None and since >= until:
        raise click.BadParameter(
            f"--since ({since.isoformat()}) must be before --until ({until.isoformat()})",
            param_hint="'--since' / '--until'",
        )
    settings = _settings()
    with _errors():
        store = open_store(settings)
        try:
            result = report_module.write_report(store, out, since=since, until=until)
        finally:
            store.close()
    if as_json:
        _emit_json(result.to_json())
        return
    _print_table(["", ""], list(result.headline.items()), title="report")
    click.echo(result.html)
    click.echo(result.png)


@main.command()
@click.option("--dataset", default="ml-100k", show_default=True, help="Replay this dataset first (if new).")
@click.option("--no-replay", is_flag=True, help="Do not replay any dataset.")
@click.option("--until-idle", type=click.FloatRange(min=0), help="Stop once drained for S seconds.")
@click.option(
    "--show",
    type=click.IntRange(min=0),
    default=0,
    help="With --until-idle: then count the stream, fine-tune once and print N users' top 10.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def run(dataset: str, no_replay: bool, until_idle: float | None, show: int, as_json: bool) -> None:
    """Everything in one process on the embedded default (local broker, chDB).

    With --until-idle: replay, sink until drained, print what ClickHouse holds (and, with --show N,
    close the loop once and print what N users are recommended). Without: keep running, and serve
    the HTTP API and fine-tune on schedule too, until Ctrl-C.
    """
    from freshrec_app import embedded

    settings = _settings()
    with _errors(), _progress(f"replay {dataset}", sys.stderr.isatty()) as progress:
        result = embedded.run(
            settings,
            dataset=None if no_replay else dataset,
            until_idle_s=until_idle,
            progress=progress,
            show=show,
        )
    summary = {"replayed": result.replayed, "sink_consumed": result.sink.consumed, **result.summary}
    shown: list[dict[str, Any]] = [
        {"user_id": s.user_id, "history": s.history, "model_version": s.model_version, "items": s.items}
        for s in result.shown
    ]
    if as_json:
        _emit_json(summary | ({"recommendations": shown} if show else {}))
        return
    _print_table(["", ""], [(k, v) for k, v in summary.items()], title="freshrec audit log (ClickHouse)")
    for user in shown:
        _print_table(
            ["#", "item", "title", "source", "score", "explore"],
            [
                [
                    n + 1,
                    i["item_id"],
                    i["title"],
                    i["source"],
                    f"{i['score']:.3f}",
                    "yes" if i["explore"] else "",
                ]
                for n, i in enumerate(user["items"])
            ],
            title=(
                f"top 10 for user {user['user_id']} ({user['history']} events; "
                f"model v{user['model_version']})"
            ),
        )
    _err.print('Query it: freshrec sql "SELECT type, count() FROM events GROUP BY type"', highlight=False)
    if shown:
        _err.print(
            "Ask for more: `freshrec run` (no --until-idle) serves the API; then "
            f"curl 'http://{settings.api_host}:{settings.api_port}/v1/recommendations/{shown[0]['user_id']}?k=10'",
            highlight=False,
        )

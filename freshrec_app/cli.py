"""The ``freshrec`` command line: each subcommand parses its arguments, builds the settings and calls
one ``run(settings, ...)`` function. Results are tables for people, or JSON with ``--json``; logs and
progress go to stderr so that stdout stays parseable.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from rich.logging import RichHandler

from freshrec.errors import FreshrecError
from freshrec_app.cli_common import (
    EXIT_CONFIG,
    emit_json,
    ensure_kafka,
    err,
    errors,
    fail,
    load_settings,
    print_table,
    progress_bar,
    settings_problem,
)
from freshrec_app.cli_eval import eval_, simulate
from freshrec_app.cli_model import model, train

__all__ = ["main"]

logger = logging.getLogger(__name__)


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
        handlers=[RichHandler(console=err, show_path=False, rich_tracebacks=True)],
    )


# ---------------------------------------------------------------------------- broker


@main.group()
def broker() -> None:
    """The local Apache Kafka broker (KRaft, single node)."""


@broker.command("start")
def broker_start() -> None:
    """Start the local broker (idempotent) and print its bootstrap address."""
    from freshrec.broker import LocalBroker

    settings = load_settings()
    if not settings.uses_local_broker:
        err.print(f"FRESHREC_KAFKA_BOOTSTRAP is set: using the cluster at {settings.bootstrap}")
        click.echo(settings.bootstrap)
        return
    with errors():
        status = LocalBroker(settings).start()
    err.print(f"local Kafka broker running (pid {status.pid}), data in {status.data_dir}")
    click.echo(status.bootstrap)


@broker.command("stop")
def broker_stop() -> None:
    """Stop the local broker."""
    from freshrec.broker import LocalBroker

    with errors():
        stopped = LocalBroker(load_settings()).stop()
    click.echo("stopped" if stopped else "not running")


@broker.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def broker_status(as_json: bool) -> None:
    """Say whether the local broker runs, and its bootstrap address. Exit 3 when it does not."""
    from freshrec.broker import LocalBroker

    status = LocalBroker(load_settings()).status()
    if as_json:
        emit_json({"running": status.running, "pid": status.pid, "bootstrap": status.bootstrap})
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

    settings = load_settings()
    ensure_kafka(settings)
    with errors(), progress_bar(f"replay {dataset}", sys.stderr.isatty()) as progress:
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
        emit_json(result)
    else:
        print_table(["", ""], [(k, v) for k, v in result.items()], title="replay")


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

    settings = load_settings()
    ensure_kafka(settings, check=until_idle is not None)
    with errors():
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
        emit_json(result)
    else:
        print_table(["", ""], [(k, v) for k, v in result.items()], title="sink")


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

    settings = load_settings()
    if roles:
        try:
            stream_settings = StreamSettings(**{**settings.stream.model_dump(), "roles": roles})
        except ValidationError as exc:
            fail(settings_problem(exc, prefix="--role / FRESHREC_STREAM__"), code=EXIT_CONFIG)
        settings = settings.model_copy(update={"stream": stream_settings})
    ensure_kafka(settings, check=until_idle is not None)
    with errors():
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
        emit_json(result)
    else:
        print_table(["", ""], [(k, v) for k, v in result.items()], title="stream worker")


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

    settings = load_settings()
    ensure_kafka(settings, check=False)  # serving waits for a cluster that is away; /readyz says so
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    count = workers or settings.serve.workers
    url = f"http://{settings.api_host}:{settings.api_port}"
    err.print(
        f"serving on {url} with {count} process(es) (OpenAPI: {url}/docs, dashboard: {url}/dashboard); "
        "Ctrl-C stops",
        highlight=False,
    )
    with errors():
        code = server.serve(settings, workers=count, stop=stop)
    sys.exit(code)


@main.command()
@click.argument("query")
@click.option("--json", "as_json", is_flag=True, help="Print rows as a JSON list of objects.")
def sql(query: str, as_json: bool) -> None:
    """Run QUERY on the configured ClickHouse (in database `freshrec` by default) and print the rows."""
    from freshrec.store import open_store

    settings = load_settings()
    with errors():
        store = open_store(settings)
        try:
            columns, rows = store.query(query)
        except Exception as exc:  # a user's SQL error is an answer, not a crash
            if isinstance(exc, FreshrecError):
                raise
            fail(str(exc))
        finally:
            store.close()
    if as_json:
        emit_json([dict(zip(columns, row, strict=True)) for row in rows])
    else:
        print_table(columns, rows)


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
    settings = load_settings()
    with errors():
        store = open_store(settings)
        try:
            result = report_module.write_report(store, out, since=since, until=until)
        finally:
            store.close()
    if as_json:
        emit_json(result.to_json())
        return
    print_table(["", ""], list(result.headline.items()), title="report")
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

    settings = load_settings()
    with errors(), progress_bar(f"replay {dataset}", sys.stderr.isatty()) as progress:
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
        emit_json(summary | ({"recommendations": shown} if show else {}))
        return
    print_table(["", ""], [(k, v) for k, v in summary.items()], title="freshrec audit log (ClickHouse)")
    for user in shown:
        print_table(
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
    err.print('Query it: freshrec sql "SELECT type, count() FROM events GROUP BY type"', highlight=False)
    if shown:
        err.print(
            "Ask for more: `freshrec run` (no --until-idle) serves the API; then "
            f"curl 'http://{settings.api_host}:{settings.api_port}/v1/recommendations/{shown[0]['user_id']}?k=10'",
            highlight=False,
        )


# ---------------------------------------------------------------------------- state


@main.group()
def state() -> None:
    """The stream workers' state, as the changelog in Kafka holds it."""


@state.command("top")
@click.option("--k", "k", default=10, show_default=True, type=click.IntRange(min=1), help="How many items.")
@click.option("--json", "as_json", is_flag=True, help="JSON: [{item_id, total}], highest first.")
def state_top(k: int, as_json: bool) -> None:
    """The items counted most, from every partition's newest snapshot in Kafka alone (works with an
    empty FRESHREC_HOME, whether the workers run or not)."""
    from streams import state_top as state_top_module

    settings = load_settings()
    ensure_kafka(settings)
    with errors():
        rows = state_top_module.run(settings, k=k)
    if as_json:
        emit_json(rows)
    else:
        print_table(["item", "total"], [(row["item_id"], row["total"]) for row in rows])


main.add_command(eval_)
main.add_command(simulate)
main.add_command(train)
main.add_command(model)

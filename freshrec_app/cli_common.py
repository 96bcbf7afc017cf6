"""What every ``freshrec`` command shares: settings from the environment (or one line and exit 2),
one-line errors, JSON on stdout, tables and progress on the terminal, and a Kafka to talk to."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import orjson
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from freshrec.errors import FreshrecError
from freshrec.settings import Settings

__all__ = [
    "EXIT_CONFIG",
    "emit_json",
    "ensure_kafka",
    "err",
    "errors",
    "fail",
    "load_settings",
    "out",
    "print_table",
    "progress_bar",
    "settings_problem",
]

out = Console()
err = Console(stderr=True)


#: Exit status of a command whose configuration is wrong (as for a usage error): fix, do not retry.
EXIT_CONFIG = 2


def load_settings() -> Settings:
    """The settings from the environment, or exit 2 with one line naming each bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        fail(settings_problem(exc), code=EXIT_CONFIG)
    except SettingsError as exc:  # a JSON-valued variable that is not JSON, before validation
        fail(settings_problem(exc), code=EXIT_CONFIG)


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


def fail(message: str, *, code: int = 1) -> NoReturn:
    # One line however wide the terminal, and the message taken literally (no rich markup).
    err.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True, highlight=False)
    sys.exit(code)


def emit_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


@contextmanager
def errors() -> Iterator[None]:
    try:
        yield
    except FreshrecError as exc:
        fail(str(exc))


def ensure_kafka(settings: Settings, *, check: bool = True) -> None:
    """Make sure a command that needs Kafka has one. Without ``FRESHREC_KAFKA_BOOTSTRAP`` the local
    broker is started when it is not running (as ``freshrec run`` does; ``freshrec broker stop``
    stops it). A configured cluster is asked for its topics, with ``check``, and a cluster that does
    not answer within 5 s ends the command with one line saying what to do (instead of librdkafka
    retrying for ever); the long-running roles pass ``check=False`` and wait for it instead."""
    from freshrec.broker import LocalBroker
    from streams.admin import ensure_topics

    with errors():
        if settings.uses_local_broker:
            broker = LocalBroker(settings)
            if not broker.status().running:
                err.print(
                    f"starting the local Kafka broker at {settings.bootstrap} "
                    "(`freshrec broker stop` stops it)",
                    highlight=False,
                )
                broker.start()
        elif check:
            ensure_topics(settings, timeout_s=5.0)


@contextmanager
def progress_bar(description: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    if not enabled:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    table = Table(*columns, title=title, show_lines=False)
    for row in rows:
        table.add_row(*("NULL" if value is None else str(value) for value in row))
    out.print(table)

"""Helpers for tests: subprocess CLI runs with isolated settings, bounded waits, free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
from confluent_kafka import Consumer, KafkaException, TopicPartition

from freshrec.settings import Settings

REPO = Path(__file__).resolve().parent.parent
# The project's top-level packages, as pyproject.toml installs them (one list, read by every test).
PACKAGES: tuple[str, ...] = tuple(
    name
    for name in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    if "." not in name
)


def free_port_pair() -> tuple[int, int]:
    """Two free TCP ports on 127.0.0.1 (the broker's client and controller listeners)."""
    socks = [socket.socket() for _ in range(2)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return socks[0].getsockname()[1], socks[1].getsockname()[1]
    finally:
        for sock in socks:
            sock.close()


def cli_env(settings: Settings, *, dsn: str | None = None) -> dict[str, str]:
    """Environment for a ``freshrec`` subprocess with the same isolation as ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
    env.update(
        {
            "FRESHREC_HOME": str(settings.home),
            "FRESHREC_CACHE_DIR": str(settings.cache_dir),
            "FRESHREC_KAFKA_BOOTSTRAP": settings.bootstrap,
            "FRESHREC_CLICKHOUSE_DSN": dsn or settings.dsn,
            "FRESHREC_CLICKHOUSE_DATABASE": settings.clickhouse_database,
            "FRESHREC_TOPIC_PREFIX": settings.topic_prefix,
            "FRESHREC_SINK__GROUP_ID": settings.sink.group_id,
            "FRESHREC_SINK__BATCH_TIMEOUT_S": str(settings.sink.batch_timeout_s),
            "FRESHREC_SINK__BATCH_SIZE": str(settings.sink.batch_size),
            "FRESHREC_SINK__SESSION_TIMEOUT_MS": str(settings.sink.session_timeout_ms),
        }
    )
    if settings.datasets_dir is not None:
        env["FRESHREC_DATASETS_DIR"] = str(settings.datasets_dir)
    return env


def freshrec_cli(
    *args: str, env: dict[str, str], timeout: float = 180.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the installed console script's module in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-m", "freshrec_app", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"freshrec {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def sql_json(query: str, *, env: dict[str, str]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = orjson.loads(freshrec_cli("sql", "--json", query, env=env).stdout)
    return rows


def wait_until(predicate: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.1) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout_s`` (a bounded wait, not a sleep)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


@contextmanager
def chdb_path_held(path: Path) -> Iterator[None]:
    """Another process holding the chDB ``path`` open (as ``freshrec run`` would) for the block."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"import clickhouse_connect, time; c = clickhouse_connect.get_client(dsn='chdb://{path}'); "
         "c.query('SELECT 1'); print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        yield
    finally:
        holder.kill()
        holder.communicate()


def sink_committed(settings: Settings) -> int:
    """Sum of the audit sink group's committed offsets on ``events`` (what the sink has stored),
    read with a short-lived consumer; -1 while the group's coordinator moves (after a broker
    restart): ask again."""
    partitions = [TopicPartition(settings.topics.events, p) for p in range(settings.broker_partitions)]
    probe = Consumer(
        settings.kafka_config(**{"group.id": settings.sink.group_id, "enable.auto.commit": False})
    )
    try:
        return sum(max(tp.offset, 0) for tp in probe.committed(partitions, timeout=10))
    except KafkaException:
        return -1
    finally:
        probe.close()


def started(call: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    """``call`` running on a started thread, and the list any exception it raises lands in (a test
    asserts it stays empty; a thread's exception would otherwise only be printed)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors

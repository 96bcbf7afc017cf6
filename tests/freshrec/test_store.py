"""The ClickHouse store on the real embedded engine: migrations, natural-key dedup, chDB's one-owner rule."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import chdb_path_held, cli_env, freshrec_cli

from freshrec.errors import StoreUnavailable
from freshrec.settings import Settings
from freshrec.store import MIGRATIONS, Store, open_store


def test_migrations_are_idempotent_and_create_the_documented_tables(settings: Settings, store: Store) -> None:
    assert store.migrate() == []  # the fixture already migrated: a second run applies nothing
    versions = store.rows(f"SELECT version FROM {store.table('schema_migrations')} FINAL ORDER BY version")
    assert [v for (v,) in versions] == [m.version for m in MIGRATIONS]
    tables = {name for (name,) in store.rows(f"SHOW TABLES FROM {settings.clickhouse_database}")}
    assert {"events", "dead_letters", "schema_migrations"} <= tables
    columns = dict(
        store.rows(
            "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = 'events'",
            {"db": settings.clickhouse_database},
        )
    )
    assert columns["ts"] == "DateTime64(3, 'UTC')" and columns["value"] == "Nullable(Float64)"


def test_events_collapse_on_event_id_with_final(store: Store) -> None:
    names = ["event_id", "user_id", "item_id", "type", "ts", "context", "topic", "partition", "offset",
             "kafka_ts", "ingested_at"]  # fmt: skip
    row = ["same", "u", "i", "view", 1_700_000_000_000, "", "t", 0, 1, 1_700_000_000_000, 1_700_000_000_000]
    store.insert("events", [[v] for v in row], column_names=names)
    store.insert("events", [[v] for v in row], column_names=names)
    assert store.rows(f"SELECT count() FROM {store.table('events')} FINAL") == [(1,)]


def test_a_chdb_path_held_by_another_process_gives_a_clear_error(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "held"
    with chdb_path_held(path):
        result = freshrec_cli("sql", "SELECT 1", env=cli_env(settings, dsn=f"chdb://{path}"), check=False)
        assert result.returncode == 1
        assert "open in another process" in result.stderr


def test_freshrec_sql_prints_rows_as_json_and_tables(settings: Settings, tmp_path: Path) -> None:
    env = cli_env(settings, dsn=f"chdb://{tmp_path / 'sql-db'}")
    result = freshrec_cli(
        "sql", "--json", "SELECT number AS n, toString(number * 2) AS s FROM numbers(3)", env=env
    )
    import orjson

    assert orjson.loads(result.stdout) == [{"n": 0, "s": "0"}, {"n": 1, "s": "2"}, {"n": 2, "s": "4"}]
    table = freshrec_cli("sql", "SELECT count() AS c FROM freshrec_missing.nothing", env=env, check=False)
    assert table.returncode == 1 and "error" in table.stderr.lower()
    started = time.monotonic()
    assert "events" in freshrec_cli("sql", f"SHOW TABLES FROM {settings.clickhouse_database}", env=env).stdout
    assert time.monotonic() - started < 60


def test_open_store_rejects_unknown_dsn_schemes(settings: Settings) -> None:
    import pytest

    from freshrec.errors import ConfigError

    with pytest.raises(ConfigError, match="chdb://"):
        open_store(settings.model_copy(update={"clickhouse_dsn": "postgres://nope"}))


@contextmanager
def silent_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts every connection and never answers: a hung ClickHouse."""
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:  # closed at the end of the block
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        for connection in accepted:
            connection.close()
        thread.join(5)


def test_a_clickhouse_that_never_answers_fails_the_call_within_the_timeout(settings: Settings) -> None:
    with silent_server() as port:
        hung = settings.model_copy(
            update={"clickhouse_dsn": f"http://127.0.0.1:{port}", "clickhouse_query_timeout_s": 2}
        )
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="timed out"):
            open_store(hung)
        assert time.monotonic() - started < 10


def test_the_sink_against_a_hung_clickhouse_exits_with_one_clear_line(settings: Settings) -> None:
    with silent_server() as port:
        env = cli_env(settings, dsn=f"http://127.0.0.1:{port}") | {"FRESHREC_CLICKHOUSE_QUERY_TIMEOUT_S": "2"}
        started = time.monotonic()
        result = freshrec_cli("sink", "--until-idle", "1", env=env, check=False, timeout=60)
        assert result.returncode == 1
        assert time.monotonic() - started < 30
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith("error: cannot reach ClickHouse"), result.stderr
        assert "timed out" in errors[0] and "Traceback" not in result.stderr

"""The ClickHouse store on the real embedded engine: migrations, natural-key dedup, chDB's one-owner rule."""

from __future__ import annotations

import time
from pathlib import Path

from support import chdb_path_held, cli_env, freshrec_cli

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

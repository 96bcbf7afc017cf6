"""`freshrec run` end to end, as `make run` does it: ml-100k through Kafka into ClickHouse, twice."""

from __future__ import annotations

from pathlib import Path

import orjson
from support import cli_env, freshrec_cli

from freshrec.settings import Settings


def test_run_replays_ml_100k_into_clickhouse_once(settings: Settings, tmp_path: Path) -> None:
    env = cli_env(settings, dsn=f"chdb://{tmp_path / 'run-db'}")
    first = orjson.loads(
        freshrec_cli("run", "--dataset", "ml-100k", "--until-idle", "3", "--json", env=env).stdout
    )
    assert first["replayed"] == 100_000
    assert first["events"] == first["distinct_event_ids"] == 100_000
    assert (first["users"], first["items"]) == (943, 1682)
    assert first["events_by_type"] == {"rating": 100_000}
    assert first["dead_letters"] == 0
    # A second run finds the dataset stored and does not publish it again.
    second = orjson.loads(
        freshrec_cli("run", "--dataset", "ml-100k", "--until-idle", "2", "--json", env=env).stdout
    )
    assert second["replayed"] == 0 and second["events"] == 100_000 and second["dead_letters"] == 0

"""Fixtures shared by the whole suite.

Integration tests run against a real Apache Kafka broker and the real ClickHouse engine:
- Kafka: ``FRESHREC_KAFKA_BOOTSTRAP`` when set, else one local KRaft broker started for the session on
  free ports (its jars are resolved by Maven once and cached).
- ClickHouse: ``FRESHREC_TEST_CLICKHOUSE_DSN`` when set (e.g. a server), else chDB. chDB lets a process
  open one path, so this process uses one path for the whole session, and every test gets its own
  database, topic prefix and consumer group. Tests that need a separate process (kill -9) give it
  its own chDB path and read results back through that process's CLI.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import free_port_pair

from freshrec.broker import LocalBroker
from freshrec.settings import Settings, SinkSettings, default_datasets_dir
from freshrec.store import Store, open_store


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("FRESHREC_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    port, controller = free_port_pair()
    settings = Settings(
        home=tmp_path_factory.mktemp("broker-home"),
        broker_port=port,
        broker_controller_port=controller,
        broker_heap="768m",
    )
    broker = LocalBroker(settings)
    broker.start()
    yield settings.bootstrap
    broker.stop()


@pytest.fixture(scope="session")
def session_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    return os.environ.get("FRESHREC_TEST_CLICKHOUSE_DSN") or f"chdb://{tmp_path_factory.mktemp('chdb')}/db"


@pytest.fixture
def run_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def make_settings(
    kafka_bootstrap: str, session_dsn: str, tmp_path: Path, run_id: str
) -> Callable[..., Settings]:
    """Settings isolated to this test: own topic prefix, database, consumer group and home."""

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "home": tmp_path / "home",
            "cache_dir": Settings().cache_dir,
            "kafka_bootstrap": kafka_bootstrap,
            "clickhouse_dsn": session_dsn,
            "clickhouse_database": f"test_{run_id}",
            "topic_prefix": f"test-{run_id}.",
            "datasets_dir": default_datasets_dir(),
            # A killed sink's partitions move on after 6 s (the broker's minimum), not 45 s.
            "sink": SinkSettings(group_id=f"sink-{run_id}", batch_timeout_s=0.2, session_timeout_ms=6000),
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    store = open_store(settings)
    yield store
    store.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
    store.close()

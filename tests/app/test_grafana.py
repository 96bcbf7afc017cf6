"""The provisioned Grafana dashboard is the queries library's, and its SQL runs as Grafana would run it."""

from __future__ import annotations

import gzip
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from freshrec import queries
from freshrec.settings import Settings
from freshrec.store import Store
from freshrec_app import grafana

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/grafana/dashboards/freshrec-overview.json"
SINCE = datetime(1997, 9, 1, tzinfo=UTC)
UNTIL = datetime(1998, 5, 1, tzinfo=UTC)


@pytest.fixture
def ml100k_rows(settings: Settings, store: Store) -> int:
    """The first 20,000 ml-100k ratings straight into ``events`` (ingested one second after they happened)."""
    assert settings.datasets_dir is not None
    with gzip.open(settings.datasets_dir / "ml-100k" / "u.data.gz", "rt") as lines:
        rows = [line.split("\t") for _, line in zip(range(20_000), lines, strict=False)]
    ts = [datetime.fromtimestamp(int(r[3]), UTC) for r in rows]
    n = len(rows)
    columns = {
        "event_id": [f"ml-100k:{r[0]}:{r[1]}" for r in rows],
        "user_id": [r[0] for r in rows],
        "item_id": [r[1] for r in rows],
        "type": ["rating"] * n,
        "ts": ts,
        "value": [float(r[2]) for r in rows],
        "topic": ["events"] * n,
        "partition": [0] * n,
        "offset": list(range(n)),
        "kafka_ts": ts,
        "ingested_at": [t + timedelta(seconds=1) for t in ts],
    }
    store.insert("events", list(columns.values()), column_names=list(columns))
    return n


def test_the_committed_dashboard_is_the_generated_one() -> None:
    committed = json.loads(DASHBOARD.read_text())
    assert committed == grafana.dashboard(), (
        "deploy/grafana/dashboards/freshrec-overview.json is stale: "
        "run `python -m freshrec_app.grafana > deploy/grafana/dashboards/freshrec-overview.json`"
    )
    assert [p["title"] for p in committed["panels"]] == [q.title for q in queries.QUERIES.values()]


def _expand(sql: str, database: str, bucket_s: int) -> str:
    """Grafana's ClickHouse plugin's macro expansion (v4.0.3+), for a fixed range and interval."""
    ms = {"$__fromTime_ms": SINCE, "$__toTime_ms": UNTIL}
    for macro, when in ms.items():
        sql = sql.replace(macro, f"fromUnixTimestamp64Milli({int(when.timestamp() * 1000)})")
    sql = sql.replace("$__interval_s", str(bucket_s))
    assert "$__" not in sql and not re.search(r"\{\w+:\w+", sql), sql  # nothing left unbound
    return sql.replace("freshrec.", f"{database}.")


@pytest.mark.parametrize("name", sorted(queries.QUERIES))
def test_every_panel_runs_and_equals_the_library_query(name: str, store: Store, ml100k_rows: int) -> None:
    assert ml100k_rows > 0
    query = queries.QUERIES[name]
    panel = next(p for p in grafana.dashboard()["panels"] if p["title"] == query.title)
    bucket_s = 86_400
    _, rows = store.query(_expand(panel["targets"][0]["rawSql"], store.database, bucket_s))
    params = {**query.defaults, "since": SINCE, "until": UNTIL}
    if "bucket_s" in query.parameters:
        params["bucket_s"] = bucket_s
    _, expected = queries.run(store, name, **params)
    assert rows == expected
    if name in {"events_by_type", "sequence_entropy", "freshness"}:
        assert rows, f"{name}: no rows over a range that holds data"

"""The provisioned Grafana dashboard, written from the queries library (never edited by hand).

``python -m freshrec_app.grafana > deploy/grafana/dashboards/freshrec-overview.json`` regenerates it; a
test fails when the committed file and :data:`freshrec.queries.QUERIES` disagree, and runs every
panel's SQL (macros expanded as the plugin expands them) against the embedded ClickHouse.

The SQL is the library's with Grafana's ClickHouse-plugin macros (v4.0.3+) in place of its
parameters: ``$__fromTime_ms`` / ``$__toTime_ms`` (``DateTime64(3)``) for the range, ``$__interval_s``
for the bucket, and each query's dashboard default for the rest. Tables are ``freshrec.<table>``,
the database the compose stack uses.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from freshrec.queries import QUERIES, TABLES, Query, render

__all__ = ["DATASOURCE", "dashboard", "grafana_sql"]

DATASOURCE = {"type": "grafana-clickhouse-datasource", "uid": "freshrec-clickhouse"}
_FORMAT = {"timeseries": 0, "table": 1}  # the plugin's Format enum: TIMESERIES = 0, TABLE = 1


def grafana_sql(query: Query, *, database: str = "freshrec") -> str:
    """The query as Grafana runs it: tables qualified, parameters replaced by macros or defaults."""
    sql = render(query, {t: f"{database}.{t}" for t in TABLES})
    # $__interval_s can be 0 for a short range; toIntervalSecond(0) would fail.
    macros = {"since": "$__fromTime_ms", "until": "$__toTime_ms", "bucket_s": "greatest($__interval_s, 1)"}
    for name, kind in query.all_parameters.items():
        if name in macros:
            value = macros[name]
        elif name in query.defaults:
            value = repr(query.defaults[name])
        else:
            raise ValueError(f"query parameter {name!r} has neither a Grafana macro nor a default")
        sql = sql.replace(f"{{{name}:{kind}}}", value)
    return sql


def _panel(panel_id: int, query: Query, x: int, y: int) -> dict[str, Any]:
    panel: dict[str, Any] = {
        "id": panel_id,
        "type": query.kind,
        "title": query.title,
        "description": query.description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": 12, "h": 8},
        "targets": [
            {
                "refId": "A",
                "datasource": DATASOURCE,
                "editorType": "sql",
                "queryType": query.kind,
                "format": _FORMAT[query.kind],
                "rawSql": grafana_sql(query),
            }
        ],
        "fieldConfig": {"defaults": {"unit": _UNITS.get(query.unit, query.unit)}, "overrides": []},
        "options": {},
        "links": [],
        "transformations": [],
    }
    if query.kind == "timeseries" and query.series is None:
        # Plot the values only (the SQL also returns counts that give them context).
        keep = [query.x, *query.values]
        panel["transformations"] = [{"id": "filterFieldsByName", "options": {"include": {"names": keep}}}]
    return panel


_UNITS = {"ms": "ms", "ratio": "percentunit", "events/min": "short", "nats": "short", "messages": "short"}


def dashboard() -> dict[str, Any]:
    """The whole dashboard JSON, panels two per row in the library's order."""
    panels = [
        _panel(i + 1, query, x=12 * (i % 2), y=8 * (i // 2)) for i, query in enumerate(QUERIES.values())
    ]
    return {
        "uid": "freshrec-overview",
        "title": "freshrec overview",
        "description": "Written by `python -m freshrec_app.grafana` from freshrec/queries.py; do not edit.",
        "tags": ["freshrec"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "refresh": "10s",
        "time": {"from": "now-6h", "to": "now"},
        "panels": panels,
    }


def _main() -> None:
    sys.stdout.write(json.dumps(dashboard(), indent=2) + "\n")


if __name__ == "__main__":
    _main()

"""The built-in dashboard: ``GET /dashboard`` (one HTML page, no external resources) and the JSON
it polls, ``GET /v1/dashboard`` (the panels) and ``GET /v1/dashboard/{name}`` (one panel's rows).

The panels are the queries library's (:mod:`freshrec.queries`), the same SQL as the provisioned
Grafana dashboard, so the two cannot disagree. Rows come from ClickHouse, which the serving process
may not be able to open: chDB allows one process per path, so in the embedded mode the page is served
by ``freshrec run`` (which owns the path), and ``freshrec serve`` shows it only over a ClickHouse
server. Without a store the data routes answer 503 with that explanation; the page shows it.

The page itself needs no token (it holds no data); its data requests carry the bearer token, which
the page takes from ``#token=…`` in its address (a fragment never reaches the server or its logs)
and keeps in the browser's local storage.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query
from fastapi.responses import HTMLResponse, Response

from freshrec import queries
from freshrec.store import Store

__all__ = ["PAGE_PATH", "router"]

logger = logging.getLogger(__name__)

PAGE_PATH = "/dashboard"

_NO_STORE = (
    "this process has no ClickHouse to read: chDB allows one process per data path, so in the "
    "embedded mode open the dashboard of `freshrec run`; `freshrec serve` shows it when "
    "FRESHREC_CLICKHOUSE_DSN points at a ClickHouse server"
)


def _cell(value: Any) -> Any:
    """JSON-ready: times as epoch milliseconds (ClickHouse's are UTC), NaN/inf as null."""
    if isinstance(value, datetime):
        when = value if value.tzinfo else value.replace(tzinfo=UTC)
        return int(when.timestamp() * 1000)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json(body: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json")


def router(store: Store | None) -> APIRouter:
    """The page and its data routes over ``store`` (None: the data routes answer 503)."""
    page = resources.files("publishers").joinpath("dashboard.html").read_text(encoding="utf-8")
    api = APIRouter()

    @api.get(PAGE_PATH, response_class=HTMLResponse, include_in_schema=False)
    async def dashboard_page() -> HTMLResponse:
        return HTMLResponse(page)

    @api.get("/v1/dashboard")
    async def dashboard_panels() -> Response:
        """The panels, in order: name, title, description, how to draw them."""
        panels = [
            {
                "name": name,
                "title": q.title,
                "description": q.description,
                "kind": q.kind,
                "x": q.x,
                "series": q.series,
                "values": list(q.values),
                "unit": q.unit,
            }
            for name, q in queries.QUERIES.items()
        ]
        return _json({"panels": panels, "store": store is not None, "detail": None if store else _NO_STORE})

    # A plain ``def``: FastAPI runs it in its thread pool, so a 100 ms query never holds the event
    # loop that serves recommendations.
    @api.get("/v1/dashboard/{name}")
    def dashboard_panel(
        name: Annotated[str, Path(pattern=r"^[a-z_]{1,64}$")],
        since: Annotated[datetime | None, Query(description="ISO 8601; default: the data's first")] = None,
        until: Annotated[datetime | None, Query(description="ISO 8601; default: the data's last")] = None,
    ) -> Response:
        """One panel's rows over a range (default: all the data, in at most 240 buckets)."""
        if name not in queries.QUERIES:
            return _json({"detail": f"unknown panel {name!r}"}, 404)
        if store is None:
            return _json({"detail": _NO_STORE}, 503)
        aware = [t if t is None or t.tzinfo else t.replace(tzinfo=UTC) for t in (since, until)]
        panel = queries.panel(store, name, since=aware[0], until=aware[1])
        return _json(
            {
                "name": name,
                "columns": panel.columns,
                "rows": [[_cell(v) for v in row] for row in panel.rows],
                "parameters": {k: _cell(v) for k, v in panel.parameters.items()},
            }
        )

    return api

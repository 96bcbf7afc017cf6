"""The built-in dashboard: ``GET /dashboard`` (one HTML page, no external resources) and the JSON
it polls, ``GET /v1/dashboard`` (the panels) and ``GET /v1/dashboard/{name}`` (one panel's rows).

The panels are the queries library's (:mod:`freshrec.queries`), the same SQL as the provisioned
Grafana dashboard, so the two cannot disagree. Rows come from ClickHouse, which the serving process
may not be able to open: chDB allows one process per path, so in the embedded mode the page is served
by ``freshrec run`` (which owns the path), and ``freshrec serve`` shows it only over a ClickHouse
server. Without a store the data routes answer 503 with that explanation; the page shows it.

``freshrec serve`` never needs ClickHouse to serve: it hands the dashboard a :class:`LazyStore`,
opened on the first data request rather than at start. While ClickHouse cannot be reached, the data
routes answer 503 saying so (tried again at most every ``FRESHREC_SERVE__DASHBOARD_RETRY_S``), and
they answer again once it is back.

The page itself needs no token (it holds no data); its data requests carry the bearer token, which
the page takes from ``#token=…`` in its address (a fragment never reaches the server or its logs)
and keeps in the browser's local storage.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query
from fastapi.responses import HTMLResponse, Response

from freshrec import queries
from freshrec.errors import FreshrecError, StoreUnavailable
from freshrec.store import Store

__all__ = ["PAGE_PATH", "LazyStore", "router"]

logger = logging.getLogger(__name__)

PAGE_PATH = "/dashboard"

_NO_STORE = (
    "this process has no ClickHouse to read: chDB allows one process per data path, so in the "
    "embedded mode open the dashboard of `freshrec run`; `freshrec serve` shows it when "
    "FRESHREC_CLICKHOUSE_DSN points at a ClickHouse server"
)


class LazyStore:
    """The dashboard's ClickHouse, opened on first use rather than at start, and again after a
    failure (at most every ``retry_s``), so that a process serving recommendations neither waits
    for ClickHouse nor fails without it."""

    def __init__(self, opener: Callable[[], Store], *, retry_s: float = 5.0) -> None:
        self._opener = opener
        self._retry_s = retry_s
        self._store: Store | None = None
        self._failed_at: float | None = None
        self._error = ""
        self._lock = threading.Lock()

    @classmethod
    def of(cls, store: Store) -> LazyStore:
        """An already open store."""
        lazy = cls(lambda: store)
        lazy._store = store
        return lazy

    @property
    def opened(self) -> Store | None:
        """The store if it has been opened (None: not yet, or ClickHouse was unreachable)."""
        return self._store

    def get(self) -> Store:
        """The store, opening it if need be; :class:`StoreUnavailable` while it cannot be reached."""
        with self._lock:
            if self._store is not None:
                return self._store
            now = time.monotonic()
            if self._failed_at is not None and now - self._failed_at < self._retry_s:
                raise StoreUnavailable(f"ClickHouse cannot be reached ({self._error}); trying again shortly")
            try:
                self._store = self._opener()
            except FreshrecError as exc:
                self._failed_at, self._error = now, str(exc)
                logger.warning("the dashboard cannot open ClickHouse: %s", exc)
                raise StoreUnavailable(f"ClickHouse cannot be reached ({exc}); trying again shortly") from exc
            logger.info("the dashboard opened ClickHouse")
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


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


def router(store: Store | LazyStore | None) -> APIRouter:
    """The page and its data routes over ``store`` (None: the data routes answer 503; a
    :class:`LazyStore`: they answer 503 while ClickHouse cannot be reached)."""
    source = LazyStore.of(store) if isinstance(store, Store) else store
    page = resources.files("serving").joinpath("dashboard.html").read_text(encoding="utf-8")
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
        return _json({"panels": panels, "store": source is not None, "detail": None if source else _NO_STORE})

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
        if source is None:
            return _json({"detail": _NO_STORE}, 503)
        aware = [t if t is None or t.tzinfo else t.replace(tzinfo=UTC) for t in (since, until)]
        try:
            panel = queries.panel(source.get(), name, since=aware[0], until=aware[1])
        except StoreUnavailable as exc:  # down, or gone since it was opened: serving goes on
            return _json({"detail": str(exc)}, 503)
        return _json(
            {
                "name": name,
                "columns": panel.columns,
                "rows": [[_cell(v) for v in row] for row in panel.rows],
                "parameters": {k: _cell(v) for k, v in panel.parameters.items()},
            }
        )

    return api

"""The HTTP API (DESIGN.md §2), hosted by ``freshrec serve`` and ``freshrec run``.

Routes: ``GET /v1/recommendations/{user_id}?k=10``, ``POST /v1/events`` (one event or an array),
``GET /healthz``, ``GET /metrics`` (Prometheus text), ``GET /dashboard`` (see
:mod:`publishers.dashboard`), and the OpenAPI spec at ``/openapi.json`` (``/docs`` renders it). With
``FRESHREC_API_TOKEN`` set, every route but ``/healthz`` and the dashboard's page (which holds no
data) needs ``Authorization: Bearer <token>``; anything else gets 401.

Why FastAPI: request validation and the OpenAPI spec come from the same type declarations, and
``k`` out of range is a 422 before any work (so nothing is served and nothing is logged). Every
response is queued for the ``impressions`` topic (the decision log) before it is returned; the log's
producer sends it within ``FRESHREC_SERVE__IMPRESSIONS_LINGER_MS`` (batched: see that setting), and a
stop delivers what is queued. A process that dies loses at most that last batch.
``POST /v1/events`` validates every event with the spine's contract first: one bad event makes the
whole request a 422 naming each bad one, and none is published; otherwise all are published and
acknowledged by Kafka (acks=all) before the 202, or the answer is a 503 naming the failure.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route signatures' annotations at
# runtime, and ``k``'s bound (``max_k``) is a closure variable that a string annotation cannot name.

import asyncio
import logging
import secrets
import time
from typing import Annotated

import orjson
from confluent_kafka import KafkaError
from fastapi import FastAPI, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from freshrec.errors import InvalidEvent
from freshrec.events import event_from_obj
from freshrec.settings import Settings
from freshrec.store import Store
from publishers.dashboard import PAGE_PATH
from publishers.dashboard import router as dashboard_router
from publishers.replica import ReplicaSubscriber
from publishers.scan import ScanCounts
from publishers.serving import Recommender
from streams.impressions import encode_impression
from streams.producer import EventProducer

__all__ = ["Accepted", "AuthAndTiming", "Item", "Metrics", "RecommendationOut", "create_app"]

logger = logging.getLogger(__name__)


class Item(BaseModel):
    item_id: str
    score: float
    source: str
    explore: bool
    propensity: float


class RecommendationOut(BaseModel):
    request_id: str
    user_id: str
    model_version: int
    items: list[Item]


class Accepted(BaseModel):
    accepted: int


class _ScanCollector:
    """``freshrec_retrieval_scans_total{scan}``: retrieval scans by outcome, read from the counts the
    recommender keeps (a Counter object would need its increments mirrored)."""

    def __init__(self, counts: ScanCounts) -> None:
        self.counts = counts

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(
            "freshrec_retrieval_scans",
            "Retrieval scans: certified (int8, proven exact), fallback (int8, then again in fp32) or "
            "fp32 (a table not quantised, a zero query, or int8 given up on this table).",
            labels=["scan"],
        )
        family.add_metric(["certified"], self.counts.certified)
        family.add_metric(["fallback"], self.counts.fallback)
        family.add_metric(["fp32"], self.counts.fp32)
        return [family]


class Metrics:
    """Prometheus metrics of one API instance (its own registry: several apps in a process stay apart)."""

    def __init__(self, scans: ScanCounts | None = None) -> None:
        self.registry = CollectorRegistry()
        if scans is not None:
            self.registry.register(_ScanCollector(scans))
        self.latency = Histogram(
            "freshrec_request_seconds",
            "Request latency by route.",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=self.registry,
        )
        self.events = Counter(
            "freshrec_events_accepted", "Events accepted by POST /v1/events.", registry=self.registry
        )
        self.rejected = Counter(
            "freshrec_events_rejected", "Requests rejected with 422.", registry=self.registry
        )
        self.version = Gauge("freshrec_model_version", "Model version being served.", registry=self.registry)
        self.lag = Gauge(
            "freshrec_model_lag_seconds",
            "Age of the served version (since it was made).",
            registry=self.registry,
        )
        self.indexed = Gauge("freshrec_index_items", "Items in the confident index.", registry=self.registry)
        self.drawn = Gauge(
            "freshrec_explore_drawn_items",
            "Young items a request's exploration draw considers (the newest of the pool, at most "
            "FRESHREC_SERVE__EXPLORE_POOL).",
            registry=self.registry,
        )
        self.pool = Gauge(
            "freshrec_explore_pool_items", "Items in the exploration pool.", registry=self.registry
        )
        self.state = Gauge(
            "freshrec_state_size",
            "Stream state held by this replica, by part.",
            ["part"],
            registry=self.registry,
        )


_OPEN_PATHS = frozenset({"/healthz", PAGE_PATH})  # no data: the page's own requests carry the token


class AuthAndTiming:
    """Bearer-token check and the latency histogram, as a plain ASGI middleware.

    (Starlette's ``BaseHTTPMiddleware``, what ``@app.middleware("http")`` builds, cost more per
    request than the rest of the HTTP stack here.) Latency is labelled by route template, never by
    raw path: user ids in paths would make one time series per user.
    """

    def __init__(self, app: ASGIApp, *, token: str | None, metrics: Metrics) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.expected is not None and scope["path"] not in _OPEN_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(header, self.expected):
                denied = JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401)
                await denied(scope, receive, send)
                return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


def create_app(
    settings: Settings,
    *,
    recommender: Recommender,
    producer: EventProducer,
    decisions: EventProducer | None = None,
    subscriber: ReplicaSubscriber | None = None,
    store: Store | None = None,
) -> FastAPI:
    """The API over a recommender (serving state) and producers: ``producer`` sends posted events
    (at once: they change recommendations), ``decisions`` the decision log to ``impressions`` (in
    large batches: see ``ServeSettings.impressions_linger_ms``; None: ``producer``). The dashboard
    reads ``store`` (without one, its data routes answer 503 and say why)."""
    app = FastAPI(title="freshrec", version="1", summary="Streaming, online-learning recommendations.")
    metrics = Metrics(recommender.scans)
    # An empty token (e.g. an unset variable in docker-compose) means no authentication, not "Bearer ".
    token = (settings.api_token.get_secret_value() if settings.api_token else None) or None
    topics = settings.topics
    max_k = settings.serve.max_k
    log = decisions if decisions is not None else producer
    producer.poll_in_background()  # POST /v1/events waits for its own delivery reports

    app.add_middleware(AuthAndTiming, token=token, metrics=metrics)
    app.include_router(dashboard_router(store))

    @app.get("/healthz")
    def healthz() -> Response:
        """200 while the replica follows the model topics; 503 once its subscriber has died (the API
        would otherwise keep serving an ever staler model and look healthy)."""
        index = recommender.index
        following = subscriber is None or subscriber.alive
        body = {
            "status": "ok" if following else "degraded",
            "model_version": 0 if index is None else index.version.version,
            "worker": settings.stream.worker_id,
        }
        if not following:
            body["detail"] = f"the model replica stopped following: {subscriber.error if subscriber else ''}"
        return JSONResponse(body, status_code=200 if following else 503)

    # ``async``: the work is a few milliseconds of CPU under the GIL; a thread-pool hop per request
    # (FastAPI's way for ``def`` routes) only adds latency.
    @app.get("/v1/recommendations/{user_id}", response_model=RecommendationOut)
    async def recommendations(
        user_id: Annotated[str, Path(min_length=1, max_length=128)],
        k: Annotated[int, Query(ge=1, le=max_k, description="How many items.")] = 10,
    ) -> Response:
        result = recommender.recommend(user_id, k)
        items = [
            {
                "item_id": i.item_id,
                "score": i.score,
                "source": i.source,
                "explore": i.explore,
                "propensity": i.propensity,
            }
            for i in result.items
        ]
        log.produce(
            topics.impressions,
            encode_impression(
                request_id=result.request_id,
                user_id=user_id,
                policy=result.policy,
                model_version=result.model_version,
                latency_ms=result.latency_ms,
                items=items,
            ),
            key=user_id.encode(),
        )
        body = {
            "request_id": result.request_id,
            "user_id": user_id,
            "model_version": result.model_version,
            "items": items,
        }
        return Response(orjson.dumps(body), media_type="application/json")

    @app.post(
        "/v1/events",
        status_code=202,
        response_model=Accepted,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"description": "One event object or an array."}}},
            }
        },
    )
    async def post_events(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            metrics.rejected.inc()
            return JSONResponse({"detail": [{"index": None, "reason": "not_json", "detail": str(exc)}]}, 422)
        batch = body if isinstance(body, list) else [body]
        now_ms = int(time.time() * 1000)
        events, errors = [], []
        for index, obj in enumerate(batch):
            try:
                events.append(
                    event_from_obj(obj, now_ms=now_ms, max_future_skew_ms=settings.max_future_skew_ms)
                )
            except InvalidEvent as exc:
                errors.append({"index": index, "reason": exc.reason, "detail": exc.detail})
        if errors or not events:
            metrics.rejected.inc()
            if not errors:
                errors.append({"index": None, "reason": "empty", "detail": "no event in the request"})
            return JSONResponse({"detail": errors}, status_code=422)
        # 202 once the broker acknowledged these events (not everyone's: no flush), awaited without
        # holding up the event loop; the delivery reports arrive on the producer's polling thread.
        loop = asyncio.get_running_loop()
        acknowledged = loop.create_future()
        pending = len(events)
        failures: list[str] = []

        def settle(error: KafkaError | None) -> None:  # on the loop
            nonlocal pending
            if error is not None:
                failures.append(str(error))
            pending -= 1
            if pending == 0 and not acknowledged.done():  # done: cancelled by the timeout
                acknowledged.set_result(None)

        def delivered(error: KafkaError | None) -> None:  # on a thread serving delivery reports
            loop.call_soon_threadsafe(settle, error)

        for event in events:
            producer.produce(
                topics.events, event.to_json(), key=event.user_id.encode(), on_delivery=delivered
            )
        try:
            await asyncio.wait_for(acknowledged, timeout=10.0)
        except TimeoutError:
            failures.append("not acknowledged by Kafka within 10 s")
        if failures:
            metrics.rejected.inc()
            detail = f"{len(failures)} of {len(events)} events not stored: {failures[0]}"
            return JSONResponse({"detail": detail}, status_code=503)
        metrics.events.inc(len(events))
        return JSONResponse({"accepted": len(events)}, status_code=202)

    @app.get("/metrics")
    def prometheus() -> Response:
        index = recommender.index
        if index is not None:
            metrics.version.set(index.version.version)
            metrics.lag.set(max(0.0, time.time() - index.version.created_at_ms / 1000))
            metrics.indexed.set(len(index.index_rows))
            metrics.pool.set(len(index.pool_rows))
            metrics.drawn.set(len(index.pool_items))
        if recommender.reader is not None:
            for part, size in recommender.reader.sizes().items():
                metrics.state.labels(part).set(size)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app

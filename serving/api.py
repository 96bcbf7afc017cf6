"""The HTTP API, hosted by ``freshrec serve`` and ``freshrec run``.

Routes: ``GET /v1/recommendations/{user_id}?k=10``, ``POST /v1/events`` (one event or an array),
``GET /healthz`` (liveness), ``GET /readyz`` (readiness), ``GET /metrics`` (Prometheus text),
``GET /dashboard`` (see :mod:`serving.dashboard`), and the OpenAPI spec at ``/openapi.json``
(``/docs`` renders it). With ``FRESHREC_API_TOKEN`` set, every route but ``/healthz``, ``/readyz``
and the dashboard's page (which holds no data) needs ``Authorization: Bearer <token>``; anything
else gets 401.

Why FastAPI: request validation and the OpenAPI spec come from the same type declarations, and
``k`` out of range is a 422 before any work (so nothing is served and nothing is logged). A 422
lists at most ``FRESHREC_SERVE__MAX_ERRORS_LISTED`` errors (the rest are counted in ``omitted``) and
echoes at most 64 characters of any input. Every response is queued for the ``impressions`` topic
(the decision log) before it is returned; the log's producer sends it within
``FRESHREC_SERVE__IMPRESSIONS_LINGER_MS`` (batched: see that setting), and a stop delivers what is
queued. A process that dies loses at most that last batch.

A user id is any string the event contract allows (1-128 characters), ``/`` included: the route
takes the rest of the path, so ``/v1/recommendations/a/b`` and ``/v1/recommendations/a%2Fb`` both
serve user ``a/b``.

``POST /v1/events`` and its contract, checked in this order:

- ``Content-Type`` must be ``application/json`` (or ``application/*+json``): else 415, so that a
  browser's cross-site form or ``text/plain`` post is refused before anything is read;
- the body is at most ``FRESHREC_SERVE__MAX_REQUEST_BYTES``: else 413, decided from
  ``Content-Length`` or, for a chunked body, as soon as the bytes streamed in pass the limit, before
  anything is parsed; then at most ``FRESHREC_SERVE__MAX_REQUEST_EVENTS`` events: else 413, before
  any is validated;
- every event passes the event contract, including the 64 KiB limit of a message on ``events``
  (applied to the exact bytes that would be published): else 422 naming each bad event by index and
  reason, and none is published. Parsing and validation run on a worker thread, so a maximal body
  does not hold up the other routes;
- all are then published and acknowledged by Kafka (acks=all) before the 202. When Kafka does not
  acknowledge every one within ``FRESHREC_SERVE__PUBLISH_TIMEOUT_S``, the answer is a 503 giving how
  many were and were not acknowledged. Those not acknowledged are given up at that deadline (the
  producer's ``message.timeout.ms``), so none is published after the 503; those acknowledged are
  stored. **A 503 is the one case where part of a request may be stored**: resend the whole
  request, since the ``event_id`` makes a resend harmless (a stored event sent again is
  dead-lettered as ``duplicate_event_id``, never counted twice). Kafka transactions would make even
  that case all-or-nothing; not done, for their costs: one open transaction at a time per producer
  (concurrent requests would queue behind each other's commits), a commit per request (measured on
  the local broker: 8.1 against 5.1 ms p50 and 50 against 26 ms p99 for one record), a commit
  marker taking an offset on ``events`` per request (the lag of a consumer that stores the offset
  after its last record never reads 0), and a transaction left open by a killed process holding
  up every read-committed consumer of its partitions until ``transaction.timeout.ms``.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route signatures' annotations at
# runtime, and ``k``'s bound (``max_k``) is a closure variable that a string annotation cannot name.

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import orjson
from confluent_kafka import KafkaError, KafkaException
from fastapi import FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
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
from freshrec.events import MAX_MESSAGE_BYTES, REASON_TOO_LARGE, event_from_obj
from freshrec.settings import Settings
from freshrec.store import Store
from publishers.replica import ReplicaSubscriber
from serving.dashboard import PAGE_PATH, LazyStore
from serving.dashboard import router as dashboard_router
from serving.recommender import Recommender
from serving.scan import ScanCounts
from streams.impressions import ServedItem, encode_impression
from streams.producer import EventProducer

__all__ = [
    "Accepted",
    "AuthAndTiming",
    "CheckedBatch",
    "Metrics",
    "Readiness",
    "RecommendationOut",
    "check_batch",
    "create_app",
]

logger = logging.getLogger(__name__)

_ECHO_CHARS = 64  # the most of any client input an error body repeats
_INLINE_BYTES = 16_384  # bodies up to this size are checked on the event loop (<1 ms: 0.8 ms for 200 events)


class RecommendationOut(BaseModel):
    request_id: str
    user_id: str
    model_version: int
    items: list[ServedItem]


class Accepted(BaseModel):
    accepted: int


@dataclass(frozen=True, slots=True)
class Readiness:
    """What ``GET /readyz`` answers: ready, or the reasons why not (a stable key, e.g. ``kafka``,
    ``stream`` or ``model``, to a sentence saying what is awaited)."""

    ready: bool
    reasons: dict[str, str] = field(default_factory=dict)
    lag: int | None = None  # messages the stream state is behind its topics' ends (None: unknown)


@dataclass(frozen=True, slots=True)
class CheckedBatch:
    """A request body checked against the event contract: the records to publish, or the errors.

    ``records`` are (key, value) pairs, the value being the exact bytes the size rule was applied
    to. ``errors`` lists at most the first ``max_errors``; ``error_count`` counts them all.
    ``count`` is the number of events in the body (``too_many`` when over the limit: nothing was
    validated then)."""

    count: int
    records: list[tuple[bytes, bytes]]
    errors: list[dict[str, Any]]
    error_count: int
    too_many: bool = False


def check_batch(
    raw: bytes, *, now_ms: int, max_future_skew_ms: int, max_events: int, max_errors: int
) -> CheckedBatch:
    """Parse a ``POST /v1/events`` body and validate every event with the stream's own rules.

    The same contract as a message on ``events`` gets from the sink: :func:`event_from_obj`'s
    rules, then the 64 KiB limit on the encoded event (what would be published). Pure CPU: the
    API runs it on a worker thread.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        error = {"index": None, "reason": "not_json", "detail": _clip(str(exc), 200)}
        return CheckedBatch(0, [], [error], 1)
    batch = body if isinstance(body, list) else [body]
    if len(batch) > max_events:
        return CheckedBatch(len(batch), [], [], 0, too_many=True)
    records: list[tuple[bytes, bytes]] = []
    errors: list[dict[str, Any]] = []
    count = 0
    for index, obj in enumerate(batch):
        try:
            event = event_from_obj(obj, now_ms=now_ms, max_future_skew_ms=max_future_skew_ms)
            value = event.to_json()
            if len(value) > MAX_MESSAGE_BYTES:
                raise InvalidEvent(
                    REASON_TOO_LARGE,
                    f"the event encodes to {len(value):,} bytes; the limit is {MAX_MESSAGE_BYTES:,} bytes",
                )
        except InvalidEvent as exc:
            count += 1
            if len(errors) < max_errors:
                errors.append({"index": index, "reason": exc.reason, "detail": _clip(exc.detail, 200)})
            continue
        if not count:  # once one event is bad none is published: stop encoding the rest
            records.append((event.user_id.encode(), value))
    if not batch:
        errors.append({"index": None, "reason": "empty", "detail": "no event in the request"})
        count = 1
    return CheckedBatch(len(batch), [] if count else records, errors, count)


def _clip(text: str, limit: int = _ECHO_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json(body: dict[str, Any], status_code: int) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json")


def _is_json(content_type: str | None) -> bool:
    """``application/json`` or ``application/<anything>+json``, with or without parameters."""
    media = (content_type or "").partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


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
            "freshrec_events_rejected",
            "POST /v1/events requests refused (413, 415, 422) or failed (503).",
            registry=self.registry,
        )
        self.ready = Gauge(
            "freshrec_ready",
            "1 when GET /readyz would answer 200 (stream state caught up, a model loaded or none "
            "yet, Kafka answering), else 0.",
            registry=self.registry,
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


# No data behind these: probes, and the page (its own requests carry the token).
_OPEN_PATHS = frozenset({"/healthz", "/readyz", PAGE_PATH})


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
            route = scope.get("route")
            # ``path_format``: the template without converters ({user_id}, not {user_id:path})
            label = getattr(route, "path_format", None) or getattr(route, "path", "unmatched")
            self.metrics.latency.labels(label).observe(time.perf_counter() - started)


def _bounded_validation_errors(errors: Any, limit: int) -> dict[str, Any]:
    """FastAPI's 422 body, with at most ``limit`` errors and no input echoed past 64 characters
    (its default repeats the whole input: a 10 KB user id came back whole)."""
    listed = []
    for error in list(errors)[:limit]:
        value = error.get("input")
        echoed = value if value is None or isinstance(value, bool | int | float) else _clip(str(value))
        listed.append(
            {
                "type": str(error.get("type", "")),
                "loc": [_clip(str(part)) if isinstance(part, str) else part for part in error.get("loc", ())],
                "msg": _clip(str(error.get("msg", "")), 200),
                "input": echoed,
            }
        )
    body: dict[str, Any] = {"detail": listed}
    if len(errors) > limit:
        body["omitted"] = len(errors) - limit
    return body


def create_app(
    settings: Settings,
    *,
    recommender: Recommender,
    producer: EventProducer,
    decisions: EventProducer | None = None,
    subscriber: ReplicaSubscriber | None = None,
    store: Store | LazyStore | None = None,
    readiness: Callable[[], Readiness] | None = None,
) -> FastAPI:
    """The API over a recommender (serving state) and producers: ``producer`` sends posted events
    (at once: they change recommendations), ``decisions`` the decision log to ``impressions`` (in
    large batches: see ``ServeSettings.impressions_linger_ms``; None: ``producer``). The dashboard
    reads ``store`` (None: its data routes answer 503 and say why; a :class:`LazyStore`: opened on
    first use, 503 while ClickHouse cannot be reached). ``readiness`` decides ``/readyz`` (a
    blocking call, run on a worker thread; None: always ready, for an app without a stream state
    or model replica of its own)."""
    app = FastAPI(title="freshrec", version="1", summary="Streaming, online-learning recommendations.")
    metrics = Metrics(recommender.scans)
    # An empty token (e.g. an unset variable in docker-compose) means no authentication, not "Bearer ".
    token = (settings.api_token.get_secret_value() if settings.api_token else None) or None
    topics = settings.topics
    serve = settings.serve
    max_k = serve.max_k
    log = decisions if decisions is not None else producer
    producer.poll_in_background()  # POST /v1/events waits for its own delivery reports

    def ready_now() -> Readiness:  # blocking: on a worker thread
        state = readiness() if readiness is not None else Readiness(True)
        metrics.ready.set(1 if state.ready else 0)
        return state

    app.add_middleware(AuthAndTiming, token=token, metrics=metrics)
    app.include_router(dashboard_router(store))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> Response:
        return _json(_bounded_validation_errors(exc.errors(), serve.max_errors_listed), 422)

    @app.get("/healthz")
    def healthz() -> Response:
        """Liveness: 200 while the replica follows the model topics; 503 once its subscriber has
        died (the API would otherwise keep serving an ever staler model and look healthy). Names
        the model version served and its state checksum ("" before any), so that replicas can be
        compared. Whether this replica should get traffic is ``/readyz``'s answer."""
        index = recommender.index
        following = subscriber is None or subscriber.alive
        body = {
            "status": "ok" if following else "degraded",
            "model_version": 0 if index is None else index.version.version,
            "state_checksum": "" if index is None else index.version.state_checksum,
            "worker": settings.stream.worker_id,
        }
        if not following:
            body["detail"] = f"the model replica stopped following: {subscriber.error if subscriber else ''}"
        return JSONResponse(body, status_code=200 if following else 503)

    @app.get("/readyz")
    async def readyz() -> Response:
        """Readiness: 200 once the stream state has caught up (lag at most
        ``FRESHREC_SERVE__READY_MAX_LAG``), a model version is loaded (or none exists yet) and
        Kafka answers; else 503 naming each reason. Kafka is asked at most once a second."""
        state = await asyncio.to_thread(ready_now)
        body = {"status": "ready" if state.ready else "not_ready", "reasons": state.reasons, "lag": state.lag}
        return _json(body, 200 if state.ready else 503)

    # ``async``: the work is a few milliseconds of CPU under the GIL; a thread-pool hop per request
    # (FastAPI's way for ``def`` routes) only adds latency. ``:path``: user ids may hold "/".
    @app.get("/v1/recommendations/{user_id:path}", response_model=RecommendationOut)
    async def recommendations(
        user_id: Annotated[str, Path(min_length=1, max_length=128)],
        k: Annotated[int, Query(ge=1, le=max_k, description="How many items.")] = 10,
    ) -> Response:
        result = recommender.recommend(user_id, k)
        items = [item.to_json() for item in result.items]  # the response's, from the logged type
        log.produce(
            topics.impressions,
            encode_impression(
                request_id=result.request_id,
                user_id=user_id,
                policy=result.policy,
                model_version=result.model_version,
                latency_ms=result.latency_ms,
                items=result.items,
                exploration=result.exploration,
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

    async def read_body(request: Request) -> bytes | None:
        """The body, or None as soon as it is known to pass ``max_request_bytes``."""
        limit = serve.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post(
        "/v1/events",
        status_code=202,
        response_model=Accepted,
        responses={
            413: {"description": "Over the body or batch limit; nothing was parsed or published."},
            415: {"description": "Not a JSON body."},
            422: {"description": "Bad events, each named by index and reason; none was published."},
            503: {"description": "Kafka did not acknowledge them all in time; resend the request."},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"description": "One event object or an array."}}},
            }
        },
    )
    async def post_events(request: Request) -> Response:
        if not _is_json(request.headers.get("content-type")):
            metrics.rejected.inc()
            detail = "POST /v1/events takes a JSON body: send Content-Type: application/json"
            return _json({"detail": detail}, 415)
        raw = await read_body(request)
        if raw is None:
            metrics.rejected.inc()
            detail = (
                f"the body is over {serve.max_request_bytes:,} bytes (FRESHREC_SERVE__MAX_REQUEST_BYTES): "
                "send the events in smaller requests"
            )
            return _json({"detail": detail}, 413)
        check = functools.partial(
            check_batch,
            raw,
            now_ms=int(time.time() * 1000),
            max_future_skew_ms=settings.max_future_skew_ms,
            max_events=serve.max_request_events,
            max_errors=serve.max_errors_listed,
        )
        # A small body checks in well under a millisecond: the thread hop would cost more than it
        # saves. A large one goes to a worker thread, so the other routes stay responsive.
        checked = check() if len(raw) <= _INLINE_BYTES else await asyncio.to_thread(check)
        del raw
        if checked.too_many:
            metrics.rejected.inc()
            detail = (
                f"{checked.count:,} events in one request; at most {serve.max_request_events:,} "
                "(FRESHREC_SERVE__MAX_REQUEST_EVENTS): send them in smaller requests"
            )
            return _json({"detail": detail}, 413)
        if checked.error_count:
            metrics.rejected.inc()
            body: dict[str, Any] = {"detail": checked.errors}
            if checked.error_count > len(checked.errors):
                body["omitted"] = checked.error_count - len(checked.errors)
            return _json(body, 422)
        return await publish(checked.records)

    async def publish(records: list[tuple[bytes, bytes]]) -> Response:
        """Publish every record and wait for Kafka's acknowledgements (this request's only: no
        flush), without holding up the event loop; delivery reports arrive on the producer's
        polling thread."""
        loop = asyncio.get_running_loop()
        acknowledged = loop.create_future()
        pending = len(records)
        failures: list[str] = []

        def settle(error: KafkaError | None, count: int = 1) -> None:  # on the loop
            nonlocal pending
            if error is not None:
                failures.extend([str(error)] * count)
            pending -= count
            if pending == 0 and not acknowledged.done():  # done: cancelled by the timeout
                acknowledged.set_result(None)

        def delivered(error: KafkaError | None) -> None:  # on a thread serving delivery reports
            loop.call_soon_threadsafe(settle, error)

        for sent, (key, value) in enumerate(records):
            try:
                producer.produce(topics.events, value, key=key, on_delivery=delivered)
            except KafkaException as exc:  # refused locally: this one and the rest are not sent
                settle(exc.args[0] if exc.args else None, len(records) - sent)
                break
        try:
            # The producer gives up on a record at publish_timeout_s (message.timeout.ms): every
            # report is in shortly after. The margin covers its timeout scan.
            await asyncio.wait_for(acknowledged, timeout=serve.publish_timeout_s + 2.0)
        except TimeoutError:
            failures.extend([f"not acknowledged by Kafka within {serve.publish_timeout_s:g} s"] * pending)
        if failures:
            metrics.rejected.inc()
            stored = len(records) - len(failures)
            detail = (
                f"{len(failures)} of {len(records)} events not stored: {failures[0]}. "
                "Resend the whole request: the event_id makes a resend harmless."
            )
            return _json({"detail": detail, "acknowledged": max(0, stored)}, 503)
        metrics.events.inc(len(records))
        return _json({"accepted": len(records)}, 202)

    @app.get("/metrics")
    def prometheus() -> Response:
        ready_now()
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

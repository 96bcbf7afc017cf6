"""``POST /v1/events`` and the HTTP server keep their contract, on a real uvicorn and a real broker:
every event rule (64 KiB included), limits answered before parsing, bounded error bodies, JSON only,
any user id servable, a maximal request not stalling the other routes, bounded heads and idle
connections."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import orjson
import pytest
from confluent_kafka import Consumer
from support import free_port_pair, wait_until

from freshrec.settings import ServeSettings, Settings
from serving.api import create_app
from serving.recommender import Recommender
from serving.server import api_producers, api_server
from streams.admin import ensure_topics
from streams.producer import EventProducer


@contextmanager
def _running(settings: Settings) -> Iterator[tuple[str, EventProducer]]:
    """The API over a recommender without state, its producers on the real broker: (url, producer)."""
    ensure_topics(settings)
    producer, decisions = api_producers(settings)
    app = create_app(
        settings, recommender=Recommender(settings=settings.serve), producer=producer, decisions=decisions
    )
    server = api_server(app, settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout_s=15, interval_s=0.02)
        yield f"http://127.0.0.1:{settings.api_port}", producer
    finally:
        server.should_exit = True
        thread.join(20)
        decisions.close()
        producer.close()


@pytest.fixture
def serve_with(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def make(**serve: object) -> Settings:
        port, _ = free_port_pair()
        return make_settings(api_port=port, serve=ServeSettings(**serve))  # type: ignore[arg-type]

    return make


def _event(n: int, **fields: object) -> dict[str, object]:
    return {"event_id": f"e-{n}", "user_id": f"u-{n}", "item_id": "i-1", "type": "view",
            "ts": int(time.time() * 1000)} | fields  # fmt: skip


def _published(settings: Settings, *, idle_s: float = 1.0) -> list[bytes]:
    """Every value on ``events``, read from the beginning (once assigned) until nothing arrives for
    ``idle_s``."""
    consumer = Consumer(
        settings.kafka_config(
            **{"group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest", "log_level": 3}
        )
    )
    assigned = threading.Event()
    consumer.subscribe([settings.topics.events], on_assign=lambda *_: assigned.set())
    out: list[bytes] = []
    deadline = time.monotonic() + 30
    last = None
    while last is None or time.monotonic() - last < idle_s:
        assert time.monotonic() < deadline, "the events topic was not assigned within 30 s"
        for message in consumer.consume(100, 0.2):
            if message.error() is None:
                out.append(message.value() or b"")
                last = time.monotonic()
        if last is None and assigned.is_set():
            last = time.monotonic()
    consumer.close()
    return out


def test_every_event_rule_applies_at_the_api_and_a_bad_request_publishes_nothing(
    serve_with: Callable[..., Settings],
) -> None:
    settings = serve_with()
    big = _event(1, context={f"k{n}": "x" * 3_200 for n in range(32)})  # ~100 KB: valid but for its size
    huge = _event(2, context={"blob": "y" * 2_000_000})  # 2 MB
    with _running(settings) as (url, _), httpx.Client(base_url=url, timeout=30) as http:
        over = http.post("/v1/events", json=[_event(0), big])
        assert over.status_code == 422, over.text
        assert [(e["index"], e["reason"]) for e in over.json()["detail"]] == [(1, "too_large")]
        # Over the body limit (1 MiB by default): a JSON 413, by Content-Length or by counting a
        # chunked body, never a plain-text 500.
        sized = http.post("/v1/events", json=[_event(3), huge])
        chunked = http.post(
            "/v1/events",
            content=iter(
                [orjson.dumps([_event(4), huge])[i : i + 65_536] for i in range(0, 2_100_000, 65_536)]
            ),
            headers={"content-type": "application/json"},
        )
        for response in (sized, chunked):
            assert response.status_code == 413, response.text
            assert "MAX_REQUEST_BYTES" in response.json()["detail"]
        assert http.post("/v1/events", json=[_event(5)]).json() == {"accepted": 1}
    assert [orjson.loads(v)["event_id"] for v in _published(settings)] == ["e-5"]


def test_a_2_mb_event_under_a_raised_body_limit_is_a_422_too_large(
    serve_with: Callable[..., Settings],
) -> None:
    settings = serve_with(max_request_bytes=8 * 1_048_576)
    with _running(settings) as (url, _), httpx.Client(base_url=url, timeout=30) as http:
        response = http.post("/v1/events", json=[_event(0), _event(1, context={"blob": "y" * 2_000_000})])
        assert response.status_code == 422, response.text
        assert response.json()["detail"] == [
            {"index": 1, "reason": "too_large", "detail": response.json()["detail"][0]["detail"]}
        ]
    assert _published(settings, idle_s=1.0) == []


def test_limits_and_bounded_error_bodies(serve_with: Callable[..., Settings]) -> None:
    settings = serve_with(max_request_events=500, max_errors_listed=5, max_request_bytes=8 * 1_048_576)
    with _running(settings) as (url, _), httpx.Client(base_url=url, timeout=30) as http:
        too_many = http.post("/v1/events", json=[_event(n) for n in range(501)])
        assert too_many.status_code == 413 and "MAX_REQUEST_EVENTS" in too_many.json()["detail"]
        # 500 bad events, each with a 10 KB id: five errors listed, the rest counted, nothing echoed whole.
        bad = http.post("/v1/events", json=[_event(n, user_id="u" * 10_000) for n in range(500)])
        assert bad.status_code == 422
        assert len(bad.json()["detail"]) == 5 and bad.json()["omitted"] == 495
        assert len(bad.content) < 2_000
        # FastAPI's own 422s too: a 10 KB user id in the path comes back cut to 64 characters.
        long_id = http.get(f"/v1/recommendations/{'v' * 10_000}")
        assert long_id.status_code == 422
        assert len(long_id.content) < 1_000 and long_id.json()["detail"][0]["input"].startswith("vvv")


def test_only_json_bodies_are_accepted(serve_with: Callable[..., Settings]) -> None:
    settings = serve_with()
    body = orjson.dumps(_event(0))
    with _running(settings) as (url, _), httpx.Client(base_url=url, timeout=30) as http:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
            headers = {"content-type": content_type} if content_type else {}
            response = http.post("/v1/events", content=body, headers=headers)
            assert response.status_code == 415, (content_type, response.text)
        typed = http.post(
            "/v1/events",
            content=body,
            headers={"content-type": "application/vnd.freshrec+json; charset=utf-8"},
        )
        assert typed.status_code == 202, typed.text
    assert len(_published(settings, idle_s=1.0)) == 1


def test_user_ids_with_a_slash_are_served(serve_with: Callable[..., Settings]) -> None:
    settings = serve_with()
    with _running(settings) as (url, _), httpx.Client(base_url=url, timeout=30) as http:
        for path in ("/v1/recommendations/team/alice", "/v1/recommendations/team%2Falice"):
            response = http.get(path, params={"k": 3})
            assert response.status_code == 200, (path, response.text)
            assert response.json()["user_id"] == "team/alice"
        assert http.get("/openapi.json").json()["paths"]["/v1/recommendations/{user_id}"]


def test_healthz_answers_quickly_during_a_maximal_post(serve_with: Callable[..., Settings]) -> None:
    events = 100_000
    settings = serve_with(max_request_events=events, max_request_bytes=32 * 1_048_576)
    body = orjson.dumps([_event(n, type="BAD") for n in range(events)])  # all invalid: nothing published
    latencies: list[float] = []
    with _running(settings) as (url, _), httpx.Client(base_url=url, timeout=60) as http:
        answer: list[httpx.Response] = []
        poster = threading.Thread(
            target=lambda: answer.append(
                http.post("/v1/events", content=body, headers={"content-type": "application/json"})
            )
        )
        with httpx.Client(base_url=url, timeout=10) as probe:
            probe.get("/healthz")  # connected before the post starts
            poster.start()
            while poster.is_alive():
                started = time.perf_counter()
                assert probe.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - started)
            poster.join()
        assert answer[0].status_code == 422 and answer[0].json()["omitted"] == events - 20
    assert len(latencies) >= 5, latencies  # the probes overlapped the post's work
    assert max(latencies) < 0.5, f"/healthz took {max(latencies):.2f} s during the post"


def test_a_request_kafka_does_not_acknowledge_is_never_published_later(
    make_settings: Callable[..., Settings],
) -> None:
    """The 503 says how many were stored (here none), and the rest are given up, not sent later."""
    dead, _ = free_port_pair()
    settings = make_settings(kafka_bootstrap=f"127.0.0.1:{dead}", serve=ServeSettings(publish_timeout_s=1.0))
    producer, decisions = api_producers(settings)
    app = create_app(settings, recommender=Recommender(settings=settings.serve), producer=producer)

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            return await client.post("/v1/events", json=[_event(0), _event(1)])

    started = time.monotonic()
    response = asyncio.run(post())
    assert response.status_code == 503 and response.json()["acknowledged"] == 0, response.text
    assert time.monotonic() - started < 5
    # Both records have their final report, a failure: librdkafka never sends them after it.
    assert (producer.delivered, producer.failed) == (0, 2)
    producer.close()  # the 503 reported both failures: nothing is left to send or to raise
    decisions.close()


def _exchange(port: int, data: bytes, *, timeout_s: float = 5.0) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it (or ``timeout_s``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        if data:
            sock.sendall(data)
        received = b""
        while chunk := sock.recv(65_536):
            received += chunk
        return received


def test_heads_are_bounded_and_idle_connections_closed(serve_with: Callable[..., Settings]) -> None:
    settings = serve_with(max_head_bytes=8_192, head_timeout_s=1.0, keep_alive_s=1)
    port = settings.api_port
    with _running(settings):
        big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
        assert _exchange(port, big).startswith(b"HTTP/1.1 431 ")
        small = (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Ok: " + b"a" * 4_000 + b"\r\nConnection: close\r\n\r\n"
        )
        assert _exchange(port, small).startswith(b"HTTP/1.1 200 ")
        # A connection that sends nothing, and one whose head never completes, are closed (recv
        # returns b"" instead of timing out after 5 s).
        for data in (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"):
            started = time.monotonic()
            assert _exchange(port, data) == b""
            assert time.monotonic() - started < 3

"""``GET /readyz`` against the real broker: not ready before the replica's stream state has caught
up, with a model version that exists but is not loaded, or without Kafka; ready otherwise.
``/healthz`` stays liveness."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import numpy as np
import orjson
import pytest
from support import free_port_pair, wait_until

from freshrec.settings import ServeSettings, Settings, StreamSettings
from learners.sasrec import SPARSE_TABLES
from publishers.replica import Replica
from publishers.snapshots import SnapshotStore
from publishers.updates import ModelVersion
from serving.api import create_app
from serving.recommender import Recommender
from serving.server import ReadinessProbe, ServingStack, api_producers
from streams.admin import ensure_topics
from streams.producer import EventProducer
from streams.worker import StreamWorker

EVENTS = 3_000


@pytest.fixture
def ready_settings(make_settings: Callable[..., Settings], run_id: str) -> Settings:
    port, _ = free_port_pair()
    return make_settings(
        api_port=port,
        stream=StreamSettings(group_id=f"ready-{run_id}", batch_timeout_s=0.05, heads=()),
        serve=ServeSettings(ready_max_lag=50),
    )


def _produce(settings: Settings, count: int, *, start: int = 0) -> None:
    ensure_topics(settings)
    now = int(time.time() * 1000)
    with EventProducer(settings) as producer:
        for n in range(start, start + count):
            event = {"event_id": f"e-{n}", "user_id": f"u-{n % 97}", "item_id": f"i-{n % 31}",
                     "type": "view", "ts": now - 60_000 + n}  # fmt: skip
            producer.produce(settings.topics.events, orjson.dumps(event), key=f"u-{n % 97}".encode())


def _get(app: object, path: str) -> httpx.Response:
    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.get(path)

    return asyncio.run(get())


def test_readyz_is_503_until_the_stream_state_has_caught_up(ready_settings: Settings) -> None:
    _produce(ready_settings, EVENTS)
    stack = ServingStack(ready_settings)
    before = _get(stack.app, "/readyz")  # nothing started: no partitions, no state
    assert before.status_code == 503 and before.json()["status"] == "not_ready"
    # Kafka answers and no model exists yet; the stream and the model replica have not started
    assert set(before.json()["reasons"]) == {"stream", "model"}
    assert "freshrec_ready 0.0" in _get(stack.app, "/metrics").text
    stack.start()
    try:
        with httpx.Client(base_url=stack.url, timeout=10) as http:

            def ready() -> bool:
                response = http.get("/readyz")
                if response.status_code != 200:
                    return False
                # Ready means caught up: at most ready_max_lag events were still to be counted.
                assert stack.worker.stats.counted >= EVENTS - 50, response.json()
                return True

            wait_until(ready, timeout_s=60, interval_s=0.05)
            assert http.get("/readyz").json() == {
                "status": "ready",
                "reasons": {},
                "lag": pytest.approx(0, abs=50),
            }
            assert "freshrec_ready 1.0" in http.get("/metrics").text
            healthz = http.get("/healthz").json()  # no model yet: version 0, no checksum
            assert healthz["status"] == "ok" and (healthz["model_version"], healthz["state_checksum"]) == (
                0,
                "",
            )
    finally:
        stack.stop()


def test_lag_and_an_unloaded_model_are_reasons(ready_settings: Settings) -> None:
    _produce(ready_settings, 500)
    worker = StreamWorker(ready_settings)  # not run: its state and partitions are set by hand
    worker.assigned = frozenset({0})
    snapshots = SnapshotStore.for_settings(ready_settings)
    probe = ReadinessProbe(ready_settings, worker=worker, replica=Replica(snapshots=snapshots), cache_s=0)
    try:
        behind = probe()
        assert not behind.ready and behind.lag == 500 and "500 messages behind" in behind.reasons["stream"]
        ends = probe._ends()  # the topics' ends, as the probe reads them
        worker.state.offsets = {
            tp: high for tp, (_, high) in ends.items() if tp[0] == ready_settings.topics.events
        }
        assert probe().ready and probe().lag == 0

        tables = {table: np.zeros((2, 4), dtype=np.float32) for table in SPARSE_TABLES}
        model = ModelVersion.build(1, tables, ["a", "b"], config={}, sparse_tables=SPARSE_TABLES)
        snapshots.save(model)  # a version exists, and this replica has not loaded it
        unloaded = probe()
        assert not unloaded.ready and "snapshot v1" in unloaded.reasons["model"]
    finally:
        probe.close()


def test_readyz_names_kafka_when_the_broker_does_not_answer(make_settings: Callable[..., Settings]) -> None:
    dead, _ = free_port_pair()
    settings = make_settings(
        kafka_bootstrap=f"127.0.0.1:{dead}", serve=ServeSettings(ready_kafka_timeout_s=0.5)
    )
    worker = StreamWorker(settings)
    probe = ReadinessProbe(settings, worker=worker, replica=Replica())
    producer, decisions = api_producers(settings)
    app = create_app(
        settings, recommender=Recommender(settings=settings.serve), producer=producer, readiness=probe
    )
    try:
        started = time.monotonic()
        response = _get(app, "/readyz")
        assert time.monotonic() - started < 5
        assert response.status_code == 503
        reasons = response.json()["reasons"]
        assert f"127.0.0.1:{dead}" in reasons["kafka"] and "stream" in reasons
        started = time.monotonic()
        assert "freshrec_ready 0.0" in _get(app, "/metrics").text
        assert time.monotonic() - started < 0.5  # asked at most once a second: the cached answer
        assert _get(app, "/healthz").status_code == 200  # liveness is not readiness
    finally:
        probe.close()
        producer.close()
        decisions.close()

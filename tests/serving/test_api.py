"""The HTTP API through the real stack: broker, stream worker, model replica, impressions in ClickHouse."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import orjson
import pytest
from confluent_kafka import Consumer
from support import free_port_pair, wait_until

from evaluation import ips
from freshrec.settings import ServeSettings, Settings, StreamSettings, TrainSettings
from freshrec.store import Store
from learners.finetune import FineTuner
from learners.sequences import Sequences
from publishers.publisher import Publisher
from publishers.snapshots import SnapshotStore
from serving.api import create_app
from serving.recommender import Recommender
from serving.server import ServingStack
from streams import sink
from streams import worker as stream_worker
from streams.admin import ensure_topics
from streams.impressions import Exploration, ImpressionSink
from streams.producer import EventProducer
from streams.reader import StateReader

TOKEN = "s3cret-token"
USERS = [f"u{n}" for n in range(40)]
ITEMS = [f"i{n}" for n in range(60)]


def _history(user: int) -> list[str]:
    return [ITEMS[(user * 7 + step * 3) % len(ITEMS)] for step in range(8)]


@pytest.fixture
def api_settings(make_settings: Callable[..., Settings], run_id: str) -> Settings:
    port, _ = free_port_pair()
    return make_settings(
        api_port=port,
        api_token=TOKEN,
        stream=StreamSettings(group_id=f"api-{run_id}", batch_timeout_s=0.05, heads=("mf",)),
        train=TrainSettings(max_len=8, dim=16, blocks=1, epochs=2, negatives=32),
        serve=ServeSettings(seed=7, explore_fraction=0.2, candidates=50),
    )


@pytest.fixture
def stack(api_settings: Settings, store: Store) -> Iterator[ServingStack]:
    # Events first (the worker's state), then a model trained on the same histories and published.
    ensure_topics(api_settings)
    with EventProducer(api_settings) as producer:
        base = int(time.time() * 1000) - 3_600_000
        for user in range(len(USERS)):
            for step, item in enumerate(_history(user)):
                event = {"event_id": f"{user}-{step}", "user_id": USERS[user], "item_id": item,
                         "type": "view",
                         "ts": base + step * 1000}  # fmt: skip
                producer.produce(api_settings.topics.events, orjson.dumps(event), key=USERS[user].encode())
    sequences: Sequences = {USERS[u]: _history(u) for u in range(len(USERS))}
    publisher = Publisher(api_settings, snapshots=SnapshotStore.for_settings(api_settings), store=store)
    FineTuner(api_settings, publisher=publisher, source=lambda: (sequences, 320), store=store).cycle()
    publisher.close()
    stack = ServingStack(api_settings).start()
    wait_until(
        lambda: stack.recommender.index is not None and stack.worker.stats.counted >= 320, timeout_s=30
    )
    yield stack
    stack.stop()


def _client(stack: ServingStack, *, token: str | None = TOKEN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=stack.url, headers=headers, timeout=10)


def _impression_messages(settings: Settings) -> list[dict[str, object]]:
    consumer = Consumer(
        settings.kafka_config(
            **{"group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest", "log_level": 3}
        )
    )
    consumer.subscribe([settings.topics.impressions])
    out: list[dict[str, object]] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for message in consumer.consume(100, 0.5):
            if message.error() is None:
                out.append(orjson.loads(message.value() or b"{}"))
    consumer.close()
    return out


def test_recommendations_auth_validation_and_the_decision_log(
    stack: ServingStack, api_settings: Settings, store: Store
) -> None:
    with _client(stack, token=None) as anonymous:
        checksum = stack.replica.current.state_checksum if stack.replica.current else None
        assert anonymous.get("/healthz").json() == {
            "status": "ok",
            "model_version": 1,
            "state_checksum": checksum,
            "worker": "0",
        }
        # Ready: caught up, version 1 loaded, Kafka answering; no token needed, as for /healthz.
        wait_until(lambda: anonymous.get("/readyz").status_code == 200, timeout_s=30)
        assert anonymous.get("/readyz").json()["reasons"] == {}
        assert anonymous.get("/v1/recommendations/u1").status_code == 401
        assert anonymous.post("/v1/events", json=[]).status_code == 401
    with _client(stack) as client:
        known = client.get("/v1/recommendations/u1", params={"k": 10})
        assert known.status_code == 200
        body = known.json()
        assert body["user_id"] == "u1" and body["model_version"] == 1 and len(body["items"]) == 10
        items = body["items"]
        assert not {i["item_id"] for i in items} & set(_history(1))  # seen items are filtered
        assert len({i["item_id"] for i in items}) == 10
        assert {i["source"] for i in items} <= {"transformer", "cooccurrence", "popular", "explore"}
        assert "transformer" in {i["source"] for i in items}
        explored = [i for i in items if i["explore"]]
        assert len(explored) == 2 and all(0 < i["propensity"] <= 1 for i in explored)
        assert all(i["propensity"] == 1.0 for i in items if not i["explore"])

        cold = client.get("/v1/recommendations/never-seen-user", params={"k": 5}).json()
        assert len(cold["items"]) == 5 and {i["source"] for i in cold["items"]} <= {"popular", "explore"}

        for bad_k in (0, 101, "ten"):
            response = client.get("/v1/recommendations/u1", params={"k": bad_k})
            assert response.status_code == 422
        assert client.get("/openapi.json").json()["paths"]["/v1/recommendations/{user_id}"]
        metrics = client.get("/metrics").text
        assert "freshrec_model_version 1.0" in metrics and "freshrec_request_seconds_bucket" in metrics
        assert 'freshrec_state_size{part="history_users"} 40.0' in metrics
        assert 'freshrec_request_seconds_count{route="/v1/recommendations/{user_id}"} 5.0' in metrics
        assert 'freshrec_state_size{part="counter_bytes"}' in metrics
        index = stack.recommender.index
        assert index is not None and len(index.pool_items) == min(len(index.pool_rows), 256)
        assert f"freshrec_explore_drawn_items {float(len(index.pool_items))}" in metrics
        # One user with a history was served (the 422s never reached retrieval): one fp32 scan, as
        # this small catalogue is not quantised.
        assert 'freshrec_retrieval_scans_total{scan="fp32"} 1.0' in metrics
        assert 'freshrec_retrieval_scans_total{scan="certified"} 0.0' in metrics

    # Exactly the two good responses were logged, each item with its propensity, nothing for the 422s.
    logged = _impression_messages(api_settings)
    assert sorted(str(m["request_id"]) for m in logged) == sorted([body["request_id"], cold["request_id"]])
    sink = ImpressionSink(settings=api_settings, store=store)
    assert sink.run(until_idle_s=1.5) == 15
    rows = store.rows(
        "SELECT item_id, position, explore, propensity, source, model_version "
        f"FROM {store.table('impressions')} "
        "WHERE request_id = {r:String} ORDER BY position",
        {"r": body["request_id"]},
    )
    assert [(r[0], r[2], r[3], r[4]) for r in rows] == [
        (i["item_id"], i["explore"], pytest.approx(i["propensity"]), i["source"]) for i in items
    ]
    assert [r[1] for r in rows] == list(range(10)) and {r[5] for r in rows} == {1}
    # The response's exploration record (what its policy could have shown) is on its first row only.
    records = store.rows(
        f"SELECT position, exploration FROM {store.table('impressions')} "
        "WHERE request_id = {r:String} AND exploration != '' ORDER BY position",
        {"r": body["request_id"]},
    )
    assert [position for position, _ in records] == [0]
    record = Exploration.decode(records[0][1])
    assert record is not None and record.policy == "uncertainty" and record.k == 10
    assert {i["item_id"] for i in items if i["explore"]} <= set(record.pool)


def test_events_are_validated_as_a_whole_and_a_click_changes_the_next_response(stack: ServingStack) -> None:
    with _client(stack) as client:
        now = int(time.time() * 1000)
        bad = client.post(
            "/v1/events",
            json=[
                {"event_id": "ok-1", "user_id": "u2", "item_id": "i1", "type": "view", "ts": now},
                {"event_id": "bad-1", "user_id": "u2", "type": "view", "ts": now},
                {"event_id": "bad-2", "user_id": "u2", "item_id": "i1", "type": "VIEW!", "ts": now},
            ],
        )
        assert bad.status_code == 422
        assert [(e["index"], e["reason"]) for e in bad.json()["detail"]] == [
            (1, "missing_field"),
            (2, "bad_value"),
        ]
        not_json = client.post(
            "/v1/events", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 422 and not_json.json()["detail"][0]["reason"] == "not_json"

        first = client.get("/v1/recommendations/u2").json()
        clicked = first["items"][0]["item_id"]
        started = time.monotonic()
        click = {"event_id": f"click-{uuid.uuid4().hex}", "user_id": "u2", "item_id": clicked,
                 "type": "click",
                 "ts": int(time.time() * 1000), "request_id": first["request_id"]}  # fmt: skip
        assert client.post("/v1/events", json=click).json() == {"accepted": 1}
        while True:
            after = client.get("/v1/recommendations/u2").json()
            if clicked not in {i["item_id"] for i in after["items"]}:
                break
            assert time.monotonic() - started < 1.0, "the click did not reach the next response within 1 s"
            time.sleep(0.01)
        # The rejected request published nothing: "ok-1" never reached the worker.
        assert stack.worker.state.recent.state_dict() and "ok-1" not in stack.worker.state.recent


def test_ips_of_the_logging_policy_matches_its_observed_click_rate(stack: ServingStack, store: Store) -> None:
    rng = random.Random(3)
    clicks = 0
    with _client(stack) as client:
        for n in range(40):
            user = USERS[n % len(USERS)]
            served = client.get(f"/v1/recommendations/{user}").json()
            batch = []
            for item in served["items"]:
                if rng.random() < (0.4 if item["explore"] else 0.1):
                    batch.append({"event_id": f"c-{served['request_id']}-{item['item_id']}", "user_id": user,
                                  "item_id": item["item_id"], "type": "click", "ts": int(time.time() * 1000),
                                  "request_id": served["request_id"]})  # fmt: skip
            if batch:
                assert client.post("/v1/events", json=batch).json() == {"accepted": len(batch)}
                clicks += len(batch)
    stack.decisions.flush()  # the decision log is batched (impressions_linger_ms): out of it now
    sink.run(stack.settings, store, until_idle_s=1.5)  # events, and the impressions beside them
    estimate = ips.evaluate(store)
    assert (estimate.slots, estimate.clicks) == (400, clicks)
    assert estimate.observed_ctr == pytest.approx(clicks / 400)
    assert estimate.ci_low <= estimate.observed_ctr <= estimate.ci_high
    assert estimate.ips == pytest.approx(estimate.observed_ctr) and estimate.snips == pytest.approx(
        estimate.ips
    )
    assert estimate.explore_ctr is not None and estimate.exploit_ctr is not None
    assert estimate.explore_ctr > estimate.exploit_ctr  # the simulated users favour explored items
    assert sum(n for n, _ in estimate.by_source.values()) == 400


def test_a_long_decision_log_batch_is_delivered_at_stop_and_posts_do_not_wait_for_it(
    api_settings: Settings,
) -> None:
    ensure_topics(api_settings)
    serve = api_settings.serve.model_copy(update={"impressions_linger_ms": 60_000})
    stack = ServingStack(api_settings.model_copy(update={"serve": serve})).start()
    try:
        with _client(stack) as client:
            served = client.get("/v1/recommendations/cold-user", params={"k": 3}).json()
            started = time.monotonic()
            event = {"event_id": "e-1", "user_id": "cold-user", "item_id": "i1", "type": "view",
                     "ts": int(time.time() * 1000)}  # fmt: skip
            assert client.post("/v1/events", json=event).status_code == 202
            assert time.monotonic() - started < 5  # acknowledged by Kafka, not after the log's minute
        # The response went to the decision log's producer, which is still gathering its batch; the
        # event went to the other one, and only the event.
        assert (stack.decisions.queued, stack.decisions.delivered) == (1, 0)
        assert (stack.producer.queued, stack.producer.delivered) == (0, 1)
    finally:
        stack.stop()  # delivers the batch
    assert [m["request_id"] for m in _impression_messages(api_settings)] == [served["request_id"]]


def test_an_event_kafka_does_not_acknowledge_is_a_503_not_a_202(
    make_settings: Callable[..., Settings],
) -> None:
    dead, _ = free_port_pair()  # nothing listens there: delivery times out
    settings = make_settings(kafka_bootstrap=f"127.0.0.1:{dead}")
    producer = EventProducer(settings, **{"message.timeout.ms": 1000})
    app = create_app(settings, recommender=Recommender(settings=settings.serve), producer=producer)
    event = {"event_id": "e-1", "user_id": "u", "item_id": "i", "type": "view", "ts": int(time.time() * 1000)}

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
            return await client.post("/v1/events", json=event)

    response = asyncio.run(post())
    assert response.status_code == 503, response.text
    assert response.json()["detail"].startswith("1 of 1 events not stored")
    assert producer.failed == 1
    # The 503 told the client; a stop must not fail on it again (serve exited 1 on SIGTERM after an
    # outage): the producer closes cleanly and releases its client and polling thread.
    producer.close()


def test_a_new_user_gets_k_items_after_old_data_and_a_few_fresh_clicks(settings: Settings) -> None:
    """Decayed popularity underflows to 0 for every item last seen years before the newest event:
    the cold-start list must still be as long as the catalogue allows."""
    ensure_topics(settings)
    old = 880_000_000_000  # 1997-11-20
    with EventProducer(settings) as producer:
        for n in range(200):  # 50 items, a year of 1997-98 events
            user, item = f"old-{n % 20}", f"film-{n % 50}"
            event = {"event_id": f"old-{n}", "user_id": user, "item_id": item, "type": "rating",
                     "ts": old + n * 150_000_000, "value": 4.0}  # fmt: skip
            producer.produce(settings.topics.events, orjson.dumps(event), key=user.encode())
        now = int(time.time() * 1000)
        for n in range(3):  # today, on one item
            event = {"event_id": f"fresh-{n}", "user_id": f"fresh-{n}", "item_id": "film-7",
                     "type": "click", "ts": now - n}  # fmt: skip
            producer.produce(settings.topics.events, orjson.dumps(event), key=f"fresh-{n}".encode())
    worker, _ = stream_worker.run(settings, until_idle_s=1.0)
    reader = StateReader(worker)
    assert len(reader.popular(50, kind="decayed")) == 1  # what collapsed: only film-7 scores above 0
    for policy in ("uncertainty", "epsilon", "none"):
        serve = ServeSettings(seed=3, policy=policy, candidates=20)
        recommender = Recommender(settings=serve, reader=reader)
        items = [i.item_id for i in recommender.recommend("brand-new-user", 10).items]
        assert len(items) == 10 and len(set(items)) == 10, (policy, items)
        assert "film-7" in items or policy != "none"  # the fresh item is still ranked

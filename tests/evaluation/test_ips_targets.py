"""Evaluating another policy from the decision log: the logged exploration record reproduces what
each policy would have shown on the same state, and the estimates find a known truth.

The state is real (events through the broker into a stream worker); the recommender is the served
one, run many times on that state to measure how often each policy shows each item."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pytest
from support import cli_env, freshrec_cli, sql_json

from evaluation import ips
from freshrec.errors import ConfigError
from freshrec.settings import ServeSettings, Settings, StreamSettings
from serving.recommender import Recommender
from streams import worker as stream_worker
from streams.admin import ensure_topics
from streams.impressions import Exploration, encode_impression
from streams.producer import EventProducer
from streams.reader import StateReader

ITEMS = [f"i{n}" for n in range(150)]
K = 10


@pytest.fixture
def reader(make_settings: Callable[..., Settings], run_id: str) -> StateReader:
    """Popularity by views, and CTR posteriors that differ item to item (impressions and clicks
    joined by request id), so that the uncertainty policy's softmax is far from uniform."""
    settings = make_settings(stream=StreamSettings(group_id=f"ope-{run_id}", batch_timeout_s=0.05))
    ensure_topics(settings)
    now = int(time.time() * 1000) - 600_000
    rng = np.random.default_rng(1)
    events = []
    for n, item in enumerate(ITEMS):
        for view in range(1 + (150 - n) // 10):
            events.append({"event_id": f"v-{item}-{view}", "user_id": f"u{view}", "item_id": item,
                           "type": "view", "ts": now + n * 100 + view})  # fmt: skip
        shown = int(rng.integers(0, 30))
        for m in range(shown):
            request = f"r-{item}-{m}"
            events.append({"event_id": f"s-{request}", "user_id": "x", "item_id": item, "type": "impression",
                           "ts": now + 20_000 + m, "request_id": request})  # fmt: skip
            if rng.random() < (0.3 if n % 3 == 0 else 0.03):
                events.append({"event_id": f"c-{request}", "user_id": "x", "item_id": item, "type": "click",
                               "ts": now + 20_001 + m, "request_id": request})  # fmt: skip
    with EventProducer(settings) as producer:
        for event in events:
            producer.produce(settings.topics.events, orjson.dumps(event), key=str(event["user_id"]).encode())
    worker, _ = stream_worker.run(settings, until_idle_s=1.0)
    return StateReader(worker)


def _serve(reader: StateReader, requests: int, **serve: object) -> tuple[Counter[str], list[Exploration]]:
    """How often a recommender with these settings shows each item to a new user, and its records."""
    settings = ServeSettings(seed=11, candidates=100, fusion="rrf", **serve)
    recommender = Recommender(settings=settings, reader=reader)
    shown: Counter[str] = Counter()
    records = []
    for _ in range(requests):
        result = recommender.recommend("new-user", K)
        shown.update(item.item_id for item in result.items)
        assert result.exploration is not None
        records.append(result.exploration)
    return shown, records


def _agree(record: Exploration, shown: Counter[str], requests: int, policy: str, slack: float,
           **params: float) -> None:  # fmt: skip
    resolved = ips.resolve_params(record, policy, params)
    probs, outside = ips.inclusion(record, policy, resolved)
    expected = dict(zip(record.pool, probs.tolist(), strict=True))
    for item in set(expected) | set(shown):
        p = expected.get(item, outside)
        frequency = shown[item] / requests
        bound = 4.5 * np.sqrt(max(p * (1 - p), 1e-4) / requests) + slack
        assert abs(frequency - p) <= bound, (policy, params, item, frequency, p)


def test_the_logged_record_gives_every_policy_its_chance_of_every_item(reader: StateReader) -> None:
    """From one uncertainty response's record, the chance of each item under uncertainty (its own and
    another UCB weight), epsilon and none matches how often those policies, served on the same
    state, show it."""
    requests = 3000
    logged, records = _serve(reader, requests, policy="uncertainty")
    record = records[0]
    assert record.policy == "uncertainty" and record.ranked > K and len(record.pool) > record.ranked
    assert record.catalogue == 100 and len(record.mean) == len(record.pool)
    # Every request sees the same state, so every record is the same and the draws vary.
    assert all(r.pool == record.pool for r in records) and len(logged) > K + 5
    _agree(record, logged, requests, "uncertainty", 0.0)
    weaker, _ = _serve(reader, requests, policy="uncertainty", ucb_c=0.5)
    _agree(record, weaker, requests, "uncertainty", 0.0, ucb_c=0.5)
    hotter, _ = _serve(reader, requests, policy="uncertainty", temperature=0.2, explore_fraction=0.4)
    _agree(record, hotter, requests, "uncertainty", 0.0, temperature=0.2, explore_fraction=0.4)
    greedy, _ = _serve(reader, 1, policy="none")
    _agree(record, greedy, 1, "none", 0.0)
    # Epsilon's model ignores that a draw of an already shown item falls back to the ranking.
    uniform, logged_by_epsilon = _serve(reader, requests, policy="epsilon", epsilon=0.2)
    _agree(record, uniform, requests, "epsilon", 0.01, epsilon=0.2)
    # An epsilon log records its ranking's head and catalogue: epsilon and none can be evaluated on
    # it, uncertainty (whose pool it never computed) cannot.
    own = logged_by_epsilon[0]
    assert own.policy == "epsilon" and own.params["epsilon"] == 0.2 and own.ranked == len(own.pool) == K
    _agree(own, uniform, requests, "epsilon", 0.01)
    _agree(own, greedy, 1, "none", 0.0)
    with pytest.raises(ConfigError, match="logs no exploration pool"):
        ips.inclusion(own, "uncertainty", ips.resolve_params(own, "uncertainty", {}))


def test_estimates_from_an_uncertainty_log_find_each_targets_true_click_rate(reader: StateReader) -> None:
    """Users click each shown item with its own fixed chance (no position effect: the estimators'
    assumption). From a log of the uncertainty policy, the interval of every estimator holds the
    target's true click rate per slot, computed from the target served on the same state."""
    rng = np.random.default_rng(5)
    truth_ctr = {item: float(p) for item, p in zip(ITEMS, rng.uniform(0.0, 0.3, len(ITEMS)), strict=True)}
    requests = 1500
    settings = ServeSettings(seed=3, candidates=100, fusion="rrf", policy="uncertainty")
    recommender = Recommender(settings=settings, reader=reader)
    decisions = []
    for _ in range(requests):
        result = recommender.recommend("new-user", K)
        shown = [item.item_id for item in result.items]
        clicked = frozenset(i for i in shown if rng.random() < truth_ctr[i])
        assert result.exploration is not None
        decisions.append(ips.Decision(result.exploration, shown, clicked))
    targets = [("none", {}), ("uncertainty", {"ucb_c": 0.5}), ("epsilon", {"epsilon": 0.1})]
    for policy, params in targets:
        served, _ = _serve(reader, 2000, policy=policy, **params)
        truth = sum(truth_ctr[i] * n for i, n in served.items()) / (2000 * K)
        estimate = ips.evaluate_decisions(decisions, policy, params)
        assert estimate.responses == requests and estimate.params == {**estimate.params, **params}
        for ope in estimate.results:
            assert ope.ci_low <= truth <= ope.ci_high, (policy, ope, truth)
            assert 0 < ope.ess <= requests * K
        # Without a model, the catalogue is the stream's newest items, all in the logged pool: even
        # epsilon's uniform draws are supported here.
        assert estimate.unsupported == 0.0


def test_the_record_travels_through_kafka_and_clickhouse_to_freshrec_eval_ips(
    reader: StateReader, settings: Settings, tmp_path: Path
) -> None:
    """Responses logged with their record, stored by ``freshrec sink`` with the clicks, give
    ``freshrec eval ips --policy`` the estimate the responses in memory give; a bad record is
    dead-lettered, not stored."""
    ensure_topics(settings)
    recommender = Recommender(
        settings=ServeSettings(seed=4, candidates=100, fusion="rrf", policy="uncertainty"), reader=reader
    )
    rng = np.random.default_rng(2)
    decisions = []
    with EventProducer(settings) as producer:
        for n in range(60):
            result = recommender.recommend("new-user", K, request_id=f"req-{n}")
            message = encode_impression(request_id=result.request_id, user_id="new-user",
                                        policy=result.policy, model_version=0, latency_ms=1.0,
                                        items=result.items, exploration=result.exploration)  # fmt: skip
            producer.produce(settings.topics.impressions, message, key=b"new-user")
            shown = [i.item_id for i in result.items]
            clicked = frozenset(i for i in shown if rng.random() < 0.2)
            for item in sorted(clicked):
                click = {"event_id": f"c-{n}-{item}", "user_id": "new-user", "item_id": item, "type": "click",
                         "ts": int(time.time() * 1000), "request_id": result.request_id}  # fmt: skip
                producer.produce(settings.topics.events, orjson.dumps(click), key=b"new-user")
            assert result.exploration is not None
            decisions.append(ips.Decision(result.exploration, shown, clicked))
        broken = orjson.loads(message)
        broken["request_id"], broken["exploration"]["mean_e5"] = "req-bad", [1, 2]
        producer.produce(settings.topics.impressions, orjson.dumps(broken), key=b"new-user")
    env = cli_env(settings, dsn=f"chdb://{tmp_path / 'ope-db'}")
    freshrec_cli("sink", "--until-idle", "2", env=env)
    db = settings.clickhouse_database
    counts = sql_json(f"SELECT countIf(exploration != '') AS records, countIf(position = 0) AS responses "
                      f"FROM {db}.impressions", env=env)  # fmt: skip
    assert counts == [{"records": 60, "responses": 60}]
    assert sql_json(f"SELECT reason FROM {db}.dead_letters", env=env) == [{"reason": "bad_impression"}]
    out = freshrec_cli("eval", "ips", "--policy", "uncertainty", "--param", "ucb_c=1", "--json", env=env)
    from_store = orjson.loads(out.stdout)
    in_memory = ips.evaluate_decisions(decisions, "uncertainty", {"ucb_c": 1.0})
    assert from_store["responses"] == 60 and from_store["logging"] == "uncertainty"
    assert from_store["observed_ctr"] == pytest.approx(in_memory.observed_ctr)
    assert from_store["params"]["ucb_c"] == 1.0
    for a, b in zip(from_store["estimates"], in_memory.results, strict=True):
        assert a["estimator"] == b.estimator
        assert a["estimate"] == pytest.approx(b.estimate, rel=1e-3, abs=1e-4)  # means travel to 1e-5
    wrong = freshrec_cli("eval", "ips", "--policy", "epsilon", "--param", "ucb_c=1", env=env, check=False)
    assert wrong.returncode != 0 and "epsilon takes no parameter" in wrong.stderr

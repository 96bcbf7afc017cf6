"""Prequential evaluation: the protocol on a hand-made stream, and the Kafka run equals a direct one."""

from __future__ import annotations

import numpy as np
import orjson

from evaluation import prequential
from evaluation.prequential import PrequentialEvaluator, _rank_of
from freshrec.datasets import load_dataset
from freshrec.events import Event, parse_event
from freshrec.settings import Settings
from freshrec.store import Store


def test_rank_breaks_ties_by_first_appearance() -> None:
    values = np.array([1.0, 3.0, 1.0, 3.0, 0.0])
    assert [_rank_of(values, i) for i in range(5)] == [2, 0, 3, 1, 4]


def test_popularity_hits_follow_the_protocol() -> None:
    evaluator = PrequentialEvaluator(k=1)
    stream = [("a", "x"), ("b", "x"), ("b", "y"), ("c", "x"), ("c", "z"), ("d", "y")]
    for n, (user, item) in enumerate(stream):
        evaluator.step(Event(f"e{n}", user, item, "view", n * 1000))
    # e0 x: new item, miss. e1 b->x: x is top-1 (count 1), hit. e2 b->y: new item, miss.
    # e3 c->x: x (2) top, hit. e4 c->z: new, miss. e5 d->y: x (3) ranks above y (1), miss.
    assert evaluator.events == 6 and evaluator.results["popularity"].hits == 2
    assert evaluator.results["popularity"].ndcg == 2.0  # both hits at rank 0


def test_the_kafka_run_equals_a_direct_evaluation_and_is_recorded(settings: Settings, store: Store) -> None:
    result = prequential.run(settings, store, "ml-100k", limit=3000)
    direct = PrequentialEvaluator()
    for record in load_dataset(
        "ml-100k", datasets_dir=settings.datasets_dir, cache_dir=settings.cache_dir, limit=3000
    ).records:
        direct.step(parse_event(record.value, now_ms=2**62, max_future_skew_ms=0))
    assert result["events"] == 3000
    assert result["methods"] == {m: r.as_dict(3000) for m, r in direct.results.items()}
    assert result["methods"]["cooccurrence"]["hr@10"] > result["methods"]["popularity"]["hr@10"] > 0
    rows = store.rows(
        f"SELECT method, events, hr, ndcg FROM {store.table('eval_runs')} "
        "WHERE run_id = {run:String} ORDER BY method",
        {"run": result["run_id"]},
    )
    assert [(m, e) for m, e, _, _ in rows] == sorted((m, 3000) for m in prequential.METHODS)
    assert {m: (hr, ndcg) for m, _, hr, ndcg in rows} == {
        m: (v["hr@10"], v["ndcg@10"]) for m, v in result["methods"].items()
    }
    assert orjson.dumps(result["methods"])  # JSON-serialisable, as `--json` prints it

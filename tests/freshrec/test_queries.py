"""The dashboards' queries against the embedded ClickHouse, checked against independent numbers."""

from __future__ import annotations

import gzip
from collections import Counter
from datetime import UTC, datetime

import orjson
import pytest

from freshrec import queries
from freshrec.errors import ConfigError
from freshrec.settings import Settings
from freshrec.store import Store
from learners.offline import record_run
from publishers.publisher import MODEL_UPDATE_COLUMNS
from streams import replay, sink
from streams.impressions import encode_impression
from streams.producer import EventProducer

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _first_events(settings: Settings, n: int) -> list[tuple[int, str]]:
    """(unix seconds, item) of the first ``n`` ml-100k ratings in time order (ties in file order)."""
    assert settings.datasets_dir is not None
    with gzip.open(settings.datasets_dir / "ml-100k" / "u.data.gz", "rt") as lines:
        rows = [(int(line.split("\t")[3]), line.split("\t")[1]) for line in lines]
    return sorted(rows, key=lambda r: r[0])[:n]


def test_queries_agree_with_the_dataset_and_the_log(settings: Settings, store: Store) -> None:
    replay.run(settings, "ml-100k", limit=5_000)
    with EventProducer(settings) as producer:
        for raw in (b"{not json", b"[]", b'{"event_id": "x"}'):
            producer.produce(settings.topics.events, raw)
        # One served response with three items; a click on the second, with its request id.
        shown = (("50", "popular", False), ("100", "explore", True), ("181", "popular", False))
        items = [
            {"item_id": i, "score": 1.0, "source": s, "explore": e, "propensity": 1.0} for i, s, e in shown
        ]
        producer.produce(
            settings.topics.impressions,
            encode_impression(
                request_id="r1",
                user_id="u",
                policy="uncertainty",
                model_version=3,
                latency_ms=2.0,
                items=items,
            ),
        )
        click = {
            "event_id": "click-1",
            "user_id": "u",
            "item_id": "100",
            "type": "click",
            "ts": 893_286_638_000,
            "request_id": "r1",
        }
        producer.produce(settings.topics.events, orjson.dumps(click), key=b"u")
    sink.run(settings, store, until_idle_s=1.5)

    everything = {"since": EPOCH, "until": datetime(2100, 1, 1, tzinfo=UTC)}
    columns, rows = queries.run(store, "events_per_minute", **everything)
    assert columns == ["minute", "type", "events"]
    expected = Counter(datetime.fromtimestamp(ts // 60 * 60, UTC) for ts, _ in _first_events(settings, 5_000))
    got = {minute.replace(tzinfo=UTC): n for minute, kind, n in rows if kind == "rating"}
    assert got == dict(expected)
    assert sum(n for _, kind, n in rows if kind == "click") == 1

    _, reasons = queries.run(store, "dead_letter_reasons", top=10)
    # Ordered by count, then reason: one each of the three bad messages.
    assert [(r, n) for r, n, _ in reasons] == [("missing_field", 1), ("not_json", 1), ("not_object", 1)]
    assert all(per == pytest.approx(1 / 5_001, abs=1e-6) for _, _, per in reasons)

    _, fresh = queries.run(store, "freshness", since=EPOCH)
    assert sum(n for _, n, _, _, _ in fresh) == 5_001
    assert all(p99 >= p50 > 0 for _, _, p50, p99, _ in fresh)  # ml-100k is from 1997-98: years of lag

    _, served = queries.run(store, "served_ctr", since=EPOCH)
    assert served == [("explore", True, 1, 1, 1.0), ("popular", False, 2, 0, 0.0)]
    _, coverage = queries.run(store, "coverage", since=EPOCH)
    catalogue = len({item for _, item in _first_events(settings, 5_000)} | {"100"})
    assert coverage == [(3, catalogue, round(3 / catalogue, 6))]

    with pytest.raises(ConfigError, match="missing"):
        queries.run(store, "coverage")
    with pytest.raises(ConfigError, match="unknown query"):
        queries.run(store, "nope")


def test_model_and_training_queries_read_what_was_recorded(store: Store) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    store.insert(
        "model_updates",
        [
            [1, 2],
            [0, 1],
            ["snapshot", "sparse"],
            ["t", "t"],
            [1000, 40],
            [10, 1],
            [1, 1],
            ["a", "b"],
            ["s1", "s2"],
            [None, None],
            ["r1", "r1"],
            [now, now],
        ],
        column_names=MODEL_UPDATE_COLUMNS,
    )
    record_run(
        store,
        run_id="r1",
        kind="finetune",
        dataset="events",
        events=10,
        steps=2,
        loss=1.5,
        metrics={},
        params={},
        started_at=now,
        version=2,
    )
    store.insert(
        "eval_runs",
        [
            ["e1"],
            ["ml-100k"],
            ["prequential"],
            ["popularity"],
            [100],
            [10],
            [0.1],
            [0.05],
            ["{}"],
            [now],
            [now],
        ],
        column_names=[
            "run_id",
            "dataset",
            "protocol",
            "method",
            "events",
            "k",
            "hr",
            "ndcg",
            "params",
            "started_at",
            "finished_at",
        ],
    )
    since = {"since": EPOCH}
    _, versions = queries.run(store, "model_timeline", **since)
    assert [(v, p, k, b, r) for v, p, k, b, r, _ in versions] == [
        (1, 0, "snapshot", 1000, 10),
        (2, 1, "sparse", 40, 1),
    ]
    _, runs = queries.run(store, "training_runs", **since)
    assert [
        (kind, status, events, loss, version) for _, kind, _, status, events, loss, _, _, version in runs
    ] == [("finetune", "ok", 10, 1.5, 2)]
    _, evals = queries.run(store, "prequential", **since)
    assert [(d, m, hr) for _, d, m, hr, _ in evals] == [("ml-100k", "popularity", 0.1)]

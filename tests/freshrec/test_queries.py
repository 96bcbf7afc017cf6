"""The dashboards' queries against the embedded ClickHouse, checked against independent numbers."""

from __future__ import annotations

import gzip
import math
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from freshrec import queries
from freshrec.errors import ConfigError
from freshrec.settings import Settings
from freshrec.store import Store
from learners.runs import record_run
from publishers.publisher import MODEL_UPDATE_COLUMNS
from streams import replay, sink
from streams.impressions import ServedItem, encode_impression
from streams.producer import EventProducer

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _first_events(settings: Settings, n: int) -> list[tuple[int, str, str]]:
    """(unix seconds, user, item) of the first ``n`` ml-100k ratings in time order (ties in file order)."""
    assert settings.datasets_dir is not None
    with gzip.open(settings.datasets_dir / "ml-100k" / "u.data.gz", "rt") as lines:
        rows = [(int(f[3]), f[0], f[1]) for f in (line.split("\t") for line in lines)]
    return sorted(rows, key=lambda r: r[0])[:n]


def _apen(rows: list[tuple[int, str, str]], bucket_s: int, m: int) -> dict[datetime, float]:
    """ApEn(m, r=0) per bucket, from the definition: patterns pooled over the users' sequences."""
    sequences: dict[tuple[int, str], list[tuple[int, str, str]]] = defaultdict(list)
    for ts, user, item in rows:
        sequences[(ts // bucket_s * bucket_s, user)].append((ts, f"ml-100k:{user}:{item}", item))
    grams: dict[int, dict[int, Counter[tuple[str, ...]]]] = defaultdict(lambda: defaultdict(Counter))
    for (bucket, _), events in sequences.items():
        items = [item for _, _, item in sorted(events)]
        for k in (m, m + 1):
            # The m-runs an item follows, and the (m+1)-runs: as many of each.
            grams[bucket][k].update(tuple(items[i : i + k]) for i in range(len(items) - m))

    def phi(counts: Counter[tuple[str, ...]]) -> float:
        n = sum(counts.values())
        return sum(c / n * math.log(c / n) for c in counts.values())

    return {
        datetime.fromtimestamp(bucket, UTC): phi(by_k[m]) - phi(by_k[m + 1])
        for bucket, by_k in grams.items()
        if by_k[m + 1]
    }


def test_queries_agree_with_the_dataset_and_the_log(settings: Settings, store: Store) -> None:
    replay.run(settings, "ml-100k", limit=5_000)
    with EventProducer(settings) as producer:
        for raw in (b"{not json", b"[]", b'{"event_id": "x"}'):
            producer.produce(settings.topics.events, raw)
        # One served response with three items; a click on the second, with its request id.
        shown = (("50", "popular", False), ("100", "explore", True), ("181", "popular", False))
        items = [ServedItem(i, 1.0, s, e, 1.0) for i, s, e in shown]
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
    dataset = _first_events(settings, 5_000)

    everything = {"since": EPOCH, "until": datetime(2100, 1, 1, tzinfo=UTC)}
    columns, rows = queries.run(store, "events_by_type", bucket_s=60, **everything)
    assert columns == ["time", "type", "per_minute"]
    expected = Counter(datetime.fromtimestamp(ts // 60 * 60, UTC) for ts, _, _ in dataset)
    got = {minute.replace(tzinfo=UTC): n for minute, kind, n in rows if kind == "rating"}
    assert got == dict(expected)
    assert sum(n for _, kind, n in rows if kind == "click") == 1
    # Another bucket: a rate per minute, whatever the bucket.
    _, hourly = queries.run(store, "events_by_type", bucket_s=3600, **everything)
    per_hour = Counter(datetime.fromtimestamp(ts // 3600 * 3600, UTC) for ts, _, _ in dataset)
    assert {h.replace(tzinfo=UTC): r * 60 for h, k, r in hourly if k == "rating"} == pytest.approx(per_hour)

    _, reasons = queries.run(store, "dead_letter_reasons", top=10, **everything)
    # Ordered by count, then reason: one each of the three bad messages.
    assert [(r, n) for r, n, _, _ in reasons] == [("missing_field", 1), ("not_json", 1), ("not_object", 1)]
    assert all(per == pytest.approx(1 / 5_001, abs=1e-6) for _, _, per, _ in reasons)
    _, rate = queries.run(store, "dead_letter_rate", bucket_s=86_400 * 365, **everything)
    assert sum(dead for _, dead, _, _ in rate) == 3 and sum(ok for _, _, ok, _ in rate) == 5_001

    _, fresh = queries.run(store, "freshness", bucket_s=60, **everything)
    assert sum(n for _, n, _, _, _ in fresh) == 5_001
    assert all(p99 >= p50 > 0 for _, _, p50, p99, _ in fresh)  # ml-100k is from 1997-98: years of lag

    _, served = queries.run(store, "served_ctr", **everything)
    assert served == [("explore", True, 1, 1, 1.0), ("popular", False, 2, 0, 0.0)]
    _, over_time = queries.run(store, "ctr_over_time", bucket_s=86_400 * 365, **everything)
    assert [(slot, ctr) for _, slot, ctr in over_time] == [("exploit", 0.0), ("explore", 1.0)]

    _, coverage = queries.run(store, "coverage", head_share=0.2, **everything)
    counts = Counter(item for _, _, item in dataset)
    counts["100"] += 1  # the click
    catalogue = len(counts)
    ranked = sorted(counts, key=lambda i: (-counts[i], i))
    head = set(ranked[: math.ceil(catalogue * 0.2)])
    tail = sum(1 for item, _, _ in shown if item not in head)
    assert coverage == [(3, catalogue, round(3 / catalogue, 6), 3, round(tail / 3, 6))]

    # Data quality: ApEn of the users' sequences, day by day, against the definition in Python.
    _, apen = queries.run(store, "sequence_entropy", bucket_s=86_400, m=1, **everything)
    ratings_only = _apen(dataset, 86_400, 1)
    got_apen = {t.replace(tzinfo=UTC): a for t, a, _ in apen}
    # The click's day holds one more sequence (user "u", one event: no transition, no effect).
    assert got_apen == pytest.approx(ratings_only, abs=1e-9)
    assert len(got_apen) > 5 and min(got_apen.values()) >= 0

    with pytest.raises(ConfigError, match="missing"):
        queries.run(store, "coverage", since=EPOCH)
    with pytest.raises(ConfigError, match="unknown query"):
        queries.run(store, "nope")

    # A panel with nothing given: the range is the data's own, the bucket gives <= 240 points.
    panel = queries.panel(store, "events_by_type")
    assert panel.parameters["since"] == datetime.fromtimestamp(dataset[0][0], UTC)
    assert sum(1 for _ in {t for t, _, _ in panel.rows}) <= 240
    assert sum(r for _, k, r in panel.rows if k == "rating") * panel.parameters["bucket_s"] / 60 == (
        pytest.approx(5_000)
    )


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
    served = now + timedelta(milliseconds=1_500)
    impressions = ["request_id", "user_id", "position", "item_id", "score", "source", "explore"]
    impressions += ["propensity", "policy", "model_version", "latency_ms", "served_at"]
    impressions += ["topic", "partition", "offset"]
    store.insert(
        "impressions",
        [[r] for r in ("q", "u", 0, "i", 1.0, "popular", False, 1.0, "none", 2, 1.0, served, "t", 0, 0)],
        column_names=impressions,
    )
    store.insert(  # a later response with the same version: the first one counts
        "impressions",
        [[r] for r in ("q2", "u", 0, "i", 1.0, "popular", False, 1.0, "none", 2, 1.0, served + timedelta(1))]
        + [["t"], [0], [1]],
        column_names=impressions,
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
    since = {"since": EPOCH, "until": datetime(2100, 1, 1, tzinfo=UTC)}
    _, versions = queries.run(store, "model_timeline", **since)
    assert [(v, p, k, b, r, lag) for _, v, p, k, b, r, lag in versions] == [
        (1, 0, "snapshot", 1000, 10, None),  # never served
        (2, 1, "sparse", 40, 1, 1500),  # first served 1.5 s after it was published
    ]
    _, runs = queries.run(store, "training_runs", **since)
    assert [
        (kind, status, events, loss, version) for _, kind, _, status, events, loss, _, _, version in runs
    ] == [("finetune", "ok", 10, 1.5, 2)]
    _, evals = queries.run(store, "prequential", **since)
    assert [(p, d, m, hr, ci) for _, p, d, m, _, hr, ci, _ in evals] == [
        ("prequential", "ml-100k", "popularity", 0.1, [])  # no interval recorded: empty
    ]


def test_a_replay_of_old_events_shows_in_the_ingestion_panel_of_the_last_hours(store: Store) -> None:
    """Dashboards open on the last few hours: events from 1997 stored now appear in the ingestion-time
    panel there, and not in the event-time one (which shows them at their own time)."""
    now = datetime.now(UTC)
    old = datetime(1997, 11, 20, tzinfo=UTC)
    rows = [
        [f"r{n}" for n in range(3)], ["u"] * 3, ["i"] * 3, ["rating", "rating", "view"], [old] * 3,
        [4.0] * 3, [None] * 3, ["{}"] * 3, ["events"] * 3, [0] * 3, [0, 1, 2], [now] * 3, [now] * 3,
    ]  # fmt: skip
    store.insert("events", rows, column_names=sink.EVENT_COLUMNS)
    last_hours = {"since": now - timedelta(hours=6), "until": now + timedelta(minutes=1), "bucket_s": 60}
    _, received = queries.run(store, "events_received", **last_hours)
    assert sorted((kind, round(rate)) for _, kind, rate in received) == [
        ("rating", 2),
        ("view", 1),
    ]  # per minute
    _, by_event_time = queries.run(store, "events_by_type", **last_hours)
    assert by_event_time == []

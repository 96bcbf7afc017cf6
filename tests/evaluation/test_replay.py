"""Replay evaluation: its popularity is the prequential protocol's, no method sees the event it is
scored on, and the frozen transformer stays the version it was trained as.

Every test replays a small JSONL stream through the real broker and the real serving code.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pytest
from confluent_kafka import Consumer, Message

from evaluation import replay as replay_eval
from evaluation.prequential import PrequentialEvaluator
from evaluation.replay import ReplayConfig, ReplayEvaluator
from freshrec.events import Event, parse_event
from freshrec.settings import Settings, StreamSettings, TrainSettings
from freshrec.store import Store
from learners.mf import MatrixFactorisationHead
from publishers.replica import Replica
from publishers.snapshots import SnapshotStore
from streams import replay

SMALL_TRAIN = TrainSettings(dim=16, blocks=1, epochs=1, budget_s=10.0, max_len=20, dense_every=2)
Stream = list[tuple[str, str]]  # (user, item) in time order


def _popular_stream(n: int, *, users: int = 30, items: int = 60, seed: int = 7) -> Stream:
    """Zipf-like item popularity, users drawn uniformly: re-interactions and ties both happen."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(items)]
    return [(f"u{rng.randrange(users)}", f"i{rng.choices(range(items), weights)[0]}") for _ in range(n)]


def _write(path: Path, stream: Stream) -> Path:
    start_ms = 1_700_000_000_000
    with path.open("wb") as out:
        for n, (user, item) in enumerate(stream):
            event = {"event_id": f"e{n}", "user_id": user, "item_id": item, "type": "view",
                     "ts": start_ms + 60_000 * n}  # fmt: skip
            out.write(orjson.dumps(event) + b"\n")
    return path


def _independent_popularity(stream: Stream, k: int = 10) -> tuple[int, float]:
    """Hits and summed NDCG of all-time popularity, seen items excluded, ties by first appearance."""
    counts: dict[str, int] = {}  # insertion order is first appearance
    seen: dict[str, set[str]] = {}
    hits, ndcg = 0, 0.0
    for user, item in stream:
        mine = seen.setdefault(user, set())
        if item in counts and item not in mine:
            order = list(counts)
            ranked = sorted(
                (name for name in order if name not in mine),
                key=lambda name: (-counts[name], order.index(name)),
            )
            rank = ranked.index(item)
            if rank < k:
                hits += 1
                ndcg += 1.0 / math.log2(rank + 2)
        counts[item] = counts.get(item, 0) + 1
        mine.add(item)
    return hits, ndcg


def test_popularity_equals_an_independent_count_and_eval_prequential(
    make_settings: Callable[..., Settings], store: Store, tmp_path: Path
) -> None:
    stream = _popular_stream(400)
    path = _write(tmp_path / "small.jsonl", stream)
    settings = make_settings(train=SMALL_TRAIN)
    result = replay_eval.run(settings, store, str(path), config=ReplayConfig(finetune_every=0))

    assert (result["events"], result["scored"]) == (400, 400)
    hits, ndcg = _independent_popularity(stream)
    popularity = result["methods"]["popularity"]
    assert hits > 20  # the comparison below is not between two zeros
    assert popularity["hr@10"] == pytest.approx(hits / 400, rel=1e-12)
    assert popularity["ndcg@10"] == pytest.approx(ndcg / 400, rel=1e-12)
    prequential = PrequentialEvaluator()
    for line in path.read_bytes().splitlines():
        prequential.step(parse_event(line, now_ms=2**62, max_future_skew_ms=0))
    expected = prequential.results["popularity"].as_dict(400)
    assert popularity["hr@10"] == pytest.approx(expected["hr@10"], rel=1e-12)
    assert popularity["ndcg@10"] == pytest.approx(expected["ndcg@10"], rel=1e-12)
    lo, hi = popularity["ci95"]
    assert lo < popularity["hr@10"] < hi

    rows = store.rows(
        f"SELECT method, protocol, events, hr, params FROM {store.table('eval_runs')} "
        "WHERE run_id = {run:String} ORDER BY method",
        {"run": result["run_id"]},
    )
    assert sorted(m for m, *_ in rows) == sorted(replay_eval.METHODS)
    for method, protocol, events, hr, params in rows:
        assert (protocol, events, hr) == ("replay", 400, result["methods"][method]["hr@10"])
        assert orjson.loads(params)["ci95"] == result["methods"][method]["ci95"]
    # The dashboards' evaluation panel shows the run with its protocol and interval.
    from freshrec import queries

    span = {"since": datetime(2000, 1, 1, tzinfo=UTC), "until": datetime(2100, 1, 1, tzinfo=UTC)}
    _, panel = queries.run(store, "prequential", **span)
    shown = {m: (p, ci) for _, p, _, m, _, _, ci, _ in panel}
    assert shown["served"] == ("replay", pytest.approx(result["methods"]["served"]["ci95"]))
    assert orjson.dumps({k: result[k] for k in ("dataset", "events", "scored", "methods", "over_time")})


class LearnsFirst(ReplayEvaluator):
    """A deliberately leaking evaluator: the stream state learns each event before it is scored
    (as when a worker thread runs ahead of the requests)."""

    def step(self, message: Message) -> None:
        event = parse_event(message.value() or b"", now_ms=2**62, max_future_skew_ms=0)
        self.events += 1
        self.worker._apply([message])
        self.score(event)
        self.remember(event)


def _drive(settings: Settings, path: Path, evaluator: type[ReplayEvaluator]) -> ReplayEvaluator:
    """Publish ``path`` to the settings' topic and feed every message to ``evaluator``."""
    published = replay.run(settings, str(path)).published
    driven = evaluator(settings, config=ReplayConfig(finetune_every=0), replica=Replica())
    consumer = Consumer(
        settings.kafka_config(
            **{"group.id": f"leak-{settings.topic_prefix}", "auto.offset.reset": "earliest"}
        )
    )
    consumer.subscribe([settings.topics.events])
    try:
        consumed = 0
        while consumed < published:
            for message in consumer.consume(500, 1.0):
                if message.error() is None:
                    consumed += 1
                    driven.step(message)
    finally:
        consumer.close()
    return driven


def _assert_blind(methods: dict[str, dict[str, float]]) -> None:
    """On a stream where every event's item is new, a method that could not see the event misses."""
    for method, metrics in methods.items():
        assert metrics["hr@10"] == 0.0, f"{method} hit items it cannot have seen: it saw the event"


def test_no_method_sees_the_event_it_is_scored_on(
    make_settings: Callable[..., Settings], store: Store, tmp_path: Path
) -> None:
    rng = random.Random(3)
    stream = [(f"u{rng.randrange(8)}", f"new{n}") for n in range(120)]  # every item new
    path = _write(tmp_path / "new-items.jsonl", stream)
    settings = make_settings(train=SMALL_TRAIN, broker_partitions=1)

    honest = replay_eval.run(settings, store, str(path), config=ReplayConfig(finetune_every=0))
    assert honest["scored"] == 120
    _assert_blind(honest["methods"])

    leaky = _drive(
        settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}leak."}), path, LearnsFirst
    )
    methods = leaky.summary()
    assert methods["decayed_popularity"]["hr@10"] == 1.0  # the newest item tops decayed counts
    with pytest.raises(AssertionError, match="saw the event"):
        _assert_blind(methods)


def _independent_mf(stream: Stream, k: int = 10) -> tuple[int, float]:
    """Hits and summed NDCG of one MF head learning the stream in order, each event ranked first by
    ``predict_one`` over the items seen so far (the user's own left out, ties by first appearance)."""
    head = MatrixFactorisationHead()  # what the registry builds for "mf"
    order: dict[str, int] = {}  # item -> first appearance
    seen: dict[str, set[str]] = {}
    hits, ndcg = 0, 0.0
    for n, (user, item) in enumerate(stream):
        mine = seen.setdefault(user, set())
        if item in order and item not in mine:
            score = {name: head.predict_one(user, name) for name in order if name not in mine}
            target = score[item]
            rank = sum(
                1
                for name, value in score.items()
                if value > target or (value == target and order[name] < order[item])
            )
            if rank < k:
                hits += 1
                ndcg += 1.0 / math.log2(rank + 2)
        head.learn_one(Event(f"e{n}", user, item, "view", 1_700_000_000_000 + 60_000 * n))
        order.setdefault(item, len(order))
        mine.add(item)
    return hits, ndcg


def test_mf_ranks_as_the_head_it_learned_with(
    make_settings: Callable[..., Settings], store: Store, tmp_path: Path
) -> None:
    stream = _popular_stream(400)
    path = _write(tmp_path / "small.jsonl", stream)
    result = replay_eval.run(
        make_settings(train=SMALL_TRAIN), store, str(path), config=ReplayConfig(finetune_every=0)
    )

    hits, ndcg = _independent_mf(stream)
    mf = result["methods"]["mf"]
    assert hits > 20  # the comparison below is not between two zeros
    assert mf["hr@10"] == pytest.approx(hits / 400, rel=1e-12)
    assert mf["ndcg@10"] == pytest.approx(ndcg / 400, rel=1e-12)


class ChecksMf(ReplayEvaluator):
    """After each learned event, compares the user's MF scores with what the user's head predicts."""

    checked = 0

    def remember(self, event: Event) -> None:
        super().remember(event)
        ids = self.worker.state.counters.items
        items = [ids.id_of(row) for row in range(len(ids))]
        scores = self._mf(event.user_id, len(items))
        head = self.worker.state.heads["mf"]
        expected = [head.predict_one(event.user_id, item) if item else 0.0 for item in items]
        known = np.asarray([bool(item) for item in items])  # a row freed by an eviction scores nothing
        np.testing.assert_allclose(
            scores[known], np.asarray(expected)[known], rtol=1e-9, err_msg=event.event_id
        )
        self.checked += 1


def test_mf_scores_each_user_with_the_head_of_the_users_partition(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    stream = _popular_stream(300, users=24, items=40, seed=5)
    path = _write(tmp_path / "small.jsonl", stream)
    # Four partitions, so four heads; 12 items per store, so stores evict items and the merged
    # rows the scores are laid out by are renumbered as the stream goes.
    settings = make_settings(train=SMALL_TRAIN, broker_partitions=4, stream=StreamSettings(max_items=12))
    driven = _drive(settings, path, ChecksMf)

    state = driven.worker.state
    assert isinstance(driven, ChecksMf) and driven.checked == 300
    assert len(state.stores) == 4  # the users' events were learned by four heads
    assert all(store.counters.evicted for store in state.stores.values())
    ids = state.counters.items
    for user in sorted({user for user, _ in stream}):
        assert np.ptp(driven._mf(user, len(ids))) > 0, f"{user}'s scores are all equal: nothing learned"


def test_the_frozen_transformer_never_changes_and_the_replica_follows_each_finetune(
    make_settings: Callable[..., Settings], store: Store, tmp_path: Path
) -> None:
    stream = _popular_stream(600, users=20, items=40, seed=11)
    path = _write(tmp_path / "small.jsonl", stream)
    # A window of 300 events: the fine-tunes at 150 and 300 see the same events as the freshness
    # control, those at 450 and 600 do not.
    settings = make_settings(train=SMALL_TRAIN.model_copy(update={"window_events": 300}))
    plot = tmp_path / "replay.png"
    workdir = tmp_path / "replay-models"
    result = replay_eval.run(
        settings,
        store,
        str(path),
        config=ReplayConfig(finetune_every=150, sample=0.5, seed=1),
        plot=plot,
        workdir=workdir,
    )

    cycles = result["finetunes"]
    assert [c["at_event"] for c in cycles] == [150, 300, 450, 600]
    versions = [c["version"] for c in cycles]
    assert versions == sorted(set(versions))
    frozen = result["frozen"]
    snapshots = SnapshotStore(workdir / "models")
    first, last = snapshots.load(versions[0]), snapshots.load(versions[-1])
    assert frozen["version"] == versions[0]
    # What the frozen method scored with at the end is the first version, bit for bit...
    assert frozen["state_checksum"] == first.state_checksum
    # ...while the served model moved on.
    assert last.state_checksum != first.state_checksum
    # Every request after a fine-tune was served by the version it published (or a later one).
    for point in result["over_time"]:
        done = [c["version"] for c in cycles if c["at_event"] < point["from_event"]]
        assert point["model_version"] >= (done[-1] if done else 0)
    assert 200 < result["scored"] < 400  # about half, seeded
    scored = [p["scored"] for p in result["over_time"]]
    assert sum(scored) == result["scored"]
    for name in ("transformer", "transformer_frozen", "transformer_stale", "served", "served_explore"):
        lo, hi = result["methods"][name]["ci95"]
        assert lo <= result["methods"][name]["hr@10"] <= hi
    assert plot.stat().st_size > 10_000
    assert np.isfinite(result["paired"]["transformer - transformer_frozen"]["hr@10"])
    assert np.isfinite(result["paired"]["transformer - transformer_stale"]["hr@10"])
    # The freshness control trained at every fine-tune from the first version, on the oldest 300
    # events (their last one is event 299, 60 s apart), while the served model ended on the newest.
    stale = result["stale"]
    assert stale["version"] > versions[0] and stale["state_checksum"] not in (
        first.state_checksum,
        last.state_checksum,
    )
    start_ms = 1_700_000_000_000
    assert stale["window_events"] == 300
    assert stale["window_last_ts_ms"] == start_ms + 60_000 * 299
    assert stale["fresh_window_last_ts_ms"] == start_ms + 60_000 * 599


def test_the_cli_prints_the_promised_json(settings: Settings, tmp_path: Path) -> None:
    from support import cli_env, freshrec_cli

    path = _write(tmp_path / "small.jsonl", _popular_stream(300))
    env = cli_env(settings, dsn=f"chdb://{tmp_path / 'db'}") | {
        "FRESHREC_TRAIN__DIM": "16",
        "FRESHREC_TRAIN__BLOCKS": "1",
        "FRESHREC_TRAIN__MAX_LEN": "20",
    }
    plot = tmp_path / "replay.png"
    out = orjson.loads(
        freshrec_cli(
            "eval", "replay", str(path), "--finetune-every", "0", "--plot", str(plot), "--json", env=env
        ).stdout
    )
    assert {"dataset", "events", "scored", "methods", "over_time"} <= set(out)
    assert (out["events"], out["scored"]) == (300, 300)
    assert set(out["methods"]) >= {"popularity", "cooccurrence", "served", "served_explore"}
    for name, method in out["methods"].items():
        low, high = method["ci95"]
        assert 0 <= low <= method["hr@10"] <= high <= 1 and 0 <= method["ndcg@10"] <= method["hr@10"], name
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_freshness_control_can_be_left_out(
    make_settings: Callable[..., Settings], store: Store, tmp_path: Path
) -> None:
    """Data without a time order has no fresh window to compare: the control (a second fine-tune at
    every fine-tune) is then skipped, and its method scores nothing."""
    path = _write(tmp_path / "small.jsonl", _popular_stream(300, users=20, items=40, seed=3))
    settings = make_settings(train=SMALL_TRAIN)
    result = replay_eval.run(
        settings, None, str(path), config=ReplayConfig(finetune_every=150, freshness_control=False)
    )
    assert [c["at_event"] for c in result["finetunes"]] == [150, 300]
    assert result["stale"] is None and result["frozen"] is not None
    assert result["methods"]["transformer_stale"]["hr@10"] == 0.0
    assert "transformer - transformer_stale" not in result["paired"]

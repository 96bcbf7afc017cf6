"""The learned fusion: it learns which source to trust from each user's next event, never from the
event of the request it is scoring, and does so deterministically.

The synthetic stream: users take items from a catalogue; before each event, one source
(co-occurrence) ranks the item the user takes next near its top, another (popularity) lists random
items, the target only by chance. A fixed fusion gives both the same say."""

from __future__ import annotations

import numpy as np

from serving.fusion import FEATURES, LearnedFusion, candidate_features, next_event
from serving.recommender import _fuse

CATALOGUE = [f"item-{i}" for i in range(400)]
K = 10

History = list[tuple[str, str, int]]
Lists = dict[str, list[tuple[str, float]]]


def _stream(seed: int, requests: int) -> list[tuple[str, str, Lists]]:
    """Per request: the user, the item they take next, and the sources' candidate lists."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(requests):
        user = f"user-{int(rng.integers(30))}"
        target = CATALOGUE[int(rng.integers(len(CATALOGUE)))]
        others = [item for item in rng.choice(CATALOGUE, size=60, replace=False).tolist() if item != target]
        informative = others[:59]
        informative.insert(min(int(rng.geometric(0.12)) - 1, 59), target)  # near the top, mostly
        noise = rng.choice(CATALOGUE, size=60, replace=False).tolist()  # knows nothing of the target
        lists: Lists = {
            "cooccurrence": [(item, 60.0 - rank) for rank, item in enumerate(informative)],
            "popular": [(item, 1000.0 / (1 + rank)) for rank, item in enumerate(noise)],
        }
        out.append((user, target, lists))
    return out


def _replay(
    fusion: LearnedFusion, stream: list[tuple[str, str, Lists]], *, leak: bool = False
) -> tuple[list[list[tuple[str, float]]], list[int | None]]:
    """Test-then-learn, as serving sees it: each request ranked from the history so far, then its
    event joins the user's history. ``leak`` learns the event before ranking its request (what a
    leak would do): the test's own control."""
    histories: dict[str, History] = {}
    served, ranks = [], []
    for t, (user, target, lists) in enumerate(stream):
        history = histories.setdefault(user, [])
        if leak:
            names, x, _ = candidate_features(lists)
            if target in names:
                fusion.model.learn_one(x, names.index(target))
        ranked, _ = fusion.rank(user, lists, list(history))
        served.append(ranked[:K])  # with their scores: any change of weights shows
        top = [item for item, _ in ranked[:K]]
        ranks.append(top.index(target) if target in top else None)
        history.append((target, "view", t))
    return served, ranks


def _rrf_ranks(stream: list[tuple[str, str, Lists]]) -> list[int | None]:
    out = []
    for _, target, lists in stream:
        fused, _ = _fuse(lists)
        top = [item for item, _ in sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:K]]
        out.append(top.index(target) if target in top else None)
    return out


def _hits(ranks: list[int | None]) -> np.ndarray:
    return np.array([rank is not None for rank in ranks], dtype=np.float64)


def test_the_learned_fusion_down_weights_a_noise_source_and_beats_a_fixed_fusion() -> None:
    stream = _stream(seed=1, requests=3000)
    fusion = LearnedFusion()  # as served: the default step
    _, learned = _replay(fusion, stream)
    fixed = _rrf_ranks(stream)
    later = slice(1000, None)  # once it has learned
    diff = _hits(learned)[later] - _hits(fixed)[later]
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
    assert diff.mean() - half > 0.05, (diff.mean(), half)  # paired, on the same requests
    # How much each source moves a candidate's score: the spread of its part of x · w.
    x = np.concatenate([candidate_features(lists)[1] for _, _, lists in stream[-200:]])
    prior = LearnedFusion().model.weights

    def spread(source: str, weights: np.ndarray) -> float:
        columns = [i for i, name in enumerate(FEATURES) if name.startswith(f"{source}_")]
        return float((x[:, columns] @ weights[columns]).std())

    learned_weights = fusion.model.weights
    assert spread("cooccurrence", learned_weights) > 3 * spread("popular", learned_weights)
    assert spread("popular", learned_weights) < 0.5 * spread("popular", prior)  # down-weighted
    # The first request of a user has no label yet; every later one labels the user's previous one.
    assert fusion.model.learned > 2000


def test_a_request_is_scored_before_its_event_is_learned() -> None:
    """The list served for a request (items and scores) depends on the events before it only: two
    streams that differ from request t on serve the same lists up to and including t. The leaky
    control, which learns each event before ranking its request, breaks exactly this (so the check
    can fail)."""
    stream = _stream(seed=2, requests=600)
    t = 400
    user, target, lists = stream[t]
    other = next(item for item, _ in lists["cooccurrence"] if item != target)
    changed = [*stream[:t], (user, other, lists), *_stream(seed=3, requests=200)]
    for leak, same in ((False, True), (True, False)):
        first, _ = _replay(LearnedFusion(), stream, leak=leak)
        second, _ = _replay(LearnedFusion(), changed, leak=leak)
        assert first[:t] == second[:t]
        assert (first[t] == second[t]) is same, leak


def test_the_fusion_is_deterministic() -> None:
    stream = _stream(seed=4, requests=800)
    runs = []
    for _ in range(2):
        fusion = LearnedFusion()
        served, _ = _replay(fusion, stream)
        runs.append((served, fusion.model.state_dict()))
    assert runs[0] == runs[1]
    assert runs[0][1]["learned"] > 0 and runs[0][1]["features"] == list(FEATURES)


def test_the_label_is_the_first_event_after_the_request() -> None:
    history = [("a", "view", 1), ("b", "view", 2), ("c", "click", 3)]
    assert next_event(history, ("a", "view", 1)) == "b"  # not the newest, "c"
    assert next_event(history, ("c", "click", 3)) is None  # nothing yet
    assert next_event(history, ("z", "view", 0)) is None  # fell out of the bounded history
    assert next_event(history, None) == "a"  # a request made before the user's first event

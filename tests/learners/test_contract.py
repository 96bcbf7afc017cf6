"""Every head keeps the contract of learners/base.py, as river's checks hold every estimator."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable

import pytest

from freshrec.events import Event
from learners.ctr import EngagementHead
from learners.mf import MatrixFactorisationHead
from streams.heads import Head

HEADS: dict[str, Callable[[], Head]] = {
    "mf": lambda: MatrixFactorisationHead(max_users=50, max_items=40, seed=3),
    "mf_implicit": lambda: MatrixFactorisationHead(
        max_users=50, max_items=40, negatives=3, uniform_negatives=True, learning_rate=0.05, seed=3
    ),
    "engagement": lambda: EngagementHead(hash_bits=10, max_items=40),
}


def stream(n: int, seed: int = 0, users: int = 300, items: int = 200) -> list[Event]:
    rng = random.Random(seed)
    kinds = ["rating", "click", "view", "skip", "purchase", "impression"]
    out = []
    for i in range(n):
        kind = rng.choice(kinds)
        value = float(rng.randint(1, 5)) if kind == "rating" else None
        context: dict[str, str | int | float | bool | None] | None = (
            {"device": rng.choice(["ios", "web"])} if i % 3 == 0 else None
        )
        out.append(
            Event(
                f"e{i}", f"u{rng.randrange(users)}", f"i{rng.randrange(items)}", kind, i, value, None, context
            )
        )
    return out


@pytest.fixture(params=sorted(HEADS))
def make(request: pytest.FixtureRequest) -> Callable[[], Head]:
    return HEADS[request.param]


def test_predicting_before_any_learning_works(make: Callable[[], Head]) -> None:
    head = make()
    assert math.isfinite(head.predict_one("nobody", "nothing"))
    assert head.uncertainty_one("nobody", "nothing") == 1.0
    assert head.rank("nobody", ["a", "b", "c"]) == ["a", "b", "c"]
    assert head.size == 0  # reading does not grow the model


def test_learning_does_not_modify_the_event(make: Callable[[], Head]) -> None:
    head = make()
    for event in stream(300):
        before = copy.deepcopy(event)
        head.learn_one(event)
        assert event == before


def test_unknown_users_and_items_get_finite_scores_after_learning(make: Callable[[], Head]) -> None:
    head = make()
    for event in stream(2000):
        head.learn_one(event)
    size = head.size
    for user, item in [("u1", "never"), ("never", "i1"), ("never", "never")]:
        assert math.isfinite(head.predict_one(user, item))
        assert 0.0 <= head.uncertainty_one(user, item) <= 1.0
    assert head.size == size


def test_state_round_trips_and_is_a_snapshot(make: Callable[[], Head]) -> None:
    events = stream(3000)
    head = make()
    for event in events[:1500]:
        head.learn_one(event)
    state = head.state_dict()
    copy_ = make()
    copy_.load_state_dict(state)
    for event in events[1500:]:  # learning after the snapshot must not leak into it
        head.learn_one(event)
        copy_.learn_one(event)
    again = make()
    again.load_state_dict(state)
    pairs = [(f"u{u}", f"i{i}") for u in range(0, 300, 7) for i in range(0, 200, 11)]
    assert [head.predict_one(*p) for p in pairs] == [copy_.predict_one(*p) for p in pairs]
    assert any(again.predict_one(*p) != head.predict_one(*p) for p in pairs)


def test_memory_stays_bounded_on_an_endless_stream_of_new_ids(make: Callable[[], Head]) -> None:
    head = make()
    sizes = []
    for chunk in range(5):
        for event in stream(2000, seed=chunk, users=10**6, items=10**6):
            head.learn_one(event)
        sizes.append(head.size)
    assert sizes[-1] <= sizes[1] * 1.05, sizes  # flat once the caps are reached


def test_uncertainty_falls_as_a_pair_is_learned(make: Callable[[], Head]) -> None:
    head = make()
    first = head.uncertainty_one("u", "i")
    for n in range(20):
        head.learn_one(Event(f"x{n}", "u", "i", "click", n))
    assert head.uncertainty_one("u", "i") < first


def test_mf_learns_which_items_users_prefer() -> None:
    head = MatrixFactorisationHead(seed=1, learning_rate=0.02)
    rng = random.Random(5)
    for n in range(20_000):
        user, item = f"u{rng.randrange(100)}", f"i{rng.randrange(20)}"
        liked = (int(user[1:]) % 2) == (int(item[1:]) % 2)  # two tastes, two item groups
        head.learn_one(Event(f"m{n}", user, item, "rating", n, 5.0 if liked else 1.0))
    ranked = head.rank("u2", [f"i{i}" for i in range(20)])
    assert set(ranked[:10]) == {f"i{i}" for i in range(0, 20, 2)}

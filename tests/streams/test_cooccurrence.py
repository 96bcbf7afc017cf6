"""Co-occurrence: exact pair counts before pruning, bounded after, deterministic, round-trips."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from streams.cooccurrence import CoOccurrence


def brute_force(sessions: list[tuple[str, str]], window: int) -> Counter[tuple[str, str]]:
    pairs: Counter[tuple[str, str]] = Counter()
    history: dict[str, list[str]] = {}
    for user, item in sessions:
        partners: list[str] = []
        for other in reversed(history.get(user, [])):
            if other != item and other not in partners:
                partners.append(other)
                if len(partners) == window:
                    break
        for other in partners:
            pairs[(item, other)] += 1
            pairs[(other, item)] += 1
        history.setdefault(user, []).append(item)
    return pairs


def _recent_of(history: dict[str, list[str]]) -> Callable[[str, int], list[str]]:
    return lambda user, n: history.get(user, [])[-n:][::-1]


def test_counts_are_exact_before_pruning_whatever_the_batching() -> None:
    rng = random.Random(2)
    sessions = [(f"u{rng.randrange(30)}", f"i{rng.randrange(40)}") for _ in range(3000)]
    batched = CoOccurrence(window=4, max_neighbours=1000)
    history: dict[str, list[str]] = {}
    for start in range(0, len(sessions), 257):
        part = sessions[start : start + 257]
        batched.observe_batch([u for u, _ in part], [i for _, i in part], _recent_of(history))
        for user, item in part:
            history.setdefault(user, []).append(item)
    expected = brute_force(sessions, 4)
    for item in {i for _, i in sessions}:
        got = dict(batched.neighbours(item, 10_000))
        assert got == {o: float(c) for (a, o), c in expected.items() if a == item}
    assert batched.pruned == 0


def test_pruning_bounds_memory_and_keeps_the_strong_pairs() -> None:
    co = CoOccurrence(window=2, max_neighbours=3, max_items=50)
    history: dict[str, list[str]] = {}
    rng = random.Random(4)
    users, items = [], []
    for n in range(5000):
        users.append(f"u{n % 97}")
        items.append("hub" if n % 2 else f"i{rng.randrange(500)}")
    co.observe_batch(users, items, _recent_of(history))
    assert len(co) <= 50 and co.pruned > 0 and co.evicted > 0
    assert all(len(co._counts[item]) <= 6 for item in co._counts)
    assert co.neighbours("hub", 1) and co.neighbours("hub", 1)[0][1] >= 1


def test_scores_exclude_seen_items_and_state_round_trips() -> None:
    co = CoOccurrence(window=3)
    co.observe_batch(["a", "a", "a", "b", "b"], ["x", "y", "z", "x", "y"], _recent_of({}))
    assert co.score(["x"], exclude={"y"}) == {"z": 1.0}
    copy = CoOccurrence()
    copy.load_state_dict(co.state_dict())
    assert copy.neighbours("x", 5) == co.neighbours("x", 5) == [("y", 2.0), ("z", 1.0)]


def test_the_frequency_filter_keeps_rare_items_out() -> None:
    co = CoOccurrence(window=3, min_count=2)
    users = ["u1", "u1", "u2", "u2", "u3", "u3"]
    items = ["rare", "pop", "pop", "hit", "hit", "pop"]
    co.observe_batch(users, items, _recent_of({}))
    # "pop" and "hit" pair once both were seen twice (u3); "rare" (seen once) never pairs.
    assert co.neighbours("pop", 5) == [("hit", 1.0)] and co.neighbours("rare", 5) == []
    copy = CoOccurrence()
    copy.load_state_dict(co.state_dict())
    copy.observe("u4", "rare", recent=["pop"])
    assert copy.neighbours("rare", 5) == [("pop", 1.0)]


def test_the_batched_path_prunes_and_evicts_as_one_event_at_a_time() -> None:
    rng = random.Random(5)
    sessions = [(f"u{rng.randrange(20)}", f"i{int(rng.paretovariate(1.2)) % 60}") for _ in range(4000)]
    batched = CoOccurrence(window=3, max_neighbours=4, max_items=40)
    single = CoOccurrence(window=3, max_neighbours=4, max_items=40)
    history: dict[str, list[str]] = {}
    for start in range(0, len(sessions), 300):
        part = sessions[start : start + 300]
        batched.observe_batch(
            [u for u, _ in part], [i for _, i in part], lambda u, _n: history.get(u, [])[::-1]
        )
        for user, item in part:
            single.observe(user, item, recent=history.get(user, []))
            history.setdefault(user, []).append(item)
    assert batched.pruned > 0 and batched.evicted > 0
    assert batched.state_dict() == single.state_dict()

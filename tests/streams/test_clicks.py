"""Click-through: attribution by request_id, the Beta posterior, bounded join, state round trip."""

from __future__ import annotations

import random

import pytest

from streams.clicks import ClickThrough


def test_only_clicks_on_shown_items_count_and_only_once() -> None:
    ctr = ClickThrough(alpha=1.0, beta=1.0)
    for item in ("a", "b", "c"):
        ctr.observe("impression", item, "r1")
    ctr.observe("click", "a", "r1")
    ctr.observe("click", "a", "r1")  # a second click on one impression
    ctr.observe("click", "z", "r1")  # not shown in r1
    ctr.observe("click", "b", None)  # no request id
    ctr.observe("view", "a", "r1")  # not part of CTR
    a = ctr.posterior("a")
    assert (a.impressions, a.clicks, ctr.unattributed, ctr.pending) == (1, 1, 1, 2)
    assert a.mean == pytest.approx(2 / 3) and a.variance == pytest.approx((2 / 3) * (1 / 3) / 4)
    unseen = ctr.posterior("never")
    assert (unseen.impressions, unseen.mean) == (0, 0.5) and unseen.variance == pytest.approx(1 / 12)


def test_moments_of_many_items_are_their_posteriors() -> None:
    rng = random.Random(2)
    ctr = ClickThrough(alpha=2.0, beta=15.0)
    for n in range(300):
        item = f"i{rng.randrange(8)}"
        ctr.observe("impression", item, f"r{n}")
        if rng.random() < 0.3:
            ctr.observe("click", item, f"r{n}")
    items = [f"i{n}" for n in range(10)]  # two never shown
    mean, variance = ctr.moments(items)
    assert mean.tolist() == pytest.approx([ctr.posterior(i).mean for i in items], rel=1e-12)
    assert variance.tolist() == pytest.approx([ctr.posterior(i).variance for i in items], rel=1e-12)
    assert ctr.moments([])[0].shape == (0,)


def test_posterior_narrows_around_the_true_rate() -> None:
    rng = random.Random(1)
    ctr = ClickThrough()
    variances = []
    for n in range(20_000):
        ctr.observe("impression", "item", f"r{n}")
        if rng.random() < 0.08:
            ctr.observe("click", "item", f"r{n}")
        if n in (100, 1000, 19_999):
            variances.append(ctr.posterior("item").variance)
    assert variances == sorted(variances, reverse=True)
    assert ctr.posterior("item").mean == pytest.approx(0.08, abs=0.006)


def test_the_join_is_bounded_and_state_round_trips() -> None:
    ctr = ClickThrough(join_horizon=10)
    for n in range(100):
        ctr.observe("impression", "i", f"r{n}")
    ctr.observe("click", "i", "r0")  # forgotten: beyond the horizon, so it waits as pending
    ctr.observe("click", "i", "r99")
    assert (ctr.posterior("i").clicks, ctr.pending) == (1, 1)
    copy = ClickThrough()
    copy.load_state_dict(ctr.state_dict())
    copy.observe("click", "i", "r98")
    ctr.observe("click", "i", "r98")
    assert copy.posterior("i") == ctr.posterior("i") and copy.unattributed == ctr.unattributed


def test_the_join_does_not_depend_on_arrival_order() -> None:
    rng = random.Random(4)
    events = []
    for n in range(500):
        items = [f"i{n}" for n in rng.sample(range(20), 5)]  # one impression of an item per response
        events += [("impression", item, f"r{n}") for item in items]
        events += [("click", item, f"r{n}") for item in items if rng.random() < 0.2]
    ordered, shuffled = ClickThrough(), ClickThrough()
    for event in events:
        ordered.observe(*event)
    rng.shuffle(events)
    for event in events:
        shuffled.observe(*event)
    assert all(ordered.posterior(f"i{n}") == shuffled.posterior(f"i{n}") for n in range(20))
    assert sum(ordered.posterior(f"i{n}").clicks for n in range(20)) > 0

"""User histories: last N per user, bounded users, and a state that round-trips."""

from __future__ import annotations

from streams.histories import HistoryEntry, UserHistories


def test_keeps_the_last_n_events_per_user_oldest_first() -> None:
    histories = UserHistories(max_len=3, max_users=10)
    histories.append(["u1"] * 5 + ["u2"], ["a", "b", "c", "d", "e", "z"], ["view"] * 6, [1, 2, 3, 4, 5, 6])
    assert histories.items("u1") == ["c", "d", "e"]
    assert histories.get("u2") == [HistoryEntry("z", "view", 6)]
    assert histories.get("nobody") == [] and len(histories) == 2


def test_the_least_recently_active_user_is_evicted_at_the_cap() -> None:
    histories = UserHistories(max_len=2, max_users=2)
    histories.append(["a", "b", "a", "c"], ["1", "2", "3", "4"], ["view"] * 4, [1, 2, 3, 4])
    assert histories.items("b") == [] and histories.items("a") == ["1", "3"] and histories.items("c") == ["4"]
    assert histories.evicted == 1 and len(histories) == 2


def test_state_round_trip_preserves_order_and_bounds() -> None:
    histories = UserHistories(max_len=4, max_users=100)
    histories.append(
        [f"u{i % 7}" for i in range(50)], [f"i{i}" for i in range(50)], ["click"] * 50, range(50)
    )
    restored = UserHistories()
    restored.load_state_dict(histories.state_dict())
    restored.append(["u0"], ["new"], ["view"], [99])
    histories.append(["u0"], ["new"], ["view"], [99])
    assert all(restored.get(f"u{i}") == histories.get(f"u{i}") for i in range(7))
    assert restored.max_len == 4 and len(restored.items("u0")) == 4


def test_expire_forgets_users_idle_past_the_ttl_in_event_time() -> None:
    histories = UserHistories(max_len=5)
    histories.append(
        ["old", "new", "both", "both"], ["a", "b", "c", "d"], ["view"] * 4, [100, 5_000, 100, 4_000]
    )
    assert histories.expire(before_ms=1_000) == 1
    assert (
        histories.get("old") == []
        and histories.items("new") == ["b"]
        and histories.items("both") == ["c", "d"]
    )
    assert histories.evicted == 1

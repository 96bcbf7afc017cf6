"""The event contract: every rule with an example, and Hypothesis properties for the parser."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freshrec.errors import InvalidEvent
from freshrec.events import (
    MAX_MESSAGE_BYTES,
    REASON_DUPLICATE,
    REASONS,
    Event,
    event_from_obj,
    parse_event,
    parse_ts,
)

NOW = 1_700_000_000_000
SKEW = 600_000
BASE: dict[str, Any] = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "type": "view", "ts": NOW - 1}


def parse(obj: object) -> Event:
    return parse_event(orjson.dumps(obj), now_ms=NOW, max_future_skew_ms=SKEW)


def reason_of(raw: bytes) -> str:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw, now_ms=NOW, max_future_skew_ms=SKEW)
    assert info.value.detail and len(info.value.detail) < 400
    return info.value.reason


def without(field: str) -> dict[str, Any]:
    return {k: v for k, v in BASE.items() if k != field}


def test_a_valid_event_with_every_optional_field() -> None:
    event = parse(
        {
            **BASE,
            "value": 4,
            "request_id": "r1",
            "context": {"a": "x", "b": 1, "c": 2.5, "d": True, "e": None},
        }
    )
    assert event == Event(
        "e1", "u1", "i1", "view", NOW - 1, 4.0, "r1", {"a": "x", "b": 1, "c": 2.5, "d": True, "e": None}
    )
    assert isinstance(event.value, float)
    assert parse_event(event.to_json(), now_ms=NOW, max_future_skew_ms=SKEW) == event


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"x" * (MAX_MESSAGE_BYTES + 1), "too_large"),
        (b"\xff\xfe{}", "invalid_utf8"),
        (b'{"event_id": "\xed\xa0\x80"}', "invalid_utf8"),  # a lone surrogate encoded in UTF-8
        (b"not json", "not_json"),
        (b"", "not_json"),
        (b'{"event_id":"e","user_id":"u","item_id":"i","type":"view","ts":1,"value":NaN}', "not_json"),
        (b'{"event_id":"e","user_id":"u","item_id":"i","type":"view","ts":1,"value":Infinity}', "not_json"),
        (b"[1,2]", "not_object"),
        (b"null", "not_object"),
        (b"42", "not_object"),
    ],
)
def test_bytes_level_rejections(raw: bytes, reason: str) -> None:
    assert reason_of(raw) == reason


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        *[(without(field), "missing_field") for field in ("event_id", "user_id", "item_id", "type", "ts")],
        ({**BASE, "item": "typo"}, "unknown_field"),
        ({**BASE, "user_id": 7}, "bad_type"),
        ({**BASE, "item_id": None}, "bad_type"),
        ({**BASE, "type": ["view"]}, "bad_type"),
        ({**BASE, "event_id": ""}, "bad_value"),
        ({**BASE, "event_id": "x" * 129}, "bad_value"),
        ({**BASE, "user_id": "x" * 10_000}, "bad_value"),
        ({**BASE, "type": "Click"}, "bad_value"),
        ({**BASE, "type": "a" * 33}, "bad_value"),
        ({**BASE, "type": ""}, "bad_value"),
        ({**BASE, "ts": True}, "bad_ts"),
        ({**BASE, "ts": -1}, "bad_ts"),
        ({**BASE, "ts": 1.5}, "bad_ts"),
        ({**BASE, "ts": "yesterday"}, "bad_ts"),
        ({**BASE, "ts": "2024-05-01T12:00:00"}, "bad_ts"),  # no offset: ambiguous
        ({**BASE, "ts": "2024-05-01"}, "bad_ts"),
        ({**BASE, "ts": NOW + SKEW + 1}, "future_ts"),
        ({**BASE, "ts": "2999-01-01T00:00:00Z"}, "future_ts"),
        ({**BASE, "value": "5"}, "bad_type"),
        ({**BASE, "value": True}, "bad_type"),
        ({**BASE, "value": 10**400}, "bad_value"),
        ({**BASE, "request_id": ""}, "bad_value"),
        ({**BASE, "request_id": 3}, "bad_type"),
        ({**BASE, "context": [1]}, "bad_context"),
        ({**BASE, "context": {f"k{i}": i for i in range(33)}}, "bad_context"),
        ({**BASE, "context": {"nested": {"a": 1}}}, "bad_context"),
        ({**BASE, "context": {"list": [1]}}, "bad_context"),
        ({**BASE, "context": {"big": 2**64}}, "bad_context"),
    ],
)
def test_field_rules(obj: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        event_from_obj(obj, now_ms=NOW, max_future_skew_ms=SKEW)
    assert info.value.reason == reason
    assert len(str(info.value)) < 400  # a 10k-character id is never echoed back whole


def test_field_level_rules_hold_through_bytes_too() -> None:
    # 10**400 cannot go through orjson.dumps; the rest of the table is exercised on bytes here.
    assert reason_of(orjson.dumps({**BASE, "user_id": "x" * 10_000})) == "bad_value"
    assert reason_of(orjson.dumps(without("ts"))) == "missing_field"


def test_rfc3339_timestamps() -> None:
    assert parse_ts("2023-11-14T22:13:20Z") == 1_700_000_000_000
    assert parse_ts("2023-11-14T22:13:20.123Z") == 1_700_000_000_123
    assert parse_ts("2023-11-15T00:13:20+02:00") == 1_700_000_000_000
    assert parse({**BASE, "ts": "2023-11-14T22:13:19.999Z"}).ts_ms == NOW - 1


def test_the_duplicate_reason_is_registered() -> None:
    assert REASON_DUPLICATE in REASONS and len(set(REASONS)) == len(REASONS)


def test_invalid_event_pickles_with_its_reason() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(InvalidEvent("bad_ts", "detail")))
    assert (error.reason, error.detail) == ("bad_ts", "detail")


ids = st.text(min_size=1, max_size=128)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
events = st.builds(
    Event,
    event_id=ids,
    user_id=ids,
    item_id=ids,
    type=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=32),
    ts_ms=st.integers(0, NOW + SKEW),
    value=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    request_id=st.none() | ids,
    context=st.none() | st.dictionaries(st.text(max_size=10), scalars, max_size=32),
)


@settings(max_examples=400, deadline=None)
@given(events)
def test_round_trip(event: Event) -> None:
    assert parse_event(event.to_json(), now_ms=NOW, max_future_skew_ms=SKEW) == event


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_an_event_or_a_known_reason(raw: bytes) -> None:
    try:
        parse_event(raw, now_ms=NOW, max_future_skew_ms=SKEW)
    except InvalidEvent as exc:
        assert exc.reason in REASONS


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=6)
    ),
    max_leaves=20,
)
near_events = st.fixed_dictionaries(
    {},
    optional={
        key: json_values
        for key in ("event_id", "user_id", "item_id", "type", "ts", "value", "request_id", "context", "x")
    },
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(json_values, near_events))
def test_arbitrary_json_values_never_raise_anything_else(obj: object) -> None:
    try:
        event = event_from_obj(obj, now_ms=NOW, max_future_skew_ms=SKEW)
    except InvalidEvent as exc:
        assert exc.reason in REASONS
    else:
        assert event.value is None or math.isfinite(event.value)
        assert parse_event(event.to_json(), now_ms=NOW, max_future_skew_ms=SKEW) == event

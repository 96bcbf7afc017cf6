"""The event contract: every rule and reason code with an example, and Hypothesis properties of the parser."""

from __future__ import annotations

import dataclasses
import math
import pickle
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freshrec import events
from freshrec.errors import InvalidEvent
from freshrec.events import (
    KNOWN_TYPES,
    MAX_CONTEXT_KEYS,
    MAX_ID_CHARS,
    MAX_MESSAGE_BYTES,
    REASON_DUPLICATE,
    REASONS,
    Event,
    event_from_obj,
    parse_event,
    parse_ts,
)

NOW = 1_700_000_000_000  # 2023-11-14T22:13:20Z
SKEW = 600_000
BASE: dict[str, Any] = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "type": "view", "ts": NOW - 1}
REQUIRED = ("event_id", "user_id", "item_id", "type", "ts")


def parse(obj: object) -> Event:
    return parse_event(orjson.dumps(obj), now_ms=NOW, max_future_skew_ms=SKEW)


def rejection(raw: bytes) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw, now_ms=NOW, max_future_skew_ms=SKEW)
    return info.value


def obj_rejection(obj: object) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        event_from_obj(obj, now_ms=NOW, max_future_skew_ms=SKEW)
    return info.value


def without(field: str) -> dict[str, Any]:
    return {key: value for key, value in BASE.items() if key != field}


# ---------------------------------------------------------------------------- valid events


def test_a_minimal_event() -> None:
    event = parse(BASE)
    assert event == Event("e1", "u1", "i1", "view", NOW - 1)
    assert (event.value, event.request_id, event.context) == (None, None, None)


def test_a_valid_event_with_every_optional_field() -> None:
    context: dict[str, Any] = {"a": "x", "b": 1, "c": 2.5, "d": True, "e": None}
    event = parse({**BASE, "value": 4, "request_id": "r1", "context": context})
    assert event == Event("e1", "u1", "i1", "view", NOW - 1, 4.0, "r1", context)
    assert type(event.value) is float  # an integer value is widened, so consumers see one type
    assert parse_event(event.to_json(), now_ms=NOW, max_future_skew_ms=SKEW) == event


def test_parsed_events_are_ordinary_frozen_events() -> None:
    event = parse({**BASE, "value": 3.0})
    assert type(event) is Event and dataclasses.is_dataclass(event)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.user_id = "someone else"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(event)) == event
    assert hash(event) == hash(Event("e1", "u1", "i1", "view", NOW - 1, 3.0))
    assert repr(event).startswith("Event(event_id='e1', user_id='u1'")
    assert dataclasses.replace(event, value=1.0).value == 1.0


def test_to_dict_is_the_contract_shape() -> None:
    assert Event("e", "u", "i", "click", 5).to_dict() == {
        "event_id": "e",
        "user_id": "u",
        "item_id": "i",
        "type": "click",
        "ts": 5,
    }
    full = Event("e", "u", "i", "click", 5, 1.5, "r", {"k": 1})
    assert full.to_dict() == {
        "event_id": "e",
        "user_id": "u",
        "item_id": "i",
        "type": "click",
        "ts": 5,
        "value": 1.5,
        "request_id": "r",
        "context": {"k": 1},
    }
    assert orjson.loads(full.to_json()) == full.to_dict()


def test_null_optional_fields_count_as_absent() -> None:
    assert parse({**BASE, "value": None, "request_id": None, "context": None}) == parse(BASE)


@pytest.mark.parametrize(
    "changes",
    [
        {"event_id": "x" * MAX_ID_CHARS, "user_id": "é" * MAX_ID_CHARS, "request_id": "r" * MAX_ID_CHARS},
        {"type": "add_to_cart"},  # well-formed but unknown types are accepted
        {"type": "a" * 32},
        {"ts": 0},
        {"ts": NOW + SKEW},  # exactly at the skew limit
        {"ts": "2023-11-14T22:13:20Z"},
        {"value": 0},
        {"value": -1e300},
        {"context": {}},
        {"context": {f"k{i}": i for i in range(MAX_CONTEXT_KEYS)}},
        {"context": {"min": -(2**63), "max": 2**64 - 1, "s": "x" * 1000}},
    ],
)
def test_boundary_values_are_accepted(changes: dict[str, Any]) -> None:
    event = parse({**BASE, **changes})
    assert parse_event(event.to_json(), now_ms=NOW, max_future_skew_ms=SKEW) == event


def test_a_message_of_exactly_the_size_limit_is_accepted() -> None:
    skeleton = len(orjson.dumps({**BASE, "context": {"pad": ""}}))
    raw = orjson.dumps({**BASE, "context": {"pad": "x" * (MAX_MESSAGE_BYTES - skeleton)}})
    assert len(raw) == MAX_MESSAGE_BYTES
    assert parse_event(raw, now_ms=NOW, max_future_skew_ms=SKEW).event_id == "e1"
    assert rejection(raw[:-2] + b'x"}}').reason == "too_large"


def test_known_types() -> None:
    assert frozenset({"view", "click", "purchase", "rating", "impression", "skip"}) == KNOWN_TYPES
    for kind in KNOWN_TYPES:
        assert parse({**BASE, "type": kind}).type == kind


# ---------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b" " * (MAX_MESSAGE_BYTES + 1), "too_large"),
        (orjson.dumps({**BASE, "context": {"pad": "x" * MAX_MESSAGE_BYTES}}), "too_large"),
        (b"\xff\xfe", "invalid_utf8"),
        (b'{"event_id": "\xff"}', "invalid_utf8"),
        (b'{"event_id": "\xed\xa0\x80"}', "invalid_utf8"),  # a lone surrogate, encoded as UTF-8 bytes
        (b"not json", "not_json"),
        (b"", "not_json"),
        (b'{"event_id": "e1",}', "not_json"),
        (b'{"event_id": "\\ud800"}', "not_json"),  # a lone surrogate as a JSON escape
        (b'{"event_id":"e","user_id":"u","item_id":"i","type":"view","ts":1,"value":NaN}', "not_json"),
        (b'{"event_id":"e","user_id":"u","item_id":"i","type":"view","ts":1,"value":Infinity}', "not_json"),
        (b'{"event_id":"e","user_id":"u","item_id":"i","type":"view","ts":1,"value":-Infinity}', "not_json"),
        (b'{"event_id":"e","user_id":"u","item_id":"i","type":"view","ts":1,"value":1e400}', "not_json"),
        (b"[1,2]", "not_object"),
        (b"[]", "not_object"),
        (b"null", "not_object"),
        (b"42", "not_object"),
        (b'"an event"', "not_object"),
    ],
)
def test_message_level_rejections(raw: bytes, reason: str) -> None:
    assert rejection(raw).reason == reason


BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    *[(without(field), "missing_field") for field in REQUIRED],
    ({}, "missing_field"),
    ({**BASE, "extra": 1}, "unknown_field"),
    ({**without("item_id"), "item": "i1"}, "unknown_field"),  # a typo is named, not reported as missing
    ({**BASE, "value": None, "Value": 3}, "unknown_field"),
    *[({**BASE, field: 7}, "bad_type") for field in ("event_id", "user_id", "item_id", "type")],
    *[({**BASE, field: None}, "bad_type") for field in ("event_id", "user_id", "item_id", "type")],
    ({**BASE, "user_id": ["u1"]}, "bad_type"),
    ({**BASE, "item_id": True}, "bad_type"),
    ({**BASE, "type": ["view"]}, "bad_type"),
    ({**BASE, "type": {"view": 1}}, "bad_type"),
    ({**BASE, "event_id": ""}, "bad_value"),
    ({**BASE, "event_id": "x" * (MAX_ID_CHARS + 1)}, "bad_value"),
    ({**BASE, "user_id": "x" * 10_000}, "bad_value"),
    ({**BASE, "type": "Click"}, "bad_value"),
    ({**BASE, "type": "view-1"}, "bad_value"),
    ({**BASE, "type": "vïew"}, "bad_value"),
    ({**BASE, "type": "a" * 33}, "bad_value"),
    ({**BASE, "type": ""}, "bad_value"),
    ({**BASE, "ts": True}, "bad_ts"),
    ({**BASE, "ts": False}, "bad_ts"),
    ({**BASE, "ts": None}, "bad_ts"),
    ({**BASE, "ts": -1}, "bad_ts"),
    ({**BASE, "ts": 1.5}, "bad_ts"),
    ({**BASE, "ts": 1_700_000_000_000.0}, "bad_ts"),
    ({**BASE, "ts": [NOW]}, "bad_ts"),
    ({**BASE, "ts": "yesterday"}, "bad_ts"),
    ({**BASE, "ts": str(NOW)}, "bad_ts"),
    ({**BASE, "ts": "2023-11-14T22:13:20"}, "bad_ts"),  # no offset: ambiguous
    ({**BASE, "ts": "2023-11-14"}, "bad_ts"),
    ({**BASE, "ts": "2023-11-14T22:13:20+0200"}, "bad_ts"),  # ISO 8601 basic offset, not RFC 3339
    ({**BASE, "ts": "20231114T221320Z"}, "bad_ts"),
    ({**BASE, "ts": "2023-11-14T22:13Z"}, "bad_ts"),
    ({**BASE, "ts": "2023-13-14T22:13:20Z"}, "bad_ts"),
    ({**BASE, "ts": "2023-02-30T22:13:20Z"}, "bad_ts"),
    ({**BASE, "ts": "2023-11-14T24:13:20Z"}, "bad_ts"),
    ({**BASE, "ts": "2023-11-14T22:13:61Z"}, "bad_ts"),
    ({**BASE, "ts": "2023-11-14T22:13:20+24:00"}, "bad_ts"),
    ({**BASE, "ts": "1969-12-31T23:59:59Z"}, "bad_ts"),
    ({**BASE, "ts": "\uff12\uff10\uff12\uff13-11-14T22:13:20Z"}, "bad_ts"),  # fullwidth digits
    ({**BASE, "ts": "2023-11-14T22:13:20Z" + " " * 100}, "bad_ts"),
    ({**BASE, "ts": NOW + SKEW + 1}, "future_ts"),
    ({**BASE, "ts": 10**30}, "future_ts"),
    ({**BASE, "ts": "2999-01-01T00:00:00Z"}, "future_ts"),
    ({**BASE, "value": "5"}, "bad_type"),
    ({**BASE, "value": True}, "bad_type"),
    ({**BASE, "value": [5]}, "bad_type"),
    ({**BASE, "value": {"v": 5}}, "bad_type"),
    ({**BASE, "value": math.nan}, "bad_value"),
    ({**BASE, "value": math.inf}, "bad_value"),
    ({**BASE, "value": 10**400}, "bad_value"),
    ({**BASE, "request_id": ""}, "bad_value"),
    ({**BASE, "request_id": "r" * (MAX_ID_CHARS + 1)}, "bad_value"),
    ({**BASE, "request_id": 3}, "bad_type"),
    ({**BASE, "context": [1]}, "bad_context"),
    ({**BASE, "context": "k=v"}, "bad_context"),
    ({**BASE, "context": {f"k{i}": i for i in range(MAX_CONTEXT_KEYS + 1)}}, "bad_context"),
    ({**BASE, "context": {"nested": {"a": 1}}}, "bad_context"),
    ({**BASE, "context": {"list": [1]}}, "bad_context"),
    ({**BASE, "context": {"big": 2**64}}, "bad_context"),
    ({**BASE, "context": {"small": -(2**63) - 1}}, "bad_context"),
    ({**BASE, "context": {"nan": math.nan}}, "bad_context"),
    ({**BASE, "context": {1: "non-string key"}}, "bad_context"),
]


@pytest.mark.parametrize(("obj", "reason"), BAD_FIELDS)
def test_field_rules_on_decoded_objects(obj: dict[str, Any], reason: str) -> None:
    error = obj_rejection(obj)
    assert error.reason == reason
    assert error.reason in REASONS
    assert len(error.detail) < 300  # a 10k-character id is never echoed back whole


def _has_json_form(obj: dict[str, Any]) -> bool:
    """Whether obj survives JSON: not NaN or infinity (orjson writes null), huge ints or int keys."""
    try:
        return bool(orjson.loads(orjson.dumps(obj)) == obj)
    except orjson.JSONEncodeError:
        return False


@pytest.mark.parametrize(
    ("obj", "reason"), [(obj, reason) for obj, reason in BAD_FIELDS if _has_json_form(obj)]
)
def test_field_rules_hold_on_message_bytes_too(obj: dict[str, Any], reason: str) -> None:
    assert rejection(orjson.dumps(obj)).reason == reason


def test_strings_that_cannot_be_encoded_are_rejected_on_the_object_path() -> None:
    # A lenient decoder (the stdlib json module) turns "\ud800" into a lone surrogate; orjson cannot.
    assert obj_rejection({**BASE, "user_id": "u\ud800"}).reason == "invalid_utf8"
    assert obj_rejection({**BASE, "request_id": "\udfff"}).reason == "invalid_utf8"
    assert obj_rejection({**BASE, "context": {"k": "\ud800"}}).reason == "invalid_utf8"
    assert obj_rejection({**BASE, "context": {"\ud800": 1}}).reason == "invalid_utf8"


def test_the_input_object_is_not_modified() -> None:
    obj = {**BASE, "value": 2, "context": {"a": 1}}
    copy = orjson.loads(orjson.dumps(obj))
    event_from_obj(obj, now_ms=NOW, max_future_skew_ms=SKEW)
    assert obj == copy


# ---------------------------------------------------------------------------- detail sentences


@pytest.mark.parametrize(
    ("obj", "detail"),
    [
        (
            {**BASE, "user_id": "x" * 200},
            "field 'user_id' must be a string of 1-128 characters, got 200 characters",
        ),
        ({**BASE, "user_id": 7}, "field 'user_id' must be a string, got a number"),
        ({**BASE, "value": True}, "field 'value' must be a number, got a boolean"),
        ({**BASE, "type": "Click"}, "field 'type' must match [a-z_]{1,32}, got 'Click'"),
        (without("ts"), "required field 'ts' is missing; required: event_id, user_id, item_id, type, ts"),
        (
            {"event_id": "e"},
            "required fields 'user_id', 'item_id', 'type', 'ts' are missing; "
            "required: event_id, user_id, item_id, type, ts",
        ),
        ([BASE], "an event must be a JSON object, got an array"),
        (
            {**BASE, "ts": NOW + SKEW + 1},
            f"field 'ts' is 600,001 ms after the reference time {NOW}; at most 600,000 ms ahead is allowed",
        ),
        (
            {**BASE, "context": {f"k{i}": i for i in range(33)}},
            "field 'context' has 33 keys; at most 32 are allowed",
        ),
    ],
)
def test_detail_sentences_name_the_field_and_the_rule(obj: object, detail: str) -> None:
    assert obj_rejection(obj).detail == detail


def test_unknown_fields_are_named_with_the_remedy() -> None:
    detail = obj_rejection({**without("item_id"), "item": "i1"}).detail
    assert detail.startswith("unknown field 'item'; allowed: context, event_id, item_id,")
    assert "put extra data in 'context'" in detail
    assert obj_rejection({**BASE, "a": 1, "b": 2}).detail.startswith("unknown fields 'a', 'b'; ")


@pytest.mark.parametrize(
    "obj",
    [
        {**BASE, "ts": "9" * 10_000},
        {**BASE, "type": "X" * 10_000},
        {**BASE, "y" * 10_000: 1},
        {**BASE, **{f"unknown{i}": i for i in range(1_000)}},
        {**BASE, "context": {"k" * 10_000: [1]}},
    ],
)
def test_huge_values_are_never_echoed_whole(obj: dict[str, Any]) -> None:
    assert len(obj_rejection(obj).detail) < 300


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({**BASE, "ts": 10**5000}, "future_ts"),
        ({**BASE, "ts": -(10**5000)}, "bad_ts"),
        ({**BASE, "value": 10**5000}, "bad_value"),
        ({**BASE, "context": {"k": 10**5000}}, "bad_context"),
        ({**BASE, 10**5000: 1}, "unknown_field"),
        ({**BASE, (10**5000,): 1}, "unknown_field"),
    ],
)
def test_integers_too_long_for_str_are_described_not_printed(obj: dict[Any, Any], reason: str) -> None:
    # Python refuses str() of an int over 4,300 digits; the detail must not trip on that.
    error = obj_rejection(obj)
    assert (error.reason, len(error.detail) < 300) == (reason, True)


def test_message_level_details() -> None:
    assert rejection(b" " * 70_000).detail == "message is 70,000 bytes; the limit is 65,536 bytes"
    assert rejection(b"\xff\xfe").detail == "message is not valid UTF-8: invalid start byte at byte 0"
    assert rejection(b"{" * 50_000).detail.startswith("message is not valid JSON: ")
    assert len(rejection(b"[" * 50_000).detail) < 300


# ---------------------------------------------------------------------------- timestamps


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("2023-11-14T22:13:20Z", NOW),
        ("2023-11-14T22:13:20.123Z", NOW + 123),
        ("2023-11-14T22:13:20.5Z", NOW + 500),
        ("2023-11-14T22:13:20.123999999Z", NOW + 123),  # sub-millisecond digits are truncated
        ("2023-11-15T00:13:20+02:00", NOW),
        ("2023-11-14T16:43:20-05:30", NOW),
        ("2023-11-14T22:13:20-00:00", NOW),
        ("2023-11-14t22:13:20z", NOW),  # RFC 3339 §5.6: T and Z may be lower case
        ("2023-11-14 22:13:20Z", NOW),  # ... and a space may separate date and time
        ("1970-01-01T00:00:00Z", 0),
        ("1970-01-01T01:00:00+01:00", 0),
        ("2016-12-31T23:59:60Z", 1_483_228_800_000),  # a leap second reads as the next second's start
        ("9999-12-31T23:59:59-23:59", 253_402_300_799_000 + 1_439 * 60_000),
    ],
)
def test_rfc3339_timestamps(text: str, ms: int) -> None:
    assert parse_ts(text) == ms


def test_rfc3339_timestamps_through_the_parser() -> None:
    assert parse({**BASE, "ts": "2023-11-14T22:13:19.999Z"}).ts_ms == NOW - 1
    assert parse({**BASE, "ts": "2023-11-15T00:13:19+02:00"}).ts_ms == NOW - 1_000
    assert parse({**BASE, "ts": "2023-11-14T22:13:20Z"}).to_dict()["ts"] == NOW  # always integer ms out


@pytest.mark.parametrize("value", [True, False, None, -1, 1.0, "2023-11-14T22:13:20", "", [1], {"ms": 1}])
def test_parse_ts_rejects_with_bad_ts(value: object) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_ts(value)
    assert info.value.reason == "bad_ts"
    assert info.value.detail.startswith("field 'ts' ")


def test_parse_ts_passes_integer_ms_through() -> None:
    assert parse_ts(0) == 0
    assert parse_ts(NOW) == NOW


# ---------------------------------------------------------------------------- the reason codes


def test_every_reason_code_is_a_constant_in_reasons() -> None:
    constants = {name: value for name, value in vars(events).items() if name.startswith("REASON_")}
    assert set(constants.values()) == set(REASONS)
    assert len(set(REASONS)) == len(REASONS)
    assert REASON_DUPLICATE == "duplicate_event_id"
    assert set(REASONS) == {
        "too_large",
        "invalid_utf8",
        "not_json",
        "not_object",
        "missing_field",
        "unknown_field",
        "bad_type",
        "bad_value",
        "bad_ts",
        "future_ts",
        "bad_context",
        "duplicate_event_id",
    }
    assert all(name in events.__all__ for name in constants)


def test_invalid_event_pickles_with_its_reason() -> None:
    error = pickle.loads(pickle.dumps(obj_rejection(without("ts"))))
    assert (error.reason, error.detail) == ("missing_field", obj_rejection(without("ts")).detail)


# ---------------------------------------------------------------------------- properties

ids = st.text(min_size=1, max_size=MAX_ID_CHARS)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
valid_events = st.builds(
    Event,
    event_id=ids,
    user_id=ids,
    item_id=ids,
    type=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=32),
    ts_ms=st.integers(0, NOW + SKEW),
    value=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    request_id=st.none() | ids,
    context=st.none() | st.dictionaries(st.text(max_size=10), scalars, max_size=MAX_CONTEXT_KEYS),
)


@settings(max_examples=300, deadline=None)
@given(valid_events)
def test_round_trip(event: Event) -> None:
    raw = event.to_json()
    assert parse_event(raw, now_ms=NOW, max_future_skew_ms=SKEW) == event
    assert event_from_obj(orjson.loads(raw), now_ms=NOW, max_future_skew_ms=SKEW) == event


def _check_bytes(raw: bytes) -> None:
    try:
        event = parse_event(raw, now_ms=NOW, max_future_skew_ms=SKEW)
    except InvalidEvent as exc:
        assert exc.reason in REASONS
        assert exc.reason != REASON_DUPLICATE
        assert exc.detail and len(exc.detail) < 400
    else:
        assert type(event) is Event
        assert parse_event(event.to_json(), now_ms=NOW, max_future_skew_ms=SKEW) == event


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_an_event_or_a_known_reason(raw: bytes) -> None:
    _check_bytes(raw)


@settings(max_examples=300, deadline=None)
@given(valid_events, st.data())
def test_damaged_messages_give_an_event_or_a_known_reason(event: Event, data: st.DataObject) -> None:
    raw = event.to_json()
    start = data.draw(st.integers(0, len(raw)))
    end = data.draw(st.integers(start, min(len(raw), start + 8)))
    _check_bytes(raw[:start] + data.draw(st.binary(max_size=8)) + raw[end:])


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
        key: json_values | scalars
        for key in ("event_id", "user_id", "item_id", "type", "ts", "value", "request_id", "context", "item")
    },
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(json_values, near_events, valid_events.map(Event.to_dict)))
def test_arbitrary_json_values_never_raise_anything_else(obj: object) -> None:
    try:
        event = event_from_obj(obj, now_ms=NOW, max_future_skew_ms=SKEW)
    except InvalidEvent as exc:
        assert exc.reason in REASONS
        assert exc.detail and len(exc.detail) < 400
    else:
        assert event.value is None or math.isfinite(event.value)
        assert parse_event(event.to_json(), now_ms=NOW, max_future_skew_ms=SKEW) == event


finite_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=6)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        finite_json,
        st.fixed_dictionaries({}, optional=dict.fromkeys((*REQUIRED, "value", "context", "x"), finite_json)),
        valid_events.map(Event.to_dict),
    )
)
def test_bytes_and_object_paths_agree(obj: object) -> None:
    """The HTTP API (objects) and the sink (bytes) accept and reject exactly the same events."""

    def outcome(run: Any) -> object:
        try:
            return run()
        except InvalidEvent as exc:
            return exc.reason

    from_bytes = outcome(lambda: parse_event(orjson.dumps(obj), now_ms=NOW, max_future_skew_ms=SKEW))
    from_obj = outcome(lambda: event_from_obj(obj, now_ms=NOW, max_future_skew_ms=SKEW))
    assert from_bytes == from_obj

"""The event contract (DESIGN.md §2): raw Kafka bytes in, a typed :class:`Event` or a precise rejection out.

This runs once per message on the ingest hot path, so it is written for speed: orjson decodes,
then plain type and length checks on the resulting dict; no pydantic, no regex on the common path.
A rejection is an :class:`~freshrec.errors.InvalidEvent` carrying a stable ``reason`` code (for
dashboards and the ``dead_letters`` table) and a ``detail`` sentence that names the field and the
rule, never echoing more than a short prefix of the offending value.

>>> e = parse_event(b'{"event_id":"e1","user_id":"u","item_id":"i","type":"view","ts":1000}',
...                 now_ms=2000, max_future_skew_ms=0)
>>> (e.user_id, e.item_id, e.type, e.ts_ms)
('u', 'i', 'view', 1000)
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple

import orjson

from freshrec.errors import InvalidEvent

__all__ = [
    "KNOWN_TYPES",
    "MAX_CONTEXT_KEYS",
    "MAX_ID_CHARS",
    "MAX_MESSAGE_BYTES",
    "MAX_TYPE_CHARS",
    "REASONS",
    "REASON_BAD_CONTEXT",
    "REASON_BAD_TS",
    "REASON_BAD_TYPE",
    "REASON_BAD_VALUE",
    "REASON_DUPLICATE",
    "REASON_FUTURE_TS",
    "REASON_INVALID_UTF8",
    "REASON_MISSING_FIELD",
    "REASON_NOT_JSON",
    "REASON_NOT_OBJECT",
    "REASON_TOO_LARGE",
    "REASON_UNKNOWN_FIELD",
    "ContextValue",
    "Event",
    "event_from_obj",
    "parse_event",
    "parse_ts",
]

KNOWN_TYPES: Final = frozenset({"view", "click", "purchase", "rating", "impression", "skip"})
MAX_MESSAGE_BYTES: Final = 65_536
MAX_ID_CHARS: Final = 128
MAX_TYPE_CHARS: Final = 32
MAX_CONTEXT_KEYS: Final = 32

REASON_TOO_LARGE: Final = "too_large"
REASON_INVALID_UTF8: Final = "invalid_utf8"
REASON_NOT_JSON: Final = "not_json"
REASON_NOT_OBJECT: Final = "not_object"
REASON_MISSING_FIELD: Final = "missing_field"
REASON_UNKNOWN_FIELD: Final = "unknown_field"
REASON_BAD_TYPE: Final = "bad_type"
REASON_BAD_VALUE: Final = "bad_value"
REASON_BAD_TS: Final = "bad_ts"
REASON_FUTURE_TS: Final = "future_ts"
REASON_BAD_CONTEXT: Final = "bad_context"
REASON_DUPLICATE: Final = "duplicate_event_id"  # decided by the sink, which remembers ids
REASONS: Final = (
    REASON_TOO_LARGE, REASON_INVALID_UTF8, REASON_NOT_JSON, REASON_NOT_OBJECT, REASON_MISSING_FIELD,
    REASON_UNKNOWN_FIELD, REASON_BAD_TYPE, REASON_BAD_VALUE, REASON_BAD_TS, REASON_FUTURE_TS,
    REASON_BAD_CONTEXT, REASON_DUPLICATE,
)  # fmt: skip

ContextValue = str | int | float | bool | None

_REQUIRED: Final = ("event_id", "user_id", "item_id", "type", "ts")
_ALLOWED: Final = frozenset({*_REQUIRED, "value", "request_id", "context"})
_TYPE_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz_")
_loads = orjson.loads
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)


class Event(NamedTuple):
    """One valid event. ``ts_ms`` is event time in milliseconds since the epoch, UTC.

    A NamedTuple rather than a frozen dataclass: it is built once per message on the hot path, and
    a frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field) costs several times more.
    """

    event_id: str
    user_id: str
    item_id: str
    type: str
    ts_ms: int
    value: float | None = None
    request_id: str | None = None
    context: dict[str, ContextValue] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The contract's JSON shape: ``ts`` as integer ms; optional fields omitted when unset."""
        out: dict[str, Any] = {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "item_id": self.item_id,
            "type": self.type,
            "ts": self.ts_ms,
        }
        if self.value is not None:
            out["value"] = self.value
        if self.request_id is not None:
            out["request_id"] = self.request_id
        if self.context is not None:
            out["context"] = self.context
        return out

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


def parse_event(raw: bytes, *, now_ms: int, max_future_skew_ms: int) -> Event:
    """Decode and validate one message; raise :class:`InvalidEvent` naming the first broken rule."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidEvent(
            REASON_TOO_LARGE, f"message is {len(raw):,} bytes; the limit is {MAX_MESSAGE_BYTES:,}"
        )
    try:
        obj = _loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")  # only on the error path: tell bad encoding from bad JSON
        except UnicodeDecodeError as utf8:
            raise InvalidEvent(
                REASON_INVALID_UTF8, f"message is not valid UTF-8 (byte {utf8.start}: {utf8.reason})"
            ) from exc
        raise InvalidEvent(REASON_NOT_JSON, f"message is not JSON: {_short(str(exc))}") from exc
    return event_from_obj(obj, now_ms=now_ms, max_future_skew_ms=max_future_skew_ms)


def event_from_obj(obj: object, *, now_ms: int, max_future_skew_ms: int) -> Event:
    """Validate an already-decoded JSON value (the HTTP API's path); raise :class:`InvalidEvent`."""
    if type(obj) is not dict:
        raise InvalidEvent(REASON_NOT_OBJECT, f"an event must be a JSON object, got {_json_kind(obj)}")
    if len(obj) > 8 or not obj.keys() <= _ALLOWED:
        unknown = sorted(str(key) for key in obj if key not in _ALLOWED)
        if unknown:
            raise InvalidEvent(
                REASON_UNKNOWN_FIELD,
                f"unknown field(s) {_short(', '.join(map(repr, unknown)))}; allowed: "
                f"{', '.join(sorted(_ALLOWED))} (put extra data in 'context')",
            )
    try:
        event_id = obj["event_id"]
        user_id = obj["user_id"]
        item_id = obj["item_id"]
        type_ = obj["type"]
        ts = obj["ts"]
    except KeyError:
        missing = [field for field in _REQUIRED if field not in obj]
        raise InvalidEvent(REASON_MISSING_FIELD, f"required field(s) missing: {', '.join(missing)}") from None
    # Inline fast checks; the helpers that build the error message run only on failure.
    if type(event_id) is not str or not 0 < len(event_id) <= MAX_ID_CHARS:
        _check_id("event_id", event_id)
    if type(user_id) is not str or not 0 < len(user_id) <= MAX_ID_CHARS:
        _check_id("user_id", user_id)
    if type(item_id) is not str or not 0 < len(item_id) <= MAX_ID_CHARS:
        _check_id("item_id", item_id)
    if type(type_) is not str or type_ not in KNOWN_TYPES:
        if type(type_) is not str:
            raise InvalidEvent(REASON_BAD_TYPE, f"field 'type' must be a string, got {_json_kind(type_)}")
        if not 0 < len(type_) <= MAX_TYPE_CHARS or not _TYPE_CHARS.issuperset(type_):
            raise InvalidEvent(
                REASON_BAD_VALUE, f"field 'type' must match [a-z_]{{1,32}}, got {_short(repr(type_))}"
            )
    ts_ms = ts if type(ts) is int and ts >= 0 else parse_ts(ts)
    if ts_ms > now_ms + max_future_skew_ms:
        raise InvalidEvent(
            REASON_FUTURE_TS,
            f"field 'ts' is {ts_ms - now_ms:,} ms in the future; "
            f"at most {max_future_skew_ms:,} ms is allowed",
        )
    value = obj.get("value")
    if value is not None and (type(value) is not float or not math.isfinite(value)):
        value = _check_value(value)
    request_id = obj.get("request_id")
    if request_id is not None:
        _check_id("request_id", request_id)
    context = obj.get("context")
    if context is not None:
        _check_context(context)
    return Event(event_id, user_id, item_id, type_, ts_ms, value, request_id, context)


def parse_ts(value: object) -> int:
    """Event time to integer ms: an integer ms ≥ 0, or an RFC 3339 string carrying an offset (or Z)."""
    if type(value) is int:
        if value >= 0:
            return value
        raise InvalidEvent(REASON_BAD_TS, f"field 'ts' must be ≥ 0 ms since the epoch, got {value}")
    if type(value) is str:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is None or parsed.tzinfo is None or "T" not in value.upper() or len(value) > 40:
            raise InvalidEvent(
                REASON_BAD_TS,
                f"field 'ts' string must be RFC 3339 with an offset, e.g. 2024-05-01T12:00:00Z; "
                f"got {_short(repr(value))}",
            )
        ms = (parsed - _EPOCH) // _ONE_MS  # integer arithmetic: exact, unlike float timestamp()
        if ms < 0:
            raise InvalidEvent(REASON_BAD_TS, f"field 'ts' is before 1970: {_short(repr(value))}")
        return ms
    raise InvalidEvent(
        REASON_BAD_TS, f"field 'ts' must be integer ms or an RFC 3339 string, got {_json_kind(value)}"
    )


# ---------------------------------------------------------------------------- checks


def _check_id(field: str, value: object) -> None:
    if type(value) is not str:
        raise InvalidEvent(REASON_BAD_TYPE, f"field {field!r} must be a string, got {_json_kind(value)}")
    if not 0 < len(value) <= MAX_ID_CHARS:
        raise InvalidEvent(
            REASON_BAD_VALUE,
            f"field {field!r} must be a string of 1-{MAX_ID_CHARS} characters, got {len(value):,} characters",
        )


def _check_value(value: object) -> float:
    kind = type(value)
    if kind is float:
        if math.isfinite(value):  # type: ignore[arg-type]
            return value  # type: ignore[return-value]
        raise InvalidEvent(REASON_BAD_VALUE, f"field 'value' must be finite, got {value}")
    if kind is int:
        try:
            return float(value)  # type: ignore[arg-type]
        except OverflowError:
            raise InvalidEvent(REASON_BAD_VALUE, "field 'value' is too large for a 64-bit float") from None
    raise InvalidEvent(REASON_BAD_TYPE, f"field 'value' must be a number, got {_json_kind(value)}")


def _check_context(context: object) -> None:
    if type(context) is not dict:
        raise InvalidEvent(
            REASON_BAD_CONTEXT, f"field 'context' must be an object, got {_json_kind(context)}"
        )
    if len(context) > MAX_CONTEXT_KEYS:
        raise InvalidEvent(
            REASON_BAD_CONTEXT, f"field 'context' has {len(context)} keys; at most {MAX_CONTEXT_KEYS} allowed"
        )
    for key, value in context.items():
        kind = type(value)
        if kind is dict or kind is list:
            raise InvalidEvent(
                REASON_BAD_CONTEXT,
                f"context key {_short(repr(key))} holds {_json_kind(value)}; values must be scalars",
            )
        if kind is float and not math.isfinite(value):
            raise InvalidEvent(REASON_BAD_CONTEXT, f"context key {_short(repr(key))} is not finite")
        if kind is int and not -(2**63) <= value < 2**64:
            raise InvalidEvent(REASON_BAD_CONTEXT, f"context key {_short(repr(key))} overflows 64 bits")


def _json_kind(value: object) -> str:
    kind = type(value)
    if value is None:
        return "null"
    if kind is bool:
        return "a boolean"
    if kind is int or kind is float:
        return "a number"
    if kind is str:
        return "a string"
    if kind is list:
        return "an array"
    if kind is dict:
        return "an object"
    return kind.__name__


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""The event contract: raw Kafka bytes in, a typed :class:`Event` or a precise rejection out.

This runs once per message on the ingest hot path, so it is written for speed: orjson decodes, then
plain type and length checks run on the resulting dict, and error messages are only built on failure;
no pydantic, no regex unless ``ts`` is a string. A rejection is an :class:`~freshrec.errors.InvalidEvent`
carrying a stable ``reason`` code (for dashboards and the ``dead_letters`` table, one of
:data:`REASONS`) and a ``detail`` sentence that names the field and the rule, never echoing more than
a short prefix of the offending value.

Validation is a pure function of the message and ``now_ms``: the sink passes the broker's append time,
so a replay after a crash classifies every message exactly as the first pass did.

>>> e = parse_event(b'{"event_id":"e1","user_id":"u","item_id":"i","type":"view","ts":1000}',
...                 now_ms=2000, max_future_skew_ms=0)
>>> (e.user_id, e.item_id, e.type, e.ts_ms)
('u', 'i', 'view', 1000)
>>> parse_event(b'{"event_id":"e1","user_id":"u","item":"i","type":"view","ts":1000}',
...             now_ms=2000, max_future_skew_ms=0)
Traceback (most recent call last):
...
freshrec.errors.InvalidEvent: unknown_field: unknown field 'item'; allowed: context, event_id, item_id, \
request_id, ts, type, user_id, value (put extra data in 'context')
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, NoReturn

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

KNOWN_TYPES: Final[frozenset[str]] = frozenset({"view", "click", "purchase", "rating", "impression", "skip"})
"""The types freshrec's heads know. Informational: any type matching ``[a-z_]{1,32}`` is accepted."""
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
REASON_DUPLICATE: Final = "duplicate_event_id"
"""Decided by the sink, which remembers recent ids; the validator never raises it."""
REASONS: Final = (
    REASON_TOO_LARGE,
    REASON_INVALID_UTF8,
    REASON_NOT_JSON,
    REASON_NOT_OBJECT,
    REASON_MISSING_FIELD,
    REASON_UNKNOWN_FIELD,
    REASON_BAD_TYPE,
    REASON_BAD_VALUE,
    REASON_BAD_TS,
    REASON_FUTURE_TS,
    REASON_BAD_CONTEXT,
    REASON_DUPLICATE,
)
"""Every reason code an event can be dead-lettered with."""

ContextValue = str | int | float | bool | None
"""A value in an event's ``context``: a JSON scalar."""

_REQUIRED: Final = ("event_id", "user_id", "item_id", "type", "ts")
_ALLOWED: Final = frozenset({*_REQUIRED, "value", "request_id", "context"})
_TYPE_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz_")
_DETAIL_CHARS: Final = 80
# orjson.dumps writes ints in [-2**63, 2**64); a context int outside it could never be re-encoded.
_INT_MIN: Final = -(2**63)
_INT_END: Final = 2**64
_RFC3339: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)
_EPOCH: Final = datetime(1970, 1, 1)
_ONE_MS: Final = timedelta(milliseconds=1)
_loads = orjson.loads
_isfinite = math.isfinite


@dataclass(frozen=True, slots=True)
class Event:
    """One valid event. ``ts_ms`` is event time in milliseconds since the epoch, UTC.

    Immutable, because one event is handed to several consumers (the sink, every head). Build one
    directly for tests and examples; messages become events through :func:`parse_event`.

    >>> Event("e1", "u1", "i1", "rating", 1_000, 4.0).to_json()
    b'{"event_id":"e1","user_id":"u1","item_id":"i1","type":"rating","ts":1000,"value":4.0}'
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
        """The event as a message value: :meth:`to_dict` encoded by orjson, which parses back equal."""
        return orjson.dumps(self.to_dict())


class _UnfrozenEvent:
    """:class:`Event`'s slot layout without its frozen guard, so that the hot path can fill one cheaply.

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``: ~0.85 µs for
    eight fields on CPython 3.11, more than orjson takes to decode the whole message. Filling this
    twin with plain slot stores and then switching its ``__class__`` to :class:`Event` costs ~0.15 µs
    and yields an ordinary, immutable Event. CPython allows the switch between classes of identical
    layout; the twin takes its slots from Event, so the two cannot drift apart (and if they did, the
    switch would raise ``TypeError`` on the first event, not corrupt it).
    """

    __slots__ = Event.__slots__
    event_id: str
    user_id: str
    item_id: str
    type: str
    ts_ms: int
    value: float | None
    request_id: str | None
    context: dict[str, ContextValue] | None


def parse_event(raw: bytes, *, now_ms: int, max_future_skew_ms: int) -> Event:
    """Decode and validate one message value; raise :class:`InvalidEvent` naming the first broken rule.

    ``now_ms`` is the reference time for the future-skew rule: ``ts`` may be at most
    ``max_future_skew_ms`` after it.
    """
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidEvent(
            REASON_TOO_LARGE, f"message is {len(raw):,} bytes; the limit is {MAX_MESSAGE_BYTES:,} bytes"
        )
    try:
        obj = _loads(raw)
    except orjson.JSONDecodeError as exc:
        _reject_undecodable(raw, exc)
    return _validate(obj, now_ms, max_future_skew_ms)


def event_from_obj(obj: object, *, now_ms: int, max_future_skew_ms: int) -> Event:
    """Validate an already-decoded JSON value (the HTTP API's path); raise :class:`InvalidEvent`.

    Beyond :func:`parse_event`'s rules, this also rejects what a lenient JSON decoder can produce but
    orjson cannot (strings with lone surrogates, non-string keys), so every event it returns encodes.
    """
    event = _validate(obj, now_ms, max_future_skew_ms)
    for field in ("event_id", "user_id", "item_id", "type", "request_id"):
        _check_encodable(field, getattr(event, field))
    if event.context is not None:
        for key, value in event.context.items():
            _check_encodable("context", key)
            _check_encodable("context", value)
    return event


def parse_ts(value: object) -> int:
    """Event time as integer ms since the epoch: an integer ms ≥ 0, or an RFC 3339 string with an offset.

    The offset (``Z`` or ``±HH:MM``) is required, since a local time without one is ambiguous.
    Fractions of a millisecond are truncated. Anything else raises ``InvalidEvent("bad_ts", ...)``.

    >>> parse_ts("2023-11-14T22:13:20.5Z"), parse_ts("2023-11-15T00:13:20+02:00"), parse_ts(7)
    (1700000000500, 1700000000000, 7)
    """
    if type(value) is int:
        if value >= 0:
            return value
        raise InvalidEvent(REASON_BAD_TS, f"field 'ts' must be ≥ 0 ms since the epoch, got {_short(value)}")
    if type(value) is not str:
        raise InvalidEvent(
            REASON_BAD_TS,
            f"field 'ts' must be integer ms since the epoch or an RFC 3339 string, got {_kind(value)}",
        )
    text = value
    match = _RFC3339.fullmatch(text) if len(text) <= 64 else None
    if match is None:
        raise InvalidEvent(
            REASON_BAD_TS,
            "field 'ts' must be an RFC 3339 timestamp with an offset, like 2024-05-01T12:00:00Z "
            f"or 2024-05-01T14:00:00+02:00; got {_short(text)}",
        )
    year, month, day, hour, minute, second, fraction, sign, off_hour, off_minute = match.groups()
    try:
        # Seconds and the offset are added as integers: that admits a leap second (:60) and cannot
        # overflow datetime at its year 1 / year 9999 edges.
        minutes = datetime(int(year), int(month), int(day), int(hour), int(minute))
    except ValueError as exc:
        raise InvalidEvent(
            REASON_BAD_TS, f"field 'ts' is not a real date and time ({exc}): {_short(text)}"
        ) from exc
    if int(second) > 60 or (sign and (int(off_hour) > 23 or int(off_minute) > 59)):
        raise InvalidEvent(REASON_BAD_TS, f"field 'ts' has a second or offset out of range: {_short(text)}")
    ms = (minutes - _EPOCH) // _ONE_MS + int(second) * 1000
    if fraction:
        ms += int(fraction[:3].ljust(3, "0"))
    if sign:
        offset_ms = (int(off_hour) * 60 + int(off_minute)) * 60_000
        ms += -offset_ms if sign == "+" else offset_ms
    if ms < 0:
        raise InvalidEvent(REASON_BAD_TS, f"field 'ts' is before 1970-01-01T00:00:00Z: {_short(text)}")
    return ms


# ---------------------------------------------------------------------------- the hot path


def _validate(obj: object, now_ms: int, skew_ms: int) -> Event:
    """The contract's field rules on a decoded JSON value. Failure paths live in ``_reject_*``."""
    if type(obj) is not dict:
        raise InvalidEvent(REASON_NOT_OBJECT, f"an event must be a JSON object, got {_kind(obj)}")
    try:
        event_id = obj["event_id"]
        user_id = obj["user_id"]
        item_id = obj["item_id"]
        type_ = obj["type"]
        ts = obj["ts"]
    except KeyError:
        _reject_missing(obj)
    if type(event_id) is not str or not event_id or len(event_id) > MAX_ID_CHARS:
        _reject_id("event_id", event_id)
    if type(user_id) is not str or not user_id or len(user_id) > MAX_ID_CHARS:
        _reject_id("user_id", user_id)
    if type(item_id) is not str or not item_id or len(item_id) > MAX_ID_CHARS:
        _reject_id("item_id", item_id)
    if type(type_) is not str or type_ not in KNOWN_TYPES:
        _check_type(type_)
    if type(ts) is not int or ts < 0:
        ts = parse_ts(ts)
    if ts > now_ms + skew_ms:
        raise InvalidEvent(
            REASON_FUTURE_TS,
            f"field 'ts' is {_short(ts - now_ms)} ms after the reference time {now_ms}; "
            f"at most {skew_ms:,} ms ahead is allowed",
        )
    # Unknown keys are found by counting rather than by a subset test of every key: with the five
    # required keys present, the dict can only be longer than five plus the optional fields set if it
    # holds an unknown key (or an optional one set to null); the exact test runs on a mismatch.
    extra = len(obj) - 5
    value = obj.get("value")
    if value is not None:
        extra -= 1
        if type(value) is not float or not _isfinite(value):
            value = _check_value(value)
    request_id = obj.get("request_id")
    if request_id is not None:
        extra -= 1
        if type(request_id) is not str or not request_id or len(request_id) > MAX_ID_CHARS:
            _reject_id("request_id", request_id)
    context = obj.get("context")
    if context is not None:
        extra -= 1
        _check_context(context)
    if extra:
        _check_known(obj)
    event = _UnfrozenEvent()
    event.event_id = event_id
    event.user_id = user_id
    event.item_id = item_id
    event.type = type_
    event.ts_ms = ts
    event.value = value
    event.request_id = request_id
    event.context = context
    event.__class__ = Event  # type: ignore[assignment]  # see _UnfrozenEvent
    return event  # type: ignore[return-value]


# ---------------------------------------------------------------------------- failure paths


def _reject_undecodable(raw: bytes, exc: orjson.JSONDecodeError) -> NoReturn:
    try:
        raw.decode("utf-8")  # only on the error path: tells bad encoding from bad JSON
    except UnicodeDecodeError as utf8:
        raise InvalidEvent(
            REASON_INVALID_UTF8, f"message is not valid UTF-8: {utf8.reason} at byte {utf8.start}"
        ) from exc
    raise InvalidEvent(REASON_NOT_JSON, f"message is not valid JSON: {_short(str(exc), plain=True)}") from exc


def _check_known(obj: dict[Any, Any]) -> None:
    unknown = [key for key in obj if key not in _ALLOWED]
    if not unknown:
        return
    names = _short(", ".join(_short(key) for key in unknown), plain=True)
    raise InvalidEvent(
        REASON_UNKNOWN_FIELD,
        f"unknown field{'s' if len(unknown) > 1 else ''} {names}; allowed: {', '.join(sorted(_ALLOWED))} "
        "(put extra data in 'context')",
    )


def _reject_missing(obj: dict[Any, Any]) -> NoReturn:
    _check_known(obj)  # a typo ("item") is better reported as itself than as the field it misses
    missing = [repr(field) for field in _REQUIRED if field not in obj]
    fields = f"field {missing[0]} is" if len(missing) == 1 else f"fields {', '.join(missing)} are"
    raise InvalidEvent(REASON_MISSING_FIELD, f"required {fields} missing; required: {', '.join(_REQUIRED)}")


def _reject_id(field: str, value: object) -> NoReturn:
    if type(value) is not str:
        raise InvalidEvent(REASON_BAD_TYPE, f"field {field!r} must be a string, got {_kind(value)}")
    raise InvalidEvent(
        REASON_BAD_VALUE,
        f"field {field!r} must be a string of 1-{MAX_ID_CHARS} characters, got {len(value):,} characters",
    )


def _check_type(value: object) -> None:
    if type(value) is not str:
        raise InvalidEvent(REASON_BAD_TYPE, f"field 'type' must be a string, got {_kind(value)}")
    if not 0 < len(value) <= MAX_TYPE_CHARS or not _TYPE_CHARS.issuperset(value):
        raise InvalidEvent(
            REASON_BAD_VALUE,
            f"field 'type' must match [a-z_]{{1,{MAX_TYPE_CHARS}}}, got {_short(value)}",
        )


def _check_value(value: object) -> float:
    if type(value) is float:
        raise InvalidEvent(REASON_BAD_VALUE, f"field 'value' must be a finite number, got {value}")
    if type(value) is int:
        try:
            return float(value)
        except OverflowError as exc:
            raise InvalidEvent(REASON_BAD_VALUE, "field 'value' is too large for a 64-bit float") from exc
    raise InvalidEvent(REASON_BAD_TYPE, f"field 'value' must be a number, got {_kind(value)}")


def _check_context(context: object) -> None:
    if type(context) is not dict:
        raise InvalidEvent(REASON_BAD_CONTEXT, f"field 'context' must be an object, got {_kind(context)}")
    if len(context) > MAX_CONTEXT_KEYS:
        raise InvalidEvent(
            REASON_BAD_CONTEXT,
            f"field 'context' has {len(context):,} keys; at most {MAX_CONTEXT_KEYS} are allowed",
        )
    for key, value in context.items():
        if type(key) is not str:
            raise InvalidEvent(REASON_BAD_CONTEXT, f"context keys must be strings, got {_kind(key)}")
        kind = type(value)
        if kind is str or value is None or kind is bool:
            pass
        elif kind is int:
            if not _INT_MIN <= value < _INT_END:
                raise InvalidEvent(
                    REASON_BAD_CONTEXT, f"context key {_short(key)} holds an integer beyond 64 bits"
                )
        elif kind is float:
            if not _isfinite(value):
                raise InvalidEvent(
                    REASON_BAD_CONTEXT, f"context key {_short(key)} must be a finite number, got {value}"
                )
        else:
            raise InvalidEvent(
                REASON_BAD_CONTEXT,
                f"context key {_short(key)} holds {_kind(value)}; "
                "values must be strings, numbers, booleans or null",
            )


def _check_encodable(field: str, value: object) -> None:
    """Reject a string holding a lone surrogate: it is not Unicode text and cannot be encoded."""
    if type(value) is str and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidEvent(
                REASON_INVALID_UTF8,
                f"field {field!r} holds a lone surrogate at character {exc.start}: not valid Unicode",
            ) from exc


def _kind(value: object) -> str:
    """The JSON kind of a decoded value, for detail sentences."""
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
    return f"a Python {kind.__name__}"


def _short(value: object, *, plain: bool = False) -> str:
    """A value for a detail sentence, cut to a readable length.

    Strings are quoted (``repr``) unless ``plain``; integers get thousands separators. Never raises:
    an integer too long for ``str`` (over 4,300 digits) is described by its size instead.
    """
    if type(value) is str:
        value = value[:_DETAIL_CHARS]  # never repr a 60 KB string only to cut it
        text = value if plain else repr(value)
    elif type(value) is int:
        text = f"{value:,}" if value.bit_length() <= 256 else f"a {value.bit_length():,}-bit integer"
    else:
        try:
            text = repr(value)
        except ValueError:  # a container holding a huge integer
            text = _kind(value)
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."

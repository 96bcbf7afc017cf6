"""The dead letter: a message freshrec could not use, kept whole with why, where it came from and when.

One shape for every consumer that refuses input (the audit sink, the impressions sink): the same row
in ClickHouse ``dead_letters`` and, for ``events``, the same message on ``<prefix>events.dlq``
(the original key and bytes, the reason and the source coordinates as headers), so a dead letter
can be replayed from either.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from confluent_kafka import Message

__all__ = ["DEAD_LETTER_COLUMNS", "DeadLetter"]

DEAD_LETTER_COLUMNS: Final = (
    "topic", "partition", "offset", "key", "payload", "reason", "detail", "event_id",
    "kafka_ts", "received_at",
)  # fmt: skip

_HEADER_DETAIL_CHARS: Final = 1000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A refused message; ``received_at`` is when the consumer read it (ms since the epoch, or a
    datetime), ``event_id`` what could be read of it (may be empty)."""

    topic: str
    partition: int
    offset: int
    key: bytes
    payload: bytes
    reason: str
    detail: str
    event_id: str
    kafka_ts: int
    received_at: int | datetime

    @classmethod
    def of(
        cls, message: Message, *, reason: str, detail: str, event_id: str = "", received_at: int | datetime
    ) -> DeadLetter:
        """The dead letter of a consumed ``message``."""
        return cls(
            topic=message.topic() or "",
            partition=message.partition() or 0,
            offset=message.offset() or 0,
            key=message.key() or b"",
            payload=message.value() or b"",
            reason=reason,
            detail=detail,
            event_id=event_id,
            kafka_ts=max(message.timestamp()[1], 0),
            received_at=received_at,
        )

    def row(self) -> tuple[Any, ...]:
        """The ``dead_letters`` row, in :data:`DEAD_LETTER_COLUMNS` order."""
        return (self.topic, self.partition, self.offset, self.key, self.payload, self.reason,
                self.detail, self.event_id, self.kafka_ts, self.received_at)  # fmt: skip

    def headers(self) -> list[tuple[str, str | bytes | None]]:
        """The headers of its message on the dead-letter topic (the value and key are the original's)."""
        return [
            ("reason", self.reason),
            ("detail", self.detail[:_HEADER_DETAIL_CHARS]),
            ("source.topic", self.topic),
            ("source.partition", str(self.partition)),
            ("source.offset", str(self.offset)),
        ]

"""A small producer for freshrec's topics: idempotent, with delivery reports and a flush on close.

Delivery semantics: ``enable.idempotence`` (acks=all, ordered retries without duplicates within a
producer session) makes each ``produce`` at-least-once across producer restarts and exactly-once
within one session. Events carry their own ``event_id``, so a resend after a crash is recognised
downstream as a duplicate and never counted twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from freshrec.errors import KafkaUnavailable
from freshrec.settings import Settings

__all__ = ["EventProducer"]

logger = logging.getLogger(__name__)

Headers = list[tuple[str, str | bytes | None]]


class EventProducer:
    """Produce records to Kafka and account for each one's delivery.

    >>> # with EventProducer(settings) as producer:
    >>> #     producer.produce(settings.topics.events, value=event.to_json(), key=b"user-1")
    """

    def __init__(self, settings: Settings, **overrides: Any) -> None:
        config = settings.kafka_config(
            **{
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "compression.type": "lz4",
                "queue.buffering.max.messages": 500_000,
                "log_level": 3,
                **overrides,
            }
        )
        self._producer = Producer(config)
        self._lock = threading.Lock()
        self._poller: threading.Thread | None = None
        self._closing = threading.Event()
        self.delivered = 0
        self.failed = 0  # every record that failed, whoever was told
        self._unreported = 0  # failed records no ``on_delivery`` was told of, not yet raised by flush
        self.last_error: KafkaError | None = None

    def _on_delivery(self, error: KafkaError | None, _message: Message, *, handled: bool = False) -> None:
        # Runs inside poll()/flush() on the producing thread; the lock keeps readers consistent.
        with self._lock:
            if error is None:
                self.delivered += 1
            else:
                self.failed += 1
                self._unreported += 0 if handled else 1
                self.last_error = error
        if error is not None:
            logger.error("delivery failed: %s", error)

    def produce(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
        timestamp_ms: int | None = None,
        on_delivery: Callable[[KafkaError | None], None] | None = None,
    ) -> None:
        """Queue one record; blocks (serving delivery reports) while the local queue is full.
        ``on_delivery(error)`` runs once the broker acknowledged it (error None) or it failed, on
        whichever thread serves delivery reports (:meth:`poll_in_background`, ``flush``); the caller
        then owns that record's failure, and :meth:`flush` does not raise it again."""
        report: Callable[[KafkaError | None, Message], None] = self._on_delivery
        if on_delivery is not None:

            def both(error: KafkaError | None, message: Message) -> None:
                self._on_delivery(error, message, handled=True)
                on_delivery(error)

            report = both

        while True:
            try:
                if timestamp_ms is None:
                    self._producer.produce(topic, value, key, on_delivery=report, headers=headers)
                else:
                    self._producer.produce(
                        topic, value, key, on_delivery=report, headers=headers, timestamp=timestamp_ms
                    )
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)

    @property
    def queued(self) -> int:
        """Records waiting to be sent or acknowledged."""
        return len(self._producer)

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait for every queued record's delivery report; raise if some remain, or if a record
        failed that no ``on_delivery`` was told of and no earlier flush raised."""
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise KafkaUnavailable(f"{remaining} records not delivered within {timeout_s:.0f} s")
        with self._lock:
            unreported, self._unreported = self._unreported, 0
        if unreported:
            raise KafkaUnavailable(f"{unreported} records failed delivery; last error: {self.last_error}")

    def poll_in_background(self) -> None:
        """Serve delivery reports on a thread of their own from now until :meth:`close`, so that a
        caller can wait for its own records' ``on_delivery`` instead of flushing everyone's."""
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="freshrec-producer-poll", daemon=True)
            self._poller.start()

    def _poll(self) -> None:
        while not self._closing.is_set():
            self._producer.poll(0.1)

    def close(self) -> None:
        """Deliver everything queued, then release the Kafka client (no produce after this)."""
        self._closing.set()
        if self._poller is not None:
            self._poller.join()
        try:
            self.flush()  # raises if a record was not delivered
        finally:
            del self._producer  # the librdkafka client goes now, not whenever its owner is collected

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
        else:  # do not mask the original error; still try to deliver what was queued
            try:
                self._producer.flush(10.0)
            except Exception:  # pragma: no cover - best effort during unwinding
                logger.exception("flush during error handling failed")

"""The producer's delivery accounting: a failure is raised once, to whoever was not told of it."""

from __future__ import annotations

import pytest
from support import free_port_pair, wait_until

from freshrec.errors import KafkaUnavailable
from freshrec.settings import Settings
from streams.producer import EventProducer


def _unreachable(settings: Settings) -> EventProducer:
    port, _ = free_port_pair()  # nothing listens there: every record times out
    return EventProducer(
        settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{port}"}),
        **{"message.timeout.ms": 300, "log_level": 0},
    )


def test_failures_told_to_their_callback_are_not_raised_again_at_close(settings: Settings) -> None:
    """A server answers each request's failure (503) through its on_delivery; its stop must not
    fail on those old failures afterwards."""
    producer = _unreachable(settings)
    producer.poll_in_background()  # as the API does: each request waits for its own reports
    told: list[object] = []
    for n in range(3):
        producer.produce("events", b"{}", key=str(n).encode(), on_delivery=told.append)
    wait_until(lambda: len(told) == 3, timeout_s=10)
    assert len(told) == 3 and all(error is not None for error in told)
    assert producer.failed == 3
    producer.close()  # nothing unreported: no raise


def test_a_failure_nobody_was_told_of_is_raised_once(settings: Settings) -> None:
    producer = _unreachable(settings)
    producer.produce("events", b"{}", key=b"k")
    with pytest.raises(KafkaUnavailable, match="1 records failed delivery"):
        producer.flush(10)
    producer.flush(10)  # raised already: the next flush has nothing new to say
    producer.produce("events", b"{}", key=b"k")
    with pytest.raises(KafkaUnavailable, match="1 records failed delivery"):
        producer.close()

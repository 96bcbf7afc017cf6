"""The consume loop every freshrec consumer runs, and the signals that end it.

Each consumer (the audit sink, the impressions sink, the stream worker) polls batches until it is
stopped, hands each batch to its own ``on_batch``, and with ``--until-idle S`` ends once it owns
partitions and no message has arrived for ``S`` seconds since the later of its last message and
its last assignment (a rebalance can take longer than ``S``; the group must settle first). What
each does with a batch, and how it stores offsets, is its own: this module owns only the loop.

SIGINT and SIGTERM end the loop after the current batch (:func:`stop_on_signals`): a process
stopped by its supervisor commits what it processed, as it would at the end of a drain.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from confluent_kafka import Consumer, Message

__all__ = ["consume_loop", "stop_on_signals"]

logger = logging.getLogger(__name__)


def consume_loop(
    consumer: Consumer,
    *,
    batch_size: int,
    timeout_s: float,
    stop: threading.Event,
    on_batch: Callable[[list[Message]], None],
    until_idle_s: float | None = None,
    assigned_at: Callable[[], float] = lambda: 0.0,
    after_poll: Callable[[float], None] | None = None,
) -> None:
    """Poll ``consumer`` until ``stop`` is set or it has been idle for ``until_idle_s``.

    ``on_batch`` gets every non-empty batch; ``after_poll`` (if given) is called with the monotonic
    time after every poll, batch or not (periodic work: checkpoints); ``assigned_at`` tells when the
    consumer last got partitions.
    """
    last_message = time.monotonic()
    while not stop.is_set():
        messages = consumer.consume(batch_size, timeout_s)
        now = time.monotonic()
        if messages:
            on_batch(messages)
            last_message = now
        if after_poll is not None:
            after_poll(now)
        if (
            not messages
            and until_idle_s is not None
            and now - max(last_message, assigned_at()) >= until_idle_s
            and consumer.assignment()
        ):
            logger.info("no message for %.1f s: drained, stopping", until_idle_s)
            return


@contextmanager
def stop_on_signals(stop: Callable[[], None], *, what: str) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM call ``stop`` (log: ``what``) instead of killing the
    process; the previous handlers come back after it. Only the main thread can install handlers:
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %d: %s", signum, what)
        stop()

    previous = {signum: signal.signal(signum, _stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

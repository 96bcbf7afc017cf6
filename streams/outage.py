"""Riding out a ClickHouse outage: retry a call with backoff, one line when it starts and one when it ends.

Both sinks (the audit sink and the decision log's) write a batch and only then let Kafka commit its
offsets, so a store that is down must stall them, not kill them, and must not fill the log with a
traceback per attempt. :class:`StoreRetry` wraps each ClickHouse call of a batch: a failure
(an engine error, a server that refuses or drops the connection, a call past its timeout) waits
and tries again, doubling the wait up to a ceiling, until the call succeeds or the sink is stopped.

A retried insert sends the same rows again. If the first attempt did reach the table (its answer was
lost), the rows are there twice until a merge; both tables are ``ReplacingMergeTree`` on their natural
key, so ``FINAL`` reads (what every query of freshrec uses) see each row once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from clickhouse_connect.driver.exceptions import ClickHouseError

from freshrec.errors import StoreUnavailable

__all__ = ["STORE_FAILURES", "StoreRetry", "one_line"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: What a ClickHouse call raises when the store is down, hangs past its timeout, or refuses a write.
STORE_FAILURES = (ClickHouseError, StoreUnavailable, OSError)


def one_line(exc: BaseException) -> str:
    """An exception as one log line of at most 300 characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


class StoreRetry:
    """Retries ClickHouse calls through an outage; see the module docstring."""

    def __init__(self, *, stop: threading.Event, initial_s: float, max_s: float, name: str) -> None:
        self._stop = stop
        self._initial_s = initial_s
        self._max_s = max_s
        self._name = name  # whose calls, in the log lines
        self._outage_since: float | None = None  # monotonic start of the current outage
        self.retries = 0
        self.outages = 0

    def __call__(self, what: str, call: Callable[[], _T]) -> _T:
        """``call()`` until it succeeds. Raises :class:`StoreUnavailable` if the owner is stopped
        meanwhile (the batch is then neither written nor committed, and is read again at start)."""
        delay = self._initial_s
        while True:
            try:
                result = call()
            except STORE_FAILURES as exc:
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    self.outages += 1
                    logger.warning(
                        "%s: ClickHouse failed to %s (%s); retrying with backoff, Kafka offsets held "
                        "until the batch is stored",
                        self._name, what, one_line(exc),
                    )  # fmt: skip
                self.retries += 1
                if self._stop.wait(delay):
                    raise StoreUnavailable(
                        f"stopped while ClickHouse was unavailable ({one_line(exc)}); the unwritten "
                        "batch was not committed and is read again on the next start"
                    ) from exc
                delay = min(delay * 2, self._max_s)
                continue
            if self._outage_since is not None:
                logger.info(
                    "%s: ClickHouse is back after %.1f s; going on",
                    self._name,
                    time.monotonic() - self._outage_since,
                )
                self._outage_since = None
            return result

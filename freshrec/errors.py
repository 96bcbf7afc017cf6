"""The exception tree of freshrec, grouped by what the caller should do about it.

::

    FreshrecError                   root: catch this to catch everything freshrec raises
    ├── ConfigError                 fail fast: a setting or argument is wrong; the message says which
    ├── RetryableError              transient: the same call may succeed later
    │   ├── KafkaUnavailable        the broker cannot be reached or refused the request
    │   ├── StoreUnavailable        ClickHouse cannot be reached or is locked by another process
    │   ├── NothingToTrain          the freshest window holds no events yet
    │   └── VersionConflict         another publisher (a rollback) moved the model chain on
    ├── InvalidEvent                dead-letter: this one message breaks the event contract
    ├── DatasetError                fail fast: a dataset is missing, corrupt or cannot be fetched
    └── BrokerError                 fail fast: the local Kafka broker cannot be set up or started

Every error raised while handling another is chained (``raise ... from exc``) so that the cause
stays visible.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "ConfigError",
    "DatasetError",
    "FreshrecError",
    "InvalidEvent",
    "KafkaUnavailable",
    "NothingToTrain",
    "RetryableError",
    "StoreUnavailable",
    "VersionConflict",
]


class FreshrecError(Exception):
    """Root of every exception freshrec raises on purpose."""


class ConfigError(FreshrecError):
    """A setting or argument is wrong. Fix the configuration; retrying will not help."""


class RetryableError(FreshrecError):
    """A transient failure: the same operation may succeed if tried again later."""


class KafkaUnavailable(RetryableError):
    """The Kafka cluster cannot be reached or refused the request."""


class StoreUnavailable(RetryableError):
    """ClickHouse cannot be reached, or (embedded chDB) its path is held by another process."""


class NothingToTrain(RetryableError):
    """A fine-tune found no events to learn from; it will have some once events are ingested."""


class VersionConflict(RetryableError):
    """The model chain moved on under a publisher (a rollback, or a second trainer): it has adopted
    the newer head, and the next attempt builds on it."""


class InvalidEvent(FreshrecError):
    """A message breaks the event contract; it goes to the dead-letter topic and table.

    ``reason`` is a short stable code (``not_json``, ``missing_field``, ...) fit for grouping in a
    dashboard; ``detail`` is a human sentence naming the field and the rule it broke.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[InvalidEvent], tuple[str, str]]:
        return (type(self), (self.reason, self.detail))


class DatasetError(FreshrecError):
    """A dataset is missing, fails its checksum, or cannot be downloaded."""


class BrokerError(FreshrecError):
    """The local Kafka broker cannot be resolved, formatted or started."""

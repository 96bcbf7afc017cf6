"""freshrec: a streaming, online-learning recommender on Kafka.

This package holds what every part shares: settings, the event contract, errors, the local broker,
the ClickHouse store and the command line. The roles live beside it: ``streams`` (consumers and
producers), ``learners`` (incremental heads, the sequential transformer) and ``publishers``
(model deltas and serving).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("freshrec")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]

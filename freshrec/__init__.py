"""freshrec: a streaming, online-learning recommender on Kafka.

This package is the floor every other package stands on, and it imports none of them: settings,
errors, the event contract and the other message codecs, the ClickHouse store and its operational
queries, the local Kafka broker, the datasets, named fault points and process helpers. Above it, in
the order data flows: ``streams`` (consumers, real-time state), ``learners`` (incremental heads, the
sequential transformer), ``publishers`` (model versions and their deltas, replicas), ``serving``
(recommendations and the HTTP API), ``evaluation`` (prequential, replay, offline, off-policy,
simulation) and, at the top, ``freshrec_app`` (the command line, the embedded mode, reports and
Grafana's dashboard). docs/architecture.md draws the map.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("freshrec")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]

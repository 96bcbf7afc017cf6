"""The incremental heads by name: what ``FRESHREC_STREAM__HEADS`` lists, built for a stream worker.

The worker (``streams``) feeds whatever heads it is given and never imports a model; whoever builds
a worker (the command line, the serving process, the replay evaluation) asks here for the heads its
settings name.
"""

from __future__ import annotations

from freshrec.errors import ConfigError
from freshrec.settings import StreamSettings
from learners.ctr import EngagementHead
from learners.mf import MatrixFactorisationHead
from streams.heads import Head

__all__ = ["build_heads", "make_head"]


def make_head(name: str) -> Head:
    """A head by its settings name."""
    if name == "mf":
        return MatrixFactorisationHead()
    if name == "engagement":
        return EngagementHead()
    raise ConfigError(f"unknown head {name!r} in FRESHREC_STREAM__HEADS; known: mf, engagement")


def build_heads(stream: StreamSettings) -> dict[str, Head]:
    """The heads a worker with these settings keeps: none unless it has the ``heads`` role."""
    return {name: make_head(name) for name in stream.heads} if "heads" in stream.roles else {}

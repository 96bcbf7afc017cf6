"""The contract every incremental head keeps, in river's vocabulary.

A head learns from one :class:`~freshrec.events.Event` at a time (``learn_one``), scores a
(user, item) pair (``predict_one``), orders candidates (``rank``), and says how unsure it is about an
item for a user (``uncertainty_one``, in [0, 1], 1 = knows nothing), which exploration will spend.
State round-trips through ``state_dict`` / ``load_state_dict`` — checkpoints and model deltas are one
mechanism — and memory stays bounded (``size`` counts the entries held, which caps keep in check).
``tests/learners/test_contract.py`` holds every head to these rules, as river's ``checks`` do.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

from freshrec.events import Event

__all__ = ["Head"]


class Head(abc.ABC):
    """An incremental model head; see the module docstring."""

    name: str = "head"

    @abc.abstractmethod
    def learn_one(self, event: Event) -> None:
        """Update from one event. Must not modify ``event``. Events a head has no use for are ignored."""

    @abc.abstractmethod
    def predict_one(self, user_id: str, item_id: str) -> float:
        """A finite score for the pair; works before any learning and for unknown users and items."""

    @abc.abstractmethod
    def uncertainty_one(self, user_id: str, item_id: str) -> float:
        """How unsure the head is about this pair, in [0, 1] (1: never seen)."""

    def rank(self, user_id: str, items: Sequence[str]) -> list[str]:
        """``items`` ordered by descending score (ties keep their input order)."""
        scores = [self.predict_one(user_id, item) for item in items]
        order = sorted(range(len(items)), key=lambda i: -scores[i])
        return [items[i] for i in order]

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Entries held (users, items, weights): what the memory caps bound."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """A snapshot independent of later learning."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a snapshot taken by :meth:`state_dict`."""

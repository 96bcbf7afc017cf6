"""Impressions and clicks per item, clicks joined to impressions by ``request_id``: a Beta posterior
of each item's click-through rate, with its mean and variance.

An ``impression`` event with a ``request_id`` records that the item was shown in that response; a
``click`` with the same ``request_id`` and item is an **attributed** click. CTR counts attributed
clicks over impressions, so a click on something never shown (or shown too long ago to remember)
cannot push a rate above one; clicks without a ``request_id`` are counted apart as ``unattributed``.
The join does not depend on arrival order: served impressions come from the ``impressions`` topic and
clicks from ``events``, which Kafka does not order against each other, so a click that arrives before
its impression waits (as *pending*) and is credited when the impression comes. The join remembers the
most recent ``join_horizon`` requests on each side.

The posterior is ``Beta(alpha + clicks, beta + impressions - clicks)``: mean
``(alpha + c) / (alpha + beta + n)`` and variance ``mean (1 - mean) / (alpha + beta + n + 1)``, which
exploration will spend: few impressions, wide posterior.

>>> ctr = ClickThrough(alpha=1.0, beta=9.0)
>>> ctr.observe("impression", "i1", "r1")
>>> ctr.observe("click", "i1", "r1")
>>> ctr.observe("click", "i1", None)
>>> ctr.observe("click", "i2", "r2")  # before its impression: pending
>>> ctr.observe("impression", "i2", "r2")
>>> p = ctr.posterior("i1")
>>> (p.impressions, p.clicks, round(p.mean, 4), ctr.unattributed, ctr.posterior("i2").clicks)
(1, 1, 0.1818, 1, 1)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["ClickThrough", "CtrPosterior"]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class CtrPosterior:
    item_id: str
    impressions: int
    clicks: int
    mean: float
    variance: float


class ClickThrough:
    """Attributed click-through counts and their Beta posterior; see the module docstring."""

    def __init__(self, *, alpha: float = 1.0, beta: float = 19.0, join_horizon: int = 1_000_000) -> None:
        if alpha <= 0 or beta <= 0 or join_horizon < 1:
            raise ValueError("alpha and beta must be positive and join_horizon at least 1")
        self.alpha = alpha
        self.beta = beta
        self.join_horizon = join_horizon
        self._impressions: dict[str, int] = {}
        self._clicks: dict[str, int] = {}
        self._shown: OrderedDict[str, set[str]] = OrderedDict()  # request_id -> items not yet clicked
        self._pending: OrderedDict[str, set[str]] = OrderedDict()  # request_id -> clicks before impression
        self.unattributed = 0

    def observe(self, event_type: str, item_id: str, request_id: str | None) -> None:
        """Count one event; anything but an impression or a click is ignored."""
        if event_type == "impression":
            self._impressions[item_id] = self._impressions.get(item_id, 0) + 1
            if request_id is not None:
                early = self._pending.get(request_id)
                if early is not None and item_id in early:  # its click came first
                    early.discard(item_id)
                    self._clicks[item_id] = self._clicks.get(item_id, 0) + 1
                    return
                shown = self._shown.get(request_id)
                if shown is None:
                    shown = self._shown[request_id] = set()
                    if len(self._shown) > self.join_horizon:
                        self._shown.popitem(last=False)
                shown.add(item_id)
        elif event_type == "click":
            shown = self._shown.get(request_id) if request_id is not None else None
            if shown is not None and item_id in shown:
                shown.discard(item_id)  # one click per impression
                self._clicks[item_id] = self._clicks.get(item_id, 0) + 1
            elif request_id is None:
                self.unattributed += 1
            else:
                early = self._pending.get(request_id)
                if early is None:
                    early = self._pending[request_id] = set()
                    if len(self._pending) > self.join_horizon:
                        self._pending.popitem(last=False)
                early.add(item_id)

    @property
    def pending(self) -> int:
        """Clicks waiting for their impression (or whose impression was never seen)."""
        return sum(len(items) for items in self._pending.values())

    def posterior(self, item_id: str) -> CtrPosterior:
        n = self._impressions.get(item_id, 0)
        c = self._clicks.get(item_id, 0)
        a, b = self.alpha + c, self.beta + n - c
        mean = a / (a + b)
        return CtrPosterior(item_id, n, c, mean, mean * (1.0 - mean) / (a + b + 1.0))

    def moments(self, items: Sequence[str]) -> tuple[FloatArray, FloatArray]:
        """Posterior means and variances of many items at once (what a request's exploration reads:
        ``posterior`` per item cost it ~1.6 µs an item, mostly building the records)."""
        n = np.array([self._impressions.get(item, 0) for item in items], dtype=np.float64)
        c = np.array([self._clicks.get(item, 0) for item in items], dtype=np.float64)
        total = self.alpha + self.beta + n
        mean = (self.alpha + c) / total
        return mean, mean * (1.0 - mean) / (total + 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "join_horizon": self.join_horizon,
            "impressions": dict(self._impressions),
            "clicks": dict(self._clicks),
            "shown": [(request, sorted(items)) for request, items in self._shown.items()],
            "pending": [(request, sorted(items)) for request, items in self._pending.items()],
            "unattributed": self.unattributed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.alpha, self.beta = float(state["alpha"]), float(state["beta"])
        self.join_horizon = int(state["join_horizon"])
        self._impressions = dict(state["impressions"])
        self._clicks = dict(state["clicks"])
        self._shown = OrderedDict((request, set(items)) for request, items in state["shown"])
        self._pending = OrderedDict((request, set(items)) for request, items in state.get("pending", []))
        self.unattributed = int(state["unattributed"])

"""Off-policy estimators over a slate log: IPS, self-normalised IPS and doubly robust.

Pure NumPy over flat arrays, so that the decision log, the simulator and the tests feed them alike.
A *round* is one response (a slate of ``size`` slots); a *slot* is one shown item with its reward
(1 if clicked), its importance weight ``w = P_target(item in slate) / P_logging(item in slate)`` and
the reward model's prediction ``q_hat`` for it. Per round the log also carries DR's direct term
(the reward model's expected clicks under the target, ``sum_a P_target(a) q_hat(a)``) and the
target's *supported mass* (``sum_a P_target(a)`` over the items the logging policy could show: the
expected sum of a round's weights). Every estimate is a click rate per slot, the mean over rounds
of a round's value divided by its ``size``. Rounds, not slots, are the samples of the interval: the
slots of one response share a user and a state.

- **IPS** (``sum w r / size``): unbiased where the target's items have logging probability > 0;
  the target's unsupported items count as reward 0.
- **SNIPS**: the same values divided by the mean round weight relative to its known expectation
  (the supported mass), a ratio estimator: slightly biased, far less variable when weights are
  large. With one slot per round and full support it is ``sum w r / sum w``.
- **DR**: the direct term plus the weighted residuals ``w (r - q_hat)``: unbiased if either the
  weights or the reward model are right, and the reward model covers unsupported items.

Each comes with a 95% normal interval (IPS and DR from the rounds' values; SNIPS by the delta
method) and Kish's effective sample size of the slot weights, ``(sum w)^2 / sum w^2``: how many
on-policy slots the log is worth for this target.

With one slot per round these are the formulas of Open Bandit Pipeline's
``InverseProbabilityWeighting``, ``SelfNormalizedInverseProbabilityWeighting`` and ``DoublyRobust``
(``_estimate_round_rewards``, no clipping); obp's intervals are bootstrapped instead.

>>> log = SlateLog.from_arrays(
...     rounds=[0, 0, 1], reward=[1, 0, 1], weight=[2.0, 1.0, 0.5], q_hat=[0.5, 0.5, 0.5],
...     direct=[1.0, 1.0], mass=[2.0, 2.0], size=[2, 2])
>>> round(estimate(log, "ips").estimate, 4)
0.625
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from freshrec.errors import ConfigError

__all__ = ["ESTIMATORS", "OpeResult", "SlateLog", "estimate", "round_values"]

logger = logging.getLogger(__name__)

ESTIMATORS = ("ips", "snips", "dr")
_Z975 = 1.959963984540054  # the normal distribution's 97.5th percentile

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class SlateLog:
    """A log as flat arrays: per slot (``rounds`` says which round each slot is in, ``0..n-1``)
    and per round."""

    rounds: IntArray  # (S,) round of each slot
    reward: FloatArray  # (S,) 1 if the shown item was clicked
    weight: FloatArray  # (S,) P_target(item in slate) / P_logging(item in slate)
    q_hat: FloatArray  # (S,) reward model at the shown item
    direct: FloatArray  # (n,) reward model's expected clicks in the round under the target
    mass: FloatArray  # (n,) target's expected count of supported items in the round
    size: FloatArray  # (n,) slots of the round (the k asked for): estimates are per slot

    @classmethod
    def from_arrays(
        cls,
        *,
        rounds: Sequence[int] | IntArray,
        reward: Sequence[float] | FloatArray,
        weight: Sequence[float] | FloatArray,
        q_hat: Sequence[float] | FloatArray,
        direct: Sequence[float] | FloatArray,
        mass: Sequence[float] | FloatArray,
        size: Sequence[float] | FloatArray,
    ) -> SlateLog:
        log = cls(
            rounds=np.asarray(rounds, dtype=np.int64),
            reward=np.asarray(reward, dtype=np.float64),
            weight=np.asarray(weight, dtype=np.float64),
            q_hat=np.asarray(q_hat, dtype=np.float64),
            direct=np.asarray(direct, dtype=np.float64),
            mass=np.asarray(mass, dtype=np.float64),
            size=np.asarray(size, dtype=np.float64),
        )
        slots, n = len(log.rounds), len(log.direct)
        if not (len(log.reward) == len(log.weight) == len(log.q_hat) == slots):
            raise ConfigError("a slate log needs one reward, weight and q_hat per slot")
        if not (len(log.mass) == len(log.size) == n) or n == 0:
            raise ConfigError("a slate log needs at least one round, with its direct term, mass and size")
        if slots and (log.rounds.min() < 0 or log.rounds.max() >= n):
            raise ConfigError(f"slot rounds must lie in 0..{n - 1}")
        if np.any(log.weight < 0) or np.any(log.size <= 0):
            raise ConfigError("weights must be non-negative and round sizes positive")
        return log

    @property
    def n(self) -> int:
        return len(self.direct)

    def per_round(self, values: FloatArray) -> FloatArray:
        """Sum of a per-slot array within each round, shape (n,)."""
        return np.bincount(self.rounds, weights=values, minlength=self.n).astype(np.float64)


@dataclass(frozen=True, slots=True)
class OpeResult:
    estimator: str
    estimate: float  # click rate per slot
    ci_low: float
    ci_high: float
    ess: float  # Kish's effective sample size of the slot weights
    rounds: int
    slots: int

    def to_json(self) -> dict[str, object]:
        return {
            "estimator": self.estimator,
            "estimate": self.estimate,
            "ci95": [self.ci_low, self.ci_high],
            "ess": self.ess,
            "rounds": self.rounds,
            "slots": self.slots,
        }


def round_values(log: SlateLog, estimator: str) -> FloatArray:
    """Each round's value per slot under ``ips`` or ``dr`` (their estimate is the mean)."""
    if estimator == "ips":
        return log.per_round(log.weight * log.reward) / log.size
    if estimator == "dr":
        return (log.direct + log.per_round(log.weight * (log.reward - log.q_hat))) / log.size
    raise ConfigError(f"unknown estimator {estimator!r}; known: ips, dr (snips is a ratio of rounds)")


def estimate(log: SlateLog, estimator: str) -> OpeResult:
    """The target's click rate per slot by ``estimator`` (``ips``, ``snips`` or ``dr``)."""
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown estimator {estimator!r}; known: {', '.join(ESTIMATORS)}")
    n = log.n
    if estimator == "snips":
        y = log.per_round(log.weight * log.reward) / log.size
        u = log.per_round(log.weight) / log.size  # E[u] = m: the supported mass per slot
        m = log.mass / log.size
        y_bar, u_bar, m_bar = float(y.mean()), float(u.mean()), float(m.mean())
        if u_bar <= 0:
            logger.warning("no logged slot has weight under this target: SNIPS is undefined")
            value, half = float("nan"), float("nan")
        else:
            ratio = y_bar / u_bar
            value = ratio * m_bar
            # Delta method for (mean y / mean u) * mean m: each round's influence on the estimate.
            influence = (m_bar / u_bar) * (y - ratio * u) + ratio * (m - m_bar)
            half = _half_width(influence)
    else:
        values = round_values(log, estimator)
        value, half = float(values.mean()), _half_width(values)
    total = float(log.weight.sum())
    squares = float((log.weight**2).sum())
    ess = total * total / squares if squares > 0 else 0.0
    return OpeResult(estimator, value, value - half, value + half, ess, n, len(log.rounds))


def _half_width(values: FloatArray) -> float:
    """Half the 95% normal interval of the mean of ``values`` (infinite for a single value)."""
    n = len(values)
    if n < 2:
        return float("inf")
    return _Z975 * float(values.std(ddof=1)) / math.sqrt(n)

"""Off-policy evaluation from the decision log alone (``freshrec eval ips``).

Every served slot is a row of ClickHouse ``impressions`` with the probability (``propensity``) that the
logging policy had of putting that item there; a click event carrying the response's ``request_id``
and the item is the slot's reward. The inverse-propensity estimate of a target policy's click rate per
slot is ``mean(reward * target(item | slot) / propensity)``, with a 95% normal confidence interval;
the self-normalised variant (SNIPS) divides by the mean weight instead of 1.

Targets: ``logging`` (the policy that served; weights 1): its IPS estimate must agree with its
observed click rate — the check that the log, its propensities and the click join are sound. The
breakdown by source and by explore flag shows what exploration costs or earns per slot.

Not yet: other targets. Evaluating, say, "no exploration" needs the logging policy's probability of
the *target's* choice in each slot, which needs the candidate distribution logged (or the policy
re-run on the logged state); the log stores the chosen item's propensity only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from freshrec.errors import ConfigError
from freshrec.store import Store

__all__ = ["TARGETS", "Estimate", "evaluate"]

TARGETS = ("logging",)


@dataclass(frozen=True, slots=True)
class Estimate:
    target: str
    slots: int
    clicks: int
    observed_ctr: float  # the logging policy's click rate per slot
    ips: float
    ci_low: float
    ci_high: float
    snips: float
    by_source: dict[str, tuple[int, float]]  # source -> (slots, observed CTR)
    explore_ctr: float | None  # observed CTR of explore slots (None: none served)
    exploit_ctr: float | None

    def to_json(self) -> dict[str, object]:
        return {
            "target": self.target,
            "slots": self.slots,
            "clicks": self.clicks,
            "observed_ctr": self.observed_ctr,
            "ips": self.ips,
            "ci95": [self.ci_low, self.ci_high],
            "snips": self.snips,
            "by_source": {k: {"slots": n, "ctr": c} for k, (n, c) in self.by_source.items()},
            "explore_ctr": self.explore_ctr,
            "exploit_ctr": self.exploit_ctr,
        }


def evaluate(store: Store, *, target: str = "logging", policy: str | None = None) -> Estimate:
    """Estimate ``target``'s click rate per slot from ``impressions`` and the click events."""
    if target not in TARGETS:
        raise ConfigError(f"unknown target policy {target!r}; known: {', '.join(TARGETS)}")
    rows = store.rows(
        f"""
        SELECT i.source, i.explore, i.propensity, if(c.request_id = '', 0, 1) AS clicked
        FROM {store.table("impressions")} AS i FINAL
        LEFT JOIN (
            SELECT DISTINCT assumeNotNull(request_id) AS request_id, item_id
            FROM {store.table("events")} FINAL
            WHERE type = 'click' AND request_id IS NOT NULL
        ) AS c ON c.request_id = i.request_id AND c.item_id = i.item_id
        WHERE ({{policy:String}} = '' OR i.policy = {{policy:String}})
        """,
        {"policy": policy or ""},
    )
    if not rows:
        raise ConfigError("the impressions table holds no served slots (for this policy) to evaluate")
    source = np.array([r[0] for r in rows])
    explore = np.array([bool(r[1]) for r in rows])
    propensity = np.array([float(r[2]) for r in rows])
    reward = np.array([float(r[3]) for r in rows])
    if np.any(propensity <= 0):
        raise ConfigError("some logged propensities are not positive: the log cannot support IPS")
    weights = np.ones(len(rows))  # target == logging: pi / propensity = 1
    values = reward * weights
    n = len(values)
    mean = float(values.mean())
    half = 1.96 * float(values.std(ddof=1)) / math.sqrt(n) if n > 1 else float("inf")
    by_source = {
        str(s): (int((source == s).sum()), float(reward[source == s].mean()))
        for s in sorted(set(source.tolist()))
    }
    return Estimate(
        target=target,
        slots=n,
        clicks=int(reward.sum()),
        observed_ctr=float(reward.mean()),
        ips=mean,
        ci_low=mean - half,
        ci_high=mean + half,
        snips=float(values.sum() / weights.sum()) if weights.sum() else 0.0,
        by_source=by_source,
        explore_ctr=float(reward[explore].mean()) if explore.any() else None,
        exploit_ctr=float(reward[~explore].mean()) if (~explore).any() else None,
    )

"""Off-policy evaluation from the decision log alone (``freshrec eval ips``).

Every served slot is a row of ClickHouse ``impressions`` with the probability (``propensity``) that the
logging policy had of putting that item there; a click event carrying the response's ``request_id``
and the item is the slot's reward. The inverse-propensity estimate of a target policy's click rate per
slot is ``mean(reward * target(item | slot) / propensity)``, with a 95% normal confidence interval;
the self-normalised variant (SNIPS) divides by the mean weight instead of 1.

Target ``logging`` (:func:`evaluate`, the policy that served; weights 1): its IPS estimate must agree
with its observed click rate, the check that the log, its propensities and the click join are sound.
The breakdown by source and by explore flag shows what exploration costs or earns per slot.

**Any other policy** (:func:`evaluate_policy`: ``none``, ``epsilon``, ``uncertainty``, with any
parameters) is evaluated from each response's :class:`~streams.impressions.Exploration`: the
ranking's head, the exploration pool with each item's CTR mean and uncertainty bonus, and the
catalogue size are enough to recompute, for that request, the chance that either policy includes
any item in the response (:func:`inclusion`). The estimators (:mod:`evaluation.ope`: IPS, SNIPS,
DR) weight each shown item by ``P_target(item shown) / P_logging(item shown)``.

Assumptions, written down because the estimates rest on them:

- **Item-level rewards.** A click depends on the user's state and the item, not on its position in
  the list or on the other items shown (a position-based model whose examination is equal at every
  position). Exact per-position matching has no support here: the policies shift the ranking's items
  by different numbers of explore slots, so the item a target puts in slot 4 is never logged in slot
  4. Where position bias is strong and the target moves items far, the estimate inherits it (the
  simulator's users discount position ``j`` by ``1 / (1 + 0.1 j)``; ``freshrec simulate --ope``
  measures what that costs).
- **The policies as served**: ``uncertainty`` keeps the ranking's first ``k - s`` items (``s =
  round(k * explore_fraction)``), draws ``s`` times independently from ``softmax((mean + ucb_c *
  bonus) / temperature)`` over the rest of the pool, and fills the slots a repeated draw left with
  the next ranked items (exact for ``s <= 2``, Monte Carlo for more). ``epsilon`` is modelled with
  ``Binomial(k, 1 - epsilon)`` ranking slots and ``k epsilon`` uniform draws from the catalogue
  (ignoring that a draw of an already shown or seen item falls back to the ranking). ``none`` shows
  the ranking's first ``k``.
- **The reward model** of DR is each item's CTR posterior mean at serving time; items outside the
  logged pool (epsilon's uniform draws) get the pool's mean CTR.
- A target's items that the logging policy could never show (an uncertainty log cannot show most of
  epsilon's uniform draws) count as no clicks in IPS and SNIPS; the share of the target's mass on
  them is reported as ``unsupported``. DR covers them with the reward model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from evaluation.ope import ESTIMATORS, OpeResult, SlateLog, estimate
from freshrec.errors import ConfigError
from freshrec.store import Store
from streams.impressions import Exploration

__all__ = [
    "POLICIES",
    "TARGETS",
    "Decision",
    "Estimate",
    "PolicyEstimate",
    "evaluate",
    "evaluate_decisions",
    "evaluate_policy",
    "inclusion",
    "read_decisions",
    "resolve_params",
]

logger = logging.getLogger(__name__)

TARGETS = ("logging",)
POLICIES = ("none", "epsilon", "uncertainty")
_PARAMS = {
    "none": (),
    "epsilon": ("epsilon",),
    "uncertainty": ("explore_fraction", "ucb_c", "temperature"),
}
_FILL_DRAWS = 4096  # Monte Carlo draws of the repeat-fill when a response has more than 2 explore slots

FloatArray = npt.NDArray[np.float64]


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


def _clicked_join(store: Store) -> str:
    """Each logged slot joined to the click that names its response and item (at most one counts),
    for the requests the ``policy`` parameter keeps (empty: all)."""
    return f"""LEFT JOIN (
            SELECT DISTINCT assumeNotNull(request_id) AS request_id, item_id
            FROM {store.table("events")} FINAL
            WHERE type = 'click' AND request_id IS NOT NULL
        ) AS c ON c.request_id = i.request_id AND c.item_id = i.item_id
        WHERE ({{policy:String}} = '' OR i.policy = {{policy:String}})"""


def evaluate(store: Store, *, target: str = "logging", policy: str | None = None) -> Estimate:
    """Estimate ``target``'s click rate per slot from ``impressions`` and the click events."""
    if target not in TARGETS:
        raise ConfigError(f"unknown target policy {target!r}; known: {', '.join(TARGETS)}")
    rows = store.rows(
        f"""
        SELECT i.source, i.explore, i.propensity, if(c.request_id = '', 0, 1) AS clicked
        FROM {store.table("impressions")} AS i FINAL
        {_clicked_join(store)}
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


# -- any policy, from the logged exploration records ----------------------------------------------


@dataclass(frozen=True)
class Decision:
    """One logged response: what could have been shown (``exploration``), what was, what was clicked."""

    exploration: Exploration
    shown: Sequence[str]
    clicked: frozenset[str]


@dataclass(frozen=True, slots=True)
class PolicyEstimate:
    policy: str
    params: dict[str, float]
    logging: str  # the policy (or policies) that wrote the log
    responses: int
    observed_ctr: float  # the logging policy's click rate per slot
    unsupported: float  # share of the target's expected items the log could never show
    results: list[OpeResult]

    def to_json(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "params": self.params,
            "logging": self.logging,
            "responses": self.responses,
            "observed_ctr": self.observed_ctr,
            "unsupported": self.unsupported,
            "estimates": [r.to_json() for r in self.results],
        }


def resolve_params(record: Exploration, policy: str, params: Mapping[str, float]) -> dict[str, float]:
    """The target's parameters: ``params`` over what the log's policy was run with."""
    if policy not in POLICIES:
        raise ConfigError(f"unknown target policy {policy!r}; known: {', '.join(POLICIES)}")
    unknown = set(params) - set(_PARAMS[policy])
    if unknown:
        known = ", ".join(_PARAMS[policy]) or "none"
        raise ConfigError(f"{policy} takes no parameter {sorted(unknown)}; its parameters: {known}")
    resolved = {name: float(record.params.get(name, 0.0)) for name in _PARAMS[policy]}
    resolved.update({name: float(value) for name, value in params.items()})
    return resolved


def inclusion(record: Exploration, policy: str, params: Mapping[str, float]) -> tuple[FloatArray, float]:
    """The chance that ``policy`` includes each of ``record.pool`` in the response, and the chance of
    each catalogue item outside the pool (non-zero only for epsilon's uniform draws).

    >>> e = Exploration("none", {}, k=2, catalogue=10, ranked=3, pool=["a", "b", "c"],
    ...                 mean=np.zeros(3), bonus=np.zeros(3))
    >>> inclusion(e, "none", {})[0].tolist()
    [1.0, 1.0, 0.0]
    >>> probs, outside = inclusion(e, "epsilon", {"epsilon": 0.5})
    >>> [round(p, 4) for p in probs.tolist()], round(outside, 4)
    ([0.7744, 0.3231, 0.0975], 0.0975)
    """
    k, size, ranked = record.k, len(record.pool), min(record.ranked, len(record.pool))
    probs = np.zeros(size)
    if policy == "none":
        probs[: min(k, ranked)] = 1.0
        return probs, 0.0
    if policy == "epsilon":
        epsilon = float(params["epsilon"])
        n = record.catalogue
        each = 1.0 - (1.0 - epsilon / n) ** k if n > 0 else 0.0  # drawn uniformly in one of k slots
        probs[:] = each
        # Slots that go to the ranking: Binomial(k, 1 - epsilon); ranked item r shows if more than r.
        ranking_slots = np.array(
            [math.comb(k, e) * (1 - epsilon) ** e * epsilon ** (k - e) for e in range(k + 1)]
        )
        beyond = ranking_slots[::-1].cumsum()[::-1]  # beyond[r] = P(slots >= r)
        for r in range(min(k, ranked)):
            shown = float(beyond[r + 1])
            probs[r] = shown + (1.0 - shown) * each
        return probs, each
    if policy != "uncertainty":
        raise ConfigError(f"unknown target policy {policy!r}; known: {', '.join(POLICIES)}")
    if record.policy != "uncertainty":
        raise ConfigError(
            f"these responses were served by {record.policy}, which logs no exploration pool: evaluate "
            "none or epsilon on them, or uncertainty on a log that uncertainty wrote"
        )
    slots = round(k * float(params["explore_fraction"]))
    exploit = min(k - slots, ranked)
    probs[:exploit] = 1.0
    if slots == 0 or exploit >= size:
        probs[exploit : min(k, ranked)] = 1.0  # no pool: the ranking fills the slots
        return probs, 0.0
    ucb = record.mean[exploit:] + float(params["ucb_c"]) * record.bonus[exploit:]
    p = np.exp((ucb - ucb.max()) / float(params["temperature"]))
    p /= p.sum()
    probs[exploit:] = 1.0 - (1.0 - p) ** slots  # in at least one of the independent draws
    tail = ranked - exploit  # the pool's first items continue the ranking: a repeat's fill
    if slots == 2 and tail > 0:
        repeat = float((p**2).sum())
        probs[exploit] += repeat - p[0] ** 2  # a repeat of another item: the next ranked fills
        if tail > 1:
            probs[exploit + 1] += p[0] ** 2  # the next ranked was the repeat: the one after
    elif slots > 2 and tail > 0:
        probs[exploit : exploit + min(2 * slots, tail)] += _fill(p, slots, min(2 * slots, tail))
    return np.minimum(probs, 1.0), 0.0


def _fill(p: FloatArray, slots: int, front: int) -> FloatArray:
    """Monte Carlo chance that each of the pool's first ``front`` items is not drawn but fills a
    slot a repeated draw left (the fill takes undrawn ranked items in order)."""
    rng = np.random.default_rng(0)  # fixed: the same log always gives the same estimate
    draws = rng.choice(len(p), size=(_FILL_DRAWS, slots), p=p)
    ordered = np.sort(draws, axis=1)
    distinct = 1 + (np.diff(ordered, axis=1) != 0).sum(axis=1)
    free = slots - distinct  # slots left to the ranking
    drawn = (draws[:, :, None] == np.arange(front)[None, None, :]).any(axis=1)  # (R, front)
    waiting = np.cumsum(~drawn, axis=1)  # undrawn ranked items up to and including each
    filled = ~drawn & (waiting <= free[:, None])
    return np.asarray(filled.mean(axis=0), dtype=np.float64)


def evaluate_decisions(
    decisions: Sequence[Decision],
    policy: str,
    params: Mapping[str, float] | None = None,
    *,
    estimators: Iterable[str] = ESTIMATORS,
) -> PolicyEstimate:
    """``policy``'s click rate per slot, estimated from logged responses by each estimator."""
    if not decisions:
        raise ConfigError("no logged responses with an exploration record to evaluate")
    rounds: list[int] = []
    reward: list[float] = []
    weight: list[float] = []
    q_hat: list[float] = []
    n = len(decisions)
    direct, mass, size = np.zeros(n), np.zeros(n), np.zeros(n)
    target_total = unsupported = 0.0
    clicks = slots = dropped = 0
    resolved: dict[str, float] = {}
    for i, decision in enumerate(decisions):
        record = decision.exploration
        resolved = resolve_params(record, policy, params or {})
        target, target_out = inclusion(record, policy, resolved)
        logged, logged_out = inclusion(record, record.policy, record.params)
        prior = float(record.mean.mean()) if len(record.mean) else 0.0
        outside = max(record.catalogue - len(record.pool), 0)
        supported = logged > 0
        direct[i] = float(target @ record.mean) + target_out * outside * prior
        mass[i] = float(target[supported].sum()) + (target_out * outside if logged_out > 0 else 0.0)
        size[i] = record.k
        total = float(target.sum()) + target_out * outside
        target_total += total
        unsupported += total - mass[i]
        position = {item: j for j, item in enumerate(record.pool)}
        for item in decision.shown:
            j = position.get(item)
            p_target, p_logged, q = (
                (target_out, logged_out, prior) if j is None else (target[j], logged[j], record.mean[j])
            )
            clicked = item in decision.clicked
            clicks += clicked
            slots += 1
            if p_logged <= 0:
                dropped += 1  # shown, yet the record says it could not be: a log this model does not fit
                continue
            rounds.append(i)
            reward.append(float(clicked))
            weight.append(float(p_target) / float(p_logged))
            q_hat.append(float(q))
    if dropped:
        logger.warning("%d shown items had no chance under their own record; left out", dropped)
    log = SlateLog.from_arrays(
        rounds=rounds, reward=reward, weight=weight, q_hat=q_hat, direct=direct, mass=mass, size=size
    )
    loggers = sorted({d.exploration.policy for d in decisions})
    return PolicyEstimate(
        policy=policy,
        params=resolved,
        logging="+".join(loggers),
        responses=n,
        observed_ctr=clicks / max(slots, 1),
        unsupported=float(unsupported / target_total) if target_total > 0 else 0.0,
        results=[estimate(log, name) for name in estimators],
    )


def read_decisions(store: Store, *, logging_policy: str | None = None) -> list[Decision]:
    """Every logged response that carries an exploration record, with its shown and clicked items."""
    rows = store.rows(
        f"""
        SELECT i.request_id, groupArray((i.position, i.item_id)) AS shown,
               argMin(i.exploration, i.position) AS exploration,
               groupArrayIf(i.item_id, c.request_id != '') AS clicked
        FROM {store.table("impressions")} AS i FINAL
        {_clicked_join(store)}
        GROUP BY i.request_id
        HAVING exploration != ''
        ORDER BY i.request_id
        """,
        {"policy": logging_policy or ""},
    )
    decisions = []
    for _request, shown, exploration, clicked in rows:
        record = Exploration.decode(str(exploration))
        if record is None:
            continue
        decisions.append(
            Decision(record, [str(item) for _, item in sorted(shown)], frozenset(str(c) for c in clicked))
        )
    return decisions


def evaluate_policy(
    store: Store,
    *,
    policy: str,
    params: Mapping[str, float] | None = None,
    estimators: Iterable[str] = ESTIMATORS,
    logging_policy: str | None = None,
) -> PolicyEstimate:
    """``policy`` (with ``params`` over the logged ones) estimated from the decision log in ``store``."""
    decisions = read_decisions(store, logging_policy=logging_policy)
    if not decisions:
        raise ConfigError(
            "no response in the impressions table carries an exploration record (logged by freshrec "
            "serve since the exploration column was added): serve some traffic first"
        )
    return evaluate_decisions(decisions, policy, params, estimators=estimators)

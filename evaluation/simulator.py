"""``freshrec simulate``: the whole system in a closed loop against simulated users.

Users with **hidden ground-truth preferences**, fit on a real dataset (a rank-``dim`` SVD of the
ml-100k user-item matrix: user and item vectors whose inner product says how much a user likes an
item), send requests to the real API (``freshrec serve``'s stack: Kafka, stream worker, model
replica, recommender); they click each shown item with probability ``sigmoid(z - 5)``, where
``z`` is the standardised affinity, discounted by position, and the clicks go back through
``POST /v1/events`` with the response's ``request_id`` (so the CTR posteriors and the impressions log
see them). A fine-tune cycle runs every ``finetune_every`` requests on the stream's histories and
publishes a sparse delta, as the scheduler would.

**Drift**: at ``release_at`` of the run, ``new_items`` items are released (each gets one organic view,
as a launch page would give it); a quarter are *good* (their vectors are those of the best-liked
items, so most users want them). At ``drift_at`` every user's taste moves halfway towards another
user's.

Compared on the same seed: ``none`` (no exploration), ``epsilon`` and ``uncertainty``. Reported:
click rate per request, catalogue coverage, and for the good new items how many requests after their
release they needed to be **served widely** (shown ``widely`` times), if they ever were.

**Off-policy evaluation against the truth** (:func:`ope`, ``freshrec simulate --ope``): a logging
policy runs and its decisions (each response's exploration record, what was shown, what was
clicked) are collected in process; every target policy is estimated from that log
(:mod:`evaluation.ips`), then run on-policy on the same seed, and its click rate per slot is the
truth. The truth comes from a different closed loop (the target learns from its own feedback), so
the comparison holds the estimators and their item-level assumption to what a team would want to
know, not only to their own model.
"""

from __future__ import annotations

import functools
import gzip
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from evaluation import ips
from evaluation.ope import ESTIMATORS
from freshrec.errors import DatasetError
from freshrec.settings import ServeSettings, Settings, StreamSettings, TrainSettings
from learners.finetune import FineTuner
from publishers.publisher import Publisher
from publishers.snapshots import SnapshotStore
from serving.server import ServingStack
from streams.admin import ensure_topics
from streams.impressions import Exploration

__all__ = [
    "OPE_TARGETS",
    "PolicyRun",
    "SimConfig",
    "World",
    "ope",
    "ope_summary",
    "paired",
    "run",
    "run_policy",
]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

# Targets of ``freshrec simulate --ope`` (the logging policy is uncertainty with the defaults:
# ucb_c 2, epsilon 0.1): no exploration, epsilon on either side of its default, a weaker and a
# stronger uncertainty bonus.
OPE_TARGETS: tuple[tuple[str, dict[str, float]], ...] = (
    ("none", {}),
    ("epsilon", {"epsilon": 0.05}),
    ("epsilon", {"epsilon": 0.2}),
    ("uncertainty", {"ucb_c": 1.0}),
    ("uncertainty", {"ucb_c": 3.0}),
)


@dataclass(frozen=True)
class SimConfig:
    users: int = 200  # simulated users (drawn from the dataset's users)
    requests: int = 1_500  # requests per policy
    k: int = 10
    new_items: int = 20
    release_at: float = 0.3  # share of the run after which the new items appear
    drift_at: float = 0.6  # share of the run after which tastes shift
    finetune_every: int = 250  # requests between fine-tune cycles
    widely: int = 10  # impressions that make an item "served widely"
    dim: int = 16  # rank of the ground truth
    seed: int = 0


@dataclass
class World:
    """Ground truth: user and item vectors, and who likes what how much."""

    users: list[str]
    items: list[str]
    user_vectors: FloatArray
    item_vectors: FloatArray
    histories: dict[str, list[str]]
    good_new: set[str] = field(default_factory=set)

    @classmethod
    def from_movielens(cls, path: Path, config: SimConfig) -> World:
        rng = np.random.default_rng(config.seed)
        rows: list[tuple[str, str, int]] = []
        with gzip.open(path, "rt") as lines:
            for line in lines:
                user, item, _rating, ts = line.split("\t")
                rows.append((user, item, int(ts)))
        users = sorted({u for u, _, _ in rows}, key=int)
        items = sorted({i for _, i, _ in rows}, key=int)
        u_index = {u: n for n, u in enumerate(users)}
        i_index = {i: n for n, i in enumerate(items)}
        matrix = np.zeros((len(users), len(items)))
        for user, item, _ in rows:
            matrix[u_index[user], i_index[item]] = 1.0
        left, sigma, right = np.linalg.svd(matrix, full_matrices=False)
        scale = np.sqrt(sigma[: config.dim])
        user_vectors = left[:, : config.dim] * scale
        item_vectors = right[: config.dim].T * scale
        chosen = sorted(rng.choice(len(users), size=min(config.users, len(users)), replace=False).tolist())
        histories: dict[str, list[str]] = {}
        picked = set(chosen)
        for user, item, _ts in sorted(rows, key=lambda r: r[2]):
            if u_index[user] in picked:
                histories.setdefault(f"sim-u{user}", []).append(f"sim-i{item}")
        return cls(
            users=[f"sim-u{users[n]}" for n in chosen],
            items=[f"sim-i{i}" for i in items],
            user_vectors=user_vectors[chosen],
            item_vectors=item_vectors,
            histories={u: h[-30:] for u, h in histories.items()},
        )

    def release(self, count: int, rng: np.random.Generator) -> list[str]:
        """New items: a quarter are copies (with noise) of the best-liked items, the rest of random ones."""
        appeal = (self.user_vectors @ self.item_vectors.T).mean(axis=0)
        best = np.argsort(-appeal)[:20]
        vectors, names = [], []
        for n in range(count):
            good = n < max(1, count // 4)
            base = self.item_vectors[int(rng.choice(best)) if good else int(rng.integers(len(self.items)))]
            vectors.append(base + rng.normal(scale=0.02, size=base.shape))
            names.append(f"sim-new{n}")
            if good:
                self.good_new.add(names[-1])
        self.items += names
        self.item_vectors = np.vstack([self.item_vectors, np.array(vectors)])
        return names

    def drift(self, rng: np.random.Generator) -> None:
        partners = rng.permutation(len(self.users))
        self.user_vectors = 0.5 * self.user_vectors + 0.5 * self.user_vectors[partners]

    def click_probabilities(self, user: int, shown: list[str]) -> FloatArray:
        index = {item: n for n, item in enumerate(self.items)}
        scores = self.item_vectors @ self.user_vectors[user]
        mean, sd = float(scores.mean()), float(scores.std()) or 1.0
        z = np.array([(scores[index[i]] - mean) / sd if i in index else -3.0 for i in shown])
        position = 1.0 / (1.0 + 0.1 * np.arange(len(shown)))
        return position / (1.0 + np.exp(-(z - 5.0)))  # z = 2.5: 7.6%; z = 3.5: 18%; z = 0: 0.7%


@dataclass
class PolicyRun:
    policy: str
    seed: int
    requests: int = 0
    clicks: int = 0
    ctr_curve: list[float] = field(default_factory=list)  # cumulative clicks per request
    coverage_curve: list[float] = field(default_factory=list)
    new_curve: list[int] = field(default_factory=list)  # impressions of the good new items so far
    shown: Counter[str] = field(default_factory=Counter)
    widely_after: dict[str, int | None] = field(default_factory=dict)  # good new item -> requests

    def summary(self, catalogue: int) -> dict[str, Any]:
        reached = [v for v in self.widely_after.values() if v is not None]
        return {
            "policy": self.policy,
            "seed": self.seed,
            "requests": self.requests,
            "clicks_per_request": self.clicks / max(self.requests, 1),
            "coverage": len(self.shown) / catalogue,
            "good_new_items": len(self.widely_after),
            "good_new_served_widely": len(reached),
            "median_requests_to_widely": float(np.median(reached)) if reached else None,
        }


def run_policy(
    base: Settings,
    policy: str,
    config: SimConfig,
    world_factory: Callable[[], World],
    port: int,
    *,
    params: dict[str, float] | None = None,
    decisions: list[ips.Decision] | None = None,
) -> tuple[PolicyRun, int]:
    """One closed-loop run of ``policy`` (``params``: its serving settings, e.g. ``ucb_c``) on its own
    topics, database prefix and home; with ``decisions``, every response is appended to it."""
    world = world_factory()
    rng = np.random.default_rng(config.seed + 1)
    tag = f"sim-{policy}-{config.seed}-{uuid.uuid4().hex[:6]}"
    settings = base.model_copy(
        update={
            "topic_prefix": f"{base.topic_prefix}{tag}.",
            "home": base.home / "simulate" / tag,
            "api_port": port,
            "api_token": None,
            "stream": StreamSettings(group_id=tag, batch_timeout_s=0.05, heads=("mf",)),
            "train": TrainSettings(max_len=20, dim=32, blocks=1, epochs=3, negatives=256, budget_s=20),
            "serve": ServeSettings(policy=policy, seed=config.seed, **(params or {})),
        }
    )
    ensure_topics(settings)
    publisher = Publisher(settings, snapshots=SnapshotStore.for_settings(settings))
    stack = ServingStack(settings)
    records: dict[str, Exploration] = {}
    if decisions is not None:
        stack.recommender.on_decision(
            lambda served: (
                records.__setitem__(served.request_id, served.exploration)
                if served.exploration is not None
                else None
            )
        )
    tuner = FineTuner(settings, publisher=publisher, source=lambda: (_histories(stack, world), 0))
    result = PolicyRun(policy=policy, seed=config.seed)
    now = int(time.time() * 1000)
    try:
        with httpx.Client(base_url=f"http://{settings.api_host}:{port}", timeout=30) as http:
            # The users' past: their last 30 views, published as events; the model trains on them.
            events = [
                {
                    "event_id": f"{tag}-h-{user}-{n}",
                    "user_id": user,
                    "item_id": item,
                    "type": "view",
                    "ts": now - 3_600_000 + n,
                }
                for user, items in world.histories.items()
                for n, item in enumerate(items)
            ]
            tuner.source = lambda: (dict(world.histories), len(events))
            tuner.cycle()
            tuner.source = lambda: (_histories(stack, world), 0)
            stack.start()
            for start in range(0, len(events), 500):
                http.post("/v1/events", json=events[start : start + 500]).raise_for_status()
            deadline = time.monotonic() + 60
            while stack.worker.stats.counted < len(events) and time.monotonic() < deadline:
                time.sleep(0.05)
            released_at: int | None = None
            for step in range(config.requests):
                if step == int(config.release_at * config.requests):
                    released_at = step
                    for item in world.release(config.new_items, rng):
                        launch = {"event_id": f"{tag}-launch-{item}", "user_id": "launch", "item_id": item,
                                  "type": "view", "ts": _ms()}  # fmt: skip
                        http.post("/v1/events", json=launch).raise_for_status()
                        if item in world.good_new:
                            result.widely_after[item] = None
                if step == int(config.drift_at * config.requests):
                    world.drift(rng)
                if step and step % config.finetune_every == 0:
                    tuner.cycle()
                user = int(rng.integers(len(world.users)))
                name = world.users[user]
                body = (
                    http.get(f"/v1/recommendations/{name}", params={"k": config.k}).raise_for_status().json()
                )
                shown = [i["item_id"] for i in body["items"]]
                clicked = [i for i, p in zip(shown, world.click_probabilities(user, shown), strict=True)
                           if rng.random() < p]  # fmt: skip
                if clicked:
                    request = body["request_id"]
                    clicks = [
                        {"event_id": f"{tag}-c-{request}-{i}", "user_id": name, "item_id": i, "type": "click",
                         "ts": _ms(), "request_id": request}
                        for i in clicked
                    ]  # fmt: skip
                    http.post("/v1/events", json=clicks).raise_for_status()
                record = records.pop(body["request_id"], None)
                if decisions is not None and record is not None:
                    decisions.append(ips.Decision(record, shown, frozenset(clicked)))
                result.requests += 1
                result.clicks += len(clicked)
                result.shown.update(shown)
                result.ctr_curve.append(result.clicks / result.requests)
                result.coverage_curve.append(len(result.shown) / len(world.items))
                result.new_curve.append(sum(result.shown[item] for item in world.good_new))
                if released_at is not None:
                    for item in shown:
                        waiting = item in result.widely_after and result.widely_after[item] is None
                        if waiting and result.shown[item] >= config.widely:
                            result.widely_after[item] = step - released_at
    finally:
        stack.stop()
        publisher.close()
    return result, len(world.items)


def _histories(stack: ServingStack, world: World) -> dict[str, list[str]]:
    """The freshest window for a fine-tune: the stream's histories of the simulated users."""
    with stack.worker.lock:
        return {user: items for user in world.users if (items := stack.worker.state.histories.items(user))}


def _ms() -> int:
    return int(time.time() * 1000)


def run(
    settings: Settings,
    config: SimConfig,
    *,
    policies: tuple[str, ...],
    seeds: tuple[int, ...],
    port: int,
    plot: Path | None,
) -> list[dict[str, Any]]:
    """Every policy on every seed; returns one summary per run and writes the plot."""
    path = _dataset(settings)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    summaries, runs = [], []
    for seed in seeds:
        seeded = SimConfig(**{**asdict(config), "seed": seed})
        for policy in policies:
            logger.info("simulating %s, seed %d", policy, seed)
            result, catalogue = run_policy(
                settings, policy, seeded, functools.partial(World.from_movielens, path, seeded), port
            )
            runs.append(result)
            summaries.append(result.summary(catalogue))
    if plot is not None:
        _plot(runs, plot, config)
    return summaries


def ope(
    settings: Settings,
    config: SimConfig,
    *,
    seeds: tuple[int, ...],
    port: int,
    logging_policy: tuple[str, dict[str, float]] = ("uncertainty", {}),
    targets: tuple[tuple[str, dict[str, float]], ...] = OPE_TARGETS,
    estimators: tuple[str, ...] = ESTIMATORS,
    plot: Path | None = None,
) -> dict[str, Any]:
    """Per seed: run the logging policy, estimate every target from its decisions, run each target
    on-policy for its true click rate per slot. Returns ``{"ope": [...], "summary": [...], "runs":
    [...]}``: one row per seed, target and estimator, each estimator's coverage and mean relative
    error, and every run's summary."""
    path = _dataset(settings)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    rows: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    for seed in seeds:
        seeded = SimConfig(**{**asdict(config), "seed": seed})
        world = functools.partial(World.from_movielens, path, seeded)
        decisions: list[ips.Decision] = []
        name, params = logging_policy
        logger.info("simulating the logging policy %s %s, seed %d", name, params, seed)
        logged, catalogue = run_policy(
            settings, name, seeded, world, port, params=params, decisions=decisions
        )
        summaries.append(logged.summary(catalogue) | {"params": params, "role": "logging"})
        for policy, target_params in targets:
            estimate = ips.evaluate_decisions(decisions, policy, target_params, estimators=estimators)
            logger.info("simulating the target %s %s on-policy, seed %d", policy, target_params, seed)
            truth_run, catalogue = run_policy(settings, policy, seeded, world, port, params=target_params)
            summaries.append(truth_run.summary(catalogue) | {"params": target_params, "role": "target"})
            truth = truth_run.clicks / max(sum(truth_run.shown.values()), 1)
            for result in estimate.results:
                rows.append(
                    {
                        "seed": seed,
                        "logging": name,
                        "target": policy,
                        "params": target_params,
                        "estimator": result.estimator,
                        "estimate": result.estimate,
                        "ci95": [result.ci_low, result.ci_high],
                        "truth": truth,
                        "ess": result.ess,
                        "unsupported": estimate.unsupported,
                        "logged_ctr": estimate.observed_ctr,
                    }
                )
    if plot is not None:
        _plot_ope(rows, plot)
    return {"ope": rows, "summary": ope_summary(rows), "runs": summaries}


def ope_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per estimator: how often the truth lies in its 95% interval, and its mean relative error.

    >>> rows = [{"estimator": "dr", "estimate": 0.11, "ci95": [0.1, 0.12], "truth": 0.1},
    ...         {"estimator": "dr", "estimate": 0.2, "ci95": [0.19, 0.21], "truth": 0.25}]
    >>> [(s["estimator"], s["covered"], round(s["mean_relative_error"], 3)) for s in ope_summary(rows)]
    [('dr', 1, 0.15)]
    """
    out = []
    for estimator in dict.fromkeys(r["estimator"] for r in rows):
        mine = [r for r in rows if r["estimator"] == estimator]
        covered = sum(1 for r in mine if r["ci95"][0] <= r["truth"] <= r["ci95"][1])
        errors = [abs(r["estimate"] - r["truth"]) / r["truth"] for r in mine if r["truth"] > 0]
        out.append(
            {
                "estimator": estimator,
                "cases": len(mine),
                "covered": covered,
                "coverage": covered / len(mine),
                "mean_relative_error": float(np.mean(errors)) if errors else float("nan"),
            }
        )
    return out


def _dataset(settings: Settings) -> Path:
    if settings.datasets_dir is None or not (settings.datasets_dir / "ml-100k" / "u.data.gz").exists():
        raise DatasetError(
            "the simulator fits its users on ml-100k: set FRESHREC_DATASETS_DIR to where it is"
        )
    return settings.datasets_dir / "ml-100k" / "u.data.gz"


def _plot_ope(rows: list[dict[str, Any]], path: Path) -> None:
    """Estimate (with its interval) against the truth, one panel per estimator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    estimators = list(dict.fromkeys(r["estimator"] for r in rows))
    figure, axes = plt.subplots(1, len(estimators), figsize=(5 * len(estimators), 4.5), squeeze=False)
    labels = list(dict.fromkeys(_label(r) for r in rows))
    colours = {label: f"C{n}" for n, label in enumerate(labels)}
    values = [v for r in rows for v in (r["truth"], r["estimate"])]
    low, high = min(values) * 0.9, max(values) * 1.1
    for axis, estimator in zip(axes[0], estimators, strict=True):
        shown: set[str] = set()
        for r in (r for r in rows if r["estimator"] == estimator):
            label = _label(r)
            axis.errorbar(
                r["truth"],
                r["estimate"],
                yerr=[[r["estimate"] - r["ci95"][0]], [r["ci95"][1] - r["estimate"]]],
                fmt="o",
                color=colours[label],
                label=None if label in shown else label,
                capsize=3,
                markersize=4,
            )
            shown.add(label)
        axis.plot([low, high], [low, high], color="grey", linestyle=":", linewidth=1)
        axis.set_xlim(low, high)
        axis.set_ylim(low, high)
        axis.set_title(f"{estimator.upper()}: estimate (95% CI) vs on-policy truth")
        axis.set_xlabel("true click rate per slot")
        axis.set_ylabel("estimate from the uncertainty log")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    logger.info("plot written to %s", path)


def _label(row: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v:g}" for k, v in row["params"].items())
    return f"{row['target']} {params}".strip()


# Student's t, 97.5th percentile, by degrees of freedom (a 95% two-sided interval), rounded up.
_T975 = {1: 12.707, 2: 4.303, 3: 3.183, 4: 2.777, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.263, 10: 2.229, 12: 2.179, 15: 2.132, 20: 2.086, 25: 2.060, 30: 2.043, 40: 2.022,
         60: 2.001, 120: 1.980}  # fmt: skip


def _t975(df: int) -> float:
    """The value for the largest tabulated df not above ``df`` (t falls with df: never too narrow)."""
    return _T975[max(d for d in _T975 if d <= df)]


def paired(
    summaries: list[dict[str, Any]], *, baseline: str = "none", metric: str = "clicks_per_request"
) -> list[dict[str, Any]]:
    """Each policy against ``baseline`` on the seeds both ran: the mean relative difference of
    ``metric`` (``policy / baseline - 1``) and its 95% t interval over the pairs.

    Runs are paired by seed because a seed fixes the users, their tastes and the new items, the
    largest source of variance between runs; the interval still includes the run-to-run noise of
    the wall-clock driven stack. A seed run twice pairs its runs in order. With one pair the
    interval is unbounded (``-inf``, ``inf``); with none, everything is NaN (JSON: null). A pair
    whose baseline is 0 is left out, with a warning.

    >>> rows = [{"policy": p, "seed": s, "clicks_per_request": v} for p, s, v in
    ...         [("none", 0, 1.0), ("none", 1, 2.0), ("uncertainty", 0, 0.9), ("uncertainty", 1, 1.9)]]
    >>> [(r["policy"], r["seeds"], round(r["mean"], 3)) for r in paired(rows)]
    [('uncertainty', 2, -0.075)]
    """
    runs: dict[tuple[str, Any], list[float]] = {}
    for summary in summaries:
        runs.setdefault((summary["policy"], summary["seed"]), []).append(float(summary[metric]))
    out = []
    for policy in dict.fromkeys(s["policy"] for s in summaries if s["policy"] != baseline):
        ratios = []
        for (name, seed), values in runs.items():
            if name != policy:
                continue
            for value, base in zip(values, runs.get((baseline, seed), []), strict=False):
                if base == 0:
                    logger.warning("%s, seed %s: %s is 0 under %s; left out", policy, seed, metric, baseline)
                    continue
                ratios.append(value / base - 1)
        n = len(ratios)
        mean = float(np.mean(ratios)) if n else float("nan")
        if n > 1:
            half = _t975(n - 1) * float(np.std(ratios, ddof=1)) / math.sqrt(n)
        else:
            half = float("inf") if n else float("nan")
        row = {"policy": policy, "baseline": baseline, "metric": metric, "seeds": n, "mean": mean}
        out.append(row | {"low": mean - half, "high": mean + half})
    return out


def _plot(runs: list[PolicyRun], path: Path, config: SimConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    # One colour per policy, one line per seed (labelled once): with many seeds, a colour per run
    # repeats colours and hides which policy is which.
    colours = {policy: f"C{n}" for n, policy in enumerate(dict.fromkeys(r.policy for r in runs))}
    seeds = len({r.seed for r in runs})
    labelled: set[str] = set()
    for result in runs:
        label = None if result.policy in labelled else f"{result.policy} ({seeds} seed{'s' * (seeds > 1)})"
        labelled.add(result.policy)
        style = {"color": colours[result.policy], "linewidth": 1.0, "alpha": 0.8, "label": label}
        left.plot(result.ctr_curve, **style)
        middle.plot(result.coverage_curve, **style)
        right.plot(result.new_curve, **style)
    panels = (
        (left, "clicks per request (cumulative)"),
        (middle, "catalogue coverage"),
        (right, "impressions of the good new items"),
    )
    for axis, title in panels:
        axis.axvline(config.release_at * config.requests, color="grey", linestyle=":", linewidth=1)
        axis.axvline(config.drift_at * config.requests, color="grey", linestyle="--", linewidth=1)
        axis.set_title(title)
        axis.set_xlabel("requests")
    left.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    logger.info("plot written to %s", path)

"""The off-policy estimators against an independent computation of Open Bandit Pipeline's formulas,
and their intervals against a known truth."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.ope import SlateLog, estimate
from freshrec.errors import ConfigError


def _fixed_bandit_log(seed: int = 7, n: int = 400, actions: int = 5) -> dict[str, np.ndarray]:
    """A logged bandit in obp's layout (``action_dist`` of shape (n, actions, 1), len_list = 1)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, actions))
    behaviour = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    action = np.array([rng.choice(actions, p=p) for p in behaviour])
    pscore = behaviour[np.arange(n), action]
    truth = rng.uniform(0.05, 0.4, size=(n, actions))
    reward = (rng.random(n) < truth[np.arange(n), action]).astype(float)
    target = np.exp(2 * logits[:, ::-1])
    action_dist = (target / target.sum(axis=1, keepdims=True))[:, :, None]
    q_hat = np.clip(truth + rng.normal(scale=0.05, size=truth.shape), 0, 1)[:, :, None]
    return {"action": action, "pscore": pscore, "reward": reward, "action_dist": action_dist, "q_hat": q_hat}


def _as_slate_log(b: dict[str, np.ndarray]) -> SlateLog:
    n = len(b["action"])
    rows = np.arange(n)
    iw = b["action_dist"][rows, b["action"], 0] / b["pscore"]
    return SlateLog.from_arrays(
        rounds=rows,
        reward=b["reward"],
        weight=iw,
        q_hat=b["q_hat"][rows, b["action"], 0],
        direct=(b["action_dist"][:, :, 0] * b["q_hat"][:, :, 0]).sum(axis=1),
        mass=np.ones(n),
        size=np.ones(n),
    )


def test_estimates_match_obp_formulas_computed_independently() -> None:
    """Mirrors obp 0.5.7 ``InverseProbabilityWeighting``, ``SelfNormalizedInverseProbabilityWeighting``
    and ``DoublyRobust`` (their ``_estimate_round_rewards`` with ``position = 0`` and no clipping,
    then ``.mean()``), written here in NumPy: obp 0.5.7 pins numpy and scikit-learn versions older
    than this project's."""
    b = _fixed_bandit_log()
    n = len(b["action"])
    rows, position = np.arange(n), np.zeros(n, dtype=int)
    iw = b["action_dist"][rows, b["action"], position] / b["pscore"]
    obp_ips = (b["reward"] * iw).mean()
    obp_snips = (b["reward"] * iw / iw.mean()).mean()
    q_at_position = b["q_hat"][rows, :, position]
    q_factual = b["q_hat"][rows, b["action"], position]
    obp_dr = (
        np.average(q_at_position, weights=b["action_dist"][rows, :, position], axis=1)
        + iw * (b["reward"] - q_factual)
    ).mean()

    log = _as_slate_log(b)
    ips, snips, dr = (estimate(log, name) for name in ("ips", "snips", "dr"))
    assert ips.estimate == pytest.approx(obp_ips, rel=1e-12)
    assert snips.estimate == pytest.approx(obp_snips, rel=1e-12)
    assert dr.estimate == pytest.approx(obp_dr, rel=1e-12)
    # The three differ on this log (a test that would pass with one formula for all would be void).
    assert len({round(x, 6) for x in (obp_ips, obp_snips, obp_dr)}) == 3

    # Normal 95% interval of the round values, and Kish's effective sample size.
    values = b["reward"] * iw
    half = 1.959964 * values.std(ddof=1) / np.sqrt(n)
    assert (ips.ci_low, ips.ci_high) == pytest.approx((obp_ips - half, obp_ips + half), rel=1e-6)
    assert ips.ess == pytest.approx(iw.sum() ** 2 / (iw**2).sum())
    assert 1 < ips.ess < n and ips.rounds == n and ips.slots == n
    assert snips.ci_low < snips.estimate < snips.ci_high and dr.ci_low < dr.estimate < dr.ci_high


def test_slate_rounds_are_the_samples_and_snips_uses_the_supported_mass() -> None:
    """Two slots per round: values are per slot; SNIPS normalises the weights by their known
    expectation (the mass), so full support and unit weights give the plain click rate."""
    log = SlateLog.from_arrays(
        rounds=[0, 0, 1, 1, 2, 2], reward=[1, 0, 0, 0, 1, 1], weight=[1.0] * 6, q_hat=[0.0] * 6,
        direct=[0.0, 0.0, 0.0], mass=[2.0, 2.0, 2.0], size=[2, 2, 2],
    )  # fmt: skip
    for name in ("ips", "snips", "dr"):
        assert estimate(log, name).estimate == pytest.approx(0.5)
    # Per-round values 0.5, 0, 1: the interval is over the three rounds, not the six slots.
    half = 1.959964 * np.std([0.5, 0.0, 1.0], ddof=1) / np.sqrt(3)
    ips = estimate(log, "ips")
    assert (ips.ci_low, ips.ci_high) == pytest.approx((0.5 - half, 0.5 + half), rel=1e-6)
    # Half the target's mass unsupported (mass 1 of 2 slots): SNIPS scales by it, as IPS counts
    # the unsupported items as no clicks.
    half_mass = SlateLog.from_arrays(
        rounds=log.rounds, reward=log.reward, weight=log.weight, q_hat=log.q_hat, direct=log.direct,
        mass=[1.0, 1.0, 1.0], size=log.size,
    )  # fmt: skip
    assert estimate(half_mass, "snips").estimate == pytest.approx(0.25)


def test_intervals_cover_a_known_truth_about_95_percent_of_the_time() -> None:
    """200 logs of a bandit whose target value is known exactly: each estimator's 95% interval
    holds the truth in 90-99% of them."""
    rng = np.random.default_rng(11)
    actions, n = 4, 600
    ctr = np.array([0.30, 0.10, 0.05, 0.20])
    behaviour = np.array([0.4, 0.3, 0.2, 0.1])
    target = np.array([0.1, 0.1, 0.1, 0.7])
    truth = float(target @ ctr)
    q_hat = ctr + np.array([0.05, -0.03, 0.02, -0.04])  # a reward model that is a little wrong
    covered = dict.fromkeys(("ips", "snips", "dr"), 0)
    for _ in range(200):
        action = rng.choice(actions, size=n, p=behaviour)
        reward = (rng.random(n) < ctr[action]).astype(float)
        log = SlateLog.from_arrays(
            rounds=np.arange(n), reward=reward, weight=target[action] / behaviour[action],
            q_hat=q_hat[action], direct=np.full(n, float(target @ q_hat)), mass=np.ones(n),
            size=np.ones(n),
        )  # fmt: skip
        for name in covered:
            result = estimate(log, name)
            covered[name] += result.ci_low <= truth <= result.ci_high
    assert all(180 <= c <= 198 for c in covered.values()), covered


def test_bad_logs_and_estimators_are_refused_with_what_to_fix() -> None:
    good = {"rounds": [0], "reward": [1], "weight": [1.0], "q_hat": [0.1], "direct": [0.1],
            "mass": [1.0], "size": [1]}  # fmt: skip
    with pytest.raises(ConfigError, match="known: ips, snips, dr"):
        estimate(SlateLog.from_arrays(**good), "switch")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"rounds must lie in 0\.\.0"):
        SlateLog.from_arrays(**{**good, "rounds": [1]})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="non-negative"):
        SlateLog.from_arrays(**{**good, "weight": [-1.0]})  # type: ignore[arg-type]
    single = estimate(SlateLog.from_arrays(**good), "ips")  # type: ignore[arg-type]
    assert single.estimate == 1.0 and single.ci_high == float("inf")

"""``freshrec eval ...`` and ``freshrec simulate``: how good is what freshrec serves."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from freshrec_app.cli_common import (
    emit_json,
    ensure_kafka,
    err,
    errors,
    load_settings,
    print_table,
    progress_bar,
)

__all__ = ["eval_", "simulate"]

logger = logging.getLogger(__name__)


@click.group("eval")
def eval_() -> None:
    """Evaluate the recommenders."""


@eval_.command("prequential")
@click.argument("dataset")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N events.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_prequential(dataset: str, limit: int | None, as_json: bool) -> None:
    """Test-then-train HR@10 / NDCG@10 of each method over DATASET, replayed through Kafka."""
    from evaluation import prequential
    from freshrec.store import open_store

    settings = load_settings()
    ensure_kafka(settings)
    with errors(), progress_bar(f"prequential {dataset}", sys.stderr.isatty()) as progress:
        store = open_store(settings)
        try:
            result = prequential.run(settings, store, dataset, limit=limit, progress=progress)
        finally:
            store.close()
    if as_json:
        emit_json({k: result[k] for k in ("dataset", "events", "methods")})
        return
    rows = [(m, f"{v['hr@10']:.4f}", f"{v['ndcg@10']:.4f}") for m, v in result["methods"].items()]
    print_table(
        ["method", "HR@10", "NDCG@10"], rows, title=f"prequential {dataset}, {result['events']:,} events"
    )


@eval_.command("replay")
@click.argument("dataset")
@click.option("--limit", type=click.IntRange(min=1), help="Replay only the first N events.")
@click.option(
    "--sample",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=1.0,
    show_default=True,
    help="Share of the events scored (one seeded subset for every method); every event is learned.",
)
@click.option(
    "--finetune-every",
    type=click.IntRange(min=0),
    default=10_000,
    show_default=True,
    help="Events between two fine-tunes of the transformer, in event order (0: never).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample and of exploration.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default="replay.png",
    show_default=True,
    help="Where the plot of HR@10 over event time goes.",
)
@click.option(
    "--no-freshness-control",
    is_flag=True,
    help="Skip transformer_stale, the freshness control (it doubles the fine-tunes' cost; for data "
    "without a time order it measures nothing).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_replay(
    dataset: str,
    limit: int | None,
    sample: float,
    finetune_every: int,
    seed: int,
    plot: str,
    no_freshness_control: bool,
    as_json: bool,
) -> None:
    """HR@10 / NDCG@10 of the served list and of each source, each event scored before it is learned."""
    from evaluation import replay as replay_eval
    from freshrec.store import open_store

    settings = load_settings()
    ensure_kafka(settings)
    with errors(), progress_bar(f"eval replay {dataset}", sys.stderr.isatty()) as progress:
        config = replay_eval.ReplayConfig(
            finetune_every=finetune_every,
            sample=sample,
            seed=seed,
            freshness_control=not no_freshness_control,
        )
        store = open_store(settings)
        try:
            result = replay_eval.run(
                settings, store, dataset, limit=limit, config=config, plot=Path(plot), progress=progress
            )
        finally:
            store.close()
    if as_json:
        keys = ("dataset", "events", "scored", "methods", "paired", "over_time")
        emit_json({k: result[k] for k in keys})
        return
    rows = [
        (m, f"{v['hr@10']:.4f}", f"[{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]", f"{v['ndcg@10']:.4f}")
        for m, v in result["methods"].items()
    ]
    title = f"replay {dataset}: {result['scored']:,} of {result['events']:,} events scored"
    print_table(["method", "HR@10", "95% CI", "NDCG@10"], rows, title=title)
    err.print(f"plot: {plot}", highlight=False)


@eval_.command("ips")
@click.option(
    "--policy",
    type=click.Choice(["logging", "none", "epsilon", "uncertainty"]),
    default="logging",
    show_default=True,
    help="Target policy. logging: the one that served (a check of the log); the others are "
    "evaluated from each response's logged exploration record.",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="Repeatable: a target parameter over the logged one "
    "(epsilon; explore_fraction, ucb_c, temperature).",
)
@click.option(
    "--estimator",
    "estimators",
    type=click.Choice(["ips", "snips", "dr"]),
    multiple=True,
    help="Repeatable; default: all three.",
)
@click.option("--logged-by", help="Only responses served by this policy (uncertainty, epsilon, none).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_ips(
    policy: str, params: tuple[str, ...], estimators: tuple[str, ...], logged_by: str | None, as_json: bool
) -> None:
    """Off-policy estimate of a policy's click rate per slot, from the decision log alone."""
    from evaluation import ips
    from freshrec.errors import ConfigError
    from freshrec.store import open_store

    settings = load_settings()
    with errors():
        values: dict[str, float] = {}
        for param in params:
            name, sep, value = param.partition("=")
            try:
                values[name.strip()] = float(value)
            except ValueError:
                sep = ""
            if not sep:
                raise ConfigError(f"--param {param!r}: write NAME=NUMBER, e.g. --param ucb_c=1.5")
        if policy == "logging" and (values or estimators):
            raise ConfigError(
                "--param and --estimator apply to a target policy: add --policy none|epsilon|uncertainty"
            )
        store = open_store(settings)
        try:
            if policy == "logging":
                estimate = ips.evaluate(store, policy=logged_by)
            else:
                target = ips.evaluate_policy(
                    store,
                    policy=policy,
                    params=values,
                    estimators=estimators or ("ips", "snips", "dr"),
                    logging_policy=logged_by,
                )
        finally:
            store.close()
    if policy != "logging":
        if as_json:
            emit_json(target.to_json())
            return
        table = [
            (r.estimator, f"{r.estimate:.4f}", f"[{r.ci_low:.4f}, {r.ci_high:.4f}]", f"{r.ess:,.0f}")
            for r in target.results
        ]
        params_text = ", ".join(f"{k}={v:g}" for k, v in target.params.items()) or "no parameters"
        title = (
            f"{policy} ({params_text}) from {target.responses:,} responses logged by {target.logging}; "
            f"observed CTR {target.observed_ctr:.4f}, unsupported {target.unsupported:.1%}"
        )
        print_table(["estimator", "click rate per slot", "95% CI", "effective slots"], table, title=title)
        return
    if as_json:
        emit_json(estimate.to_json())
        return
    rows = [
        ("slots", f"{estimate.slots:,}"),
        ("clicks", f"{estimate.clicks:,}"),
        ("observed CTR", f"{estimate.observed_ctr:.4f}"),
        ("IPS (95% CI)", f"{estimate.ips:.4f} [{estimate.ci_low:.4f}, {estimate.ci_high:.4f}]"),
        ("SNIPS", f"{estimate.snips:.4f}"),
        ("explore / exploit CTR", f"{estimate.explore_ctr} / {estimate.exploit_ctr}"),
    ]
    print_table(["", ""], rows, title=f"IPS, target: {estimate.target}")


@click.command()
@click.option(
    "--requests", type=click.IntRange(min=10), default=1_500, show_default=True, help="Per policy run."
)
@click.option("--users", type=click.IntRange(min=2), default=200, show_default=True)
@click.option("--seed", "seeds", type=int, multiple=True, help="Repeatable; default: 0 and 1.")
@click.option(
    "--policy",
    "policies",
    type=click.Choice(["none", "epsilon", "uncertainty"]),
    multiple=True,
    help="Repeatable; default: all three.",
)
@click.option("--plot", type=click.Path(dir_okay=False), default="simulation.png", show_default=True)
@click.option(
    "--ope",
    is_flag=True,
    help="Off-policy check: log with uncertainty, estimate none, epsilon (0.05, 0.2) and uncertainty "
    "(ucb_c 1, 3) from that log, run each on-policy for the truth (--policy is ignored).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summaries as JSON.")
def simulate(
    requests: int,
    users: int,
    seeds: tuple[int, ...],
    policies: tuple[str, ...],
    plot: str,
    ope: bool,
    as_json: bool,
) -> None:
    """Closed loop: simulated users with hidden tastes against the real stack, policy by policy."""
    from pathlib import Path

    from evaluation import simulator

    settings = load_settings()
    ensure_kafka(settings)
    config = simulator.SimConfig(requests=requests, users=users)
    if ope:
        with errors():
            report = simulator.ope(
                settings, config, seeds=seeds or (0, 1, 2), port=settings.api_port, plot=Path(plot)
            )
        if as_json:
            emit_json(report)
            return
        print_table(
            ["seed", "target", "params", "estimator", "estimate", "95% CI", "truth", "ESS"],
            [
                [r["seed"], r["target"], ", ".join(f"{k}={v:g}" for k, v in r["params"].items()),
                 r["estimator"], f"{r['estimate']:.4f}", f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]",
                 f"{r['truth']:.4f}", f"{r['ess']:,.0f}"]
                for r in report["ope"]
            ],
            title="off-policy estimates from the uncertainty log against each target run on-policy",
        )  # fmt: skip
        print_table(
            ["estimator", "truth inside the 95% CI", "mean relative error"],
            [[s["estimator"], f"{s['covered']} of {s['cases']}", f"{s['mean_relative_error']:.1%}"]
             for s in report["summary"]],
            title="per estimator",
        )  # fmt: skip
        err.print(f"plot: {plot}", highlight=False)
        return
    with errors():
        summaries = simulator.run(
            settings,
            config,
            policies=policies or ("none", "epsilon", "uncertainty"),
            seeds=seeds or (0, 1),
            port=settings.api_port,
            plot=Path(plot),
        )
    comparison = simulator.paired(summaries) if "none" in {s["policy"] for s in summaries} else []
    if as_json:
        emit_json({"runs": summaries, "against_none": comparison})
        return
    columns = ["policy", "seed", "clicks_per_request", "coverage", "good_new_served_widely",
               "median_requests_to_widely"]  # fmt: skip
    print_table(columns, [[s[c] for c in columns] for s in summaries], title="closed-loop simulation")
    if comparison:
        print_table(
            ["policy", "seeds", "clicks/request vs none", "95% interval"],
            [
                [c["policy"], c["seeds"], f"{c['mean']:+.1%}", f"[{c['low']:+.1%}, {c['high']:+.1%}]"]
                for c in comparison
            ],
            title="paired by seed",
        )
    err.print(f"plot: {plot}", highlight=False)

"""The replay evaluation on a dataset, on a broker of its own: HR@10 / NDCG@10 with intervals per
method, each as a ratio to popularity (the baseline, scored on the same requests), and the wall time.

    .venv/bin/python bench/replay_eval.py ml-100k --sample 0.2 --finetune-every 10000 --out replay.json

What ``freshrec eval replay`` does, without a deployment: the run's topics live on a broker started
for it (or ``FRESHREC_KAFKA_BOOTSTRAP``), its ``eval_runs`` rows in a chDB home that goes with it.
Training settings come from the environment (``FRESHREC_TRAIN__*``), as for the CLI.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import bench_cluster

from evaluation import replay as replay_eval
from evaluation.replay import ReplayConfig
from freshrec.store import open_store


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset")
    parser.add_argument("--limit", type=int, default=None, help="Replay only the first N events.")
    parser.add_argument("--sample", type=float, default=1.0, help="Share of the events scored.")
    parser.add_argument("--finetune-every", type=int, default=10_000, help="Events between fine-tunes.")
    parser.add_argument("--first-epochs", type=int, default=None, help="Epochs of the first training.")
    parser.add_argument("--first-budget-s", type=float, default=None, help="Budget of the first training.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=None, help="Write the HR@10-over-time plot here.")
    parser.add_argument(
        "--no-freshness-control",
        action="store_true",
        help="Skip transformer_stale (for data without a time order; it doubles the fine-tunes).",
    )
    parser.add_argument("--out", type=Path, default=None, help="Write the whole result as JSON here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("publishers.publisher").setLevel(logging.WARNING)
    config = ReplayConfig(
        finetune_every=args.finetune_every,
        sample=args.sample,
        seed=args.seed,
        first_epochs=args.first_epochs,
        first_budget_s=args.first_budget_s,
        freshness_control=not args.no_freshness_control,
    )
    load = os.getloadavg()
    started = time.perf_counter()
    with bench_cluster() as settings:
        store = open_store(settings)
        try:
            result = replay_eval.run(
                settings, store, args.dataset, limit=args.limit, config=config, plot=args.plot
            )
        finally:
            store.close()
    wall = time.perf_counter() - started
    base = result["methods"]["popularity"]["hr@10"] or float("nan")
    print(f"replay {args.dataset}: {result['events']:,} events, {result['scored']:,} scored "
          f"({result['scorable']:,} scorable), {len(result['finetunes'])} fine-tunes, "
          f"{wall:.0f} s wall (load average before: {load[0]:.1f}), fusion {result['fusion']}")  # fmt: skip
    print(f"{'method':<20} {'HR@10':>7} {'95% CI':>17} {'NDCG@10':>8} {'x pop':>6}")
    for method, m in result["methods"].items():
        (lo, hi), ratio = m["ci95"], m["hr@10"] / base
        print(f"{method:<20} {m['hr@10']:7.4f}   [{lo:.4f}, {hi:.4f}] {m['ndcg@10']:8.4f} {ratio:6.2f}")
    print(f"share of served slots already seen by the user: {result['served_seen_share']}")
    print("paired HR@10 differences (same requests):")
    for pair, d in result["paired"].items():
        lo, hi = d["ci95"]
        print(f"  {pair:<36} {d['hr@10']:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    if args.out is not None:
        args.out.write_bytes(
            orjson.dumps(result | {"bench_wall_s": wall, "load_before": load}, option=orjson.OPT_INDENT_2)
        )


if __name__ == "__main__":
    main()

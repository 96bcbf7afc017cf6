"""Offline transformer benchmark: loss and block variants x seeds under the leave-last-out protocol.

Each setting trains with early stopping on validation NDCG@10 (:func:`evaluation.offline.run`, the
code behind ``freshrec train --offline``) once per seed, and reports test HR@10 / NDCG@10 as the
mean of the seeds with a 95% Student-t interval, the wall time per epoch, and the popularity
baseline of the same split as the ratio's denominator. Settings (``--setting``, repeatable):

- ``sasrec-sampled``: SASRec's block, sampled softmax (1,024 shared uniform negatives, log-Q corrected)
- ``sasrec-full``: SASRec's block, full softmax over the catalogue
- ``hstu-full``: the HSTU block, full softmax
- ``hstu-sampled``: the HSTU block, sampled softmax

``--delta-window N`` measures instead what one fine-tune cycle publishes: a model warmed on all but
the last ``N`` events (one epoch), then a cycle of ``--cycle-epochs`` passes over those ``N`` events'
histories, as :class:`learners.finetune.FineTuner` does (``--softmax-over window``, its choice, or
``catalogue``); it prints the rows touched and the rows a
sparse delta ships at each ``--min-change`` (``delta_min_change``), for each ``--setting``.

Common options override the model (``--max-len``, ``--dim``, ``--dropout``, ``--blocks``) and the
schedule (``--lr``, ``--batch-size``, ``--max-epochs``, ``--patience``). Example::

    .venv/bin/python bench/transformer_offline.py ml-100k --setting sasrec-full --seeds 0 1 2 \\
        --max-len 200 --max-epochs 150 --patience 20 --json
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import orjson

from evaluation import offline
from freshrec.datasets import load_dataset
from freshrec.settings import Settings
from learners.sasrec import SASRecConfig
from learners.sequences import sequences_from_records
from learners.training import SequenceTrainer, TrainConfig

SETTINGS: dict[str, SASRecConfig] = {
    "sasrec-sampled": SASRecConfig(block="sasrec", loss="sampled", negatives=1024),
    "sasrec-full": SASRecConfig(block="sasrec", loss="full"),
    "hstu-full": SASRecConfig(block="hstu", loss="full"),
    "hstu-sampled": SASRecConfig(block="hstu", loss="sampled", negatives=1024),
}

# Two-sided 95% Student-t quantiles by degrees of freedom (seeds - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval of ``values`` (a single value has a zero-width interval)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def delta_sizes(
    dataset: str,
    config: SASRecConfig,
    *,
    window: int,
    epochs: int,
    thresholds: list[float],
    seed: int,
    softmax_over: str,
    batch_size: int,
) -> dict[str, Any]:
    """Rows touched and rows shipped by one fine-tune cycle over the last ``window`` events."""
    settings = Settings()
    data = load_dataset(dataset, datasets_dir=settings.datasets_dir, cache_dir=settings.cache_dir)
    records = sorted(data.records, key=lambda r: r.ts_ms or 0)
    trainer = SequenceTrainer(config=config, train=TrainConfig(seed=seed, batch_size=batch_size))
    warm = trainer.rows_for(sequences_from_records(records[:-window]))
    trainer.fit(warm, epochs=1)
    trainer.clear_touched()  # the warm model is what was published
    trainer.train_config = replace(trainer.train_config, softmax_over=softmax_over)
    fresh = sequences_from_records(records[-window:])
    started = time.monotonic()
    trainer.fit(trainer.rows_for(fresh), epochs=epochs)
    seconds = time.monotonic() - started
    shipped = {}
    for threshold in thresholds:
        trainer.train_config = replace(trainer.train_config, delta_min_change=threshold)
        shipped[str(threshold)] = len(trainer.touched_rows())
    return {
        "items": len(trainer.items),
        "window_items": len({i for items in fresh.values() for i in items}),
        "touched": int(trainer._touched.sum()),
        "shipped": shipped,
        "row_bytes": 4 * config.dim,
        "cycle_s": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset")
    parser.add_argument("--setting", action="append", choices=sorted(SETTINGS), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--negatives", type=int, default=1024)
    parser.add_argument("--sample-alpha", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-epochs", type=int, default=150)
    parser.add_argument("--patience", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="Print one JSON object at the end.")
    parser.add_argument("--delta-window", type=int, default=0, help="Measure a cycle's delta instead.")
    parser.add_argument("--cycle-epochs", type=int, default=2)
    parser.add_argument("--softmax-over", choices=["catalogue", "window"], default="window")
    parser.add_argument("--min-change", type=float, nargs="+", default=[0.0, 1e-3, 3e-3, 1e-2, 3e-2])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("evaluation.offline").setLevel(logging.INFO)  # one line per epoch

    settings = Settings()
    report: dict[str, Any] = {"dataset": args.dataset, "args": vars(args), "settings": {}}
    for name in args.setting:
        config = replace(
            SETTINGS[name],
            max_len=args.max_len,
            dim=args.dim,
            blocks=args.blocks,
            dropout=args.dropout,
            negatives=args.negatives,
            sample_alpha=args.sample_alpha,
        )
        if args.delta_window:
            sizes = delta_sizes(
                args.dataset,
                config,
                window=args.delta_window,
                epochs=args.cycle_epochs,
                thresholds=args.min_change,
                seed=args.seeds[0],
                softmax_over=args.softmax_over,
                batch_size=args.batch_size,
            )
            report["settings"][name] = sizes
            print(f"{name}: {sizes}", flush=True)
            continue
        runs = []
        for seed in args.seeds:
            train = TrainConfig(
                lr=args.lr,
                batch_size=args.batch_size,
                max_epochs=args.max_epochs,
                patience=args.patience,
                seed=seed,
                threads=args.threads,
                device=args.device,
            )
            result = offline.run(settings, args.dataset, config=config, train=train)
            epoch_s = statistics.fmean(h["seconds"] for h in result.history)
            run = {
                "seed": seed,
                "hr@10": result.test.hr,
                "ndcg@10": result.test.ndcg,
                "popularity_hr@10": result.popularity.hr,
                "popularity_ndcg@10": result.popularity.ndcg,
                "epochs": result.epochs,
                "best_epoch": result.best_epoch,
                "s_per_epoch": epoch_s,
                "wall_s": result.wall_s,
            }
            runs.append(run)
            print(
                f"{name} seed {seed}: HR@10 {result.test.hr:.4f} NDCG@10 {result.test.ndcg:.4f} "
                f"(popularity {result.popularity.hr:.4f}) best epoch {result.best_epoch}/{result.epochs}, "
                f"{epoch_s:.1f} s/epoch, {result.wall_s:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        hr = interval([r["hr@10"] for r in runs])
        ndcg = interval([r["ndcg@10"] for r in runs])
        popularity = statistics.fmean(r["popularity_hr@10"] for r in runs)
        summary = {
            "config": config.to_dict(),
            "runs": runs,
            "hr@10": hr[0],
            "hr@10_ci95": [hr[1], hr[2]],
            "ndcg@10": ndcg[0],
            "ndcg@10_ci95": [ndcg[1], ndcg[2]],
            "popularity_hr@10": popularity,
            "ratio_to_popularity": hr[0] / popularity if popularity else None,
            "s_per_epoch": statistics.fmean(r["s_per_epoch"] for r in runs),
        }
        report["settings"][name] = summary
        print(
            f"{name}: HR@10 {hr[0]:.4f} [{hr[1]:.4f}, {hr[2]:.4f}] NDCG@10 {ndcg[0]:.4f} "
            f"[{ndcg[1]:.4f}, {ndcg[2]:.4f}] = {summary['ratio_to_popularity'] or 0:.2f}x popularity "
            f"({popularity:.4f}), {summary['s_per_epoch']:.1f} s/epoch",
            flush=True,
        )
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

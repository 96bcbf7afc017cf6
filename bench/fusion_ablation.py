"""What each candidate source adds to the served list: the replay evaluation with extra served lists.

    .venv/bin/python bench/fusion_ablation.py ml-100k --sample 0.3 --finetune-every 10000 --out fusion.json

The replay of ``evaluation.replay`` (same requests, same protocol, its own broker as
``bench/replay_eval.py``), where besides its methods these lists are scored on every request, each
by its own :class:`serving.recommender.Recommender` (policy ``none``) over the same stream state and
model versions:

- ``served_rrf``: the fixed reciprocal-rank fusion the learned one replaced;
- ``served_no_<source>``: the learned fusion without one source (transformer, cooccurrence,
  popular) or without the MF head's re-score (mf).

Printed: HR@10 / NDCG@10 with 95% intervals per list, paired HR@10 differences against ``served``
on the same requests, and the served fusion's learned weights.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import bench_cluster

from evaluation import replay as replay_eval
from evaluation.replay import MethodScores, ReplayConfig, ReplayEvaluator, interval
from freshrec.events import Event
from freshrec.settings import Settings
from publishers.replica import Replica
from serving.recommender import Recommender

ALL_SOURCES = ("transformer", "cooccurrence", "popular", "mf")


class AblationEvaluator(ReplayEvaluator):
    """The replay's evaluator, scoring the extra served lists on the same requests."""

    last: AblationEvaluator | None = None

    def __init__(self, settings: Settings, *, config: ReplayConfig, replica: Replica, **kwargs: Any) -> None:
        super().__init__(settings, config=config, replica=replica, **kwargs)
        variants: dict[str, dict[str, Any]] = {"served_rrf": {"fusion": "rrf"}}
        for source in ALL_SOURCES:
            variants[f"served_no_{source}"] = {"sources": [s for s in ALL_SOURCES if s != source]}
        self.extra = {
            name: Recommender(
                settings=self._serve.model_copy(update={"policy": "none", "seed": config.seed} | update),
                replica=replica,
                reader=self.reader,
            )
            for name, update in variants.items()
        }
        for name in self.extra:
            self.scores[name] = MethodScores()  # unscorable events are added as misses by score()
        AblationEvaluator.last = self

    def score(self, event: Event) -> None:
        before = self.scorable
        super().score(event)
        if self.scorable == before:
            return
        for name, recommender in self.extra.items():
            recommender._popular_cache = None  # event time, as the evaluator does for served
            items = [item.item_id for item in recommender.recommend(event.user_id, self.k).items]
            rank = items.index(event.item_id) if event.item_id in items else None
            self.scores[name].add(rank, self.k)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--sample", type=float, default=1.0)
    parser.add_argument("--finetune-every", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("publishers.publisher").setLevel(logging.WARNING)
    replay_eval.ReplayEvaluator = AblationEvaluator  # type: ignore[misc]  # what _replay builds
    config = ReplayConfig(finetune_every=args.finetune_every, sample=args.sample, seed=args.seed)
    started = time.perf_counter()
    with bench_cluster() as settings:
        result = replay_eval.run(settings, None, args.dataset, limit=args.limit, config=config)
    evaluator = AblationEvaluator.last
    assert evaluator is not None
    served = np.asarray(evaluator.scores["served"].gains) > 0
    paired: dict[str, dict[str, Any]] = {}
    for name, scores in evaluator.scores.items():
        diff = served.astype(np.float64) - (np.asarray(scores.gains) > 0)
        paired[f"served - {name}"] = {"hr@10": float(diff.mean()), "ci95": list(interval(diff))}
    weights = evaluator.served.fusion.model.explain()
    print(
        f"replay {args.dataset}: {result['events']:,} events, {result['scored']:,} scored "
        f"({result['scorable']:,} scorable), {time.perf_counter() - started:.0f} s"
    )
    print(f"{'method':<24} {'HR@10':>7} {'95% CI':>17} {'NDCG@10':>8}   served - method (paired HR@10)")
    for name, m in result["methods"].items():
        (lo, hi), d = m["ci95"], paired[f"served - {name}"]
        print(
            f"{name:<24} {m['hr@10']:7.4f}   [{lo:.4f}, {hi:.4f}] {m['ndcg@10']:8.4f}   "
            f"{d['hr@10']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"
        )
    print("paired (replay):")
    for pair, d in result["paired"].items():
        print(f"  {pair:<36} {d['hr@10']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]")
    print(f"served fusion: {evaluator.served.fusion.model.learned} requests learned; weights {weights}")
    if args.out is not None:
        payload = result | {"paired_served": paired, "fusion_weights": weights}
        args.out.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()

"""Model deltas: bytes vs touched rows, publish → applied latency, and fine-tune cost.

1. **Size**: a sparse delta of a 100,000-item, d=64 table as the fraction of touched rows varies,
   against its ideal (touched rows x (row bytes + 8 bytes of row index)) and the full model.
2. **Latency**: p50/p99 from the publisher making a version to a replica (its own consumer, on a
   thread) having it current, for 10,000-row deltas through the real broker; beside the same
   update's encode + decode + apply without Kafka (the baseline, same run).
3. **Fine-tune**: wall time of one training pass per 10,000 events of ml-100k histories with the
   default model (d=64, 2 blocks, 50 positions, 256 shared negatives), beside the forward pass alone.

    .venv/bin/python bench/deltas.py --publishes 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import bench_cluster

from freshrec.datasets import load_dataset
from freshrec.settings import Settings
from learners.sasrec import SASRecConfig
from learners.sequences import sequences_from_records, windows
from learners.training import SequenceTrainer, TrainConfig
from publishers.publisher import Publisher
from publishers.replica import Replica, ReplicaSubscriber
from publishers.snapshots import SnapshotStore
from publishers.updates import ModelVersion, apply, decode, encode, snapshot_update, sparse_update

TABLE = "item_emb.weight"


def base_model(items: int, dim: int, seed: int = 0) -> ModelVersion:
    rng = np.random.default_rng(seed)
    params = {
        TABLE: rng.normal(size=(items + 1, dim)).astype(np.float32),
        "dense.weight": rng.normal(size=(4 * dim * dim,)).astype(np.float32),
    }
    ids = [None, *(f"item-{n}" for n in range(items))]
    return ModelVersion.build(1, params, ids, config={}, sparse_tables=[TABLE])


def touched(base: ModelVersion, version: int, rows: np.ndarray) -> ModelVersion:
    table = np.array(base.params[TABLE])
    table[rows] += 0.01
    return ModelVersion.build(
        version, {**base.params, TABLE: table}, base.item_ids, config={}, sparse_tables=[TABLE]
    )


def size_table(items: int, dim: int) -> None:
    base = base_model(items, dim)
    full = len(encode(snapshot_update(base, parent=0)))
    row_bytes = dim * 4 + 8
    print(f"\n1. sparse delta size, {items:,} items x d={dim} (full snapshot {full:,} B)")
    print(f"{'touched':>8} {'rows':>8} {'delta B':>12} {'ideal B':>12} {'overhead':>9} {'of full':>8}")
    rng = np.random.default_rng(1)
    for fraction in (0.001, 0.01, 0.1, 0.5, 1.0):
        rows = np.sort(rng.choice(np.arange(1, items + 1), size=max(1, int(items * fraction)), replace=False))
        child = touched(base, 2, rows)
        size = len(encode(sparse_update(base, child, rows=rows)))
        ideal = len(rows) * row_bytes
        print(
            f"{fraction:>8.1%} {len(rows):>8,} {size:>12,} {ideal:>12,}"
            f" {size / ideal - 1:>9.2%} {size / full:>8.3f}"
        )


def latency(items: int, dim: int, publishes: int, delta_rows: int) -> None:
    base = base_model(items, dim)
    rng = np.random.default_rng(2)
    # Baseline: the same work without Kafka (encode, decode, apply with its checksums).
    local = []
    model = base
    for version in range(2, 12):
        rows = np.sort(rng.choice(np.arange(1, items + 1), size=delta_rows, replace=False))
        child = touched(model, version, rows)
        started = time.perf_counter()
        model = apply(model, decode(encode(sparse_update(model, child, rows=rows))))
        local.append(time.perf_counter() - started)
    with bench_cluster() as settings:
        snapshots = SnapshotStore(settings.home / "models", keep=3)
        publisher = Publisher(settings, snapshots=snapshots)
        publisher.publish_snapshot(base.params, base.item_ids, config={}, sparse_tables=[TABLE])
        replica = Replica(snapshots=None)
        lags: list[float] = []
        with ReplicaSubscriber(settings, replica):
            deadline = time.monotonic() + 60
            while replica.version < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            for _ in range(publishes):
                current = publisher.latest
                assert current is not None
                rows = np.sort(rng.choice(np.arange(1, items + 1), size=delta_rows, replace=False))
                table = np.array(current.params[TABLE])
                table[rows] += 0.01
                started = time.time()
                published = publisher.publish_sparse({TABLE: table}, current.item_ids, rows)
                while replica.version < published.version:
                    time.sleep(0.001)
                lags.append(time.time() - started)
                time.sleep(0.2)
        publisher.close()
    lags.sort()
    local.sort()
    p50, p99 = statistics.median(lags), lags[min(len(lags) - 1, int(0.99 * len(lags)))]
    print(
        f"\n2. publish -> applied on the replica, {delta_rows:,}-row deltas on {items:,} x d={dim},"
        f" n={publishes}"
    )
    print(
        f"   through Kafka: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms (max {lags[-1] * 1000:.0f} ms)"
    )
    print(f"   baseline (encode+decode+apply, no Kafka): p50 {statistics.median(local) * 1000:.0f} ms")
    print(f"   ratio p50 Kafka / baseline: {p50 / statistics.median(local):.2f}")


def finetune_cost(events: int) -> None:
    data = load_dataset("ml-100k", datasets_dir=Settings().datasets_dir, cache_dir=Settings().cache_dir)
    sequences = sequences_from_records(data.records[:events])
    trainer = SequenceTrainer(config=SASRecConfig(), train=TrainConfig())
    rows = trainer.rows_for(sequences)
    inputs, _ = windows(rows, max_len=trainer.config.max_len)
    started = time.perf_counter()
    with torch.no_grad():
        trainer.model.eval()
        for start in range(0, len(inputs), 128):
            trainer.model.hidden(torch.from_numpy(inputs[start : start + 128]))
    forward = time.perf_counter() - started
    result = trainer.fit(rows, epochs=1)
    per_10k = result.seconds * 10_000 / events
    print(
        f"\n3. fine-tune pass over {events:,} ml-100k events ({result.windows} windows, {result.steps} steps)"
    )
    print(f"   train: {result.seconds:.2f} s = {per_10k:.2f} s per 10,000 events")
    print(f"   forward only (baseline): {forward:.2f} s; train / forward = {result.seconds / forward:.2f}")
    print(f"   touched rows: {len(trainer.touched_rows()):,} of {trainer.model.rows:,}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--publishes", type=int, default=30)
    parser.add_argument("--delta-rows", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=50_000, help="ml-100k events for the fine-tune pass")
    args = parser.parse_args()
    size_table(args.items, args.dim)
    latency(args.items, args.dim, args.publishes, args.delta_rows)
    finetune_cost(args.events)


if __name__ == "__main__":
    main()

"""Serving latency: ``GET /v1/recommendations/{user}?k=10`` under concurrent load, per catalogue size.

For synthetic catalogues of 10k, 100k and 1M items (d=64, a 2-block SASRec with random weights: the
cost does not depend on what the weights are), in the same run:

- **bare top-k**: one fp32 matrix product over the item table and an ``argpartition`` (numpy), the
  floor any exact retrieval pays, beside the memory-bandwidth bound (table bytes / measured copy
  bandwidth);
- **recommender**: :meth:`Recommender.recommend` in-process (user state by the transformer, exact
  top-n, co-occurrence, popularity, fusion, exploration);
- **API**: the HTTP route through uvicorn, with ``--clients`` concurrent client processes (one request
  at a time each), the response logged to the impressions topic of a real broker, as served.

    .venv/bin/python bench/serving_latency.py --requests 400 --clients 4
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).parent))
from harness import bench_cluster, free_port

from freshrec.settings import ServeSettings, Settings, StreamSettings
from learners.sasrec import SASRec, SASRecConfig
from publishers.api import create_app
from publishers.replica import Replica
from publishers.serving import Recommender
from publishers.updates import ModelVersion, snapshot_update
from streams.producer import EventProducer
from streams.reader import StateReader
from streams.worker import StreamWorker

USERS = 2_000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bandwidth_gbs() -> float:
    a = np.ones(64 * 2**20 // 4, dtype=np.float32)  # 64 MiB
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - started)
    return 2 * a.nbytes / best / 1e9  # read + write


def model_version(items: int) -> ModelVersion:
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(dim=64, blocks=2), rows=items + 1)
    model.init_rows(torch.arange(1, items + 1))
    params = {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}
    ids = [None, *(f"i{n}" for n in range(items))]
    return ModelVersion.build(1, params, ids, config=model.config.to_dict())


def _client(port: int, offset: int, requests: int, clients: int) -> list[float]:
    """One load-generating process: its share of the requests, one at a time; their latencies."""
    out = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
        for n in range(offset, requests, clients):
            started = time.perf_counter()
            response = http.get(f"/v1/recommendations/u{n % USERS}", params={"k": 10})
            out.append(time.perf_counter() - started)
            assert response.status_code == 200 and len(response.json()["items"]) == 10
    return out


def run_size(settings: Settings, items: int, requests: int, clients: int, gbs: float) -> dict[str, float]:
    version = model_version(items)
    replica = Replica()
    replica.receive(snapshot_update(version, parent=0))
    worker = StreamWorker(settings.model_copy(update={"stream": StreamSettings(heads=("mf",))}))
    rng = np.random.default_rng(1)
    users = [f"u{n}" for n in range(USERS)]
    for step in range(20):  # every user has a 20-item history; counters and co-occurrence follow
        picked = [f"i{int(x)}" for x in rng.zipf(1.2, size=USERS) % items]
        stamps = [step * 1000] * USERS
        worker.state.histories.append(users, picked, ["view"] * USERS, stamps)
        worker.state.counters.update(picked, ["view"] * USERS, stamps)
    recommender = Recommender(settings=ServeSettings(seed=1), replica=replica, reader=StateReader(worker))
    index = recommender.index
    assert index is not None
    # Bare top-k over the same table.
    bare = []
    for _ in range(200):
        user = rng.normal(size=64).astype(np.float32)
        started = time.perf_counter()
        scores = index.index_vectors @ user
        top = np.argpartition(-scores, 9)[:10]
        top[np.argsort(-scores[top])]
        bare.append(time.perf_counter() - started)
    floor_ms = index.index_vectors.nbytes / (gbs * 1e9 / 2) * 1000  # reading the table once
    inproc = []
    for n in range(200):
        started = time.perf_counter()
        recommender.recommend(users[n % USERS], 10)
        inproc.append(time.perf_counter() - started)
    # Through the API, with concurrent clients.
    port = free_port()
    producer = EventProducer(settings, **{"linger.ms": 5})
    app = create_app(settings, recommender=recommender, producer=producer)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
            http="httptools",
            loop="uvloop",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    # Clients in processes of their own: in this process they would contend with the server for
    # the GIL and measure that instead.
    context = multiprocessing.get_context("fork")
    with context.Pool(clients) as pool:
        started = time.perf_counter()
        parts = pool.starmap(_client, [(port, c, requests, clients) for c in range(clients)])
    wall = time.perf_counter() - started
    latencies = [value for part in parts for value in part]
    server.should_exit = True
    thread.join()
    producer.flush()
    ms = 1000.0
    return {
        "items": items,
        "floor": floor_ms,
        "bare50": statistics.median(bare) * ms,
        "bare99": pct(bare, 0.99) * ms,
        "rec50": statistics.median(inproc) * ms,
        "rec99": pct(inproc, 0.99) * ms,
        "api50": statistics.median(latencies) * ms,
        "api99": pct(latencies, 0.99) * ms,
        "qps": requests / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(ServeSettings().torch_threads)  # as `freshrec serve` does
    gbs = bandwidth_gbs()
    print(f"copy bandwidth {gbs:.1f} GB/s (read+write); torch threads {torch.get_num_threads()}")
    with bench_cluster() as settings:
        rows = [run_size(settings, size, args.requests, args.clients, gbs) for size in args.sizes]
    print(
        f"\nGET /v1/recommendations k=10, {args.clients} client processes, {args.requests} requests each size"
    )
    header = (
        f"{'items':>9} {'floor':>7} {'bare p50':>9} {'bare p99':>9} {'rec p50':>8} {'rec p99':>8}"
        f" {'API p50':>8} {'API p99':>8} {'req/s':>7} {'API-bare p50':>13}"
    )
    print(header + "   (ms)")
    for r in rows:
        print(
            f"{r['items']:>9,} {r['floor']:>7.2f} {r['bare50']:>9.2f} {r['bare99']:>9.2f} {r['rec50']:>8.2f}"
            f" {r['rec99']:>8.2f} {r['api50']:>8.2f} {r['api99']:>8.2f} {r['qps']:>7.0f}"
            f" {r['api50'] - r['bare50']:>13.2f}"
        )


if __name__ == "__main__":
    main()

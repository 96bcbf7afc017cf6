"""Serving latency: ``GET /v1/recommendations/{user}?k=10`` under concurrent load, per catalogue size.

For synthetic catalogues of 10k, 100k and 1M items (d=64, a 2-block SASRec with random weights: the
cost does not depend on what the weights are), in the same run:

- **bare top-k**, single queries, beside the memory-bandwidth bound (table bytes / measured copy
  bandwidth): numpy (one fp32 matrix product and an ``argpartition``, the baseline the issue names),
  torch (``mv`` and ``topk``, fp32: the bare matrix-product top-k) and the scan retrieval runs
  (:class:`serving.scan.ExactScan`: int8 products and a certified fp32 re-score), with the
  scan's recall of torch's top-10 and how often its certificate held;
- **recommender**: :meth:`Recommender.recommend` in-process (user state by the transformer, exact
  top-n, co-occurrence, popularity, fusion, exploration);
- **API**: the HTTP route through uvicorn, with ``--clients`` concurrent client processes (one request
  at a time each), the response logged to the impressions topic of a real broker, as served.

    .venv/bin/python bench/serving_latency.py --requests 400 --clients 2 --server-procs 1 2 [--load wrk]

The decision log is batched as ``freshrec serve`` batches it (``--impressions-linger-ms``, default
the setting's); ``--impressions-linger-ms 5`` shows what logging each response at once costs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import bench_cluster

from freshrec.settings import ServeSettings, Settings, StreamSettings
from learners.registry import build_heads
from learners.sasrec import SPARSE_TABLES, SASRec, SASRecConfig
from publishers.replica import Replica
from publishers.updates import ModelVersion, snapshot_update
from serving.api import create_app
from serving.dealer import Dealer
from serving.recommender import Recommender
from serving.scan import ExactScan
from serving.server import api_producers, api_server
from streams.reader import StateReader
from streams.stores import partition_of
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
    return ModelVersion.build(1, params, ids, config=model.config.to_dict(), sparse_tables=SPARSE_TABLES)


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


def bare_topk(table: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """Single-query top-10 over ``table`` three ways: medians and p99 in ms, the scan's recall of
    torch's top-10 and the share of its queries certified without an fp32 re-scan."""
    tensor = torch.from_numpy(table)
    scan = ExactScan(table)  # as retrieval builds it
    times: dict[str, list[float]] = {"numpy": [], "torch": [], "scan": []}
    hits = 0
    for _ in range(200):
        user = np.asarray(rng.normal(size=table.shape[1]), dtype=np.float32)
        query = torch.from_numpy(user)
        started = time.perf_counter()
        scores = table @ user
        top = np.argpartition(-scores, 9)[:10]
        top[np.argsort(-scores[top])]
        times["numpy"].append(time.perf_counter() - started)
        started = time.perf_counter()
        exact = torch.topk(torch.mv(tensor, query), 10).indices
        times["torch"].append(time.perf_counter() - started)
        started = time.perf_counter()
        positions, _ = scan.top(user, 10)
        times["scan"].append(time.perf_counter() - started)
        hits += len(set(positions.tolist()) & set(exact.tolist()))
    out = {f"{name}50": statistics.median(v) * 1000 for name, v in times.items()}
    out |= {f"{name}99": pct(v, 0.99) * 1000 for name, v in times.items()}
    out["recall"] = hits / (200 * 10)
    scanned = scan.counts.certified + scan.counts.fallback
    out["certified"] = scan.counts.certified / scanned if scanned else float("nan")
    return out


def _serve(dealer: Dealer, n: int, settings: Settings, recommender: Recommender, ready: Any) -> None:
    """Server process ``n``: the API over the (inherited) recommender, serving the connections dealt
    to it, as a worker of ``freshrec serve --workers`` does."""
    channel = dealer.channel(n)
    torch.set_num_threads(settings.serve.torch_threads)
    producer, decisions = api_producers(settings)
    app = create_app(settings, recommender=recommender, producer=producer, decisions=decisions)
    server = api_server(app, settings, channel)

    def announce() -> None:
        while not server.started:
            time.sleep(0.01)
        ready.set()

    threading.Thread(target=announce, daemon=True).start()
    server.run()  # until SIGTERM
    producer.close()
    decisions.close()


_WRK_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/v1/recommendations/u" .. (counter %% %d) .. "?k=10")
end
"""


def _wrk(port: int, connections: int, *, seconds: float) -> tuple[float, float, float]:
    """Load from wrk (C, one thread, ``connections`` closed-loop connections): p50 and p99 in ms, req/s.

    The Python clients spend ~1 ms of CPU per request on the same two cores; wrk measures the server
    with almost none of that."""
    if shutil.which("wrk") is None:
        raise SystemExit("--load wrk needs wrk (Debian: apt-get install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(_WRK_SCRIPT % USERS)
        script.flush()
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--latency", "-s", script.name,
             f"http://127.0.0.1:{port}"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    unit = {"us": 0.001, "ms": 1.0, "s": 1000.0}

    def quantile(q: str) -> float:
        value, suffix = re.search(rf"^\s*{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()  # type: ignore[union-attr]
        return float(value) * unit[suffix]

    qps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk saw errors:\n{out}")
    return quantile("50"), quantile("99"), qps


def run_size(
    settings: Settings,
    items: int,
    requests: int,
    clients: int,
    gbs: float,
    procs: int,
    load: str,
    serve: ServeSettings,
) -> dict[str, float]:
    version = model_version(items)
    replica = Replica()
    replica.receive(snapshot_update(version, parent=0))
    stream = StreamSettings(heads=("mf",))
    worker = StreamWorker(settings.model_copy(update={"stream": stream}), heads=build_heads(stream))
    rng = np.random.default_rng(1)
    users = [f"u{n}" for n in range(USERS)]
    # The state is kept per input partition: each user's events go to the store of the partition
    # freshrec's producers would write them to, as a stream worker owning every partition keeps them.
    by_partition: dict[int, list[int]] = {}
    for n, user in enumerate(users):
        by_partition.setdefault(partition_of(user, settings.broker_partitions), []).append(n)
    for step in range(20):  # every user has a 20-item history, and item counters follow
        picked = [f"i{int(x)}" for x in rng.zipf(1.2, size=USERS) % items]
        for partition, members in sorted(by_partition.items()):
            store = worker.state.store(partition)
            mine = [picked[n] for n in members]
            views, stamps = ["view"] * len(members), [step * 1000] * len(members)
            store.histories.append([users[n] for n in members], mine, views, stamps)
            store.counters.update(mine, views, stamps)
    settings = settings.model_copy(update={"serve": serve})
    recommender = Recommender(settings=serve, replica=replica, reader=StateReader(worker))
    index = recommender.index
    assert index is not None
    bare = bare_topk(index.index_vectors, rng)
    floor_ms = index.index_vectors.nbytes / (gbs * 1e9 / 2) * 1000  # reading the table once
    inproc = []
    for n in range(200):
        started = time.perf_counter()
        recommender.recommend(users[n % USERS], 10)
        inproc.append(time.perf_counter() - started)
    # Through the API, with concurrent clients, served by ``procs`` forked server processes behind
    # one port, connections dealt in turn (`freshrec serve --workers`; each child holds a
    # copy-on-write copy of the state and its own Kafka producers).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    dealer = Dealer(sock, procs)
    context = multiprocessing.get_context("fork")
    ready = [context.Event() for _ in range(procs)]
    servers = [
        context.Process(target=_serve, args=(dealer, n, settings, recommender, event), daemon=True)
        for n, event in enumerate(ready)
    ]
    for server in servers:
        server.start()
    dealer.start()
    for event in ready:
        assert event.wait(60), "a server process did not start"
    if load == "wrk":
        api50, api99, qps = _wrk(port, clients, seconds=max(5.0, requests / 60))
    else:
        # Clients in processes of their own: in this process they would contend with the server for
        # the GIL and measure that instead.
        with context.Pool(clients) as pool:
            started = time.perf_counter()
            parts = pool.starmap(_client, [(port, c, requests, clients) for c in range(clients)])
        wall = time.perf_counter() - started
        latencies = [value for part in parts for value in part]
        api50, api99, qps = statistics.median(latencies) * 1000, pct(latencies, 0.99) * 1000, requests / wall
    for server in servers:
        server.terminate()
        server.join()
    dealer.stop()
    sock.close()
    ms = 1000.0
    return {
        "items": items,
        "floor": floor_ms,
        **bare,
        "rec50": statistics.median(inproc) * ms,
        "rec99": pct(inproc, 0.99) * ms,
        "api50": api50,
        "api99": api99,
        "qps": qps,
        "procs": procs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument(
        "--load", choices=["httpx", "wrk"], default="httpx", help="Client processes in Python, or wrk."
    )
    parser.add_argument(
        "--server-procs", type=int, nargs="+", default=[1, 2], help="API server processes (forked)."
    )
    parser.add_argument(
        "--impressions-linger-ms",
        type=int,
        default=ServeSettings().impressions_linger_ms,
        help="How long the decision log gathers a batch (FRESHREC_SERVE__IMPRESSIONS_LINGER_MS).",
    )
    args = parser.parse_args()
    torch.set_num_threads(ServeSettings().torch_threads)  # as `freshrec serve` does
    gbs = bandwidth_gbs()
    print(f"copy bandwidth {gbs:.1f} GB/s (read+write); torch threads {torch.get_num_threads()}")
    with bench_cluster() as settings:
        rows = [
            run_size(
                settings,
                size,
                args.requests,
                args.clients,
                gbs,
                procs,
                args.load,
                ServeSettings(seed=1, impressions_linger_ms=args.impressions_linger_ms),
            )
            for size in args.sizes
            for procs in args.server_procs
        ]
    print("\nbare top-10, single queries (ms): numpy = fp32 product + argpartition; torch = mv + topk;")
    print("scan = serving.scan.ExactScan as served (int8 + certified fp32 re-score from 65,536 rows;")
    print("recall: of torch's top-10; certified: share of int8 scans that needed no fp32 re-scan)")
    print(
        f"{'items':>9} {'floor':>7} {'numpy p50':>10} {'torch p50':>10} {'scan p50':>9}"
        f" {'scan recall':>12} {'certified':>10}"
    )
    for r in rows:
        if r["procs"] == args.server_procs[0]:
            print(
                f"{r['items']:>9,} {r['floor']:>7.2f} {r['numpy50']:>10.2f} {r['torch50']:>10.2f}"
                f" {r['scan50']:>9.2f} {r['recall']:>12.4f} {r['certified']:>10.3f}"
            )
    print(
        f"\nGET /v1/recommendations k=10, {args.clients} concurrent clients ({args.load}),"
        f" {args.requests} requests each size"
    )
    header = (
        f"{'items':>9} {'procs':>5} {'rec p50':>8} {'rec p99':>8} {'API p50':>8}"
        f" {'API p99':>8} {'req/s':>7}"
        f" {'API-numpy p50':>14} {'API-torch p50':>14} {'API-scan p50':>13}"
    )
    print(header + "   (ms)")
    for r in rows:
        print(
            f"{r['items']:>9,} {r['procs']:>5} {r['rec50']:>8.2f} {r['rec99']:>8.2f}"
            f" {r['api50']:>8.2f} {r['api99']:>8.2f} {r['qps']:>7.0f} {r['api50'] - r['numpy50']:>14.2f}"
            f" {r['api50'] - r['torch50']:>14.2f} {r['api50'] - r['scan50']:>13.2f}"
        )


if __name__ == "__main__":
    main()

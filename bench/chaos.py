"""Chaos campaign: the split stack under traffic while seeded faults hit it, then an audit.

    python bench/chaos.py [--faults 20] [--minutes 5] [--seed 1] [--rate 200] [--json] [--report F]

What runs, each its own process as in the distributed mode: a private local Kafka broker (own home
and free ports, driven from here), ``freshrec sink``, ``freshrec stream`` and ``freshrec serve``,
and the trainer as ``freshrec train --once`` cycles. ClickHouse is one chDB path, and chDB lets one
process open a path: the sink owns it, so a training cycle stops the sink (SIGTERM), trains and
publishes against the same path, and starts the sink again (a ClickHouse server would let them run
side by side; the pauses are then part of the campaign's load on the sink).

Traffic: events with unique ``event_id`` s at ``--rate`` a second through Kafka (each counted as
produced once the broker acknowledged it), and a small stream of ``POST /v1/events`` batches
(counted when answered 202). ``GET /readyz`` is polled every 100 ms (a 404, before that route
existed, counts as not ready).

Faults: ``--faults`` over ``--minutes``, one per equal slot at a seeded point inside it, the kinds
dealt evenly and shuffled by the seed: kill -9 of the sink, the stream worker or the server (then a
restart after a seeded pause), kill -9 of a training cycle at a seeded moment, and a broker stop
(graceful or kill -9, seeded) for a seeded 1-8 s. Between faults a clean training cycle runs every
``--train-every`` seconds, and a process that exits by itself is counted and restarted (as an
orchestrator would). The same seed gives the same plan; timing on a shared machine still varies.

At the end: traffic stops, a last clean training cycle runs, the sink drains (``--until-idle``),
and the audit reads ClickHouse through ``freshrec sql`` and the model topics directly:

- events produced / stored / doubled / lost: doubled = ids with more than one row in a plain
  (non-FINAL) count of ``events``; lost = acknowledged ids in neither ``events`` nor
  ``dead_letters``; every message on the topic must sit in exactly one of the two tables;
- the model chain: ``freshrec model list`` contiguous from v1, every parent listed, and each
  committed version number with exactly one payload checksum on the model topics;
- the longest time ``/readyz`` was not 200 after the stack was first ready.

The temporary home (broker log, chDB, checkpoints, snapshots) is removed at the end unless
``--keep``. Every wait is bounded, and the whole run is bounded by ``--minutes`` plus 20 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx
import orjson
from confluent_kafka import Consumer, KafkaError, TopicPartition
from harness import free_port

from freshrec.broker import LocalBroker
from freshrec.errors import KafkaUnavailable
from freshrec.settings import Settings
from streams.admin import ensure_topics
from streams.producer import EventProducer

KINDS = ("sink", "stream", "serve", "train", "broker")


class CampaignTimeout(Exception):
    """The whole run outlived its bound (``--minutes`` + 20 min): stop and clean up."""


# ----------------------------------------------------------------------------- processes


class Role:
    """One ``freshrec`` subcommand as a restartable process, its stderr appended to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.log_path = logs / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: TextIO | None = None
        self.starts = 0
        self.unexpected_exits: list[int] = []

    def start(self) -> None:
        self._log = self.log_path.open("a")
        self._log.write(f"\n--- start {self.starts + 1} at {time.strftime('%H:%M:%S')}\n")
        self._log.flush()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "freshrec_app", *self.argv],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exited_by_itself(self) -> int | None:
        """The exit code if the process ended without being told to (recorded), else None."""
        if self.process is None or self.process.poll() is None:
            return None
        code = self.process.returncode
        self.unexpected_exits.append(code)
        self.process = None
        return code

    def kill9(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self._reap(30)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self._reap(timeout_s)

    def _reap(self, timeout_s: float) -> int | None:
        process, self.process = self.process, None
        if process is None:
            return None
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        if self._log is not None:
            self._log.close()
            self._log = None
        return process.returncode

    def last_lines(self, n: int = 3) -> list[str]:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return []
        return lines[-n:]


def freshrec(*args: str, env: dict[str, str], timeout_s: float = 300.0) -> subprocess.CompletedProcess[str]:
    """One bounded ``freshrec`` command; raises with its stderr if it fails."""
    result = subprocess.run(
        [sys.executable, "-m", "freshrec_app", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"freshrec {' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


def sql(query: str, env: dict[str, str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = orjson.loads(freshrec("sql", "--json", query, env=env).stdout)
    return rows


# ----------------------------------------------------------------------------- traffic


class Traffic:
    """Events at a steady rate through Kafka, plus small ``POST /v1/events`` batches."""

    def __init__(self, settings: Settings, *, rate: int, api: str, seed: int) -> None:
        self._settings, self._rate, self._api = settings, rate, api
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.kafka_acked: set[str] = set()
        self.kafka_failed: set[str] = set()
        self.kafka_sent = 0
        self.http_accepted: set[str] = set()
        self.http_refused: set[str] = set()
        self.http_statuses: Counter[str] = Counter()
        self.errors: list[str] = []
        self._threads = [
            threading.Thread(target=self._kafka, name="chaos-kafka", daemon=True),
            threading.Thread(target=self._http, name="chaos-http", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 180.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=timeout_s)
            if thread.is_alive():
                self.errors.append(f"{thread.name} did not stop within {timeout_s:.0f} s")

    def _event(self, event_id: str) -> tuple[bytes, bytes]:
        user = f"u{self._rng.randrange(500)}"
        event = {
            "event_id": event_id,
            "user_id": user,
            "item_id": f"i{int(self._rng.paretovariate(1.2)) % 2_000}",
            "type": ("view", "view", "click", "purchase")[self._rng.randrange(4)],
            "ts": int(time.time() * 1000),
        }
        return user.encode(), orjson.dumps(event)

    def _kafka(self) -> None:
        producer = EventProducer(self._settings, log_level=0)  # outages are expected: no log storm
        producer.poll_in_background()
        per_tick = max(1, self._rate // 10)
        n = 0
        try:
            next_tick = time.monotonic()
            while not self._stop.is_set():
                for _ in range(per_tick):
                    event_id = f"k{n}"
                    n += 1
                    with self._lock:
                        key, value = self._event(event_id)

                    def report(error: KafkaError | None, e: str = event_id) -> None:
                        with self._lock:
                            (self.kafka_acked if error is None else self.kafka_failed).add(e)

                    producer.produce(self._settings.topics.events, value, key=key, on_delivery=report)
                self.kafka_sent = n
                next_tick += 0.1
                time.sleep(max(0.0, next_tick - time.monotonic()))
        finally:
            try:
                producer.close()  # delivers what is queued (bounded by its flush timeout)
            except KafkaUnavailable as exc:
                self.errors.append(f"kafka producer: {exc}")

    def _http(self) -> None:
        n = 0
        # Longer than the API's publish timeout (10 s by default): its answer, not ours, decides.
        with httpx.Client(base_url=self._api, timeout=30.0) as client:
            while not self._stop.wait(0.5):
                ids = [f"h{n + i}" for i in range(5)]
                n += 5
                with self._lock:
                    body = b"[" + b",".join(self._event(e)[1] for e in ids) + b"]"
                try:
                    response = client.post(
                        "/v1/events", content=body, headers={"content-type": "application/json"}
                    )
                    status = str(response.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.http_statuses[status] += 1
                (self.http_accepted if status == "202" else self.http_refused).update(ids)


class ReadinessWatch:
    """``GET /readyz`` every 100 ms: when the stack was first ready, and each not-ready period after."""

    def __init__(self, api: str) -> None:
        self._api = api
        self._stop = threading.Event()
        self.started = self.origin = time.monotonic()  # origin: where the campaign's clock starts
        self.first_ready_s: float | None = None
        # Each not-ready period: when (campaign clock), how long, what the polls saw (status or
        # /readyz's reason keys, with counts) and the last reasons' sentences.
        self.outages: list[dict[str, Any]] = []
        self.statuses: Counter[str] = Counter()
        self._down_since: float | None = None
        self._seen: Counter[str] = Counter()
        self._detail: dict[str, str] = {}
        self._thread = threading.Thread(target=self._run, name="chaos-readyz", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._down_since is not None:
            self._close(time.monotonic())

    @property
    def ready(self) -> bool:
        return self.first_ready_s is not None and self._down_since is None

    def _close(self, now: float) -> None:
        assert self._down_since is not None
        self.outages.append(
            {
                "at_s": round(self._down_since - self.origin, 1),
                "length_s": round(now - self._down_since, 1),
                "seen": dict(self._seen),
                "last_reasons": self._detail,
            }
        )
        self._down_since, self._seen, self._detail = None, Counter(), {}

    def _run(self) -> None:
        with httpx.Client(base_url=self._api, timeout=1.0) as client:
            while not self._stop.wait(0.1):
                now = time.monotonic()
                reason, detail = "", {}
                try:
                    response = client.get("/readyz")
                    status = str(response.status_code)
                    if status == "503":
                        with contextlib.suppress(ValueError, AttributeError):
                            detail = dict(response.json().get("reasons", {}))
                            reason = "503 " + ",".join(sorted(detail))
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.statuses[status] += 1
                if status == "200":
                    if self.first_ready_s is None:
                        self.first_ready_s = now - self.started
                    elif self._down_since is not None:
                        self._close(now)
                elif self.first_ready_s is not None:
                    if self._down_since is None:
                        self._down_since = now
                    self._seen[reason or status] += 1
                    self._detail = detail or self._detail


# ----------------------------------------------------------------------------- the campaign


@dataclass
class Campaign:
    """The stack, its faults and what was seen; :meth:`run` drives it, :meth:`audit` reads the end."""

    args: argparse.Namespace
    root: Path
    settings: Settings = field(init=False)
    env: dict[str, str] = field(init=False)
    faults: list[dict[str, Any]] = field(default_factory=list)
    trains: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    healthz: dict[str, Any] | None = None
    drain: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        home = self.root / "home"
        api_port = free_port()
        self.settings = Settings(
            home=home,
            cache_dir=Settings().cache_dir,
            broker_port=free_port(),
            broker_controller_port=free_port(),
            broker_heap="512m",
            clickhouse_dsn=f"chdb://{self.root / 'chdb'}",
            topic_prefix=f"chaos-{uuid.uuid4().hex[:8]}.",
            api_port=api_port,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
        env.update(
            {
                "FRESHREC_HOME": str(home),
                "FRESHREC_CACHE_DIR": str(self.settings.cache_dir),
                "FRESHREC_KAFKA_BOOTSTRAP": self.settings.bootstrap,
                "FRESHREC_CLICKHOUSE_DSN": self.settings.dsn,
                "FRESHREC_TOPIC_PREFIX": self.settings.topic_prefix,
                "FRESHREC_API_HOST": "127.0.0.1",
                "FRESHREC_API_PORT": str(api_port),
                # A killed sink's partitions move on after 6 s (the broker's minimum), not 45 s.
                "FRESHREC_SINK__SESSION_TIMEOUT_MS": "6000",
                "FRESHREC_SINK__BATCH_TIMEOUT_S": "0.2",
                "FRESHREC_STREAM__CHECKPOINT_INTERVAL_S": "1",
                # A small transformer: a cycle takes seconds, so that kills land in every phase.
                "FRESHREC_TRAIN__DIM": "16",
                "FRESHREC_TRAIN__BLOCKS": "1",
                "FRESHREC_TRAIN__EPOCHS": "1",
                "FRESHREC_TRAIN__MAX_LEN": "20",
                "FRESHREC_TRAIN__WINDOW_EVENTS": "20000",
                "FRESHREC_TRAIN__DENSE_EVERY": "3",
            }
        )
        self.env = env
        self.api = f"http://127.0.0.1:{api_port}"
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        self.broker = LocalBroker(self.settings)
        self.roles = {name: Role(name, [name], env, logs) for name in ("sink", "stream", "serve")}
        self.rng = random.Random(self.args.seed)
        self.traffic = Traffic(self.settings, rate=self.args.rate, api=self.api, seed=self.args.seed + 1)
        self.readiness = ReadinessWatch(self.api)
        self.t0 = time.monotonic()
        self.train_s = 15.0  # estimate of one cycle, refined by each clean one

    def now(self) -> float:
        return time.monotonic() - self.t0

    def log(self, message: str) -> None:
        print(f"[{self.now():7.1f}s] {message}", file=sys.stderr, flush=True)

    # -- the plan

    def plan(self) -> list[tuple[float, str]]:
        n, duration = self.args.faults, self.args.minutes * 60.0
        kinds = [KINDS[i % len(KINDS)] for i in range(n)]
        self.rng.shuffle(kinds)
        slot = duration / max(n, 1)
        return [((i + self.rng.uniform(0.2, 0.8)) * slot, kind) for i, kind in enumerate(kinds)]

    # -- faults

    def inject(self, kind: str) -> dict[str, Any]:
        fault: dict[str, Any] = {"at_s": round(self.now(), 1), "kind": kind}
        if kind in ("sink", "stream", "serve"):
            role = self.roles[kind]
            role.kill9()
            down = self.rng.uniform(0.0, 2.0)
            fault["detail"] = f"kill -9, restart after {down:.1f} s"
            time.sleep(down)  # the outage itself
            role.start()
        elif kind == "train":
            kill_after = self.rng.uniform(0.5, max(1.0, self.train_s))
            fault["detail"] = self.train_cycle(kill_after=kill_after)
        else:
            how = self.rng.choice(["stop", "kill -9"])
            down = self.rng.uniform(1.0, 8.0)
            if how == "stop":
                self.broker.stop()
            else:
                pid = int(self.broker.pid_path.read_text())
                os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)  # the broker is this process's child: reap it
                self.broker.stop()  # tidies the pid file
            time.sleep(down)  # the outage itself
            started = time.monotonic()
            self.broker.start(timeout_s=180)
            fault["detail"] = f"broker {how}, {down:.1f} s down, {time.monotonic() - started:.1f} s to start"
        self.log(f"fault {kind}: {fault['detail']}")
        return fault

    def train_cycle(self, *, kill_after: float | None) -> str:
        """Stop the sink (it owns the chDB path), run ``train --once``, start the sink again."""
        sink = self.roles["sink"]
        self._note_stop("sink", sink.stop(), "before a training cycle")
        started = time.monotonic()
        log = (self.logs / "train.log").open("a")
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "freshrec_app", "train", "--once", "--json"],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=log,
            )
            try:
                out, _ = process.communicate(timeout=kill_after if kill_after is not None else 600)
                elapsed = time.monotonic() - started
                outcome = f"finished (exit {process.returncode}) in {elapsed:.1f} s"
                if kill_after is not None:
                    outcome = f"kill at {kill_after:.1f} s came too late: {outcome}"
                if process.returncode == 0:
                    published = orjson.loads(out).get("published", [])
                    outcome += f", published {[p['version'] for p in published]}"
                    if kill_after is None:
                        self.train_s = max(self.train_s * 0.5, elapsed)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate(timeout=30)
                outcome = (
                    f"kill -9 at {kill_after:.1f} s"
                    if kill_after is not None
                    else "did not finish within 600 s: killed"
                )
        finally:
            log.close()
            sink.start()
        self.trains.append(
            {"ended_at_s": round(self.now(), 1), "killed": kill_after is not None, "outcome": outcome}
        )
        return outcome

    # -- the run

    def run(self) -> None:
        self.log(f"broker on {self.settings.bootstrap}, home {self.root}")
        self.broker.start(timeout_s=180)
        ensure_topics(self.settings)
        for role in self.roles.values():
            role.start()
        self.readiness.start()
        self._wait(lambda: self.readiness.first_ready_s is not None, 180, "the stack to be ready")
        self.log(f"ready after {self.readiness.first_ready_s:.1f} s; traffic and faults start")
        self.traffic.start()
        plan = self.plan()
        self.t0 = self.readiness.origin = time.monotonic()
        duration = self.args.minutes * 60.0
        next_train = min(20.0, self.args.train_every)
        while self.now() < duration or plan:
            self._supervise()
            if plan and self.now() >= plan[0][0]:
                _, kind = plan.pop(0)
                self.faults.append(self.inject(kind))
            elif self.now() >= next_train and self.now() < duration:
                self.log(f"clean training cycle: {self.train_cycle(kill_after=None)}")
                next_train = self.now() + self.args.train_every
            else:
                time.sleep(0.2)
        self.log("faults done: traffic stops, a last clean training cycle, then the drain")
        self.traffic.stop()
        self._supervise()
        self.log(f"last training cycle: {self.train_cycle(kill_after=None)}")
        caught_up = self._wait(lambda: self.readiness.ready, 180, "ready after the campaign", fail=False)
        if not caught_up:
            self.notes.append("/readyz was not 200 within 180 s of the end of the campaign")
        self.readiness.stop()
        with contextlib.suppress(httpx.HTTPError, ValueError):
            self.healthz = httpx.get(f"{self.api}/healthz", timeout=5).json()
        for name in ("serve", "stream", "sink"):
            self._note_stop(name, self.roles[name].stop(), "at the end")
        self.drain = orjson.loads(
            freshrec("sink", "--until-idle", "3", "--json", env=self.env, timeout_s=600).stdout
        )

    def _note_stop(self, name: str, code: int | None, when: str) -> None:
        if code == -signal.SIGTERM:  # it was still starting: no handler yet, nothing to lose
            self.notes.append(f"{name} was stopped by SIGTERM during its start-up ({when})")
        elif code not in (0, None):
            self.notes.append(f"{name} exited {code} on SIGTERM {when}: {self.roles[name].last_lines(1)}")

    def _supervise(self) -> None:
        for role in self.roles.values():
            code = role.exited_by_itself()
            if code is not None:
                self.log(f"{role.name} exited by itself ({code}): {role.last_lines(1)}; restarting")
                role.start()

    def _wait(self, predicate: Any, timeout_s: float, what: str, *, fail: bool = True) -> bool:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            self._supervise()
            if time.monotonic() > deadline:
                if fail:
                    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
                return False
            time.sleep(0.1)
        return True

    # -- the audit

    def audit(self) -> dict[str, Any]:
        traffic = self.traffic
        counts = {
            str(r["event_id"]): int(r["n"])
            for r in sql("SELECT event_id, count() AS n FROM events GROUP BY event_id", self.env)
        }
        dead = sql(
            "SELECT reason, event_id, count() AS n FROM dead_letters GROUP BY reason, event_id", self.env
        )
        (positions,) = sql(
            "SELECT (SELECT count() FROM events) AS events, (SELECT count() FROM dead_letters) AS dead, "
            "(SELECT uniqExact(partition, offset) FROM (SELECT partition, offset FROM events "
            "UNION ALL SELECT partition, offset FROM dead_letters)) AS positions",
            self.env,
        )
        dead_ids = {str(r["event_id"]) for r in dead if r["event_id"]}
        acked = traffic.kafka_acked | traffic.http_accepted
        stored = set(counts)
        on_topic = self._messages_on_topic()
        runs = sql("SELECT status, count() AS n FROM training_runs GROUP BY status", self.env)
        outages = self.readiness.outages
        return {
            "config": {k: v for k, v in vars(self.args).items() if k not in ("json", "keep", "report")},
            "faults": dict(Counter(f["kind"] for f in self.faults)),
            "fault_log": self.faults,
            "training_cycles": self.trains,
            "unexpected_exits": {
                name: {"codes": role.unexpected_exits, "last_log": role.last_lines(2)}
                for name, role in self.roles.items()
                if role.unexpected_exits
            },
            "events": {
                "produced_kafka_acked": len(traffic.kafka_acked),
                "produced_kafka_failed": len(traffic.kafka_failed - traffic.kafka_acked),
                "produced_http_accepted": len(traffic.http_accepted),
                "produced_http_refused": len(traffic.http_refused),
                "http_statuses": dict(traffic.http_statuses),
                "stored": len(stored),
                "doubled": sum(1 for n in counts.values() if n > 1),
                "lost": len(acked - stored - dead_ids),
                "lost_examples": sorted(acked - stored - dead_ids)[:5],
                "acked_only_in_dead_letters": len((acked - stored) & dead_ids),
                "refused_but_stored": len(traffic.http_refused & stored),
                "stored_never_produced": len(stored - acked - traffic.http_refused - traffic.kafka_failed),
                "dead_letters_by_reason": dict(
                    sum((Counter({str(r["reason"]): int(r["n"])}) for r in dead), Counter())
                ),
                "messages_on_topic": on_topic,
                "rows_events": positions["events"],
                "rows_dead_letters": positions["dead"],
                "positions_stored": positions["positions"],
                "positions_missing": on_topic - int(positions["positions"]),
                "traffic_errors": traffic.errors,
            },
            "model_chain": self._chain(),
            "training_runs": {str(r["status"]): int(r["n"]) for r in runs},
            "readyz": {
                "first_ready_s": self.readiness.first_ready_s,
                "longest_not_ready_s": max((o["length_s"] for o in outages), default=0.0),
                "not_ready_periods": len(outages),
                "not_ready_total_s": round(sum(o["length_s"] for o in outages), 1),
                "periods": outages,
                "statuses": dict(self.readiness.statuses),
            },
            "healthz_at_end": self.healthz,
            "drain": self.drain,
            "notes": self.notes,
        }

    def _messages_on_topic(self) -> int:
        consumer = Consumer(self.settings.kafka_config(**{"group.id": f"chaos-probe-{uuid.uuid4().hex}"}))
        try:
            return sum(
                consumer.get_watermark_offsets(TopicPartition(self.settings.topics.events, p), timeout=30)[1]
                for p in range(self.settings.broker_partitions)
            )
        finally:
            consumer.close()

    def _chain(self) -> dict[str, Any]:
        listed = orjson.loads(freshrec("model", "list", "--json", env=self.env).stdout)
        versions = [int(u["version"]) for u in listed]
        parents = {int(u["parent"]) for u in listed} - {0}
        payloads = self._payloads_on_topics()
        reused = {v: sorted(c) for v, c in payloads.items() if len(c) > 1}
        return {
            "versions": versions,
            "contiguous": versions == list(range(1, len(versions) + 1)),
            "parents_missing": sorted(parents - set(versions)),
            "duplicates_in_list": sorted(v for v, n in Counter(versions).items() if n > 1),
            "committed_on_topics": sorted(payloads),
            "listed_not_on_topics": sorted(set(versions) - set(payloads)),
            "on_topics_not_listed": sorted(set(payloads) - set(versions)),
            "versions_with_several_payloads": reused,
            "served_version_at_end": (self.healthz or {}).get("model_version"),
            "intact": (
                versions == list(range(1, len(versions) + 1))
                and not parents - set(versions)
                and not reused
                and set(payloads) == set(versions)
            ),
        }

    def _payloads_on_topics(self) -> dict[int, set[str]]:
        """Committed chunk headers on the model topics: version -> payload checksums seen."""
        topics = [self.settings.topics.model_sparse, self.settings.topics.model_dense]
        consumer = Consumer(
            self.settings.kafka_config(
                **{
                    "group.id": f"chaos-audit-{uuid.uuid4().hex}",
                    "auto.offset.reset": "earliest",
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                }
            )
        )
        seen: dict[int, set[str]] = {}
        try:
            consumer.subscribe(topics)
            deadline, idle_since = time.monotonic() + 120, time.monotonic()
            while time.monotonic() < deadline and time.monotonic() - idle_since < 5:
                for message in consumer.consume(500, 0.5):
                    if message.error() is not None:
                        continue
                    idle_since = time.monotonic()
                    for header in message.headers() or []:
                        name, raw = header[0], header[1]
                        if name == "freshrec-update" and isinstance(raw, bytes):
                            fields = raw.decode().split(":")
                            if len(fields) == 6:
                                seen.setdefault(int(fields[0]), set()).add(fields[5])
        finally:
            consumer.close()
        return seen

    def close(self) -> None:
        for role in self.roles.values():
            role.kill9()
        with contextlib.suppress(Exception):
            self.broker.stop()


# ----------------------------------------------------------------------------- output


def print_table(report: dict[str, Any]) -> None:
    events, chain, ready = report["events"], report["model_chain"], report["readyz"]
    longest = max(ready["periods"], key=lambda o: o["length_s"], default=None)
    rows = [
        ("faults injected", ", ".join(f"{k} {v}" for k, v in sorted(report["faults"].items()))),
        ("processes that exited by themselves",
         {k: len(v["codes"]) for k, v in report["unexpected_exits"].items()}),
        ("events produced (Kafka acked + HTTP 202)",
         f"{events['produced_kafka_acked']:,} + {events['produced_http_accepted']:,}"),
        ("HTTP batches by status", events["http_statuses"]),
        ("events stored (distinct ids)", f"{events['stored']:,}"),
        ("doubled in events (count > 1)", events["doubled"]),
        ("lost (acked, in neither table)", events["lost"]),
        ("messages on topic / positions stored",
         f"{events['messages_on_topic']:,} / {events['positions_stored']:,}"),
        ("dead letters by reason", events["dead_letters_by_reason"]),
        ("model versions listed", f"{len(chain['versions'])} (v1..v{max(chain['versions'], default=0)})"),
        ("chain contiguous / parents missing", f"{chain['contiguous']} / {chain['parents_missing']}"),
        ("versions with several payloads", chain["versions_with_several_payloads"] or "none"),
        ("chain intact", chain["intact"]),
        ("training runs by status", report["training_runs"]),
        ("first ready after (s)", f"{ready['first_ready_s'] or 0:.1f}"),
        ("longest /readyz not 200 (s)", f"{ready['longest_not_ready_s']:.1f}"),
        ("not-ready periods / total (s)", f"{ready['not_ready_periods']} / {ready['not_ready_total_s']:.1f}"),
        ("longest period: from (s), polls seen", longest and f"{longest['at_s']}: {longest['seen']}"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    print(f"chaos campaign, seed {report['config']['seed']}: "
          f"{report['config']['faults']} faults over {report['config']['minutes']} min")  # fmt: skip
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for note in report["notes"]:
        print(f"  note: {note}")


@contextlib.contextmanager
def bounded(seconds: float) -> Iterator[None]:
    """Raise :class:`CampaignTimeout` in the main thread after ``seconds`` (cleanup still runs)."""

    def expire(*_: object) -> None:
        raise CampaignTimeout(f"the campaign ran over {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(math.ceil(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--faults", type=int, default=20, help="Faults to inject.")
    parser.add_argument("--minutes", type=float, default=5.0, help="Over this many minutes.")
    parser.add_argument("--seed", type=int, default=1, help="Chooses every fault, time and pause.")
    parser.add_argument("--rate", type=int, default=200, help="Kafka events a second.")
    parser.add_argument("--train-every", type=float, default=45.0, help="Seconds between clean cycles.")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    parser.add_argument("--report", type=Path, help="Also write the JSON report to this file.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary home (logs, data).")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="freshrec-chaos-"))
    campaign = Campaign(args, root)
    started = time.monotonic()
    try:
        with bounded(args.minutes * 60 + 1200):
            campaign.run()
            report = campaign.audit()
    finally:
        campaign.close()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)  # a broker log and a chDB home: gigabytes per run
    report["wall_s"] = round(time.monotonic() - started, 1)
    if args.report is not None:
        args.report.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())
    else:
        print_table(report)


if __name__ == "__main__":
    main()

"""``freshrec serve``: one serving replica, everything it needs in one process.

A replica keeps its own real-time state: a stream worker (every role, consumer group
``<stream group>.serve-<worker id>``, so it reads every partition and does not take partitions from
the ``freshrec stream`` workers), a model replica following ``model.sparse`` / ``model.dense`` (and
healing from the snapshot store), the :class:`~publishers.serving.Recommender` over both, and the
HTTP API on uvicorn. Replicas scale out by running more of them: each one reads the whole stream.

:func:`serve` runs ``workers`` such stacks as processes behind one port (uvicorn's and gunicorn's
pre-fork model), with each new connection dealt to the next worker in turn by the supervisor
(:mod:`publishers.dealer`: left to the kernel, two connections often share one worker). A request is CPU
under the GIL, so one process serves one request at a time; a second process lets two concurrent
requests run on two cores (measured in ``bench/serving_latency.py``). Each worker is a full
replica (its own stream worker, group ``<stream group>.serve-<worker id>-<n>``, and its own model
replica), so each reads the whole stream: the price of the extra core.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time

import torch
import uvicorn
from fastapi import FastAPI

from freshrec.errors import ConfigError
from freshrec.processes import die_with_parent
from freshrec.settings import Settings
from freshrec.store import Store
from publishers.api import create_app
from publishers.dealer import Dealer, DealtServer
from publishers.replica import Replica, ReplicaSubscriber
from publishers.serving import Recommender
from publishers.snapshots import SnapshotStore
from streams.producer import EventProducer
from streams.reader import StateReader
from streams.worker import StreamWorker

__all__ = ["ServingStack", "api_producers", "api_server", "serve"]

logger = logging.getLogger(__name__)

_SERVE_BATCH = 250


class ServingStack:
    """Stream worker + model replica + recommender + API; :meth:`start` in threads, :meth:`stop`."""

    def __init__(
        self, settings: Settings, *, store: Store | None = None, channel: socket.socket | None = None
    ) -> None:
        """``store``: the ClickHouse the dashboard reads (the caller owns it; None: no dashboard data).
        ``channel``: where :func:`serve`'s supervisor deals this worker its connections
        (:mod:`publishers.dealer`) instead of binding ``api_host:api_port``."""
        torch.set_num_threads(settings.serve.torch_threads)  # this process serves: see ServeSettings
        group = f"{settings.stream.group_id}.serve-{settings.stream.worker_id}"
        # Requests read the worker's state under the lock it holds while applying a batch: small
        # batches keep that wait short (2,000 events with the heads on hold it ~80 ms; 250, ~10 ms).
        batch = min(settings.stream.batch_size, _SERVE_BATCH)
        stream = settings.stream.model_copy(update={"group_id": group, "batch_size": batch})
        self.settings = settings.model_copy(update={"stream": stream})
        self.worker = StreamWorker(self.settings)
        self.replica = Replica(snapshots=SnapshotStore.for_settings(settings))
        self.subscriber = ReplicaSubscriber(settings, self.replica)
        self.producer, self.decisions = api_producers(settings)
        self.recommender = Recommender(
            settings=settings.serve, replica=self.replica, reader=StateReader(self.worker)
        )
        self.app = create_app(
            settings,
            recommender=self.recommender,
            producer=self.producer,
            decisions=self.decisions,
            subscriber=self.subscriber,
            store=store,
        )
        self.server = api_server(self.app, settings, channel)
        self.store = store
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    def start(self, *, timeout_s: float = 60.0, stop: threading.Event | None = None) -> ServingStack:
        """Start the worker, the replica and the API in background threads; return when it listens
        and its stream worker has partitions (or after ``timeout_s``, or as soon as ``stop`` is set)."""
        self.subscriber.start()
        worker = threading.Thread(target=self.worker.run, name="freshrec-serve-stream", daemon=True)
        worker.start()
        api = threading.Thread(target=self.server.run, name="freshrec-api", daemon=True)
        api.start()
        self._threads = [worker, api]
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not api.is_alive():
                raise ConfigError(f"the API could not listen on {self.url} (port in use?)")
            if time.monotonic() > deadline:
                raise ConfigError(f"the API did not start on {self.url} within {timeout_s:.0f} s")
            time.sleep(0.02)
        while not self.worker.assigned and time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                break
            time.sleep(0.02)
        logger.info("serving on %s", self.url)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.worker.stop()
        for thread in self._threads:
            thread.join(30)
        self.subscriber.stop()
        try:  # the decision log first: its batch holds up to a second of responses
            self.decisions.close()
        finally:
            self.producer.close()

    def wait(self) -> None:
        """Block until the API stops (SIGINT/SIGTERM reach uvicorn only in the main thread: see the CLI)."""
        for thread in self._threads:
            thread.join()


def api_producers(settings: Settings) -> tuple[EventProducer, EventProducer]:
    """The API's producers: one for posted events, sent at once (they change recommendations), and
    one for the decision log, batched (``ServeSettings.impressions_linger_ms``)."""
    events = EventProducer(settings, **{"linger.ms": 1})
    return events, EventProducer(settings, **{"linger.ms": settings.serve.impressions_linger_ms})


def api_server(app: FastAPI, settings: Settings, channel: socket.socket | None = None) -> uvicorn.Server:
    """uvicorn over ``app``: listening on ``api_host:api_port``, or, for a worker of :func:`serve`,
    serving the connections dealt over ``channel`` (:mod:`publishers.dealer`)."""
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        http="httptools",
        loop="uvloop",
        timeout_graceful_shutdown=10,  # a stop waits at most this long for open connections
    )
    return uvicorn.Server(config) if channel is None else DealtServer(config, channel)


def serve(settings: Settings, *, workers: int, stop: threading.Event) -> int:
    """Serve with ``workers`` processes behind one socket until ``stop`` is set; the exit code.

    One worker is this process. With more, this process binds the socket, forks the workers (before
    any thread of its own exists: forking a threaded process is unsafe), and supervises: if a worker
    dies, the others are stopped and the exit code is 1, so that an orchestrator restarts the whole
    set (docker-compose: ``restart: unless-stopped``). Workers die with this process
    (``PR_SET_PDEATHSIG``), and SIGINT/SIGTERM are held back across the fork so that none is lost
    before a worker has its handlers.
    """
    if workers == 1:
        _run(_stack(settings), stop)
        return 0
    assert threading.active_count() == 1, "fork the serving workers before starting any thread"
    if not settings.dsn.startswith("chdb://"):
        from freshrec.store import open_store

        open_store(settings).close()  # migrate once here; the workers open theirs without migrating
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.api_host, settings.api_port))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {settings.api_host}:{settings.api_port}: {exc}") from exc
    sock.listen(2048)
    dealer = Dealer(sock, workers)
    context = multiprocessing.get_context("fork")
    children = [
        context.Process(target=_worker, args=(settings, n, dealer, os.getpid()), name=f"freshrec-serve-{n}")
        for n in range(workers)
    ]
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        for child in children:
            child.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    dealer.start()
    logger.info("serving on %s:%d with %d worker processes", settings.api_host, settings.api_port, workers)
    crashed = False
    while not stop.wait(0.5):
        if any(not child.is_alive() for child in children):
            codes = [child.exitcode for child in children]
            logger.error("a serving worker exited (codes %s); stopping the others", codes)
            crashed = True
            break
        if not dealer.alive:
            logger.error("the connection dealer stopped; stopping the workers")
            crashed = True
            break
    dealer.stop()  # no new connection goes to a stopping worker: clients are refused instead
    sock.close()
    for child in children:
        if child.is_alive():
            child.terminate()  # SIGTERM: the worker stops its stack
    deadline = time.monotonic() + 60
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            logger.error("serving worker %s did not stop within 60 s; killing it", child.name)
            child.kill()
            child.join()
    failed = crashed or any(child.exitcode != 0 for child in children)
    return 1 if failed else 0


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _stack(settings: Settings, channel: socket.socket | None = None, *, migrate: bool = True) -> ServingStack:
    """A stack with the dashboard over a ClickHouse server (a chDB path belongs to `freshrec run`)."""
    from freshrec.store import open_store

    store = None if settings.dsn.startswith("chdb://") else open_store(settings, migrate=migrate)
    return ServingStack(settings, store=store, channel=channel)


def _worker(settings: Settings, n: int, dealer: Dealer, parent: int) -> None:
    """One forked worker: its own replica of everything, serving the connections dealt to it, until
    SIGTERM."""
    if not die_with_parent(parent, signal.SIGTERM):  # stop with the supervisor, even after kill -9
        return
    stop = threading.Event()
    for signum in _STOP_SIGNALS:
        signal.signal(signum, lambda *_: stop.set())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # held back since the fork
    stream = settings.stream.model_copy(update={"worker_id": f"{settings.stream.worker_id}-{n}"})
    _run(_stack(settings.model_copy(update={"stream": stream}), dealer.channel(n), migrate=False), stop)


def _run(stack: ServingStack, stop: threading.Event) -> None:
    try:
        stack.start(stop=stop)
        stop.wait()
    finally:
        stack.stop()
        if stack.store is not None:
            stack.store.close()

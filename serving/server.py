"""``freshrec serve``: one serving replica, everything it needs in one process.

A replica keeps its own real-time state: a stream worker (every role, consumer group
``<stream group>.serve-<worker id>``, so it reads every partition and does not take partitions from
the ``freshrec stream`` workers; see :func:`bootstrap_changelogs` for where its state starts), a
model replica following ``model.sparse`` / ``model.dense`` (and
healing from the snapshot store), the :class:`~serving.recommender.Recommender` over both, and the
HTTP API on uvicorn. Replicas scale out by running more of them: each one reads the whole stream.

:func:`serve` runs ``workers`` such stacks as processes behind one port (uvicorn's and gunicorn's
pre-fork model), with each new connection dealt to the next worker in turn by the supervisor
(:mod:`serving.dealer`: left to the kernel, two connections often share one worker). A request is CPU
under the GIL, so one process serves one request at a time; a second process lets two concurrent
requests run on two cores (measured in ``bench/serving_latency.py``). Each worker is a full
replica (its own stream worker, group ``<stream group>.serve-<worker id>-<n>``, and its own model
replica), so each reads the whole stream: the price of the extra core.

Readiness (``GET /readyz``) is decided by :class:`ReadinessProbe`; liveness (``GET /healthz``) by the
API alone. ClickHouse is needed by the dashboard only: the stack opens it on the dashboard's first
data request (:class:`~serving.dashboard.LazyStore`), so serving starts and goes on without it.

uvicorn's httptools protocol is wrapped (:class:`BoundedHttpTools`) with what it lacks: a bound on
a request's head (``FRESHREC_SERVE__MAX_HEAD_BYTES``, else 431), a deadline for the head to arrive
(``FRESHREC_SERVE__HEAD_TIMEOUT_S``), and the idle timeout (``FRESHREC_SERVE__KEEP_ALIVE_S``)
applied from the moment a connection opens, not only after a first response.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
import uuid
from asyncio import TimerHandle, Transport

import torch
import uvicorn
from confluent_kafka import Consumer, KafkaException, TopicPartition
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from freshrec.errors import ConfigError, KafkaUnavailable, StoreUnavailable
from freshrec.processes import die_with_parent
from freshrec.settings import STREAM_ROLES, Settings
from freshrec.store import Store
from learners.registry import build_heads
from publishers.replica import Replica, ReplicaSubscriber
from publishers.snapshots import SnapshotStore
from serving.api import Readiness, create_app
from serving.dashboard import LazyStore
from serving.dealer import Dealer, DealtServer
from serving.recommender import SERVED_HEADS, Recommender
from streams.changelog import changelog_topic
from streams.producer import EventProducer
from streams.reader import StateReader
from streams.worker import StreamWorker

__all__ = [
    "BoundedHttpTools",
    "ReadinessProbe",
    "ServingStack",
    "api_producers",
    "api_server",
    "bootstrap_changelogs",
    "bounded_http",
    "serve",
]

logger = logging.getLogger(__name__)

_SERVE_BATCH = 250


class ServingStack:
    """Stream worker + model replica + recommender + API; :meth:`start` in threads, :meth:`stop`."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | LazyStore | None = None,
        channel: socket.socket | None = None,
    ) -> None:
        """``store``: the ClickHouse the dashboard reads (the caller owns it; None: no dashboard data;
        a :class:`LazyStore`: opened when the dashboard first asks). ``channel``: where
        :func:`serve`'s supervisor deals this worker its connections (:mod:`serving.dealer`)
        instead of binding ``api_host:api_port``."""
        torch.set_num_threads(settings.serve.torch_threads)  # this process serves: see ServeSettings
        group = f"{settings.stream.group_id}.serve-{settings.stream.worker_id}"
        # Requests read the worker's state under the lock it holds while applying a batch: small
        # batches keep that wait short (2,000 events with the heads on hold it ~80 ms; 250, ~10 ms).
        batch = min(settings.stream.batch_size, _SERVE_BATCH)
        stream = settings.stream.model_copy(update={"group_id": group, "batch_size": batch})
        self.settings = settings.model_copy(update={"stream": stream})
        # Only the heads serving reads (the MF head ranks candidates); any other head a stream worker
        # keeps would cost every replica its learning for nothing.
        heads = {name: head for name, head in build_heads(stream).items() if name in SERVED_HEADS}
        self.worker = StreamWorker(self.settings, heads=heads, bootstrap=bootstrap_changelogs(settings))
        self.replica = Replica(snapshots=SnapshotStore.for_settings(settings))
        self.subscriber = ReplicaSubscriber(settings, self.replica)
        self.producer, self.decisions = api_producers(settings)
        self.recommender = Recommender(
            settings=settings.serve, replica=self.replica, reader=StateReader(self.worker)
        )
        self.readiness = ReadinessProbe(
            self.settings, worker=self.worker, replica=self.replica, subscriber=self.subscriber
        )
        self.app = create_app(
            settings,
            recommender=self.recommender,
            producer=self.producer,
            decisions=self.decisions,
            subscriber=self.subscriber,
            store=store,
            readiness=self.readiness,
        )
        self.server = api_server(self.app, settings, channel)
        self.store = store
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    def start(self, *, timeout_s: float = 60.0, stop: threading.Event | None = None) -> ServingStack:
        """Start the API, the model replica and the stream worker in background threads; return when
        it listens and its stream worker has partitions (or after ``timeout_s``, or as soon as ``stop``
        is set).

        The API listens first: while the replica loads its model and the worker its state, or while
        Kafka is away, ``/healthz`` answers and ``/readyz`` says what is missing. Neither the replica
        nor the worker gives up on a Kafka that is not there yet: both wait for it."""
        api = threading.Thread(target=self.server.run, name="freshrec-api", daemon=True)
        api.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not api.is_alive():
                raise ConfigError(f"the API could not listen on {self.url} (port in use?)")
            if time.monotonic() > deadline:
                raise ConfigError(f"the API did not start on {self.url} within {timeout_s:.0f} s")
            time.sleep(0.02)
        self.subscriber.start(wait=False)
        worker = threading.Thread(target=self._stream, name="freshrec-serve-stream", daemon=True)
        worker.start()
        self._threads = [worker, api]
        while not self.worker.assigned and time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                break
            time.sleep(0.02)
        logger.info("serving on %s", self.url)
        return self

    def _stream(self) -> None:
        """The stream worker, started again (from its checkpoint) while Kafka is away."""
        delay, waiting_since = 0.5, None
        while not self._stopping.is_set():
            try:
                self.worker.run()
                return
            except KafkaUnavailable as exc:
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    logger.warning("the stream worker waits for Kafka: %s", exc)
                self._stopping.wait(delay)
                delay = min(delay * 2, 10.0)

    def stop(self) -> None:
        self._stopping.set()
        self.server.should_exit = True
        self.worker.stop()
        for thread in self._threads:
            thread.join(30)
        self.subscriber.stop()
        self.readiness.close()
        try:  # the decision log first: its batch holds up to a second of responses
            self.decisions.close()
        finally:
            self.producer.close()

    def wait(self) -> None:
        """Block until the API stops (SIGINT/SIGTERM reach uvicorn only in the main thread: see the CLI)."""
        for thread in self._threads:
            thread.join()


def bootstrap_changelogs(settings: Settings) -> dict[str, tuple[str, ...]]:
    """The stream workers' changelogs a replica's state may start from, each with the roles its
    group keeps (none with ``FRESHREC_SERVE__BOOTSTRAP`` off); ``settings`` are the replica's,
    before its serving group.

    A replica is a stream worker in a group of its own, so by itself it would read ``events`` from
    offset 0: at production volume, hours before ``/readyz`` turns 200. Instead each partition
    starts from the stream group's snapshots (``FRESHREC_STREAM__GROUP_ID``) or from the replica's
    own (a replica restarted with its worker id), whichever are further on, then follows the
    topics; ``/readyz`` is 200 once it has caught up.

    - ``freshrec stream`` keeps every role in one group: one changelog, ``state.<all roles>``.
    - A deployment that splits the roles into groups (docker-compose's stream-counters,
      stream-sequences and stream-heads) keeps each part in its own changelog at its own offsets:
      each part is restored from its own, and the replica reads from the lowest of their offsets,
      applying each event only to the parts that had not seen it.

    Every split of the roles is listed; those not on the broker are skipped. A snapshot with heads
    the replica does not keep still loads (serving keeps the MF head only); one without the
    replica's heads is not used, and without any usable snapshot a partition is read from offset 0
    (said in the log).
    """
    if not settings.serve.bootstrap:
        return {}
    sources: dict[str, tuple[str, ...]] = {}
    for size in range(len(STREAM_ROLES), 0, -1):
        for roles in itertools.combinations(STREAM_ROLES, size):
            stream = settings.stream.model_copy(update={"roles": roles})
            sources[changelog_topic(settings.model_copy(update={"stream": stream}))] = roles
    return sources


def api_producers(settings: Settings) -> tuple[EventProducer, EventProducer]:
    """The API's producers: one for posted events, sent at once (they change recommendations), and
    one for the decision log, batched (``ServeSettings.impressions_linger_ms``).

    The events producer gives a record up once ``publish_timeout_s`` has passed
    (``message.timeout.ms``): the request that sent it has answered 503 by then, and a record
    published after its request failed would break the request's all-or-nothing contract."""
    timeout_ms = max(1, round(settings.serve.publish_timeout_s * 1000))
    events = EventProducer(settings, **{"linger.ms": 1, "message.timeout.ms": timeout_ms})
    return events, EventProducer(settings, **{"linger.ms": settings.serve.impressions_linger_ms})


class BoundedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded request head and idle deadlines.

    httptools buffers a header of any size (uvicorn bounds heads only for h11), and uvicorn starts
    its idle timer only after a response, so a connection that never sends a request, or sends its
    head a byte at a time, was held for ever. Here: the bytes received while a head is incomplete
    are counted, and past ``max_head_bytes`` the answer is 431 and the connection closes (after a
    short grace during which the rest of the input is discarded, so that the client reads the
    answer rather than a reset); a head must complete within ``head_timeout_s`` of its first byte;
    and a new connection gets the keep-alive timer at once. :func:`bounded_http` binds the limits.
    """

    max_head_bytes = 16_384
    head_timeout_s = 10.0
    _GRACE_S = 1.0

    def connection_made(self, transport: Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_head = True  # awaiting (or receiving) a request line and headers
        self._head_bytes = 0
        self._heads_done = 0
        self._refused = False
        self._head_timer: TimerHandle | None = None
        loop = asyncio.get_running_loop()
        self.timeout_keep_alive_task = loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # discarded until the connection closes
        done = self._heads_done
        super().data_received(data)
        if self._in_head and self._heads_done == done:  # no head completed within data: all head
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
                self._refuse()

    def on_message_begin(self) -> None:  # the first byte of a request
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._cancel_head_timer()
        self._head_timer = asyncio.get_running_loop().call_later(self.head_timeout_s, self._head_expired)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._heads_done += 1
        self._cancel_head_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self.transport.close()

    def _refuse(self) -> None:
        self._refused = True
        self._cancel_head_timer()
        self._unset_keepalive_if_required()
        body = b'{"detail":"the request line and headers are over %d bytes"}' % self.max_head_bytes
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        asyncio.get_running_loop().call_later(self._GRACE_S, self.transport.close)


def bounded_http(settings: Settings) -> type[BoundedHttpTools]:
    """:class:`BoundedHttpTools` with the limits of ``settings.serve`` (uvicorn builds one protocol
    object per connection from the class it is given)."""
    limits = {
        "max_head_bytes": settings.serve.max_head_bytes,
        "head_timeout_s": settings.serve.head_timeout_s,
    }
    return type("ServeHttpProtocol", (BoundedHttpTools,), limits)


def api_server(app: FastAPI, settings: Settings, channel: socket.socket | None = None) -> uvicorn.Server:
    """uvicorn over ``app``: listening on ``api_host:api_port``, or, for a worker of :func:`serve`,
    serving the connections dealt over ``channel`` (:mod:`serving.dealer`)."""
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        http=bounded_http(settings),
        loop="uvloop",
        timeout_keep_alive=settings.serve.keep_alive_s,
        timeout_graceful_shutdown=10,  # a stop waits at most this long for open connections
    )
    return uvicorn.Server(config) if channel is None else DealtServer(config, channel)


class ReadinessProbe:
    """Decides ``GET /readyz``: ready once the stream state has caught up, a model version is loaded
    (or none exists yet), and Kafka answers.

    - **Kafka**: a metadata request, then the end offsets of the topics involved, each with
      ``ready_kafka_timeout_s``.
    - **Stream**: the worker owns its partitions and its state is at most ``ready_max_lag``
      messages behind the ends of the topics it reads (a partition it has not read yet counts from
      its beginning). Without Kafka the lag is unknown, and not ready.
    - **Model**: the replica holds a version, or none exists yet: no snapshot in the store and
      nothing on the model topics. A replica whose subscriber died is not ready either.

    Kafka is asked at most once per ``cache_s`` (a probe per request would load the broker). When
    the answer is older, one request checks again while any other gets the last answer at once, so
    a broker that is away slows one request a second, not every one. Thread-safe.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        worker: StreamWorker,
        replica: Replica,
        subscriber: ReplicaSubscriber | None = None,
        cache_s: float = 1.0,
    ) -> None:
        self._settings = settings
        self._worker = worker
        self._replica = replica
        self._subscriber = subscriber
        self._cache_s = cache_s
        self._lock = threading.Lock()  # held by the one request that checks
        self._last: tuple[float, Readiness] | None = None
        self._consumer: Consumer | None = None
        topics = settings.topics
        self._stream_topics = [topics.events]
        if "counters" in worker.roles:
            self._stream_topics.append(topics.impressions)
        self._model_topics = [topics.model_sparse, topics.model_dense]

    def __call__(self) -> Readiness:
        last = self._last
        if last is not None and time.monotonic() - last[0] < self._cache_s:
            return last[1]
        if not self._lock.acquire(blocking=last is None):
            assert last is not None
            return last[1]  # another request is checking: the last answer, at once
        try:
            state = self._check()
            self._last = (time.monotonic(), state)
        finally:
            self._lock.release()
        if not state.ready:
            logger.debug("not ready: %s", state.reasons)
        return state

    def close(self) -> None:
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None

    def _ends(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(low, high) watermarks of every partition of the stream and model topics."""
        timeout = self._settings.serve.ready_kafka_timeout_s
        if self._consumer is None:
            self._consumer = Consumer(
                self._settings.kafka_config(
                    **{
                        "group.id": f"freshrec-readyz-{uuid.uuid4().hex}",  # never joined: no subscribe
                        "enable.auto.commit": False,
                        "log_level": 0,  # an outage is reported by /readyz, not by a log per retry
                    }
                )
            )
        metadata = self._consumer.list_topics(timeout=timeout)
        ends: dict[tuple[str, int], tuple[int, int]] = {}
        for topic in self._stream_topics + self._model_topics:
            described = metadata.topics.get(topic)
            if described is None or described.error is not None:
                continue
            for partition in described.partitions:
                low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=timeout, cached=False
                )
                ends[(topic, partition)] = (low, high)
        return ends

    def _check(self) -> Readiness:
        reasons: dict[str, str] = {}
        ends: dict[tuple[str, int], tuple[int, int]] | None = None
        try:
            ends = self._ends()
        except KafkaException as exc:
            reasons["kafka"] = f"Kafka ({self._settings.bootstrap}) does not answer: {exc.args[0]}"
        lag: int | None = None
        worker = self._worker
        if ends is not None:
            with worker.lock:
                offsets = dict(worker.state.offsets)
            lag = sum(
                max(0, high - max(low, offsets.get(tp, low)))
                for tp, (low, high) in ends.items()
                if tp[0] in self._stream_topics
            )
        if not worker.assigned:
            reasons["stream"] = "the stream worker has no partitions yet"
        elif lag is not None and lag > self._settings.serve.ready_max_lag:
            reasons["stream"] = (
                f"the stream state is {lag:,} messages behind (FRESHREC_SERVE__READY_MAX_LAG is "
                f"{self._settings.serve.ready_max_lag:,})"
            )
        elif lag is None:
            reasons["stream"] = "how far behind the stream state is cannot be known without Kafka"
        if self._subscriber is not None and not self._subscriber.following:
            reasons["model"] = (
                f"the model replica stopped following the model topics: {self._subscriber.error}"
                if self._subscriber.error is not None
                else "the model replica is not following the model topics yet (waiting for Kafka)"
            )
        elif self._replica.current is None:
            snapshots = self._replica.snapshots.versions() if self._replica.snapshots is not None else []
            published = ends is not None and any(
                high > low for (topic, _), (low, high) in ends.items() if topic in self._model_topics
            )
            if snapshots or published:
                where = f"snapshot v{snapshots[-1]}" if snapshots else "the model topics"
                reasons["model"] = f"a model version exists ({where}) but none is loaded yet"
        return Readiness(ready=not reasons, reasons=reasons, lag=lag)


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
    migrated = True
    if not settings.dsn.startswith("chdb://"):
        from freshrec.store import open_store

        try:  # migrate once here; the workers open theirs without migrating
            open_store(settings).close()
        except StoreUnavailable as exc:  # serving does not need it: the dashboard waits for it
            logger.warning("ClickHouse cannot be reached (%s); serving without the dashboard's data", exc)
            migrated = False
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
        context.Process(
            target=_worker, args=(settings, n, dealer, os.getpid(), migrated), name=f"freshrec-serve-{n}"
        )
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
    """A stack with the dashboard over a ClickHouse server (a chDB path belongs to `freshrec run`),
    opened when the dashboard first asks: serving neither waits for ClickHouse nor needs it."""
    from freshrec.store import open_store

    store = None
    if not settings.dsn.startswith("chdb://"):
        store = LazyStore(
            lambda: open_store(settings, migrate=migrate), retry_s=settings.serve.dashboard_retry_s
        )
    return ServingStack(settings, store=store, channel=channel)


def _worker(settings: Settings, n: int, dealer: Dealer, parent: int, migrated: bool) -> None:
    """One forked worker: its own replica of everything, serving the connections dealt to it, until
    SIGTERM."""
    if not die_with_parent(parent, signal.SIGTERM):  # stop with the supervisor, even after kill -9
        return
    stop = threading.Event()
    for signum in _STOP_SIGNALS:
        signal.signal(signum, lambda *_: stop.set())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # held back since the fork
    stream = settings.stream.model_copy(update={"worker_id": f"{settings.stream.worker_id}-{n}"})
    worker_settings = settings.model_copy(update={"stream": stream})
    _run(_stack(worker_settings, dealer.channel(n), migrate=not migrated), stop)


def _run(stack: ServingStack, stop: threading.Event) -> None:
    try:
        stack.start(stop=stop)
        stop.wait()
    finally:
        stack.stop()
        if stack.store is not None:
            stack.store.close()

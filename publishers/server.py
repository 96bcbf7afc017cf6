"""``freshrec serve``: one serving replica, everything it needs in one process.

A replica keeps its own real-time state: a stream worker (every role, consumer group
``<stream group>.serve-<worker id>``, so it reads every partition and does not take partitions from
the ``freshrec stream`` workers), a model replica following ``model.sparse`` / ``model.dense`` (and
healing from the snapshot store), the :class:`~publishers.serving.Recommender` over both, and the
HTTP API on uvicorn. Replicas scale out by running more of them: each one reads the whole stream.
"""

from __future__ import annotations

import logging
import threading
import time

import torch
import uvicorn

from freshrec.errors import ConfigError
from freshrec.settings import Settings
from freshrec.store import Store
from publishers.api import create_app
from publishers.replica import Replica, ReplicaSubscriber
from publishers.serving import Recommender
from publishers.snapshots import SnapshotStore
from streams.producer import EventProducer
from streams.reader import StateReader
from streams.worker import StreamWorker

__all__ = ["ServingStack"]

logger = logging.getLogger(__name__)

_SERVE_BATCH = 250


class ServingStack:
    """Stream worker + model replica + recommender + API; :meth:`start` in threads, :meth:`stop`."""

    def __init__(self, settings: Settings, *, store: Store | None = None) -> None:
        """``store``: the ClickHouse the dashboard reads (the caller owns it; None: no dashboard data)."""
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
        self.producer = EventProducer(settings, **{"linger.ms": 1})
        self.recommender = Recommender(
            settings=settings.serve, replica=self.replica, reader=StateReader(self.worker)
        )
        self.app = create_app(
            settings,
            recommender=self.recommender,
            producer=self.producer,
            subscriber=self.subscriber,
            store=store,
        )
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host=settings.api_host,
                port=settings.api_port,
                log_level="warning",
                access_log=False,
                lifespan="off",
                http="httptools",
                loop="uvloop",
            )
        )
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    def start(self, *, timeout_s: float = 60.0) -> ServingStack:
        """Start the worker, the replica and the API in background threads; return when it listens."""
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
            time.sleep(0.02)
        logger.info("serving on %s", self.url)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.worker.stop()
        for thread in self._threads:
            thread.join(30)
        self.subscriber.stop()
        self.producer.close()

    def wait(self) -> None:
        """Block until the API stops (SIGINT/SIGTERM reach uvicorn only in the main thread: see the CLI)."""
        for thread in self._threads:
            thread.join()

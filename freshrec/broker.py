"""The local Apache Kafka broker: a real Kafka 4.x in KRaft mode, one node, broker and controller.

Used by the embedded mode and the test suite when ``FRESHREC_KAFKA_BOOTSTRAP`` is unset. There is
no Docker here, so the broker runs as a plain JVM process:

1. **Jars** — Maven resolves ``org.apache.kafka:kafka_2.13`` and a log4j2 backend from Maven Central
   through ``resources/kafka-pom.xml`` into ``$FRESHREC_CACHE_DIR/kafka/<pom hash>/libs``. A stamp
   file marks a complete resolution, so later starts need neither Maven nor the network; editing the
   pom changes its hash and resolves again.
2. **Storage** — ``kafka.tools.StorageTool format`` once, with a cluster id kept beside the data.
3. **Process** — ``java kafka.Kafka server.properties`` in its own session, output to
   ``$FRESHREC_HOME/kafka/broker.out``, pid in ``broker.pid``. ``start`` is idempotent (a running
   broker is left alone) and waits until the broker answers a metadata request. The JVM gets only
   the environment it needs (:func:`broker_environment`), never the API token or Kafka secrets.

The pid file alone is not trusted: a process counts as our broker only while ``/proc/<pid>/cmdline``
still names ``kafka.Kafka`` and our ``server.properties``, so a recycled pid is never signalled.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from freshrec.errors import BrokerError
from freshrec.settings import Settings

__all__ = ["BrokerStatus", "LocalBroker", "broker_environment"]

logger = logging.getLogger(__name__)

_POM = "kafka-pom.xml"
_LOG4J = "log4j2.properties"
_MAIN_CLASS = "kafka.Kafka"
_APT = {"java": "openjdk-17-jre-headless", "mvn": "maven"}


# What the broker's JVM may see of the environment that starts it. Everything else (the API token,
# SASL passwords in FRESHREC_KAFKA_OPTIONS, cloud credentials) stays out: the broker needs none of
# it, and a JVM's environment is readable by its own user in /proc/<pid>/environ and in crash dumps.
_BROKER_ENV_NAMES = frozenset({"PATH", "JAVA_HOME", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER"})
_BROKER_ENV_PREFIXES = ("KAFKA_", "JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS")


def broker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment the broker's JVM is started with: only what Java and Kafka read (``PATH``,
    ``JAVA_HOME``, ``HOME``, locale and time zone, ``KAFKA_*`` and the JVM's option variables)."""
    return {
        name: value
        for name, value in environ.items()
        if name in _BROKER_ENV_NAMES or name.startswith(_BROKER_ENV_PREFIXES)
    }


@dataclass(frozen=True, slots=True)
class BrokerStatus:
    """What ``freshrec broker status`` reports."""

    running: bool
    pid: int | None
    bootstrap: str
    data_dir: Path


class LocalBroker:
    """Manage the single-node KRaft broker that lives under ``$FRESHREC_HOME/kafka``."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.root = settings.home / "kafka"
        self.data_dir = self.root / "data"
        self.logs_dir = self.root / "logs"
        self.config_path = self.root / "server.properties"
        self.pid_path = self.root / "broker.pid"
        self.out_path = self.root / "broker.out"
        pom = resources.files("freshrec.resources").joinpath(_POM).read_bytes()
        self._pom_digest = hashlib.sha256(pom).hexdigest()[:16]
        self.libs_dir = settings.cache_dir / "kafka" / self._pom_digest / "libs"

    # ------------------------------------------------------------------ public verbs

    def status(self) -> BrokerStatus:
        pid = self._running_pid()
        return BrokerStatus(
            running=pid is not None and self._port_open(),
            pid=pid,
            bootstrap=self._bootstrap,
            data_dir=self.data_dir,
        )

    def start(self, *, timeout_s: float = 120.0) -> BrokerStatus:
        """Start the broker unless it already runs; return once it answers metadata requests."""
        if (pid := self._running_pid()) is not None:
            logger.info("local Kafka broker already running (pid %d) at %s", pid, self._bootstrap)
            self._wait_ready(pid, timeout_s)
            return self.status()
        if self._port_in_use(self._settings.broker_port) or self._port_in_use(self._settings.controller_port):
            raise BrokerError(
                f"port {self._settings.broker_port} or {self._settings.controller_port} on 127.0.0.1 is "
                "taken by another process; stop it, or choose free ports with FRESHREC_BROKER_PORT "
                "(and FRESHREC_BROKER_CONTROLLER_PORT)"
            )
        java = _require_tool("java", "Java 17 or newer runs the Kafka broker")
        libs = self.ensure_jars()
        self._write_config()
        self._format_storage(java, libs)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        command = [
            java,
            "-Xms256m",
            f"-Xmx{self._settings.broker_heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.logs_dir}",
            f"-Dlog4j2.configurationFile={self._log4j_path()}",
            "-cp",
            f"{libs}/*",
            _MAIN_CLASS,
            str(self.config_path),
        ]
        # posix_spawn in a new session: the broker outlives the CLI that started it and ignores its
        # Ctrl-C, and no Popen object is left behind to warn about a child still running.
        pid = os.posix_spawn(
            java,
            command,
            broker_environment(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(self.out_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
            setsid=True,
        )
        self.pid_path.write_text(f"{pid}\n")
        logger.info("starting local Kafka broker (pid %d) at %s", pid, self._bootstrap)
        self._wait_ready(pid, timeout_s)
        return self.status()

    def stop(self, *, timeout_s: float = 30.0) -> bool:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout_s``). False if it was not running."""
        pid = self._running_pid()
        if pid is None:
            self.pid_path.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while self._is_our_broker(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
        if self._is_our_broker(pid):
            logger.warning("broker pid %d ignored SIGTERM for %.0f s; killing it", pid, timeout_s)
            os.kill(pid, signal.SIGKILL)
            while self._is_our_broker(pid):
                _reap(pid)
                time.sleep(0.05)
        _reap(pid)
        self.pid_path.unlink(missing_ok=True)
        return True

    def ensure_jars(self) -> Path:
        """Resolve the broker's class path with Maven once; later calls return the cached folder."""
        stamp = self.libs_dir.parent / "complete"
        if stamp.exists() and any(self.libs_dir.glob("kafka_2.13-*.jar")):
            return self.libs_dir
        mvn = _require_tool("mvn", "Maven resolves the Kafka broker's jars from Maven Central")
        self.libs_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = self.libs_dir.parent / f"libs.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        pom_path = self.libs_dir.parent / _POM
        pom_path.write_bytes(resources.files("freshrec.resources").joinpath(_POM).read_bytes())
        command = [
            mvn,
            "-B",
            "-q",
            "-f",
            str(pom_path),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ]
        logger.info("resolving the Kafka broker's jars with Maven (first start only)")
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BrokerError(
                "Maven could not resolve the Kafka broker's jars "
                f"(exit {result.returncode}); is Maven Central reachable?\n{result.stdout[-3000:]}"
                f"{result.stderr[-3000:]}"
            )
        shutil.rmtree(self.libs_dir, ignore_errors=True)
        staging.rename(self.libs_dir)
        stamp.write_text("ok\n")
        return self.libs_dir

    # ------------------------------------------------------------------ internals

    @property
    def _bootstrap(self) -> str:
        return f"127.0.0.1:{self._settings.broker_port}"

    def _log4j_path(self) -> Path:
        path = self.root / _LOG4J
        path.write_bytes(resources.files("freshrec.resources").joinpath(_LOG4J).read_bytes())
        return path

    def _write_config(self) -> None:
        port, controller = self._settings.broker_port, self._settings.controller_port
        partitions = self._settings.broker_partitions
        lines = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{controller}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": str(partitions),
            # One node: every internal topic has one replica.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # A lone consumer should not wait 3 s for company before its first assignment.
            "group.initial.rebalance.delay.ms": "0",
            # Topics are created explicitly with their partition count; a typo must not make one.
            "auto.create.topics.enable": "false",
            "log.retention.hours": "168",
        }
        self.root.mkdir(parents=True, exist_ok=True)
        text = "# Written by `freshrec broker start`; edits are overwritten.\n"
        text += "".join(f"{key}={value}\n" for key, value in lines.items())
        self.config_path.write_text(text)

    def _format_storage(self, java: str, libs: Path) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id_path = self.root / "cluster.id"
        if not cluster_id_path.exists():
            # Kafka's cluster ids are 16 random bytes in URL-safe base64 without padding; like Kafka's
            # own Uuid.randomUuid, never one starting with "-", which a command line reads as an option
            # (1 start in 64 did: "argument --cluster-id: expected one argument").
            raw = "-"
            while raw.startswith("-"):
                raw = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
            cluster_id_path.write_text(raw + "\n")
        cluster_id = cluster_id_path.read_text().strip()
        command = [
            java,
            "-cp",
            f"{libs}/*",
            f"-Dlog4j2.configurationFile={self._log4j_path()}",
            f"-Dkafka.logs.dir={self.logs_dir}",
            "kafka.tools.StorageTool",
            "format",
            f"--cluster-id={cluster_id}",
            "--config",
            str(self.config_path),
            "--ignore-formatted",
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BrokerError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")

    def _wait_ready(self, pid: int, timeout_s: float) -> None:
        from confluent_kafka.admin import AdminClient  # heavy import, only when needed

        deadline = time.monotonic() + timeout_s
        while not self._port_open():
            _reap(pid)
            if not _alive(pid):  # liveness only: /proc/<pid>/cmdline can read empty mid-exec
                raise BrokerError(f"the Kafka broker exited during start-up; last output:\n{self._tail()}")
            if time.monotonic() > deadline:
                raise BrokerError(f"the Kafka broker did not open its port in {timeout_s:.0f} s")
            time.sleep(0.2)
        admin = AdminClient({"bootstrap.servers": self._bootstrap, "log_level": 3})
        while True:
            try:
                metadata = admin.list_topics(timeout=2.0)
            except Exception as exc:  # KafkaException while the controller elects itself
                if time.monotonic() > deadline:
                    raise BrokerError(f"the Kafka broker did not answer in {timeout_s:.0f} s") from exc
                time.sleep(0.2)
                continue
            if metadata.brokers:
                return

    def _running_pid(self) -> int | None:
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if self._is_our_broker(pid) else None

    def _is_our_broker(self, pid: int) -> bool:
        proc = Path(f"/proc/{pid}")
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
        return state != "Z" and _MAIN_CLASS.encode() in cmdline and str(self.config_path).encode() in cmdline

    def _port_open(self) -> bool:
        return self._port_in_use(self._settings.broker_port)

    @staticmethod
    def _port_in_use(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    def _tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.out_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no output)"


def _require_tool(name: str, why: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BrokerError(
            f"`{name}` is not on PATH: {why}. Install it (Debian: apt-get install {_APT[name]})."
        )
    return path


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _reap(pid: int) -> None:
    """Collect the exit status if the broker is our own child, so that it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)

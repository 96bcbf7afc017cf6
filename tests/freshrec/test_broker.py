"""The local Apache Kafka broker through the CLI: idempotent start, status, real traffic, stop, restart."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import orjson
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from support import free_port_pair, freshrec_cli


def test_broker_lifecycle_through_the_cli(tmp_path: Path) -> None:
    env, port = _broker_env(tmp_path, heap="512m")
    if "FRESHREC_CACHE_DIR" in os.environ:
        env["FRESHREC_CACHE_DIR"] = os.environ["FRESHREC_CACHE_DIR"]
    bootstrap = f"127.0.0.1:{port}"
    try:
        assert freshrec_cli("broker", "start", env=env).stdout.strip() == bootstrap
        first = orjson.loads(freshrec_cli("broker", "status", "--json", env=env).stdout)
        assert first == {"running": True, "pid": first["pid"], "bootstrap": bootstrap}
        # Idempotent: a second start leaves the running broker alone.
        assert freshrec_cli("broker", "start", env=env).stdout.strip() == bootstrap
        assert orjson.loads(freshrec_cli("broker", "status", "--json", env=env).stdout)["pid"] == first["pid"]

        _round_trip(bootstrap)

        assert freshrec_cli("broker", "stop", env=env).stdout.strip() == "stopped"
        stopped = freshrec_cli("broker", "status", env=env, check=False)
        assert stopped.returncode == 3 and stopped.stdout.startswith("stopped")
        assert freshrec_cli("broker", "stop", env=env).stdout.strip() == "not running"

        # The jars are cached: a restart works without Maven on PATH, and the data survived.
        no_maven = tmp_path / "bin"
        no_maven.mkdir()
        java = shutil.which("java")
        assert java is not None
        (no_maven / "java").symlink_to(java)
        restarted = freshrec_cli(
            "broker", "start", env=env | {"PATH": f"{no_maven}:{Path(sys.executable).parent}"}
        )
        assert restarted.stdout.strip() == bootstrap
        topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=30).topics
        assert "lifecycle" in topics
    finally:
        freshrec_cli("broker", "stop", env=env, check=False)


def _round_trip(bootstrap: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics(
        [NewTopic("lifecycle", num_partitions=2, replication_factor=1)]
    ).values():
        future.result(timeout=30)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    producer.produce("lifecycle", b"hello", b"k")
    assert producer.flush(30) == 0
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "lifecycle", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe(["lifecycle"])
    try:
        for _ in range(60):
            message = consumer.poll(1.0)
            if message is not None and message.error() is None:
                assert (message.key(), message.value()) == (b"k", b"hello")
                return
        raise AssertionError("the message did not come back within 60 s")
    finally:
        consumer.close()


def test_the_broker_process_sees_no_secret_of_the_environment_that_started_it(tmp_path: Path) -> None:
    env, _ = _broker_env(tmp_path, heap="384m")
    env |= {
        "FRESHREC_API_TOKEN": "token-that-must-not-leak",
        "FRESHREC_KAFKA_OPTIONS": '{"sasl.password": "password-that-must-not-leak"}',
        "AWS_SECRET_ACCESS_KEY": "cloud-secret-that-must-not-leak",
        "TZ": "UTC",
    }
    if "FRESHREC_CACHE_DIR" in os.environ:
        env["FRESHREC_CACHE_DIR"] = os.environ["FRESHREC_CACHE_DIR"]
    try:
        freshrec_cli("broker", "start", env=env)
        pid = orjson.loads(freshrec_cli("broker", "status", "--json", env=env).stdout)["pid"]
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        names = {entry.split(b"=", 1)[0].decode() for entry in environ.split(b"\0") if entry}
        assert b"must-not-leak" not in environ
        assert not any(name.startswith("FRESHREC_") for name in names)
        assert {"PATH", "TZ"} <= names  # what Java needs is still there
    finally:
        freshrec_cli("broker", "stop", env=env, check=False)


def _broker_env(tmp_path: Path, *, heap: str) -> tuple[dict[str, str], int]:
    """The environment of a CLI run with a local broker of its own (free ports, own home), no other
    FRESHREC_ variable; and the broker's client port."""
    port, controller = free_port_pair()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
    env |= {
        "FRESHREC_HOME": str(tmp_path / "home"),
        "FRESHREC_BROKER_PORT": str(port),
        "FRESHREC_BROKER_CONTROLLER_PORT": str(controller),
        "FRESHREC_BROKER_HEAP": heap,
    }
    return env, port

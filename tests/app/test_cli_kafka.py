"""Commands that need Kafka, typed in any order by a new user: they start the local broker when no
cluster is configured, and end in seconds with one line when a configured cluster does not answer."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
from support import cli_env, free_port_pair, freshrec_cli

from freshrec.settings import Settings


def test_a_configured_cluster_that_does_not_answer_ends_the_command_with_one_line(
    settings: Settings, tmp_path: Path
) -> None:
    dead, _ = free_port_pair()
    env = cli_env(settings) | {"FRESHREC_KAFKA_BOOTSTRAP": f"127.0.0.1:{dead}"}
    for command in (
        ["replay", "ml-100k", "--limit", "10"],
        ["eval", "prequential", "ml-100k", "--limit", "10"],
    ):
        started = time.monotonic()
        result = freshrec_cli(*command, env=env, check=False, timeout=60)
        took = time.monotonic() - started
        assert result.returncode == 1 and took < 20, (command, took, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and f"cannot reach Kafka at 127.0.0.1:{dead}" in lines[0], result.stderr
        assert "Traceback" not in result.stderr


def test_without_a_configured_cluster_a_command_starts_the_local_broker(
    settings: Settings, tmp_path: Path
) -> None:
    port, controller = free_port_pair()
    env = cli_env(settings)
    del env["FRESHREC_KAFKA_BOOTSTRAP"]
    env |= {
        "FRESHREC_HOME": str(tmp_path / "home"),
        "FRESHREC_BROKER_PORT": str(port),
        "FRESHREC_BROKER_CONTROLLER_PORT": str(controller),
        "FRESHREC_BROKER_HEAP": "384m",
    }
    events = tmp_path / "events.jsonl"
    now = int(time.time() * 1000)
    events.write_text(
        "".join(
            orjson.dumps(
                {"event_id": f"e{n}", "user_id": "u", "item_id": f"i{n}", "type": "view", "ts": now + n}
            ).decode()
            + "\n"
            for n in range(5)
        )
    )
    try:
        result = freshrec_cli("replay", str(events), "--json", env=env, timeout=240)
        assert f"starting the local Kafka broker at 127.0.0.1:{port}" in " ".join(result.stderr.split())
        assert orjson.loads(result.stdout)["published"] == 5
        again = freshrec_cli("replay", str(events), "--json", env=env, timeout=120)  # it is running now
        assert "starting the local Kafka broker" not in again.stderr
    finally:
        freshrec_cli("broker", "stop", env=env, check=False, timeout=120)

"""Settings: environment prefix, nested sections, defaults that follow FRESHREC_HOME, redaction."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError
from support import freshrec_cli

from freshrec.settings import Settings, StreamSettings


def test_environment_overrides_and_nested_sections(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FRESHREC_HOME", str(tmp_path))
    monkeypatch.setenv("FRESHREC_TOPIC_PREFIX", "ci-42.")
    monkeypatch.setenv("FRESHREC_SINK__BATCH_SIZE", "1234")
    monkeypatch.setenv(
        "FRESHREC_KAFKA_OPTIONS", '{"security.protocol": "SASL_SSL", "sasl.password": "hunter2"}'
    )
    settings = Settings()
    assert settings.home == tmp_path
    assert settings.dsn == f"chdb://{tmp_path / 'clickhouse'}"
    assert settings.topics.events == "ci-42.events"
    assert settings.topics.events_dlq == "ci-42.events.dlq"
    assert settings.sink.batch_size == 1234
    assert settings.uses_local_broker and settings.bootstrap == "127.0.0.1:9092"
    assert settings.kafka_config(**{"group.id": "g"}) == {
        "bootstrap.servers": "127.0.0.1:9092",
        "security.protocol": "SASL_SSL",
        "sasl.password": "hunter2",
        "group.id": "g",
    }


def test_redacted_never_shows_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRESHREC_API_TOKEN", "s3cret-token")
    monkeypatch.setenv("FRESHREC_CLICKHOUSE_DSN", "http://admin:pa55word@ch.example:8123/freshrec")
    monkeypatch.setenv("FRESHREC_KAFKA_OPTIONS", '{"sasl.password": "hunter2", "sasl.username": "me"}')
    text = str(Settings().redacted())
    for secret in ("s3cret-token", "pa55word", "hunter2"):
        assert secret not in text
    assert "ch.example:8123" in text and "'sasl.username': 'me'" in text


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FRESHREC_BROKER_PORT", "0"),
        ("FRESHREC_TOPIC_PREFIX", "bad prefix!"),
        ("FRESHREC_SINK__BATCH_SIZE", "0"),
    ],
)
def test_bad_settings_are_rejected_with_the_field_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert name.removeprefix("FRESHREC_").lower().split("__")[-1] in str(info.value)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("FRESHREC_KAFKA_OPTIONS", "{bad", "FRESHREC_KAFKA_OPTIONS is not valid JSON"),
        ("FRESHREC_BROKER_PORT", "nine", "FRESHREC_BROKER_PORT=nine: Input should be a valid integer"),
        ("FRESHREC_SINK__BATCH_SIZE", "0", "FRESHREC_SINK__BATCH_SIZE=0: Input should be greater than"),
    ],
)
def test_a_malformed_setting_exits_2_with_one_line_naming_the_variable(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
    env |= {"FRESHREC_HOME": str(tmp_path), variable: value, "COLUMNS": "40"}
    done = freshrec_cli("broker", "status", env=env, check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: {expected}")
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_a_worker_id_of_at_hostname_is_the_machines_name_made_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    """`docker compose up --scale` starts identical containers: '@hostname' gives each its own id."""
    monkeypatch.setattr(socket, "gethostname", lambda: "3f2a9c1b7d4e.local/x y")
    assert StreamSettings(worker_id="@hostname").worker_id == "3f2a9c1b7d4e.local-x-y"
    assert StreamSettings(worker_id="w1").worker_id == "w1"

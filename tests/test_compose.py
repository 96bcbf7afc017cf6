"""docker-compose.yml cannot run here (no Docker engine); check what can be checked without one."""

from __future__ import annotations

import base64
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from freshrec.cli import main
from freshrec.queries import TABLES
from freshrec.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


def test_services_are_well_formed_and_reference_declared_things() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"kafka", "clickhouse", "grafana", "sink", "train", "serve"} <= set(services)
    assert {f"stream-{role}" for role in ("counters", "sequences", "heads")} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on undefined {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
            else:
                assert (REPO / source).exists(), f"{name} mounts missing {source}"


def test_every_freshrec_service_runs_a_real_cli_command() -> None:
    built = {name: s for name, s in _compose()["services"].items() if "build" in s}
    assert built, "the stack must run at least one freshrec role"
    for name, service in built.items():
        command = service["command"]
        assert command[0] == "freshrec", name
        assert command[1] in main.commands, f"{name} runs `freshrec {command[1]}`, which the CLI lacks"
        # ... and the CLI accepts its arguments (a typo in a role would crash-loop the service).
        context = main.commands[command[1]].make_context(
            command[1], list(command[2:]), resilient_parsing=False
        )
        assert context.params is not None


def test_every_freshrec_variable_is_a_setting() -> None:
    fields = set(Settings.model_fields)
    env: dict[str, str] = {}
    for service in _compose()["services"].values():
        env |= {k: str(v) for k, v in (service.get("environment") or {}).items()}
    names = [name for name in env if name.startswith("FRESHREC_")]
    assert "FRESHREC_KAFKA_BOOTSTRAP" in names and "FRESHREC_CLICKHOUSE_DSN" in names
    for name in names:
        key = name.removeprefix("FRESHREC_").lower()
        if "__" in key:
            section, field = key.split("__", 1)
            section_model = Settings.model_fields[section].annotation
            assert isinstance(section_model, type) and issubclass(section_model, BaseModel), name
            assert field in section_model.model_fields, name
        else:
            assert key in fields, f"{name} is not a freshrec setting"


def test_kafka_advertises_what_the_services_and_the_host_use() -> None:
    services = _compose()["services"]
    kafka_env = services["kafka"]["environment"]
    assert "INTERNAL://kafka:9092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert "9094:9094" in services["kafka"]["ports"]
    assert services["sink"]["environment"]["FRESHREC_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    # Kafka rejects a cluster id that is not 16 bytes in URL-safe base64 without padding.
    cluster_id = kafka_env["CLUSTER_ID"]
    assert len(cluster_id) == 22 and len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_grafana_provisioning_and_dashboard_agree() -> None:
    datasources = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/datasources/clickhouse.yaml").read_text()
    )
    uids = {d["uid"] for d in datasources["datasources"]}
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/freshrec-overview.json").read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in uids
            tables = set(re.findall(r"freshrec\.(\w+)", target["rawSql"]))
            assert tables and tables <= set(TABLES), tables
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/freshrec.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dockerfile_runs_the_declared_console_script() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'CMD ["freshrec", "--help"]' in dockerfile and "freshrec" in scripts
    for package in ("freshrec", "streams", "learners", "publishers"):
        assert f"COPY {package} ./{package}" in dockerfile

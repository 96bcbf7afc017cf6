"""docker-compose.yml cannot run here (no Docker engine); check what can be checked without one.

The file is loaded by compose-go, the library inside Docker Compose v2 (``tests/compose_check``, a
small Go program): the compose-spec JSON schema, interpolation from ``.env.example``, required
variables and YAML merges are Docker's own. The tests then read the project it resolved.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from support import PACKAGES

from freshrec.queries import TABLES
from freshrec.settings import Settings
from freshrec_app.cli import main

REPO = Path(__file__).resolve().parents[1]
CHECKER = REPO / "tests" / "compose_check"
FRESHREC_IMAGE = "freshrec:latest"


@pytest.fixture(scope="module")
def checker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """compose_check built once (Go fetches compose-go through its module proxy the first time)."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    binary = tmp_path_factory.mktemp("compose-check") / "compose_check"
    subprocess.run([go, "build", "-o", str(binary), "."], cwd=CHECKER, check=True, timeout=300)
    return binary


def _load(checker: Path, env_file: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in _variables()}  # only the env file counts
    return subprocess.run(
        [str(checker), str(REPO / "docker-compose.yml"), str(env_file)],
        capture_output=True,
        text=True,
        env=clean,
        timeout=60,
        check=False,
    )


def _variables() -> set[str]:
    return set(re.findall(r"\$\{(\w+)", (REPO / "docker-compose.yml").read_text()))


@pytest.fixture(scope="module")
def project(checker: Path) -> dict[str, Any]:
    loaded = _load(checker, REPO / ".env.example")
    assert loaded.returncode == 0, loaded.stderr
    data: dict[str, Any] = json.loads(loaded.stdout)
    return data


def test_the_file_validates_and_refuses_to_start_without_its_secrets(checker: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("KAFKA_EXTERNAL_HOST=localhost\n")
    missing = _load(checker, empty)
    assert missing.returncode == 1
    for name in (
        "CLICKHOUSE_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
        "GRAFANA_CLICKHOUSE_PASSWORD",
        "FRESHREC_API_TOKEN",
    ):
        assert f"required variable {name} is missing a value" in missing.stderr, name
    broken = tmp_path / "broken.yml"
    broken.write_text((REPO / "docker-compose.yml").read_text().replace("restart:", "restarts:", 1))
    rejected = subprocess.run(
        [str(checker), str(broken), str(REPO / ".env.example")], capture_output=True, text=True, check=False
    )
    assert rejected.returncode == 1 and "schema" in rejected.stderr
    example = {line.split("=", 1)[0] for line in (REPO / ".env.example").read_text().splitlines()}
    documented = {name.removeprefix("# ") for name in example}
    assert _variables() <= documented, f"undocumented in .env.example: {_variables() - documented}"


def test_services_are_well_formed_and_restart(project: dict[str, Any]) -> None:
    services = project["services"]
    assert {"kafka", "clickhouse", "grafana", "sink", "train", "serve"} <= set(services)
    assert {f"stream-{role}" for role in ("counters", "sequences", "heads")} <= set(services)
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on undefined {dependency}"
        for volume in service.get("volumes", []):
            if volume["type"] == "volume":
                assert volume["source"] in project["volumes"], f"{name} uses undeclared {volume['source']}"
            else:
                assert Path(volume["source"]).exists(), f"{name} mounts missing {volume['source']}"


def test_one_image_is_built_once_and_every_role_runs_a_real_cli_command(project: dict[str, Any]) -> None:
    services = project["services"]
    roles = {name: s for name, s in services.items() if s["image"] == FRESHREC_IMAGE}
    assert [name for name, s in services.items() if "build" in s] == ["sink"]
    assert set(roles) == {"sink", "stream-counters", "stream-sequences", "stream-heads", "train", "serve"}
    for name, service in roles.items():
        if "build" not in service:
            assert service["pull_policy"] == "never", name  # the local build, never a registry
        command = service["command"]
        assert command[0] == "freshrec", name
        assert command[1] in main.commands, f"{name} runs `freshrec {command[1]}`, which the CLI lacks"
        # ... and the CLI accepts its arguments (a typo in a role would crash-loop the service).
        context = main.commands[command[1]].make_context(command[1], list(command[2:]))
        if name.startswith("stream-"):
            assert context.params["roles"] == (name.removeprefix("stream-"),), name
            # Scalable: state in Kafka, not on a volume, and each container its own worker id.
            assert service["environment"]["FRESHREC_STREAM__WORKER_ID"] == "@hostname", name
            assert not service.get("volumes"), name


def test_every_freshrec_variable_is_a_setting(project: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    env: dict[str, str] = {}
    for service in project["services"].values():
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


def test_ports_listen_on_loopback_and_the_api_needs_a_token(project: dict[str, Any]) -> None:
    services = project["services"]
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert set(published) == {"kafka", "clickhouse", "grafana", "serve"}
    for name, ports in published.items():
        assert all(port["host_ip"] == "127.0.0.1" for port in ports), name
    assert services["serve"]["environment"]["FRESHREC_API_TOKEN"] == "change-me-to-a-long-random-token"


def test_kafka_advertises_what_the_services_and_other_hosts_use(project: dict[str, Any]) -> None:
    services = project["services"]
    kafka_env = services["kafka"]["environment"]
    assert kafka_env["KAFKA_ADVERTISED_LISTENERS"] == "INTERNAL://kafka:9092,EXTERNAL://localhost:9094"
    assert "${KAFKA_EXTERNAL_HOST:-localhost}:9094" in (REPO / "docker-compose.yml").read_text()
    assert [p["target"] for p in services["kafka"]["ports"]] == [9094]
    assert services["sink"]["environment"]["FRESHREC_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    # Kafka rejects a cluster id that is not 16 bytes in URL-safe base64 without padding.
    cluster_id = kafka_env["CLUSTER_ID"]
    assert len(cluster_id) == 22 and len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_grafana_installs_a_pinned_plugin_first_and_reads_as_a_read_only_user(
    project: dict[str, Any],
) -> None:
    grafana = project["services"]["grafana"]["environment"]
    assert re.fullmatch(r"grafana-clickhouse-datasource@\d+\.\d+\.\d+", grafana["GF_PLUGINS_PREINSTALL_SYNC"])
    assert "GF_PLUGINS_PREINSTALL" not in grafana
    datasources = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/datasources/clickhouse.yaml").read_text()
    )
    source = datasources["datasources"][0]
    assert source["jsonData"]["username"] == "${GRAFANA_CLICKHOUSE_USER}"
    assert grafana["GRAFANA_CLICKHOUSE_USER"] == "grafana"
    clickhouse = project["services"]["clickhouse"]
    init = next(v for v in clickhouse["volumes"] if v["target"] == "/docker-entrypoint-initdb.d")
    script = Path(init["source"]) / "grafana-reader.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    sql = script.read_text()
    assert "SETTINGS readonly = 2" in sql and re.search(r"GRANT SELECT ON \S+ TO", sql)
    assert "INSERT" not in sql.split("<<SQL", 1)[1] and "ALL" not in sql.split("<<SQL", 1)[1]


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


def test_dockerfile_installs_cpu_torch_and_dependencies_before_the_code() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    lines = (REPO / "Dockerfile").read_text().splitlines()
    assert 'CMD ["freshrec", "--help"]' in lines and "freshrec" in scripts
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in lines
    install = next(i for i, line in enumerate(lines) if "pip install -r /tmp/requirements.txt" in line)
    copies = [i for i, line in enumerate(lines) if line.startswith("COPY ") and "pyproject" not in line]
    assert copies and install < min(copies), "dependencies must be installed before the code is copied"
    for package in PACKAGES:
        assert f"COPY {package} ./{package}" in lines
    models = next(line for line in lines if "/var/lib/freshrec/models" in line)
    assert "install -d -o freshrec -g freshrec" in models  # the models volume is the user's, not root's

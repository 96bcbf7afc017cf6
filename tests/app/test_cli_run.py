"""`freshrec run` end to end, as `make run` does it: ml-100k through Kafka into ClickHouse, twice."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
from support import cli_env, free_port_pair, freshrec_cli, wait_until

from freshrec.settings import Settings


def test_run_replays_ml_100k_into_clickhouse_once(settings: Settings, tmp_path: Path) -> None:
    env = cli_env(settings, dsn=f"chdb://{tmp_path / 'run-db'}")
    first = orjson.loads(
        freshrec_cli("run", "--dataset", "ml-100k", "--until-idle", "3", "--json", env=env).stdout
    )
    assert first["replayed"] == 100_000
    assert first["events"] == first["distinct_event_ids"] == 100_000
    assert (first["users"], first["items"]) == (943, 1682)
    assert first["events_by_type"] == {"rating": 100_000}
    assert first["dead_letters"] == 0
    assert "recommendations" not in first  # only with --show
    # A second run finds the dataset stored and does not publish it again; with --show it closes the
    # loop once (stream, one fine-tune, the serving recommender) and shows two users' top 10.
    small = {"FRESHREC_TRAIN__DIM": "16", "FRESHREC_TRAIN__BLOCKS": "1", "FRESHREC_TRAIN__EPOCHS": "1"}
    second = orjson.loads(
        freshrec_cli(
            "run", "--dataset", "ml-100k", "--until-idle", "2", "--show", "2", "--json", env=env | small
        ).stdout
    )
    assert second["replayed"] == 0 and second["events"] == 100_000 and second["dead_letters"] == 0
    shown = second["recommendations"]
    assert [len(user["items"]) for user in shown] == [10, 10]
    for user in shown:
        assert user["model_version"] == 1 and user["history"] >= 20  # every ml-100k user rated 20+
        assert all(item["title"] for item in user["items"])  # titles from u.item beside u.data
        assert {item["source"] for item in user["items"]} <= {
            "transformer",
            "cooccurrence",
            "popular",
            "explore",
        }
        assert len({item["item_id"] for item in user["items"]}) == 10


def test_run_without_until_idle_hosts_the_api_and_the_fine_tune(settings: Settings, tmp_path: Path) -> None:
    port, _ = free_port_pair()
    env = cli_env(settings, dsn=f"chdb://{tmp_path / 'run-db'}") | {
        "FRESHREC_API_PORT": str(port),
        "FRESHREC_TRAIN__RETRY_S": "2",
        "FRESHREC_TRAIN__DIM": "16",
        "FRESHREC_TRAIN__BLOCKS": "1",
        "FRESHREC_TRAIN__EPOCHS": "1",
        "FRESHREC_TRAIN__WINDOW_EVENTS": "20000",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "freshrec_app", "run", "--dataset", "ml-100k", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

            def published() -> bool:
                try:
                    return bool(http.get("/healthz").json()["model_version"] >= 1)
                except httpx.HTTPError:
                    return False

            wait_until(published, timeout_s=180, interval_s=0.5)
            body = http.get("/v1/recommendations/1", params={"k": 5}).json()
            assert body["model_version"] >= 1 and len(body["items"]) == 5
            # The dashboard reads this process's chDB path through a second client.
            panel = http.get("/v1/dashboard/events_by_type").json()
            bucket_s = panel["parameters"]["bucket_s"]
            ratings = sum(rate for _, kind, rate in panel["rows"] if kind == "rating") * bucket_s / 60
            assert round(ratings) == 100_000
            assert http.get("/dashboard").status_code == 200
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err[-2000:]
    assert orjson.loads(out)["events"] == 100_000

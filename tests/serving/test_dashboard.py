"""The built-in dashboard, in a real headless browser (Debian's chromium), after a real replay.

Everything the panels read is made by the system itself: ml-100k replayed through Kafka and sunk
into chDB, a fine-tune cycle on that window (model versions, training runs), a prequential run, and
recommendations served by the API with a click on one of them (impressions, served CTR). The page
must load without console errors and every panel must draw rows. The screenshot is kept as a test
artifact in ``$FRESHREC_TEST_ARTIFACTS`` (default ``build/test-artifacts``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from playwright.sync_api import ConsoleMessage, sync_playwright
from support import free_port_pair, wait_until

from evaluation import prequential
from freshrec import queries
from freshrec.settings import ServeSettings, Settings, StreamSettings, TrainSettings
from freshrec.store import Store, open_store
from publishers.tuner import build_tuner
from serving.dashboard import router
from serving.server import ServingStack
from streams import replay, sink
from streams.producer import EventProducer

TOKEN = "dash-token"
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("FRESHREC_TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Debian's chromium as root in a container: no sandbox; no background networking (this machine's
# network is closed and Chromium's update/sync probes would only add noise).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_the_page_without_a_store_says_why_and_the_data_routes_answer_503() -> None:
    app = FastAPI()
    app.include_router(router(None))

    async def get(*paths: str) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dashboard") as client:
            return [await client.get(path) for path in paths]

    page, meta, missing, unknown, bad = asyncio.run(
        get(
            "/dashboard",
            "/v1/dashboard",
            "/v1/dashboard/events_by_type",
            "/v1/dashboard/nope",
            "/v1/dashboard/DROP TABLE",
        )
    )
    assert page.status_code == 200 and "<title>freshrec dashboard</title>" in page.text
    assert meta.json()["store"] is False and "freshrec run" in meta.json()["detail"]
    assert [p["name"] for p in meta.json()["panels"]] == list(queries.QUERIES)
    assert missing.status_code == 503 and "chDB allows one process" in missing.json()["detail"]
    assert unknown.status_code == 404 and bad.status_code == 422


def test_every_panel_renders_with_data_in_a_real_browser(
    make_settings: Callable[..., Settings], store: Store, run_id: str
) -> None:
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: `make test` installs it (see Makefile)"
    port, _ = free_port_pair()
    settings = make_settings(
        api_port=port,
        api_token=TOKEN,
        stream=StreamSettings(group_id=f"dash-{run_id}", batch_timeout_s=0.05, heads=("mf",)),
        train=TrainSettings(max_len=8, dim=16, blocks=1, epochs=1, negatives=32),
        serve=ServeSettings(seed=3, explore_fraction=0.2, candidates=50),
    )
    replay.run(settings, "ml-100k", limit=3_000)
    with EventProducer(settings) as producer:
        for raw in (b"{broken", b'{"event_id": "no-user"}'):
            producer.produce(settings.topics.events, raw)
    sink.run(settings, store, until_idle_s=1.0)
    tuner = build_tuner(settings, store)
    tuner.cycle()  # version 1 from the replayed window: model_updates, training_runs
    tuner.publisher.close()
    prequential.run(settings, store, "ml-100k", limit=1_000)

    dashboard_store = open_store(settings, migrate=False)
    stack = ServingStack(settings, store=dashboard_store).start()
    try:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=stack.url, headers=headers, timeout=10) as client:
            wait_until(
                lambda: stack.recommender.index is not None and stack.worker.stats.counted >= 3_000,
                timeout_s=60,
            )
            served = [client.get(f"/v1/recommendations/{user}", params={"k": 10}).json() for user in "123"]
            first = served[0]
            click = {
                "event_id": "dash-click",
                "user_id": first["user_id"],
                "item_id": first["items"][0]["item_id"],
                "type": "click",
                "ts": int(time.time() * 1000),
                "request_id": first["request_id"],
            }
            assert client.post("/v1/events", json=click).status_code == 202
        stack.decisions.flush()  # the decision log is batched (impressions_linger_ms): out of it now
        sink.run(settings, store, until_idle_s=1.0)  # impressions and the click into ClickHouse

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems: list[str] = []

            def on_console(message: ConsoleMessage) -> None:
                if message.type == "error":
                    problems.append(f"console: {message.text}")

            page.on("console", on_console)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.goto(f"{stack.url}/dashboard#token={TOKEN}")
            page.wait_for_function("window.freshrec && window.freshrec.refreshes >= 1", timeout=30_000)
            states = page.eval_on_selector_all(
                "section[data-panel]", "s => s.map(x => [x.dataset.panel, x.dataset.state, x.dataset.rows])"
            )
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            # What a panel draws is what the data route returned (one check of the wiring).
            cells = page.eval_on_selector_all("#panel-coverage td", "tds => tds.map(td => td.textContent)")
            axis = page.eval_on_selector_all("#panel-freshness svg text", "ts => ts.map(t => t.textContent)")
            errors = page.evaluate("window.freshrec.errors")
            browser.close()

        assert problems == [] and errors == []
        assert [name for name, _, _ in states] == list(queries.QUERIES)
        empty = [(name, state) for name, state, rows in states if state != "ok" or int(rows or 0) == 0]
        assert empty == [], f"panels without data: {empty}"
        coverage = queries.panel(store, "coverage")
        served_items, catalogue = coverage.rows[0][0], coverage.rows[0][1]
        assert served_items >= 10 and cells[:2] == [f"{served_items:,}", f"{catalogue:,}"]
        assert (ARTIFACTS / "dashboard.png").stat().st_size > 20_000
        # 1997 ratings stored today are decades old: a duration, not "921B ms".
        assert any(label.endswith(" y") for label in axis) and not any("B" in label for label in axis), axis
    finally:
        stack.stop()
        dashboard_store.close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The browser talks to 127.0.0.1 directly, whatever proxy the environment names."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

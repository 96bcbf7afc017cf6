"""freshrec from the outside, through tools its users run (installed by ``make test`` from Debian):
events produced by kcat, a producer in no language of ours, reach ClickHouse; Prometheus' own
checker accepts ``/metrics``."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable

import httpx
from support import free_port_pair

from freshrec.settings import Settings
from freshrec.store import Store
from serving.server import ServingStack
from streams import sink
from streams.admin import ensure_topics


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is missing: `make test` installs it (Debian package, see the Makefile)"
    return path


def test_events_produced_by_kcat_reach_clickhouse(settings: Settings, store: Store) -> None:
    ensure_topics(settings)  # topics exist once a freshrec service has started: as in the stack
    now = int(time.time() * 1000)
    lines = [
        f'u-1|{{"event_id":"k-1","user_id":"u-1","item_id":"movie-7","type":"click","ts":{now}}}',
        f'u-2|{{"event_id":"k-2","user_id":"u-2","item_id":"movie-9","type":"view","ts":{now}}}',
        'u-3|{"event_id":"k-3","user_id":"u-3","type":"view"}',  # no item_id: a dead letter
    ]
    subprocess.run(
        [_tool("kcat"), "-P", "-b", settings.bootstrap, "-t", settings.topics.events, "-K", "|"],
        input="\n".join(lines) + "\n",
        text=True,
        check=True,
        timeout=60,
    )
    sink.run(settings, store, until_idle_s=2)
    stored = store.rows(
        f"SELECT event_id, user_id, item_id, type FROM {store.table('events')} ORDER BY event_id"
    )
    assert stored == [("k-1", "u-1", "movie-7", "click"), ("k-2", "u-2", "movie-9", "view")]
    dead = store.rows(f"SELECT reason FROM {store.table('dead_letters')}")
    assert dead == [("missing_field",)]


def test_promtool_accepts_the_metrics(make_settings: Callable[..., Settings]) -> None:
    port, _ = free_port_pair()
    settings = make_settings(api_port=port)
    promtool = _tool("promtool")
    broken = subprocess.run(
        [promtool, "check", "metrics"], input="# TYPE x counter\nx{a=} 1\n", text=True, capture_output=True
    )
    assert broken.returncode != 0  # the checker does reject bad exposition text
    stack = ServingStack(settings).start()
    try:
        text = httpx.get(f"{stack.url}/metrics", timeout=10).text
    finally:
        stack.stop()
    assert "freshrec_request_seconds" in text
    checked = subprocess.run([promtool, "check", "metrics"], input=text, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr

"""``freshrec serve --workers N``: processes behind one port, stopped together, failing together."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from support import cli_env, free_port_pair, wait_until

from freshrec.settings import Settings


@contextmanager
def _serving(settings: Settings, workers: int) -> Iterator[tuple[subprocess.Popen[str], int, list[str]]]:
    """``freshrec serve --workers N`` running, both workers answering: (process, port, worker pids).
    Killed on the way out if the test left it running."""
    port, _ = free_port_pair()
    env = cli_env(settings) | {"FRESHREC_API_PORT": str(port)}
    process = subprocess.Popen(
        [sys.executable, "-m", "freshrec_app", "serve", "--workers", str(workers)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _workers_seen(port) == {f"0-{n}" for n in range(workers)}
        children = _children(process.pid)
        assert len(children) == workers
        yield process, port, children
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _workers_seen(port: int) -> set[str]:
    seen: set[str] = set()

    def both() -> bool:
        try:  # a new connection each time: the kernel hands it to either process
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
                seen.add(http.get("/healthz").json()["worker"])
        except httpx.HTTPError:
            pass
        return len(seen) == 2

    wait_until(both, timeout_s=120, interval_s=0.05)
    return seen


def test_two_workers_share_the_port_and_stop_together(settings: Settings) -> None:
    with _serving(settings, 2) as (process, port, children):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            response = http.get("/v1/recommendations/someone", params={"k": 5})
            assert response.status_code == 200 and response.json()["user_id"] == "someone"
        # Connections are dealt in turn: any two consecutive ones are served by different workers,
        # and each keeps its worker (left to the kernel, pairs often shared one).
        clients = [httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) for _ in range(6)]
        try:
            first = [client.get("/healthz").json()["worker"] for client in clients]
            again = [client.get("/healthz").json()["worker"] for client in clients]
        finally:
            for client in clients:
                client.close()
        assert all(a != b for a, b in itertools.pairwise(first)) and again == first

        # A client that keeps requesting on its keep-alive connection does not hold up the stop.
        busy = threading.Event()
        done = threading.Event()

        def keep_requesting() -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
                while not done.is_set():
                    try:
                        http.get("/healthz")
                        busy.set()
                    except httpx.HTTPError:
                        time.sleep(0.05)

        requester = threading.Thread(target=keep_requesting, daemon=True)
        requester.start()
        assert busy.wait(10)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            _, err = process.communicate(timeout=90)
        finally:
            done.set()
            requester.join()
        stopped_s = time.monotonic() - started
    assert process.returncode == 0, err[-2000:]
    assert stopped_s < 30, f"the stop took {stopped_s:.0f} s"
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)  # the workers are gone too


def test_a_dead_worker_stops_the_set_with_exit_code_1(settings: Settings) -> None:
    with _serving(settings, 2) as (process, _, children):
        subprocess.run(["kill", "-9", children[0]], check=True)
        _, err = process.communicate(timeout=90)
    assert process.returncode == 1, err[-2000:]
    assert "a serving worker exited" in err
    assert not Path(f"/proc/{children[1]}").exists()  # the other one was stopped


def test_the_workers_die_with_a_killed_supervisor(settings: Settings) -> None:
    with _serving(settings, 2) as (process, _, children):
        process.kill()
        process.communicate(timeout=30)
        wait_until(lambda: not any(_alive(pid) for pid in children), timeout_s=60)


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def _alive(pid: str) -> bool:
    """Running, not a zombie waiting for a reaper."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_serve_starts_and_serves_without_clickhouse(settings: Settings) -> None:
    """Only the dashboard needs ClickHouse: with nothing listening at the DSN, serve starts,
    recommendations are served, and the dashboard's data routes answer 503 saying why."""
    port, closed = free_port_pair()  # nothing listens on `closed`
    env = cli_env(settings, dsn=f"http://127.0.0.1:{closed}") | {"FRESHREC_API_PORT": str(port)}
    process = subprocess.Popen(
        [sys.executable, "-m", "freshrec_app", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

            def listening() -> bool:
                assert process.poll() is None, "serve exited without ClickHouse"
                try:
                    return http.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(listening, timeout_s=120, interval_s=0.1)
            served = http.get("/v1/recommendations/someone", params={"k": 5})
            assert served.status_code == 200 and served.json()["user_id"] == "someone"
            panel = http.get("/v1/dashboard/events_by_type")
            assert panel.status_code == 503 and "ClickHouse cannot be reached" in panel.json()["detail"]
            assert http.get("/v1/dashboard").status_code == 200  # the page's panel list needs no data
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0, err[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

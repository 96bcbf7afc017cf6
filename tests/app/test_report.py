"""`freshrec report` on the real embedded ClickHouse: the page's numbers against the rows put in.

The rows go straight into the tables (the sink has its own tests): the first 3,000 ratings of
ml-100k, one click on a served slot, dead letters (one with a reason and detail that are HTML), a
response of three slots, two model versions and a training run. Every expected number is computed
here, in Python, from those rows.
"""

from __future__ import annotations

import base64
import gzip
import math
import re
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from itertools import islice
from pathlib import Path
from typing import Any

import matplotlib.image
import orjson
import pytest
from support import chdb_path_held, cli_env, freshrec_cli

from freshrec.errors import ConfigError
from freshrec.queries import QUERIES
from freshrec.settings import Settings
from freshrec.store import Store
from freshrec_app.report import NO_DATA, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL_REASON = "<script>alert(1)</script>"
EVIL_DETAIL = '<img src=x onerror="alert(1)">'
EVENT_COLUMNS = ["event_id", "user_id", "item_id", "type", "ts", "value", "request_id", "context", "topic",
                 "partition", "offset", "kafka_ts", "ingested_at"]  # fmt: skip
DEAD_COLUMNS = ["topic", "partition", "offset", "key", "payload", "reason", "detail", "event_id", "kafka_ts",
                "received_at"]  # fmt: skip
IMPRESSION_COLUMNS = ["request_id", "user_id", "position", "item_id", "score", "source", "explore",
                      "propensity", "policy", "model_version", "latency_ms", "served_at", "topic",
                      "partition", "offset"]  # fmt: skip


@pytest.fixture
def kafka_bootstrap() -> str:
    """Reports read ClickHouse only: no broker is started for this module (the address is never used)."""
    return "127.0.0.1:9"


@dataclass
class Loaded:
    """The rows put in, as plain Python values to compute expectations from."""

    events: list[dict[str, Any]]
    reasons: list[str]
    served: list[tuple[str, str, bool]]  # (item, source, explore) of the one response


def _ratings(settings: Settings, n: int) -> list[tuple[str, str, float, int]]:
    """(user, item, rating, unix seconds) of the first ``n`` lines of ml-100k's u.data, file order."""
    assert settings.datasets_dir is not None
    with gzip.open(settings.datasets_dir / "ml-100k" / "u.data.gz", "rt") as lines:
        rows = [line.rstrip("\n").split("\t") for line in islice(lines, n)]
    return [(user, item, float(rating), int(ts)) for user, item, rating, ts in rows]


def _load(settings: Settings, store: Store, n: int = 3_000) -> Loaded:
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    events: list[dict[str, Any]] = []
    for i, (user, item, rating, ts) in enumerate(_ratings(settings, n)):
        ingested = base + timedelta(milliseconds=20 * i)
        events.append(
            {"event_id": f"ml-100k:{i}", "user_id": user, "item_id": item, "type": "rating",
             "ts": datetime.fromtimestamp(ts, UTC), "value": rating, "request_id": None, "context": "",
             "topic": "events", "partition": 0, "offset": i,
             "kafka_ts": ingested - timedelta(milliseconds=i % 40), "ingested_at": ingested}
        )  # fmt: skip
    counts = Counter(e["item_id"] for e in events)
    rare = min(counts, key=lambda item: (counts[item], item))  # in the long tail whatever the head is
    served = [("50", "popular", False), ("100", "explore", True), (rare, "popular", False)]
    click_at = base + timedelta(seconds=61)
    events.append(
        {"event_id": "click-1", "user_id": "clicker", "item_id": "100", "type": "click",
         "ts": base + timedelta(seconds=31), "value": None, "request_id": "r1", "context": "",
         "topic": "events", "partition": 1, "offset": 0,
         "kafka_ts": click_at - timedelta(milliseconds=3), "ingested_at": click_at}
    )  # fmt: skip
    store.insert("events", [[e[c] for e in events] for c in EVENT_COLUMNS], column_names=EVENT_COLUMNS)

    reasons = ["not_json"] * 3 + ["missing_field"] * 2 + [EVIL_REASON]
    dead_at = [base + timedelta(seconds=10 + i) for i in range(len(reasons))]
    details = ["bad"] * 5 + [EVIL_DETAIL]
    k = len(reasons)
    store.insert(
        "dead_letters",
        [["events"] * k, [0] * k, list(range(k)), [""] * k, ["{"] * k, reasons, details, [""] * k, dead_at,
         dead_at],
        column_names=DEAD_COLUMNS,
    )  # fmt: skip
    s = len(served)
    store.insert(
        "impressions",
        [["r1"] * s, ["clicker"] * s, list(range(s)), [i for i, _, _ in served], [1.0] * s,
         [src for _, src, _ in served], [e for _, _, e in served], [1.0] * s, ["uncertainty"] * s, [2] * s,
         [2.0] * s, [base + timedelta(seconds=30)] * s, ["impressions"] * s, [0] * s, list(range(s))],
        column_names=IMPRESSION_COLUMNS,
    )  # fmt: skip
    created = base + timedelta(seconds=20)  # published before the response (served at +30 s)
    store.insert(
        "model_updates",
        [[1, 2], [0, 1], ["snapshot", "sparse"], ["models", "models"], [1000, 40], [10, 1], [1, 1],
         ["a", "b"], ["s1", "s2"], [None, None], ["t1", "t1"], [created, created]],
        column_names=["version", "parent", "kind", "topic", "bytes", "rows", "chunks", "checksum",
                      "state_checksum", "rollback_of", "run_id", "created_at"],
    )  # fmt: skip
    store.insert(
        "training_runs",
        [["t1"], ["finetune"], ["events"], ["ok"], [""], [3000], [12], [1.25], [None], [None], [2], ["{}"],
         ["{}"], [created], [created + timedelta(seconds=5)]],
        column_names=["run_id", "kind", "source", "status", "error", "events", "steps", "loss", "hr_at_10",
                      "ndcg_at_10", "published_version", "metrics", "params", "started_at", "finished_at"],
    )  # fmt: skip
    return Loaded(events=events, reasons=reasons, served=served)


class _Tables(HTMLParser):
    """Every table's rows (cell texts), under the heading (h2 or h3) that precedes the table."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._title = ""
        self._in_heading = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("h2", "h3"):
            self._in_heading, self._title = True, ""
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h2", "h3"):
            self._in_heading = False
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables.setdefault(self._title, []).append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._in_heading:
            self._title += data
        elif self._cell is not None:
            self._cell.append(data)


def _tables(page: str) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(page)
    return parser.tables


def _number(text: str) -> float:
    """The leading number of a cell ("12,345 ms (12.3 s)" -> 12345)."""
    match = re.match(r"-?[\d,]+(\.\d+)?(e[-+]\d+)?", text)
    assert match, f"no number in {text!r}"
    return float(match.group(0).replace(",", ""))


def _quantile_exact(values: list[int], level: float) -> int:
    """ClickHouse's quantileExact: the element at floor(level * n) of the sorted values."""
    ordered = sorted(values)
    return ordered[min(int(level * len(ordered)), len(ordered) - 1)]


def _section(page: str, name: str) -> str:
    return page.split(f'<section id="{name}">', 1)[1].split("</section>", 1)[0]


def _assert_self_contained(page: str) -> None:
    lowered = page.lower()
    for remote in ('src="http', "src='http", 'href="http', "<script", "<link", "@import", "url("):
        assert remote not in lowered, f"the page loads something: {remote}"


def _assert_png(path: Path, page: str) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    image = matplotlib.image.imread(path)
    height, width, channels = image.shape
    assert width >= 800 and height >= 300 and channels in (3, 4)
    assert f'src="data:image/png;base64,{base64.b64encode(data).decode()}"' in page


def test_the_page_reports_the_rows_put_in(settings: Settings, store: Store, tmp_path: Path) -> None:
    loaded = _load(settings, store)
    events = loaded.events
    report = write_report(store, tmp_path / "out" / "run")
    assert report.html == tmp_path / "out" / "run" / "report.html" and report.png.name == "report.png"
    page = report.html.read_text(encoding="utf-8")
    tables = _tables(page)
    head = report.headline

    # Volumes: the window is all the data, so the window and the whole log agree.
    users, items = {e["user_id"] for e in events}, {e["item_id"] for e in events}
    volumes = {row[0]: row[1:] for row in tables["Audit log"] if len(row) == 3 and row[0]}
    assert {k: [int(_number(v)) for v in vs] for k, vs in volumes.items()} == {
        "events": [len(events)] * 2,
        "users": [len(users)] * 2,
        "items": [len(items)] * 2,
    }
    assert (head["events"], head["users"], head["items"]) == (len(events), len(users), len(items))
    assert (head["events_in_window"], head["users_in_window"]) == (len(events), len(users))
    by_type = {row[0]: int(_number(row[1])) for row in tables["Events by type (whole log)"][1:]}
    assert by_type == dict(Counter(e["type"] for e in events))

    # Freshness: exact quantiles over every row, as ClickHouse's quantileExact takes them.
    ms = timedelta(milliseconds=1)
    lags = [(e["ingested_at"] - e["ts"]) // ms for e in events]
    sink_lags = [(e["ingested_at"] - e["kafka_ts"]) // ms for e in events]
    p50, p99 = _quantile_exact(lags, 0.5), _quantile_exact(lags, 0.99)
    assert (head["freshness_p50_ms"], head["freshness_p99_ms"]) == (p50, p99)
    assert head["sink_p99_ms"] == _quantile_exact(sink_lags, 0.99) == 39
    fresh = dict(tables[QUERIES["freshness"].title])
    assert _number(fresh["event time to ClickHouse, p50"]) == p50
    assert _number(fresh["event time to ClickHouse, p99"]) == p99
    assert _number(fresh["events ingested"]) == len(events)

    # Quality: every dead letter against every accepted event; the reasons with their counts.
    assert head["dead_letters"] == len(loaded.reasons)
    assert head["dead_letter_rate"] == pytest.approx(len(loaded.reasons) / len(events))
    reasons = tables[QUERIES["dead_letter_reasons"].title]
    assert reasons[0] == ["reason", "messages", "per_event", "example"]
    assert [(r[0], int(r[1])) for r in reasons[1:]] == [
        ("not_json", 3),
        ("missing_field", 2),
        (EVIL_REASON, 1),
    ]
    entropy = dict(tables[QUERIES["sequence_entropy"].title])
    assert math.isfinite(_number(entropy["mean ApEn, weighted by transitions"]))

    # User input is escaped wherever it appears, never written as markup.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert EVIL_REASON not in page and "<img src=x" not in page

    # Exploration: the click on the explore slot; coverage and long tail from the event counts.
    served_ctr = tables[QUERIES["served_ctr"].title]
    assert served_ctr[1:] == [["explore", "true", "1", "1", "1"], ["popular", "false", "2", "0", "0"]]
    assert (head["served_slots"], head["explore_ctr"], head["exploit_ctr"]) == (3, 1.0, 0.0)
    counts = Counter(e["item_id"] for e in events)
    ranked = sorted(counts, key=lambda item: (-counts[item], item))
    top = set(ranked[: max(1, math.ceil(len(ranked) * 0.2))])
    tail = sum(item not in top for item, _, _ in loaded.served) / len(loaded.served)
    assert head["coverage"] == round(len(loaded.served) / len(ranked), 6)
    assert head["long_tail_share"] == round(tail, 6) == round(1 / 3, 6)
    versions = tables[QUERIES["model_timeline"].title]
    # Version 2 served the response 10 s after its publication; version 1 never served.
    assert [(row[1], row[3], row[6]) for row in versions[1:]] == [
        ("1", "snapshot", "—"),
        ("2", "sparse", "10,000"),
    ]
    assert (head["model_versions"], head["training_runs"]) == (2, 1)
    exploration = _section(page, "exploration")  # only the prequential table (no eval runs) is empty
    assert exploration.count(NO_DATA) == 1 and NO_DATA in exploration.split(QUERIES["prequential"].title)[1]

    _assert_self_contained(page)
    _assert_png(report.png, page)
    assert "Generated " in page and "Window: all the data" in page


def test_a_window_counts_its_rows_and_an_empty_one_says_so(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    events = _load(settings, store).events
    times = sorted(e["ts"] for e in events)
    since, until = times[1_000], times[2_000]
    inside = [e for e in events if since <= e["ts"] < until]
    report = write_report(store, tmp_path / "window", since=since, until=until)
    head = report.headline
    assert (head["events_in_window"], head["users_in_window"], head["items_in_window"]) == (
        len(inside),
        len({e["user_id"] for e in inside}),
        len({e["item_id"] for e in inside}),
    )
    assert head["events"] == len(events)  # the whole log, whatever the window
    page = report.html.read_text(encoding="utf-8")
    volumes = {row[0]: row[1:] for row in _tables(page)["Audit log"] if len(row) == 3 and row[0]}
    assert _number(volumes["events"][0]) == len(inside) and _number(volumes["events"][1]) == len(events)

    # 1980: nothing happened then. Naive times are UTC.
    empty = write_report(store, tmp_path / "empty", since=datetime(1980, 1, 1), until=datetime(1980, 2, 1))
    assert empty.since == datetime(1980, 1, 1, tzinfo=UTC)
    page = empty.html.read_text(encoding="utf-8")
    for section in ("freshness", "quality", "exploration"):
        assert NO_DATA in _section(page, section), section
    assert empty.headline["events_in_window"] == 0
    assert all(empty.headline[k] is None for k in ("freshness_p50_ms", "dead_letter_rate", "coverage"))
    assert "1980-01-01 00:00:00 UTC to 1980-02-01 00:00:00 UTC" in page
    _assert_self_contained(page)
    _assert_png(empty.png, page)

    with pytest.raises(ConfigError, match="must be before"):
        write_report(store, tmp_path / "never", since=until, until=since)
    assert not (tmp_path / "never").exists()


def test_cli_writes_the_report_and_prints_json(settings: Settings, tmp_path: Path) -> None:
    env = cli_env(settings, dsn=f"chdb://{tmp_path / 'report-db'}")
    ratings = _ratings(settings, 200)
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    values = ", ".join(
        f"('ml-100k:{i}', '{user}', '{item}', 'rating', "
        f"'{datetime.fromtimestamp(ts, UTC):%Y-%m-%d %H:%M:%S}', '{now}', '{now}')"
        for i, (user, item, _, ts) in enumerate(ratings)
    )
    columns = "event_id, user_id, item_id, type, ts, kafka_ts, ingested_at"
    freshrec_cli("sql", f"INSERT INTO events ({columns}) VALUES {values}", env=env)
    out = tmp_path / "cli-report"
    result = freshrec_cli("report", "--out", str(out), "--json", env=env)
    data = orjson.loads(result.stdout)
    assert data["html"] == str(out / "report.html") and data["png"] == str(out / "report.png")
    assert data["since"] is None and data["until"] is None
    head = data["headline"]
    assert (head["events"], head["users"], head["items"]) == (
        len(ratings),
        len({user for user, _, _, _ in ratings}),
        len({item for _, item, _, _ in ratings}),
    )
    page = (out / "report.html").read_text(encoding="utf-8")
    _assert_self_contained(page)
    _assert_png(out / "report.png", page)

    plain = freshrec_cli("report", "--out", str(out), "--since", "1997-01-01", env=env)
    assert plain.stdout.rstrip().splitlines()[-2:] == [str(out / "report.html"), str(out / "report.png")]


def test_cli_rejects_a_bad_window_as_a_usage_error(settings: Settings, tmp_path: Path) -> None:
    env = cli_env(settings, dsn=f"chdb://{tmp_path / 'unused-db'}")
    bad = freshrec_cli("report", "--out", str(tmp_path / "r"), "--since", "yesterday", env=env, check=False)
    assert bad.returncode == 2
    assert "--since" in bad.stderr and "'yesterday' is not an ISO 8601 date or time" in bad.stderr
    backwards = freshrec_cli(
        "report", "--since", "2024-02-01", "--until", "2024-01-01T00:00:00Z", env=env, check=False
    )
    assert backwards.returncode == 2 and "must be before --until" in " ".join(backwards.stderr.split())
    assert not (tmp_path / "r").exists() and not (tmp_path / "unused-db").exists()


def test_cli_says_when_another_process_holds_the_chdb_path(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "held"
    with chdb_path_held(path):
        env = cli_env(settings, dsn=f"chdb://{path}")
        result = freshrec_cli("report", "--out", str(tmp_path / "r"), env=env, check=False)
        assert result.returncode == 1 and "open in another process" in result.stderr

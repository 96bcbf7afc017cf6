"""``freshrec report``: one self-contained HTML page (and its chart as a PNG) that sums up a run.

Why: a run (a replay, a day of live traffic, a closed-loop simulation) should leave something a
person can read, attach to an issue or archive without a Grafana or a server to look at. So the
page carries its own CSS and its chart as a ``data:`` URI and loads nothing from anywhere: no
script, no stylesheet link, no font, no CDN.

What it says comes from the SQL the dashboards read (:mod:`freshrec.queries`), plus the audit log's
:func:`~freshrec_app.embedded.summary`:

- Volumes: events, users and items in the window and in the whole log; events by type.
- Freshness: event time to ClickHouse, p50 and p99 over the whole window (one exact quantile over
  the rows, not a mean of bucket quantiles), the worst bucket, and the sink's own lag.
- Quality over time: dead letters per accepted event, the top reasons, and the approximate entropy
  of user sequences.
- Exploration outcome: click-through by candidate source and explore flag, catalogue coverage and
  long-tail share, model versions and training runs.

The window, ``since`` (inclusive) and ``until`` (exclusive), applies to each query's own clock
(event time for what users did, ingestion time for what the pipeline did, serving time for what
was shown); an open end is the data's own extent on that clock. Each block therefore states the
range and the clock it covers. All times are UTC.

Everything read from the store is HTML-escaped: item ids, event types, dead-letter reasons and
details are user input. The PNG is drawn on a private matplotlib ``Figure`` with the Agg canvas: no
pyplot, no change to the process's backend.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from matplotlib import dates as mdates
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter, Locator

from freshrec import queries
from freshrec.errors import ConfigError
from freshrec.queries import Panel
from freshrec.store import Store
from freshrec_app.embedded import summary

__all__ = ["NO_DATA", "Report", "write_report"]

logger = logging.getLogger(__name__)

NO_DATA = "no data in this window"
_MAX_ROWS = 50  # rows shown per table; longer tables keep their newest rows and say so
_COLUMNS = 2  # subplots per row of the chart

# matplotlib.dates has no annotations: typed handles on the three names used here.
_date2num: Callable[[datetime], float] = mdates.date2num
_DateLocator: Callable[[], Locator] = mdates.AutoDateLocator
_DateFormatter: Callable[[Locator], Formatter] = mdates.ConciseDateFormatter


@dataclass(frozen=True, slots=True)
class Report:
    """What :func:`write_report` wrote, and the numbers at the top of the page.

    ``headline`` keys: ``events``, ``users``, ``items`` and ``dead_letters`` (the whole log);
    ``events_in_window``, ``users_in_window``, ``items_in_window`` (event time);
    ``dead_letter_rate``; ``freshness_p50_ms``, ``freshness_p99_ms``, ``sink_p99_ms``;
    ``served_slots``, ``explore_ctr``, ``exploit_ctr``, ``coverage``, ``long_tail_share``;
    ``model_versions``, ``training_runs``. ``None``: no data in the window.
    """

    html: Path
    png: Path
    generated_at: datetime
    since: datetime | None  # as asked, in UTC; None: the data's first row on each clock
    until: datetime | None  # as asked, in UTC; None: the data's last row on each clock
    headline: Mapping[str, int | float | None]

    def to_json(self) -> dict[str, Any]:
        """Paths, window and headline numbers as JSON-ready values (``freshrec report --json``)."""
        return {
            "html": str(self.html),
            "png": str(self.png),
            "generated_at": self.generated_at.isoformat(),
            "since": None if self.since is None else self.since.isoformat(),
            "until": None if self.until is None else self.until.isoformat(),
            "headline": dict(self.headline),
        }


def write_report(
    store: Store, out: Path, *, since: datetime | None = None, until: datetime | None = None
) -> Report:
    """Write ``out/report.html`` and ``out/report.png`` (creating ``out``) for the window.

    Naive datetimes are taken as UTC. Raises :class:`~freshrec.errors.ConfigError` for an empty
    window or an output directory that cannot be written.
    """
    since, until = _utc(since), _utc(until)
    if since is not None and until is not None and since >= until:
        raise ConfigError(
            f"empty window: since ({since.isoformat()}) must be before until ({until.isoformat()})"
        )
    generated_at = datetime.now(UTC)
    panels = {name: queries.panel(store, name, since=since, until=until) for name in queries.QUERIES}
    whole = summary(store)
    if since is None or until is None:
        panels.update(_dead_letters_beside_events(store, panels, whole, since, until))
    window = _window_volumes(store, panels["events_by_type"])
    fresh = _overall_freshness(store, panels["freshness"])
    headline = _headline(whole, window, fresh, panels)
    png = _chart([p for p in panels.values() if p.query.kind == "timeseries"])
    page = _page(
        store=store,
        generated_at=generated_at,
        since=since,
        until=until,
        headline=headline,
        whole=whole,
        window=window,
        fresh=fresh,
        panels=panels,
        png=png,
    )
    html_path, png_path = out / "report.html", out / "report.png"
    try:
        out.mkdir(parents=True, exist_ok=True)
        png_path.write_bytes(png)
        html_path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write the report to {out}: {exc}; pick another --out") from exc
    logger.info("report written to %s (%d bytes) and %s", html_path, len(page), png_path)
    return Report(
        html=html_path, png=png_path, generated_at=generated_at, since=since, until=until, headline=headline
    )


# ---------------------------------------------------------------------------- numbers


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _column(panel: Panel, name: str) -> list[Any]:
    if not panel.rows:  # an empty result may come back without its column names (chDB)
        return []
    index = panel.columns.index(name)
    return [row[index] for row in panel.rows]


def _dead_letters_beside_events(
    store: Store,
    panels: Mapping[str, Panel],
    whole: Mapping[str, Any],
    since: datetime | None,
    until: datetime | None,
) -> dict[str, Panel]:
    """The dead-letter panels again, over the dead letters' and the accepted events' ranges together.

    A rate needs both sides. Left to itself, an open end of the window is the dead letters' own
    first or last row (the last hour when there are none), which leaves out accepted events.
    """
    ranges = [panels["freshness"].parameters]  # events.ingested_at, the clock "accepted" is counted on
    if whole["dead_letters"]:
        ranges.append(panels["dead_letter_rate"].parameters)
    lo = since or min(r["since"] for r in ranges)
    hi = until or max(r["until"] for r in ranges)
    return {
        name: queries.panel(store, name, since=lo, until=hi)
        for name in ("dead_letter_rate", "dead_letter_reasons")
    }


def _window_volumes(store: Store, by_type: Panel) -> dict[str, int]:
    """Events, users and items by event time over the range the events panel ran with."""
    ((events, users, items),) = store.rows(
        "SELECT count(), uniqExact(user_id), uniqExact(item_id) "
        f"FROM {store.table('events')} FINAL "
        "WHERE ts >= {since:DateTime64(3)} AND ts < {until:DateTime64(3)}",
        {"since": by_type.parameters["since"], "until": by_type.parameters["until"]},
    )
    return {"events": int(events), "users": int(users), "items": int(items)}


def _overall_freshness(store: Store, freshness: Panel) -> dict[str, int | None]:
    """Exact p50/p99 of event time to ClickHouse (and the sink's p99) over the freshness panel's range.

    One quantile over all rows, because no combination of per-bucket quantiles gives it.
    """
    ((events, p50, p99, sink_p99),) = store.rows(
        "SELECT count(), "
        "quantileExact(0.5)(dateDiff('millisecond', ts, ingested_at)), "
        "quantileExact(0.99)(dateDiff('millisecond', ts, ingested_at)), "
        "quantileExact(0.99)(dateDiff('millisecond', kafka_ts, ingested_at)) "
        f"FROM {store.table('events')} FINAL "
        "WHERE ingested_at >= {since:DateTime64(3)} AND ingested_at < {until:DateTime64(3)}",
        {"since": freshness.parameters["since"], "until": freshness.parameters["until"]},
    )
    if not events:
        return {"events": 0, "p50_ms": None, "p99_ms": None, "sink_p99_ms": None}
    return {"events": int(events), "p50_ms": int(p50), "p99_ms": int(p99), "sink_p99_ms": int(sink_p99)}


def _dead_letter_totals(rate: Panel) -> tuple[int, int]:
    """(dead letters, accepted events) summed over the dead-letter-rate panel's buckets."""
    return int(sum(_column(rate, "dead"))), int(sum(_column(rate, "accepted")))


def _ctr(served: Panel, explore: bool) -> float | None:
    slots = clicks = 0
    for row in served.rows:
        record = dict(zip(served.columns, row, strict=True))
        if bool(record["explore"]) is explore:
            slots += int(record["slots"])
            clicks += int(record["clicks"])
    return clicks / slots if slots else None


def _coverage(panel: Panel) -> dict[str, Any] | None:
    """The coverage row, or None when nothing was served in the window."""
    if not panel.rows:
        return None
    record = dict(zip(panel.columns, panel.rows[0], strict=True))
    return record if record["slots"] else None


def _headline(
    whole: Mapping[str, Any],
    window: Mapping[str, int],
    fresh: Mapping[str, int | None],
    panels: dict[str, Panel],
) -> dict[str, int | float | None]:
    dead, accepted = _dead_letter_totals(panels["dead_letter_rate"])
    coverage = _coverage(panels["coverage"])
    served = panels["served_ctr"]
    return {
        "events": int(whole["events"]),
        "users": int(whole["users"]),
        "items": int(whole["items"]),
        "dead_letters": int(whole["dead_letters"]),
        "events_in_window": window["events"],
        "users_in_window": window["users"],
        "items_in_window": window["items"],
        "dead_letter_rate": dead / accepted if accepted else None,
        "freshness_p50_ms": fresh["p50_ms"],
        "freshness_p99_ms": fresh["p99_ms"],
        "sink_p99_ms": fresh["sink_p99_ms"],
        "served_slots": int(sum(_column(served, "slots"))),
        "explore_ctr": _ctr(served, explore=True),
        "exploit_ctr": _ctr(served, explore=False),
        "coverage": None if coverage is None else float(coverage["coverage"]),
        "long_tail_share": None if coverage is None else float(coverage["long_tail_share"]),
        "model_versions": len(panels["model_timeline"].rows),
        "training_runs": len(panels["training_runs"].rows),
    }


# ---------------------------------------------------------------------------- the chart


def _chart(panels: Sequence[Panel]) -> bytes:
    """One PNG: a subplot per time-series panel, one line per series value (or per value column)."""
    rows = max(1, math.ceil(len(panels) / _COLUMNS))
    figure = Figure(figsize=(12, 3.2 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself: savefig renders with Agg whatever the global backend
    axes = figure.subplots(rows, _COLUMNS, squeeze=False).flatten()
    for ax, panel in zip(axes, panels, strict=False):
        _draw(ax, panel)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _draw(ax: Axes, panel: Panel) -> None:
    query = panel.query
    unit = f" ({query.unit})" if query.unit and f"({query.unit})" not in query.title else ""
    ax.set_title(f"{query.title}{unit}", fontsize=9)
    lines = _lines(panel)
    if not lines:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="0.45")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    for label, (xs, ys) in lines.items():
        ax.plot(xs, ys, label=_plain(label), linewidth=1.2, marker="." if len(xs) < 30 else None)
    # The whole range asked for (and the last bucket's width), not just where the points fell.
    times = [x for xs, _ in lines.values() for x in xs]
    left = min(_date2num(_naive(panel.parameters["since"])), *times)
    right = max(
        _date2num(_naive(panel.parameters["until"])),
        max(times) + panel.parameters.get("bucket_s", 0) / 86_400,
    )
    ax.set_xlim(left - (right - left) * 0.02, right + (right - left) * 0.02)  # matplotlib dates count days
    locator = _DateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(_DateFormatter(locator))
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if len(lines) > 1 or query.series is not None:  # a series is named even when it is alone
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # off the data


def _lines(panel: Panel) -> dict[str, tuple[list[float], list[float]]]:
    """Label -> (times as matplotlib dates, values) for a time-series panel; NULLs become gaps."""
    query = panel.query
    if not panel.rows:
        return {}
    assert query.x is not None, f"time series {panel.name} names no x column"
    x = panel.columns.index(query.x)
    series = None if query.series is None else panel.columns.index(query.series)
    values = [(name, panel.columns.index(name)) for name in query.values]
    lines: dict[str, tuple[list[float], list[float]]] = {}
    for row in panel.rows:
        for name, index in values:
            if series is None:
                label = name
            else:
                label = str(row[series]) if len(values) == 1 else f"{row[series]} {name}"
            xs, ys = lines.setdefault(label, ([], []))
            xs.append(_date2num(_naive(row[x])))
            ys.append(math.nan if row[index] is None else float(row[index]))
    return lines


def _naive(moment: datetime) -> datetime:
    """UTC without a zone, as ClickHouse returns its times (and matplotlib then reads them)."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo is not None else moment


def _plain(label: str) -> str:
    """A legend label shown as written: no mathtext from ``$``, not hidden by a leading ``_``."""
    label = label.replace("$", r"\$")
    return f"\u200b{label}" if label.startswith("_") else label


# ---------------------------------------------------------------------------- the page


def _page(
    *,
    store: Store,
    generated_at: datetime,
    since: datetime | None,
    until: datetime | None,
    headline: Mapping[str, int | float | None],
    whole: Mapping[str, Any],
    window: Mapping[str, int],
    fresh: Mapping[str, int | None],
    panels: dict[str, Panel],
    png: bytes,
) -> str:
    if since is None and until is None:
        window_text = "all the data"
    else:
        window_text = (
            f"{'the first row' if since is None else _when(since) + ' UTC'} to "
            f"{'the last row' if until is None else _when(until) + ' UTC'}"
        )
    tiles = [
        ("events", _fmt(headline["events"])),
        ("users", _fmt(headline["users"])),
        ("items", _fmt(headline["items"])),
        ("dead letters per accepted event", _fmt(headline["dead_letter_rate"])),
        ("freshness p50", _ms(headline["freshness_p50_ms"])),
        ("freshness p99", _ms(headline["freshness_p99_ms"])),
        ("explore / exploit CTR", f"{_fmt(headline['explore_ctr'])} / {_fmt(headline['exploit_ctr'])}"),
        ("coverage", _fmt(headline["coverage"])),
    ]
    body = [
        "<header>",
        "<h1>freshrec run report</h1>",
        f"<p>Database <code>{_e(store.database)}</code> ({_e(store.dsn_kind)}). "
        f"Window: {_e(window_text)}, on each block's own clock (stated under its title). "
        f"Generated {_e(_when(generated_at))} UTC.</p>",
        "</header>",
        '<div class="tiles">',
        *(f'<div class="tile"><span>{_e(label)}</span><b>{_e(value)}</b></div>' for label, value in tiles),
        "</div>",
        _volumes(whole, window, panels["events_by_type"]),
        _freshness(fresh, panels["freshness"]),
        _quality(panels),
        _exploration(panels),
        '<section id="charts"><h2>Over time</h2>',
        f'<img alt="time series of the run" src="data:image/png;base64,{base64.b64encode(png).decode()}">',
        "</section>",
    ]
    return _HTML.format(title=_e(f"freshrec report: {store.database}"), css=_CSS, body="\n".join(body))


def _volumes(whole: Mapping[str, Any], window: Mapping[str, int], by_type: Panel) -> str:
    parts = ['<section id="volumes"><h2>Volumes</h2>', "<h3>Audit log</h3>"]
    parts.append(f'<p class="range">{_e(_range(by_type, "events.ts"))}</p>')
    parts.append(
        _table(
            ["", "in the window", "whole log"],
            [
                ("events", window["events"], whole["events"]),
                ("users", window["users"], whole["users"]),
                ("items", window["items"], whole["items"]),
            ],
        )
    )
    parts.append(
        _pairs(
            [
                ("distinct event ids (whole log)", whole["distinct_event_ids"]),
                ("first event (event time)", whole["first_ts"]),
                ("last event (event time)", whole["last_ts"]),
                ("dead letters (whole log)", whole["dead_letters"]),
            ]
        )
    )
    parts.append("<h3>Events by type (whole log)</h3>")
    by_type_rows = sorted(whole["events_by_type"].items(), key=lambda kv: (-kv[1], kv[0]))
    parts.append(_table(["type", "events"], by_type_rows) if by_type_rows else _empty())
    parts.append("</section>")
    return "\n".join(parts)


def _freshness(fresh: Mapping[str, int | None], panel: Panel) -> str:
    parts = ['<section id="freshness"><h2>Freshness</h2>', f"<h3>{_e(panel.query.title)}</h3>"]
    parts.append(f"<p>{_e(panel.query.description)}</p>")
    parts.append(f'<p class="range">{_e(_range(panel))}</p>')
    if not fresh["events"]:
        parts.append(_empty())
    else:
        times, p99s = _column(panel, "time"), _column(panel, "event_p99_ms")
        worst = max(range(len(p99s)), key=lambda i: p99s[i]) if p99s else None
        parts.append(
            _pairs(
                [
                    ("events ingested", fresh["events"]),
                    ("event time to ClickHouse, p50", _ms(fresh["p50_ms"])),
                    ("event time to ClickHouse, p99", _ms(fresh["p99_ms"])),
                    ("broker append to ClickHouse (sink lag), p99", _ms(fresh["sink_p99_ms"])),
                    ("worst bucket p99", None if worst is None else _ms(p99s[worst])),
                    ("worst bucket", None if worst is None else times[worst]),
                ]
            )
        )
    parts.append("</section>")
    return "\n".join(parts)


def _quality(panels: dict[str, Panel]) -> str:
    rate, reasons, entropy = (
        panels["dead_letter_rate"],
        panels["dead_letter_reasons"],
        panels["sequence_entropy"],
    )
    parts = ['<section id="quality"><h2>Quality over time</h2>', f"<h3>{_e(rate.query.title)}</h3>"]
    parts.append(f"<p>{_e(rate.query.description)}</p>")
    parts.append(f'<p class="range">{_e(_range(rate))}</p>')
    dead, accepted = _dead_letter_totals(rate)
    if not rate.rows:
        parts.append(_empty())
    else:
        times, ratios = _column(rate, "time"), _column(rate, "rate")
        worst = max(range(len(ratios)), key=lambda i: ratios[i])
        parts.append(
            _pairs(
                [
                    ("dead letters", dead),
                    ("accepted events", accepted),
                    ("dead letters per accepted event", dead / accepted if accepted else None),
                    ("worst bucket", f"{_fmt(ratios[worst])} at {_fmt(times[worst])}"),
                ]
            )
        )
    parts.append(_block(reasons, tail=False))
    parts.append(f"<h3>{_e(entropy.query.title)}</h3>")
    parts.append(f"<p>{_e(entropy.query.description)}</p>")
    parts.append(f'<p class="range">{_e(_range(entropy))}</p>')
    points = [
        (t, float(a), int(n))
        for t, a, n in zip(
            _column(entropy, "time"), _column(entropy, "apen"), _column(entropy, "transitions"), strict=True
        )
        if a is not None and math.isfinite(float(a))
    ]
    if not points:
        parts.append(_empty())
    else:
        transitions = sum(n for _, _, n in points)
        parts.append(
            _pairs(
                [
                    ("buckets", len(points)),
                    ("transitions", transitions),
                    ("mean ApEn, weighted by transitions", sum(a * n for _, a, n in points) / transitions),
                    ("lowest bucket", min(a for _, a, _ in points)),
                    ("highest bucket", max(a for _, a, _ in points)),
                    ("latest bucket", f"{_fmt(points[-1][1])} at {_fmt(points[-1][0])}"),
                ]
            )
        )
    parts.append("</section>")
    return "\n".join(parts)


def _exploration(panels: dict[str, Panel]) -> str:
    coverage = panels["coverage"]
    parts = [
        '<section id="exploration"><h2>Exploration outcome</h2>',
        _block(panels["served_ctr"], tail=False),
    ]
    parts.append(f"<h3>{_e(coverage.query.title)}</h3>")
    parts.append(f"<p>{_e(coverage.query.description)}</p>")
    parts.append(f'<p class="range">{_e(_range(coverage))}</p>')
    record = _coverage(coverage)
    if record is None:
        parts.append(_empty())
    else:
        head_share = coverage.parameters.get("head_share")
        parts.append(
            _pairs(
                [
                    ("served items", record["served_items"]),
                    ("catalogue (items in events)", record["catalogue"]),
                    ("coverage", record["coverage"]),
                    ("served slots", record["slots"]),
                    (f"long-tail share (head: top {_fmt(head_share)} of items)", record["long_tail_share"]),
                ]
            )
        )
    for name in ("model_timeline", "training_runs", "prequential"):
        parts.append(_block(panels[name], tail=True))
    parts.append("</section>")
    return "\n".join(parts)


def _block(panel: Panel, *, tail: bool) -> str:
    """A table panel: title, description, range, then its rows (or :data:`NO_DATA`)."""
    parts = [
        f"<h3>{_e(panel.query.title)}</h3>",
        f"<p>{_e(panel.query.description)}</p>",
        f'<p class="range">{_e(_range(panel))}</p>',
    ]
    rows = panel.rows
    if not rows:
        parts.append(_empty())
        return "\n".join(parts)
    if len(rows) > _MAX_ROWS:
        which = "last" if tail else "first"
        parts.append(f'<p class="note">{_e(f"the {which} {_MAX_ROWS} of {len(rows):,} rows")}</p>')
        rows = rows[-_MAX_ROWS:] if tail else rows[:_MAX_ROWS]
    parts.append(_table(panel.columns, rows))
    return "\n".join(parts)


def _range(panel: Panel, clock: str | None = None) -> str:
    values = panel.parameters
    text = f"{_when(values['since'])} to {_when(values['until'])} UTC, on {clock or panel.query.clock}"
    if "bucket_s" in values:
        text += f", buckets of {values['bucket_s']:,} s"
    return text


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "\n".join("<tr>" + "".join(f"<td>{_e(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>"


def _pairs(pairs: Sequence[tuple[str, Any]]) -> str:
    rows = "\n".join(f'<tr><th scope="row">{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>' for k, v in pairs)
    return f'<table class="pairs"><tbody>\n{rows}\n</tbody></table>'


def _empty() -> str:
    return f'<p class="empty">{_e(NO_DATA)}</p>'


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _fmt(value: Any) -> str:
    """A cell as people read it: thousands separators, 6 significant digits, UTC times; NULL as —."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.6g}"
    if isinstance(value, datetime):
        return _when(value)
    return str(value)


def _when(moment: datetime) -> str:
    """UTC, to the millisecond when there is one (naive times from ClickHouse are UTC already)."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    return f"{text}.{moment.microsecond // 1000:03d}" if moment.microsecond else text


def _ms(value: Any) -> str:
    """Milliseconds, with a human unit beside them once they pass a second."""
    if value is None:
        return "—"
    ms = float(value)
    text = f"{ms:,.0f} ms"
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1_000)):
        if abs(ms) >= size:
            return f"{text} ({ms / size:.1f} {unit})"
    return text


_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
{css}
</style>
</head>
<body>
{body}
</body>
</html>
"""

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1f24;
       max-width: 1200px; margin: 2rem auto; padding: 0 1rem; line-height: 1.4; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.2rem; }
h3 { margin-bottom: 0.2rem; } p { margin: 0.3rem 0; }
.range, .note { color: #57606a; font-size: 0.85rem; }
.empty { color: #8c959f; font-style: italic; }
.tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 0.6rem;
         margin: 1rem 0; }
.tile { border: 1px solid #d0d7de; border-radius: 6px; padding: 0.5rem 0.7rem; }
.tile span { display: block; color: #57606a; font-size: 0.8rem; } .tile b { font-size: 1.2rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
thead th { background: #f6f8fa; } table.pairs th { background: #f6f8fa; font-weight: normal; }
td { font-variant-numeric: tabular-nums; max-width: 40rem; overflow-wrap: anywhere; }
img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
code { background: #f6f8fa; padding: 0 0.2rem; }
""".strip()

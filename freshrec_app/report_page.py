"""The report's page and chart: one self-contained HTML document, its chart as a PNG.

:mod:`freshrec_app.report` gathers the numbers; this module draws them. Everything read from the
store is HTML-escaped (item ids, event types, dead-letter reasons are user input). The PNG is drawn
on a private matplotlib ``Figure`` with the Agg canvas: no pyplot, no change to the process's
backend.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from matplotlib import dates as mdates
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter, Locator

from freshrec.queries import Panel
from freshrec.store import Store

__all__ = ["NO_DATA", "coverage_of", "dead_letter_totals", "panel_column", "render_chart", "render_page"]

NO_DATA = "no data in this window"
_MAX_ROWS = 50  # rows shown per table; longer tables keep their newest rows and say so
_COLUMNS = 2  # subplots per row of the chart

# matplotlib.dates has no annotations: typed handles on the three names used here.
_date2num: Callable[[datetime], float] = mdates.date2num
_DateLocator: Callable[[], Locator] = mdates.AutoDateLocator
_DateFormatter: Callable[[Locator], Formatter] = mdates.ConciseDateFormatter


def panel_column(panel: Panel, name: str) -> list[Any]:
    if not panel.rows:  # an empty result may come back without its column names (chDB)
        return []
    index = panel.columns.index(name)
    return [row[index] for row in panel.rows]


def dead_letter_totals(rate: Panel) -> tuple[int, int]:
    """(dead letters, accepted events) summed over the dead-letter-rate panel's buckets."""
    return int(sum(panel_column(rate, "dead"))), int(sum(panel_column(rate, "accepted")))


def coverage_of(panel: Panel) -> dict[str, Any] | None:
    """The coverage row, or None when nothing was served in the window."""
    if not panel.rows:
        return None
    record = dict(zip(panel.columns, panel.rows[0], strict=True))
    return record if record["slots"] else None


# ---------------------------------------------------------------------------- the chart


def render_chart(panels: Sequence[Panel]) -> bytes:
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


def render_page(
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
        times, p99s = panel_column(panel, "time"), panel_column(panel, "event_p99_ms")
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
    dead, accepted = dead_letter_totals(rate)
    if not rate.rows:
        parts.append(_empty())
    else:
        times, ratios = panel_column(rate, "time"), panel_column(rate, "rate")
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
            panel_column(entropy, "time"),
            panel_column(entropy, "apen"),
            panel_column(entropy, "transitions"),
            strict=True,
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
    record = coverage_of(coverage)
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

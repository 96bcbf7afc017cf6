"""``freshrec report``: one self-contained HTML page (and its chart as a PNG) that sums up a run.

Why: a run (a replay, a day of live traffic, a closed-loop simulation) should leave something a
person can read, attach to an issue or archive without a Grafana or a server to look at. So the
page carries its own CSS and its chart as a ``data:`` URI and loads nothing from anywhere: no
script, no stylesheet link, no font, no CDN.

What it says comes from the SQL the dashboards read (:mod:`freshrec.queries`), plus the audit log's
:func:`~freshrec.queries.log_summary`:

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

The page and its chart are drawn by :mod:`freshrec_app.report_page`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from freshrec import queries
from freshrec.errors import ConfigError
from freshrec.queries import Panel, log_summary
from freshrec.store import Store
from freshrec_app.report_page import (
    NO_DATA,
    coverage_of,
    dead_letter_totals,
    panel_column,
    render_chart,
    render_page,
)

__all__ = ["NO_DATA", "Report", "write_report"]

logger = logging.getLogger(__name__)


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
    whole = log_summary(store)
    if since is None or until is None:
        panels.update(_dead_letters_beside_events(store, panels, whole, since, until))
    window = _window_volumes(store, panels["events_by_type"])
    fresh = _overall_freshness(store, panels["freshness"])
    headline = _headline(whole, window, fresh, panels)
    png = render_chart([p for p in panels.values() if p.query.kind == "timeseries"])
    page = render_page(
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


def _ctr(served: Panel, explore: bool) -> float | None:
    slots = clicks = 0
    for row in served.rows:
        record = dict(zip(served.columns, row, strict=True))
        if bool(record["explore"]) is explore:
            slots += int(record["slots"])
            clicks += int(record["clicks"])
    return clicks / slots if slots else None


def _headline(
    whole: Mapping[str, Any],
    window: Mapping[str, int],
    fresh: Mapping[str, int | None],
    panels: dict[str, Panel],
) -> dict[str, int | float | None]:
    dead, accepted = dead_letter_totals(panels["dead_letter_rate"])
    coverage = coverage_of(panels["coverage"])
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
        "served_slots": int(sum(panel_column(served, "slots"))),
        "explore_ctr": _ctr(served, explore=True),
        "exploit_ctr": _ctr(served, explore=False),
        "coverage": None if coverage is None else float(coverage["coverage"]),
        "long_tail_share": None if coverage is None else float(coverage["long_tail_share"]),
        "model_versions": len(panels["model_timeline"].rows),
        "training_runs": len(panels["training_runs"].rows),
    }

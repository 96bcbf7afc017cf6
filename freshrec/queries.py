"""The operational queries, as a library: the SQL that dashboards (Grafana, the built-in page) and
reports read, in one place, parameterised by ClickHouse itself (``{name:Type}``), never by string
formatting of input. Table names come from the store (its database), the only formatted part.

Every query takes a time range, ``since`` (inclusive) and ``until`` (exclusive), applied to one
time column, its ``clock``: event time for what users did, ingestion time for what the pipeline did,
serving time for what was shown. Time series also take ``bucket_s``. :func:`panel` fills whatever is
left out (the range from the data, a bucket that gives about 240 points) so that a page can ask for
"everything" over a replay of 1997 ratings as well as for the last hour of a live stream.

Grafana reads the same SQL (``freshrec_app.grafana`` writes its dashboard from :data:`QUERIES`), with
its macros in place of the range and the bucket.

>>> sorted(QUERIES)[:3]
['consumer_lag', 'coverage', 'ctr_over_time']
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from freshrec.errors import ConfigError
from freshrec.store import Store

__all__ = ["QUERIES", "TABLES", "Panel", "Query", "bucket_for", "log_summary", "panel", "render", "run"]

RANGE = {"since": "DateTime64(3)", "until": "DateTime64(3)"}
_IN_RANGE = "{clock} >= {{since:DateTime64(3)}} AND {clock} < {{until:DateTime64(3)}}"
TABLES = (
    "events",
    "dead_letters",
    "impressions",
    "model_updates",
    "training_runs",
    "eval_runs",
    "consumer_lag",
)


@dataclass(frozen=True, slots=True)
class Query:
    """One dashboard query.

    ``sql`` uses ``{events}``-style table placeholders and typed parameters. Parameters beyond the
    range have ``defaults`` (what dashboards use). ``kind`` says how to draw it: a ``timeseries`` has
    its time in ``x``, one line per value of ``series`` (if any) for each of ``values``; a ``table``
    is shown as rows.
    """

    title: str
    description: str
    sql: str
    clock: str  # "table.column" the range applies to
    kind: Literal["timeseries", "table"]
    parameters: Mapping[str, str] = field(default_factory=dict)  # beyond since/until: name -> type
    defaults: Mapping[str, Any] = field(default_factory=dict)
    x: str | None = None
    series: str | None = None
    values: tuple[str, ...] = ()
    unit: str = ""

    @property
    def all_parameters(self) -> dict[str, str]:
        return {**RANGE, **self.parameters}


def _where(clock: str) -> str:
    return _IN_RANGE.format(clock=clock)


_BUCKET = "toStartOfInterval({col}, toIntervalSecond({{bucket_s:UInt32}}))"
_SERIES = {"bucket_s": "UInt32"}

# ApEn (Pincus 1991) with exact matching (r = 0), the measure the Performance Law paper (Shen et al.,
# 2024, arXiv:2412.00430) proposes for the quality of sequential-recommendation data. Patterns are
# length-m runs of items inside one user's sequence (time order, ties by event id), pooled over the
# users active in the bucket: per-user ApEn is degenerate when users rarely repeat an item. Then
# Phi_m = sum over patterns p of (c_p / N) * ln(c_p / N), and ApEn = Phi_m - Phi_(m+1): the entropy
# (nats) of the next item given the m before it. Low: repetitive, predictable data (loops, bots,
# replays of the same sessions); high: every transition is new. One departure from Pincus: the
# m-runs counted are those an item follows (the prefixes of the (m+1)-runs, N of each), which makes
# ApEn the empirical conditional entropy, never negative; with all N - m + 1 runs, the many
# one-event sequences of a sparse bucket add m-runs with no successor and drive it below zero.
_APEN = """
SELECT bucket AS time,
       sumIf(c * log(c / n), k = {{m:UInt8}}) / anyIf(n, k = {{m:UInt8}})
     - sumIf(c * log(c / n), k = {{m:UInt8}} + 1) / anyIf(n, k = {{m:UInt8}} + 1) AS apen,
       anyIf(n, k = {{m:UInt8}} + 1) AS transitions
FROM (
    SELECT bucket, k, gram, count() AS c, sum(count()) OVER (PARTITION BY bucket, k) AS n
    FROM (
        SELECT bucket, k,
               arrayJoin(arrayMap(
                   i -> arraySlice(items, i, k),
                   range(1, toUInt64(greatest(toInt64(length(items)) - {{m:UInt8}} + 1, 1)))
               )) AS gram
        FROM (
            SELECT {bucket} AS bucket,
                   arrayMap(t -> t.3, arraySort(groupArray((ts, event_id, item_id)))) AS items
            FROM {{events}} FINAL WHERE {where}
            GROUP BY bucket, user_id
        )
        ARRAY JOIN [toUInt8({{m:UInt8}}), toUInt8({{m:UInt8}} + 1)] AS k
    )
    GROUP BY bucket, k, gram
)
GROUP BY bucket HAVING transitions > 0 ORDER BY bucket
"""


def _events_per_minute(title: str, description: str, *, clock: str) -> Query:
    """Events per minute by type, bucketed on ``clock`` (event time or ingestion time)."""
    return Query(
        title,
        description,
        f"SELECT {_BUCKET.format(col=clock)} AS time, type, "
        "count() * 60 / {bucket_s:UInt32} AS per_minute "
        f"FROM {{events}} FINAL WHERE {_where(clock)} GROUP BY time, type ORDER BY time, type",
        f"events.{clock}",
        "timeseries",
        _SERIES,
        x="time",
        series="type",
        values=("per_minute",),
        unit="events/min",
    )


QUERIES: dict[str, Query] = {
    "events_by_type": _events_per_minute(
        "Events per minute by type",
        "Event time, not ingestion time: what users did. Rate per minute, averaged over each bucket.",
        clock="ts",
    ),
    "events_received": _events_per_minute(
        "Events received per minute by type",
        "Ingestion time: what the system received and stored, whatever the events' own time (a "
        "replay of 1997 ratings shows here as it is stored). Rate per minute over each bucket.",
        clock="ingested_at",
    ),
    "dead_letter_rate": Query(
        "Dead letters per accepted event",
        "Bad messages over events accepted in the same bucket of ingestion time.",
        f"SELECT time, dead, accepted, if(accepted = 0, NULL, dead / accepted) AS rate FROM ("
        f"SELECT {_BUCKET.format(col='received_at')} AS time, count() AS dead "
        f"FROM {{dead_letters}} FINAL WHERE {_where('received_at')} GROUP BY time) AS d "
        f"FULL OUTER JOIN (SELECT {_BUCKET.format(col='ingested_at')} AS time, count() AS accepted "
        f"FROM {{events}} FINAL WHERE {_where('ingested_at')} GROUP BY time) AS e USING (time) "
        "ORDER BY time",
        "dead_letters.received_at",
        "timeseries",
        _SERIES,
        x="time",
        values=("rate",),
        unit="ratio",
    ),
    "dead_letter_reasons": Query(
        "Dead letters by reason",
        "What breaks the event contract most, and how often per accepted event.",
        "SELECT reason, count() AS messages, "
        f"round(count() / greatest((SELECT count() FROM {{events}} FINAL WHERE {_where('ingested_at')}), 1), "
        "6) AS per_event, any(detail) AS example "
        f"FROM {{dead_letters}} FINAL WHERE {_where('received_at')} "
        "GROUP BY reason ORDER BY messages DESC, reason LIMIT {top:UInt32}",
        "dead_letters.received_at",
        "table",
        {"top": "UInt32"},
        {"top": 10},
    ),
    "freshness": Query(
        "Freshness: event time and broker time to ClickHouse (ms)",
        "p50/p99 from event time to the row in ClickHouse, and the sink's own lag (p99) from the "
        "broker's append time, by bucket of ingestion time.",
        f"SELECT {_BUCKET.format(col='ingested_at')} AS time, count() AS events, "
        "quantileExact(0.5)(dateDiff('millisecond', ts, ingested_at)) AS event_p50_ms, "
        "quantileExact(0.99)(dateDiff('millisecond', ts, ingested_at)) AS event_p99_ms, "
        "quantileExact(0.99)(dateDiff('millisecond', kafka_ts, ingested_at)) AS sink_p99_ms "
        f"FROM {{events}} FINAL WHERE {_where('ingested_at')} GROUP BY time ORDER BY time",
        "events.ingested_at",
        "timeseries",
        _SERIES,
        x="time",
        values=("event_p50_ms", "event_p99_ms", "sink_p99_ms"),
        unit="ms",
    ),
    "consumer_lag": Query(
        "Consumer lag by group (messages)",
        "Messages each consumer group has yet to process (high watermark minus committed offset, "
        "summed over partitions): the sink, the stream roles, the serving replicas. The highest "
        "sample in each bucket.",
        "SELECT time, consumer_group, max(total) AS lag FROM ("
        "SELECT sampled_at, consumer_group, sum(lag) AS total FROM {consumer_lag} FINAL "
        f"WHERE {_where('sampled_at')} GROUP BY sampled_at, consumer_group) "
        f"GROUP BY {_BUCKET.format(col='sampled_at')} AS time, consumer_group ORDER BY time, consumer_group",
        "consumer_lag.sampled_at",
        "timeseries",
        _SERIES,
        x="time",
        series="consumer_group",
        values=("lag",),
        unit="messages",
    ),
    "served_ctr": Query(
        "Served click-through by source and explore flag",
        "Is exploration paying off: clicks per served slot, explore vs exploit, per candidate source.",
        "SELECT i.source AS source, i.explore AS explore, count() AS slots, "
        "countIf(c.request_id != '') AS clicks, round(clicks / slots, 6) AS ctr "
        "FROM {impressions} AS i FINAL LEFT JOIN ("
        "SELECT DISTINCT assumeNotNull(request_id) AS request_id, item_id FROM {events} FINAL "
        "WHERE type = 'click' AND request_id IS NOT NULL) AS c "
        "ON c.request_id = i.request_id AND c.item_id = i.item_id "
        f"WHERE {_where('i.served_at')} GROUP BY source, explore ORDER BY source, explore",
        "impressions.served_at",
        "table",
    ),
    "ctr_over_time": Query(
        "Click-through of served slots, explore vs exploit",
        "Clicks per served slot by bucket of serving time; clicks join their response by request id.",
        f"SELECT {_BUCKET.format(col='i.served_at')} AS time, "
        "if(i.explore, 'explore', 'exploit') AS slot, "
        "countIf(c.request_id != '') / count() AS ctr "
        "FROM {impressions} AS i FINAL LEFT JOIN ("
        "SELECT DISTINCT assumeNotNull(request_id) AS request_id, item_id FROM {events} FINAL "
        "WHERE type = 'click' AND request_id IS NOT NULL) AS c "
        "ON c.request_id = i.request_id AND c.item_id = i.item_id "
        f"WHERE {_where('i.served_at')} GROUP BY time, slot ORDER BY time, slot",
        "impressions.served_at",
        "timeseries",
        _SERIES,
        x="time",
        series="slot",
        values=("ctr",),
        unit="ratio",
    ),
    "coverage": Query(
        "Catalogue coverage and long-tail share of what was served",
        "Catalogue items shown at least once over the catalogue (items users interacted with: "
        "events other than impressions and skips); the share of served slots given to items outside "
        "the head (the most-interacted items, head_share of the catalogue).",
        "WITH ranked AS (SELECT item_id, row_number() OVER (ORDER BY count() DESC, item_id) AS r "
        "FROM {events} FINAL WHERE type NOT IN ('impression', 'skip') GROUP BY item_id), "
        "(SELECT count() FROM ranked) AS catalogue "
        "SELECT uniqExactIf(item_id, item_id IN (SELECT item_id FROM ranked)) AS served_items, catalogue, "
        "round(served_items / greatest(catalogue, 1), 6) AS coverage, count() AS slots, "
        "round(countIf(item_id NOT IN (SELECT item_id FROM ranked "
        "WHERE r <= greatest(1, toUInt64(ceil(catalogue * {head_share:Float64}))))) / greatest(slots, 1), 6) "
        "AS long_tail_share "
        f"FROM {{impressions}} FINAL WHERE {_where('served_at')}",
        "impressions.served_at",
        "table",
        {"head_share": "Float64"},
        {"head_share": 0.2},
    ),
    "model_timeline": Query(
        "Model versions: size, and publish to first served",
        "Every published version with its kind and size, and the time from its publication to the "
        "first response served with it (the apply lag as users saw it; empty: never served).",
        "SELECT m.created_at AS time, m.version AS version, m.parent AS parent, m.kind AS kind, "
        "m.bytes AS bytes, m.rows AS rows, "
        "if(s.first_served IS NULL, NULL, dateDiff('millisecond', m.created_at, s.first_served)) "
        "AS first_served_ms "
        "FROM {model_updates} AS m FINAL LEFT JOIN (SELECT model_version, "
        "toNullable(min(served_at)) AS first_served FROM {impressions} FINAL GROUP BY model_version) AS s "
        "ON s.model_version = m.version "
        f"WHERE {_where('m.created_at')} ORDER BY version",
        "model_updates.created_at",
        "table",
    ),
    "training_runs": Query(
        "Training runs: loss and offline metrics",
        "Fine-tune loss and offline metrics, run by run.",
        "SELECT finished_at AS time, kind, source, status, events, loss, hr_at_10, ndcg_at_10, "
        "published_version FROM {training_runs} FINAL "
        f"WHERE {_where('finished_at')} ORDER BY finished_at",
        "training_runs.finished_at",
        "table",
    ),
    "prequential": Query(
        "Evaluations: HR@10 and NDCG@10 by run (prequential, replay)",
        "Streaming evaluations as they were recorded: test-then-train of the stream's methods "
        "(prequential), and the replay of the whole recommender with the served list (replay), "
        "with its 95% interval of HR@10 where the run recorded one.",
        "SELECT finished_at AS time, protocol, dataset, method, events, hr, "
        "JSONExtract(params, 'ci95', 'Array(Float64)') AS hr_ci95, ndcg FROM {eval_runs} FINAL "
        f"WHERE {_where('finished_at')} ORDER BY finished_at, protocol, method",
        "eval_runs.finished_at",
        "table",
    ),
    "sequence_entropy": Query(
        "Data quality: approximate entropy of user sequences (nats)",
        "ApEn(m, r=0) of the items users interact with, pooled per bucket of event time: how much "
        "the next item is left to chance given the m before it (Performance Law, arXiv:2412.00430).",
        _APEN.format(bucket=_BUCKET.format(col="ts"), where=_where("ts")),
        "events.ts",
        "timeseries",
        {"bucket_s": "UInt32", "m": "UInt8"},
        {"m": 1},
        x="time",
        values=("apen",),
        unit="nats",
    ),
}


def render(query: Query, table: Mapping[str, str]) -> str:
    """The query's SQL with its table placeholders replaced (parameters left for the engine)."""
    sql = query.sql
    for name in TABLES:
        sql = sql.replace(f"{{{name}}}", table[name])
    return sql


def run(store: Store, name: str, **parameters: Any) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run query ``name`` with all its parameters (values bound by ClickHouse, never formatted)."""
    query = _get(name)
    expected = query.all_parameters
    missing = set(expected) - set(parameters)
    unknown = set(parameters) - set(expected)
    if missing or unknown:
        raise ConfigError(
            f"query {name!r} takes {sorted(expected)}; missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    return store.query(render(query, {t: store.table(t) for t in TABLES}), parameters)


@dataclass(frozen=True, slots=True)
class Panel:
    """One query's rows with the parameters it ran with (after defaults were filled)."""

    name: str
    query: Query
    parameters: dict[str, Any]
    columns: list[str]
    rows: list[tuple[Any, ...]]


_NICE_BUCKETS = (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400)


def bucket_for(span: timedelta, points: int = 240) -> int:
    """The smallest round bucket (seconds) that cuts ``span`` into at most ``points`` buckets."""
    wanted = span.total_seconds() / points
    return next((b for b in _NICE_BUCKETS if b >= wanted), math.ceil(wanted))


def panel(
    store: Store,
    name: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    points: int = 240,
    **parameters: Any,
) -> Panel:
    """Run ``name`` for a dashboard: a missing range is the data's own (the clock column's first
    and last values), a missing bucket gives at most ``points`` buckets, other parameters default."""
    query = _get(name)
    if since is None or until is None:
        table, column = query.clock.split(".")
        ((first, last),) = store.rows(f"SELECT min({column}), max({column}) FROM {store.table(table)}")
        empty = first is None or first.year < 1971  # min() of no rows is the epoch
        now = datetime.now(UTC)
        since = since or (now - timedelta(hours=1) if empty else first.replace(tzinfo=UTC))
        until = until or (now if empty else last.replace(tzinfo=UTC) + timedelta(milliseconds=1))
    values: dict[str, Any] = {**query.defaults, **parameters, "since": since, "until": until}
    if "bucket_s" in query.parameters and "bucket_s" not in parameters:
        values["bucket_s"] = bucket_for(until - since, points)
    columns, rows = run(store, name, **values)
    return Panel(name=name, query=query, parameters=values, columns=columns, rows=rows)


def _get(name: str) -> Query:
    query = QUERIES.get(name)
    if query is None:
        raise ConfigError(f"unknown query {name!r}; known: {', '.join(sorted(QUERIES))}")
    return query


def log_summary(store: Store) -> dict[str, Any]:
    """What the audit log holds: volumes, distinct keys, time range, dead letters by reason."""
    events = store.table("events")
    dead = store.table("dead_letters")
    (rows, distinct_ids, users, items, first, last), = store.rows(
        f"SELECT count(), uniqExact(event_id), uniqExact(user_id), uniqExact(item_id), "
        f"toString(min(ts)), toString(max(ts)) FROM {events}"
    )  # fmt: skip
    by_type = dict(store.rows(f"SELECT type, count() FROM {events} GROUP BY type ORDER BY type"))
    reasons = dict(store.rows(f"SELECT reason, count() FROM {dead} GROUP BY reason ORDER BY reason"))
    return {
        "events": int(rows),
        "distinct_event_ids": int(distinct_ids),
        "users": int(users),
        "items": int(items),
        "first_ts": first if rows else None,
        "last_ts": last if rows else None,
        "events_by_type": {str(k): int(v) for k, v in by_type.items()},
        "dead_letters": int(sum(reasons.values())),
        "dead_letters_by_reason": {str(k): int(v) for k, v in reasons.items()},
    }

"""The operational queries, as a library: the SQL that dashboards (Grafana, the built-in page) and
reports read, in one place, parameterised by ClickHouse itself (``{name:Type}``), never by string
formatting of input. Table names come from the store (its database), the only formatted part.

>>> sorted(QUERIES)[:3]
['coverage', 'dead_letter_reasons', 'events_per_minute']
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from freshrec.errors import ConfigError
from freshrec.store import Store

__all__ = ["QUERIES", "Query", "run"]


@dataclass(frozen=True, slots=True)
class Query:
    """One dashboard query: SQL over ``{events}``-style table placeholders and typed parameters."""

    title: str
    sql: str
    parameters: Mapping[str, str]  # name -> ClickHouse type, all required
    description: str


QUERIES: dict[str, Query] = {
    "events_per_minute": Query(
        "Events per minute by type",
        "SELECT toStartOfMinute(ts) AS minute, type, count() AS events FROM {events} FINAL "
        "WHERE ts >= {since:DateTime64(3)} AND ts < {until:DateTime64(3)} "
        "GROUP BY minute, type ORDER BY minute, type",
        {"since": "DateTime64(3)", "until": "DateTime64(3)"},
        "Event time, not ingestion time: what users did, minute by minute.",
    ),
    "dead_letter_reasons": Query(
        "Dead letters by reason",
        "SELECT reason, count() AS messages, "
        "round(count() / (SELECT count() FROM {events} FINAL) + 0, 6) AS per_event "
        "FROM {dead_letters} FINAL GROUP BY reason ORDER BY messages DESC, reason LIMIT {top:UInt32}",
        {"top": "UInt32"},
        "What breaks the event contract most, and how often per accepted event.",
    ),
    "freshness": Query(
        "Ingestion lag (event time to ClickHouse) per minute of ingestion",
        "SELECT toStartOfMinute(ingested_at) AS minute, count() AS events, "
        "quantileExact(0.5)(dateDiff('millisecond', ts, ingested_at)) AS p50_ms, "
        "quantileExact(0.99)(dateDiff('millisecond', ts, ingested_at)) AS p99_ms, "
        "quantileExact(0.99)(dateDiff('millisecond', kafka_ts, ingested_at)) AS sink_lag_p99_ms "
        "FROM {events} FINAL WHERE ingested_at >= {since:DateTime64(3)} GROUP BY minute ORDER BY minute",
        {"since": "DateTime64(3)"},
        "p50/p99 from event time, and the sink's own lag from the broker's append time.",
    ),
    "served_ctr": Query(
        "Served click-through by source and explore flag",
        "SELECT i.source AS source, i.explore AS explore, count() AS slots, "
        "countIf(c.request_id != '') AS clicks, round(clicks / slots, 6) AS ctr "
        "FROM {impressions} AS i FINAL LEFT JOIN ("
        "SELECT DISTINCT assumeNotNull(request_id) AS request_id, item_id FROM {events} FINAL "
        "WHERE type = 'click' AND request_id IS NOT NULL) AS c "
        "ON c.request_id = i.request_id AND c.item_id = i.item_id "
        "WHERE i.served_at >= {since:DateTime64(3)} GROUP BY source, explore ORDER BY source, explore",
        {"since": "DateTime64(3)"},
        "Is exploration paying off: clicks per slot, explore vs exploit, per candidate source.",
    ),
    "coverage": Query(
        "Catalogue coverage of what was served",
        "SELECT uniqExact(item_id) AS served_items, "
        "(SELECT uniqExact(item_id) FROM {events} FINAL) AS catalogue, "
        "round(served_items / catalogue, 6) AS coverage FROM {impressions} FINAL "
        "WHERE served_at >= {since:DateTime64(3)}",
        {"since": "DateTime64(3)"},
        "Share of the items seen in events that were shown at least once.",
    ),
    "model_timeline": Query(
        "Model versions",
        "SELECT version, parent, kind, bytes, rows, created_at FROM {model_updates} FINAL "
        "WHERE created_at >= {since:DateTime64(3)} ORDER BY version",
        {"since": "DateTime64(3)"},
        "Every published version with its kind and size.",
    ),
    "training_runs": Query(
        "Training runs",
        "SELECT finished_at, kind, source, status, events, loss, hr_at_10, ndcg_at_10, published_version "
        "FROM {training_runs} FINAL WHERE finished_at >= {since:DateTime64(3)} ORDER BY finished_at",
        {"since": "DateTime64(3)"},
        "Fine-tune loss and offline metrics, run by run.",
    ),
    "prequential": Query(
        "Prequential HR@10 over time",
        "SELECT finished_at, dataset, method, hr, ndcg FROM {eval_runs} FINAL "
        "WHERE finished_at >= {since:DateTime64(3)} ORDER BY finished_at, method",
        {"since": "DateTime64(3)"},
        "Streaming evaluation results as they were recorded.",
    ),
}

_TABLES = ("events", "dead_letters", "impressions", "model_updates", "training_runs", "eval_runs")


def run(store: Store, name: str, **parameters: Any) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run query ``name`` with its parameters (all required; values bound by ClickHouse)."""
    query = QUERIES.get(name)
    if query is None:
        raise ConfigError(f"unknown query {name!r}; known: {', '.join(sorted(QUERIES))}")
    missing = set(query.parameters) - set(parameters)
    unknown = set(parameters) - set(query.parameters)
    if missing or unknown:
        raise ConfigError(
            f"query {name!r} takes {sorted(query.parameters)}; "
            f"missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    sql = query.sql
    for table in _TABLES:  # the database-qualified names: the only text put into the SQL
        sql = sql.replace(f"{{{table}}}", store.table(table))
    return store.query(sql, parameters)

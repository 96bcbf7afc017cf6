"""The ClickHouse audit store: connection, idempotent migrations, and typed access to the tables.

Always through clickhouse-connect. ``FRESHREC_CLICKHOUSE_DSN`` picks the engine:

- ``chdb:///path`` (the embedded default, ``chdb://$FRESHREC_HOME/clickhouse``): chDB, ClickHouse's
  in-process engine, as a clickhouse-connect backend. **One process at a time may open a path**
  (chDB takes a file lock), and a process can hold only one path. Inside that process any number of
  clients and threads share it, so the embedded mode has one owner process (``freshrec run``) and
  other commands run when it is stopped; :class:`~freshrec.errors.StoreUnavailable` says so.
- ``http(s)://user:password@host:8123``: a ClickHouse server, shared by any number of processes.

Deduplication by natural key: every table is a ``ReplacingMergeTree`` ordered by the row's natural
key (``event_id`` for ``events``; ``(topic, partition, offset)`` for ``dead_letters``), so that a row
written twice collapses at merge time and ``FINAL`` reads are exact. The sink also avoids writing
twice in the first place (see ``streams.sink``): plain ``count()`` equals ``count() FINAL`` after a
crash and restart; ``FINAL`` is the backstop that makes it true whatever happened.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

from freshrec.errors import ConfigError, StoreUnavailable
from freshrec.settings import Settings

__all__ = ["MIGRATIONS", "Migration", "Store", "open_store"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step. Statements use ``{db}`` for the database and must be idempotent."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "events and dead_letters",
        (
            """
            CREATE TABLE IF NOT EXISTS {db}.events
            (
                event_id String COMMENT 'idempotency key; the table is deduplicated on it',
                user_id String,
                item_id String,
                type LowCardinality(String) COMMENT 'view, click, purchase, rating, impression, skip, ...',
                ts DateTime64(3, 'UTC') COMMENT 'event time, from the event',
                value Nullable(Float64) COMMENT 'rating, dwell, price; NULL when absent',
                request_id Nullable(String) COMMENT 'the recommendation response this event answers',
                context String COMMENT 'JSON object of scalar context; empty when absent',
                topic LowCardinality(String) COMMENT 'Kafka source of the row',
                partition UInt32,
                offset UInt64,
                kafka_ts DateTime64(3, 'UTC') COMMENT 'Kafka timestamp (broker append time)',
                ingested_at DateTime64(3, 'UTC') COMMENT 'when the sink wrote the row'
            )
            ENGINE = ReplacingMergeTree
            ORDER BY event_id
            """,
            """
            CREATE TABLE IF NOT EXISTS {db}.dead_letters
            (
                topic LowCardinality(String),
                partition UInt32,
                offset UInt64,
                key String COMMENT 'original message key bytes',
                payload String COMMENT 'original message bytes, unchanged',
                reason LowCardinality(String) COMMENT 'stable code: not_json, missing_field, ...',
                detail String COMMENT 'human sentence naming the field and rule',
                event_id String COMMENT 'set for duplicate_event_id, else empty',
                kafka_ts DateTime64(3, 'UTC'),
                received_at DateTime64(3, 'UTC') COMMENT 'when the sink wrote the row'
            )
            ENGINE = ReplacingMergeTree
            ORDER BY (topic, partition, offset)
            """,
        ),
    ),
    Migration(
        2,
        "eval_runs",
        (
            """
            CREATE TABLE IF NOT EXISTS {db}.eval_runs
            (
                run_id String,
                dataset String,
                protocol LowCardinality(String) COMMENT 'prequential: test-then-train over the stream',
                method LowCardinality(String),
                events UInt64,
                k UInt16,
                hr Float64 COMMENT 'hit rate at k',
                ndcg Float64 COMMENT 'NDCG at k',
                params String COMMENT 'JSON of the run parameters',
                started_at DateTime64(3, 'UTC'),
                finished_at DateTime64(3, 'UTC')
            )
            ENGINE = ReplacingMergeTree
            ORDER BY (run_id, method)
            """,
        ),
    ),
    Migration(
        3,
        "training_runs and model_updates",
        (
            """
            CREATE TABLE IF NOT EXISTS {db}.training_runs
            (
                run_id String,
                kind LowCardinality(String) COMMENT 'offline (dataset, leave-last-out) or finetune',
                source String COMMENT 'the dataset, or events for the freshest window of the log',
                status LowCardinality(String) COMMENT 'ok or failed',
                error String COMMENT 'why a failed run failed; empty when ok',
                events UInt64 COMMENT 'interactions trained on',
                steps UInt64 COMMENT 'optimiser steps',
                loss Float64 COMMENT 'mean sampled-softmax training loss',
                hr_at_10 Nullable(Float64) COMMENT 'offline: test HR@10 (full catalogue, seen excluded)',
                ndcg_at_10 Nullable(Float64) COMMENT 'offline: test NDCG@10',
                published_version Nullable(UInt64) COMMENT 'finetune: the model version it published',
                metrics String COMMENT 'JSON: every metric of the run',
                params String COMMENT 'JSON: model and training configuration',
                started_at DateTime64(3, 'UTC'),
                finished_at DateTime64(3, 'UTC')
            )
            ENGINE = ReplacingMergeTree
            ORDER BY run_id
            """,
            """
            CREATE TABLE IF NOT EXISTS {db}.model_updates
            (
                version UInt64 COMMENT 'position in the version chain, from 1',
                parent UInt64 COMMENT 'the version it applies on; 0 for a first snapshot',
                kind LowCardinality(String) COMMENT 'sparse (changed rows), dense (non-embedding), snapshot',
                topic LowCardinality(String) COMMENT 'Kafka topic it was published to',
                bytes UInt64 COMMENT 'payload size',
                rows UInt64 COMMENT 'embedding rows carried',
                chunks UInt32 COMMENT 'Kafka messages the payload was cut into',
                checksum String COMMENT 'sha256 of the payload',
                state_checksum String COMMENT 'blake2b of the whole model after applying it',
                rollback_of Nullable(UInt64) COMMENT 'a rollback: the version whose parameters it restores',
                run_id String COMMENT 'the training run that produced it; empty for a rollback',
                created_at DateTime64(3, 'UTC')
            )
            ENGINE = ReplacingMergeTree
            ORDER BY version
            """,
        ),
    ),
    Migration(
        4,
        "impressions",
        (
            """
            CREATE TABLE IF NOT EXISTS {db}.impressions
            (
                request_id String COMMENT 'the response; clicks carry it back as their request_id',
                user_id String,
                position UInt16 COMMENT '0-based slot in the response',
                item_id String,
                score Float64 COMMENT 'fused ranking score, or the UCB score of an explore slot',
                source LowCardinality(String) COMMENT 'transformer, cooccurrence, popular or explore',
                explore Bool COMMENT 'chosen by the exploration policy',
                propensity Float64 COMMENT 'probability the policy had of choosing this item here',
                policy LowCardinality(String) COMMENT 'uncertainty, epsilon or none',
                model_version UInt64 COMMENT 'the model version that served it (0: none yet)',
                latency_ms Float32 COMMENT 'time to compute the response',
                served_at DateTime64(3, 'UTC'),
                topic LowCardinality(String),
                partition UInt32,
                offset UInt64
            )
            ENGINE = ReplacingMergeTree
            ORDER BY (request_id, position)
            """,
        ),
    ),
    Migration(
        5,
        "consumer_lag",
        (
            """
            CREATE TABLE IF NOT EXISTS {db}.consumer_lag
            (
                sampled_at DateTime64(3, 'UTC') COMMENT 'when the sink sampled the group',
                consumer_group String COMMENT 'a freshrec consumer group: sink, stream roles, serving',
                topic LowCardinality(String),
                partition UInt32,
                committed Int64 COMMENT 'the group''s committed offset',
                end_offset Int64 COMMENT 'the partition''s high watermark at the sample',
                lag Int64 COMMENT 'end_offset - committed: messages the group has yet to process'
            )
            ENGINE = ReplacingMergeTree
            ORDER BY (consumer_group, topic, partition, sampled_at)
            """,
        ),
    ),
    Migration(
        6,
        "impressions.exploration",
        (
            """
            ALTER TABLE {db}.impressions ADD COLUMN IF NOT EXISTS exploration String DEFAULT ''
            CODEC(ZSTD(3))
            COMMENT 'JSON, position 0 row only: what the policy could have shown (off-policy evaluation)'
            AFTER served_at
            """,
        ),
    ),
)


class Store:
    """A clickhouse-connect client bound to freshrec's database, with its schema migrated."""

    def __init__(self, *, client: Client, database: str, dsn_kind: str) -> None:
        self.client = client
        self.database = database
        self.dsn_kind = dsn_kind

    def table(self, name: str) -> str:
        return f"{self.database}.{name}"

    def migrate(self) -> list[int]:
        """Create the database and apply every migration not yet recorded. Returns the versions applied."""
        db = self.database
        self.command(f"CREATE DATABASE IF NOT EXISTS {db}")
        self.command(
            f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations "
            "(version UInt32, description String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
            "ENGINE = ReplacingMergeTree ORDER BY version"
        )
        done = {row[0] for row in self.rows(f"SELECT version FROM {db}.schema_migrations FINAL")}
        applied = []
        for migration in MIGRATIONS:
            if migration.version in done:
                continue
            for statement in migration.statements:
                self.command(statement.format(db=db))
            self.insert(
                "schema_migrations",
                [[migration.version], [migration.description]],
                column_names=["version", "description"],
            )
            applied.append(migration.version)
            logger.info("applied migration %d (%s)", migration.version, migration.description)
        return applied

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        try:
            return self.client.command(sql, parameters=parameters)
        except ClickHouseError as exc:
            raise _translate(exc) from exc

    def rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """Run a query (server-side ``{name:Type}`` parameters, never string formatting of input)."""
        try:
            rows = cast(
                list[tuple[Any, ...]], list(self.client.query(sql, parameters=parameters).result_rows)
            )
            return rows
        except ClickHouseError as exc:
            raise _translate(exc) from exc

    def query(
        self, sql: str, parameters: dict[str, Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run a query and return its column names and rows."""
        try:
            result = self.client.query(sql, parameters=parameters)
        except ClickHouseError as exc:
            raise _translate(exc) from exc
        rows = cast(list[tuple[Any, ...]], list(result.result_rows))
        return list(result.column_names), rows

    def insert(self, table: str, columns: Sequence[Sequence[Any]], *, column_names: Sequence[str]) -> None:
        """Column-oriented insert into ``database.table``; one insert is one atomic part."""
        try:
            self.client.insert(
                table,
                list(columns),
                column_names=list(column_names),
                database=self.database,
                column_oriented=True,
            )
        except ClickHouseError as exc:
            raise _translate(exc) from exc

    def close(self) -> None:
        self.client.close()


def open_store(settings: Settings, *, migrate: bool = True) -> Store:
    """Connect to the configured ClickHouse and (by default) bring its schema up to date."""
    dsn = settings.dsn
    kind = dsn.partition("://")[0].lower()
    if kind not in {"chdb", "http", "https", "clickhouse", "clickhousedb"}:
        raise ConfigError(
            f"FRESHREC_CLICKHOUSE_DSN must start with chdb://, http:// or https://, got {kind!r}"
        )
    if kind == "chdb":
        path = dsn.partition("://")[2]
        if path and path != "memory":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        # No session: a server refuses overlapping queries within one session, and threads share a
        # Store (the sinks and the lag sampler; the dashboard's routes in FastAPI's thread pool).
        # Nothing here needs session state (temporary tables, SET).
        if kind == "chdb":
            client = clickhouse_connect.get_client(dsn=dsn)
        else:
            # Bounded: a server that accepts and never answers fails a call after these, instead of
            # hanging the caller (the library's own read timeout is 300 s). No retry of reads here:
            # the callers (the sink's backoff, the dashboard) decide when to try again.
            client = clickhouse_connect.get_client(
                dsn=dsn,
                autogenerate_session_id=False,
                connect_timeout=settings.clickhouse_connect_timeout_s,
                send_receive_timeout=settings.clickhouse_query_timeout_s,
                query_retries=0,
            )
    except ClickHouseError as exc:
        if kind == "chdb" and _chdb_path_locked(Path(dsn.partition("://")[2])):
            raise StoreUnavailable(_LOCKED) from exc
        raise _translate(exc) from exc
    except OSError as exc:
        raise StoreUnavailable(f"cannot reach ClickHouse ({kind}): {exc}") from exc
    store = Store(client=client, database=settings.clickhouse_database, dsn_kind=kind)
    if migrate:
        store.migrate()
    client.database = settings.clickhouse_database  # unqualified table names in `freshrec sql` work
    return store


_LOCKED = (
    "the embedded ClickHouse (chDB) data path is open in another process (e.g. `freshrec run` or "
    "`freshrec sink`); chDB allows one process per path. Stop that process, or point "
    "FRESHREC_CLICKHOUSE_DSN at a ClickHouse server that many processes can share."
)


def _chdb_path_locked(path: Path) -> bool:
    """True when another process holds ClickHouse's lock on ``path/status`` (an exclusive flock)."""
    try:
        with (path / "status").open("rb") as status:
            fcntl.flock(status, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(status, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _translate(exc: ClickHouseError) -> Exception:
    message = str(exc)
    if "Cannot lock file" in message or "Another server instance" in message:
        return StoreUnavailable(_LOCKED)
    if "EmbeddedServer already initialized" in message:
        return StoreUnavailable(
            "this process already opened another chDB path; chDB allows one path per process"
        )
    if any(word in message for word in ("Connection refused", "timed out", "Failed to establish")):
        return StoreUnavailable(f"cannot reach ClickHouse: {message}")
    return exc

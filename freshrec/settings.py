"""Settings: one pydantic-settings class, read from ``FRESHREC_*`` environment variables.

Every field is typed, defaulted and described. Nested sections are plain models, set from the
environment with a double underscore (``FRESHREC_SINK__BATCH_SIZE=5000``).

Kafka client options (SASL, TLS, ...) pass through untouched as librdkafka keys in
``FRESHREC_KAFKA_OPTIONS`` (a JSON object); they may hold secrets, so :meth:`Settings.redacted`
is what gets logged, never the settings object itself.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "STREAM_ROLES",
    "ServeSettings",
    "Settings",
    "SinkSettings",
    "StreamSettings",
    "Topics",
    "TrainSettings",
    "default_datasets_dir",
]

_SECRET_HINTS: Final = ("password", "secret", "token", "key")
STREAM_ROLES: Final = ("counters", "sequences", "heads")


def _xdg(var: str, fallback: str) -> Path:
    base = os.environ.get(var)
    return Path(base) if base else Path.home() / fallback


def default_datasets_dir() -> Path | None:
    """The datasets folder ``../shared/data`` beside the working directory or the checkout, if it exists."""
    candidates = [
        Path.cwd().parent / "shared" / "data",
        Path(__file__).resolve().parents[2] / "shared" / "data",
    ]
    return next((path for path in candidates if path.is_dir()), None)


class Topics(BaseModel):
    """Kafka topic names, all carrying ``FRESHREC_TOPIC_PREFIX`` so that runs stay isolated."""

    prefix: str = ""

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    @property
    def events_dlq(self) -> str:
        return f"{self.prefix}events.dlq"

    @property
    def impressions(self) -> str:
        return f"{self.prefix}impressions"

    @property
    def model_sparse(self) -> str:
        return f"{self.prefix}model.sparse"

    @property
    def model_dense(self) -> str:
        return f"{self.prefix}model.dense"

    def all(self) -> list[str]:
        return [self.events, self.events_dlq, self.impressions, self.model_sparse, self.model_dense]


class SinkSettings(BaseModel):
    """The Kafka → ClickHouse audit sink."""

    group_id: str = Field("freshrec-sink", description="Consumer group of the sink.")
    batch_size: int = Field(10_000, ge=1, le=1_000_000, description="Most messages written per insert.")
    batch_timeout_s: float = Field(
        0.5, gt=0, description="Longest wait to fill a batch before writing what has arrived."
    )
    session_timeout_ms: int = Field(
        45_000,
        ge=6_000,
        le=300_000,
        description="Consumer session timeout: how long a crashed sink holds its partitions.",
    )
    dedup_horizon: int = Field(
        1_000_000,
        ge=0,
        description="How many recent event_ids a sink remembers to turn duplicates into dead letters.",
    )
    lag_interval_s: float = Field(
        10.0,
        ge=0,
        description="How often the sink samples the lag of freshrec's consumer groups into "
        "ClickHouse `consumer_lag` (0: never).",
    )
    retry_initial_s: float = Field(
        0.5,
        gt=0,
        le=60,
        description="First wait before the sink retries a failed ClickHouse write; doubled at each "
        "failure up to retry_max_s. Kafka offsets are held until the write succeeds.",
    )
    retry_max_s: float = Field(
        15.0, gt=0, le=600, description="Longest wait between two retries of a failed ClickHouse write."
    )


class StreamSettings(BaseModel):
    """The stream workers that keep real-time counters (``freshrec stream``)."""

    group_id: str = Field("freshrec-stream", description="Consumer group shared by the stream workers.")
    worker_id: str = Field(
        "0",
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="This worker's stable name: its static group membership (a worker restarted under "
        "it gets its partitions back at once; two live workers must not share one). '@hostname' takes "
        "the machine's name, unique per container: what `docker compose up --scale` needs.",
    )
    batch_size: int = Field(
        2_000, ge=1, le=1_000_000, description="Most messages per batch: bounds how stale a read can be."
    )
    batch_timeout_s: float = Field(0.2, gt=0, description="Longest wait to fill a batch.")
    checkpoint_interval_s: float = Field(
        5.0, gt=0, description="How often state and offsets are written together to disk."
    )
    dedup_horizon: int = Field(1_000_000, ge=0, description="Recent event_ids remembered against re-sends.")
    half_life_s: float = Field(86_400.0, gt=0, description="Half-life of decayed counts.")
    windows_s: tuple[int, ...] = Field((3_600, 86_400, 604_800), description="Windowed-count lengths.")
    window_buckets: int = Field(60, ge=1, le=3_600, description="Tumbling buckets per window.")
    max_items: int = Field(
        1_000_000,
        ge=1,
        description="Items with counters. At the cap the least recently seen items (1% at a time) are "
        "cleared to make room for new ones.",
    )
    history_len: int = Field(
        200,
        ge=1,
        le=10_000,
        description="Recent events kept per user: the transformer's input (its last max_len) and the "
        "items a user is not recommended again. About 115 bytes per kept event, at most "
        "max_users x history_len events.",
    )
    user_ttl_s: float | None = Field(
        None, gt=0, description="Forget users idle this long in event time (off: exact replays)."
    )
    cooccurrence_min_count: int = Field(
        1, ge=1, description="Items pair in co-occurrence only once seen this often (1: off)."
    )
    heads: tuple[str, ...] = Field(
        ("mf",),
        description="Incremental heads learning from every event: mf (ranks candidates in serving) and, "
        "opt-in, engagement (read by nothing in serving).",
    )
    max_users: int = Field(1_000_000, ge=1, description="Users with a history; the least recent are evicted.")
    changelog: bool = Field(
        True,
        description="Snapshot each partition's state to the compacted topic state.<roles> and restore "
        "it from there when a partition is assigned (off: a worker starts its partitions from offset 0).",
    )
    session_timeout_ms: int = Field(
        30_000,
        ge=6_000,
        le=300_000,
        description="Consumer session timeout: how long the partitions of a killed worker wait before "
        "moving to the others (a worker restarted with its worker_id gets them back at once).",
    )
    roles: tuple[str, ...] = Field(
        STREAM_ROLES,
        min_length=1,
        description="What this worker keeps: counters (item counts, CTR), sequences (histories, "
        "co-occurrence), heads. A subset runs as its own consumer group, so roles scale apart.",
    )

    @field_validator("worker_id", mode="before")
    @classmethod
    def _hostname(cls, value: Any) -> Any:
        if value == "@hostname":
            return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64] or "0"
        return value

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, roles: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(roles) - set(STREAM_ROLES))
        if unknown:
            raise ValueError(f"unknown stream roles {unknown}; known: {', '.join(STREAM_ROLES)}")
        return tuple(role for role in STREAM_ROLES if role in roles)  # canonical order, no repeats

    @property
    def effective_group_id(self) -> str:
        """The consumer group: ``group_id``, suffixed by the roles when the worker keeps only some."""
        if set(self.roles) == set(STREAM_ROLES):
            return self.group_id
        return f"{self.group_id}.{'+'.join(self.roles)}"


class TrainSettings(BaseModel):
    """The transformer's scheduled fine-tune and its publishing (``freshrec train``)."""

    interval_s: float = Field(300.0, gt=0, description="Seconds between fine-tune cycles.")
    budget_s: float = Field(60.0, gt=0, description="Longest a cycle may train (wall clock).")
    epochs: int = Field(2, ge=1, le=1_000, description="Passes over the window per cycle (within budget).")
    window_events: int = Field(
        200_000, ge=1, description="The freshest window: this many most recent events train a cycle."
    )
    dense_every: int = Field(
        5, ge=1, description="Publish dense parameters every K-th cycle (sparse deltas every cycle)."
    )
    retry_s: float = Field(30.0, gt=0, description="Delay before a failed cycle is retried.")
    snapshots_keep: int = Field(10, ge=1, description="Whole versions kept for healing and rollback.")
    capacity: int = Field(1_000_000, ge=1, description="Items with an embedding row; stale rows are evicted.")
    max_len: int = Field(
        50,
        ge=2,
        le=1_024,
        description="History length the transformer attends over. Serving's user state costs about "
        "linearly in it, and the stream keeps FRESHREC_STREAM__HISTORY_LEN items per user: raise both "
        "together (docs/benchmarks.md has offline runs at 200).",
    )
    dim: int = Field(64, ge=8, le=1_024, description="Embedding size.")
    blocks: int = Field(2, ge=1, le=12, description="Transformer blocks.")
    negatives: int = Field(
        1024, ge=0, description="Shared negatives of the sampled softmax (0: full softmax)."
    )
    lr: float = Field(1e-3, gt=0, description="Learning rate.")
    batch_size: int = Field(
        32, ge=1, le=65_536, description="Training windows per step (32: 4x the steps of 128 per epoch)."
    )
    block: str = Field(
        "sasrec",
        pattern=r"^(sasrec|hstu)$",
        description="Transformer block: sasrec (softmax attention + feed-forward) or hstu (pointwise "
        "SiLU attention with a relative position bias, gated).",
    )
    loss: str = Field(
        "auto",
        pattern=r"^(auto|full|sampled)$",
        description="full softmax over the catalogue, sampled softmax (log-Q corrected), or auto: full "
        "up to full_softmax_max_items items, sampled above.",
    )
    full_softmax_max_items: int = Field(
        20_000,
        ge=0,
        description="Largest catalogue trained with the full softmax under loss=auto (the full softmax "
        "costs items x positions per step).",
    )
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout on embeddings, attention and blocks.")
    sample_alpha: float = Field(
        0.0, ge=0, le=1, description="Sampled negatives drawn in proportion to count^alpha (0: uniform)."
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto: CUDA when torch finds it, else CPU."
    )
    delta_min_change: float = Field(
        0.0,
        ge=0,
        description="A sparse delta ships a touched row once it has drifted more than this (largest "
        "coordinate change) from its published value (0: every touched row).",
    )


class ServeSettings(BaseModel):
    """Recommendations: candidates, exploration and the decision log (``freshrec serve``)."""

    policy: str = Field(
        "uncertainty",
        pattern=r"^(uncertainty|epsilon|none)$",
        description="Exploration: uncertainty (UCB over uncertain items), epsilon (uniform), none.",
    )
    explore_fraction: float = Field(
        0.2, ge=0, le=1, description="Share of the k slots spent on exploration (uncertainty policy)."
    )
    epsilon: float = Field(0.1, ge=0, le=1, description="Per-slot exploration chance (epsilon policy).")
    ucb_c: float = Field(2.0, ge=0, description="Weight of the uncertainty bonus in the UCB score.")
    temperature: float = Field(0.05, gt=0, description="Softmax temperature over UCB scores.")
    index_max_uncertainty: float = Field(
        0.5, ge=0, le=1, description="Rows younger than this (1/sqrt(updates)) stay out of the main index."
    )
    explore_pool: int = Field(
        256,
        ge=1,
        le=100_000,
        description="Most rows outside the main index that one request's exploration draw considers, "
        "the newest items first, then the least trained (besides the ranking's tail and the "
        "stream's new arrivals): bounds a "
        "request's work however many rows are young.",
    )
    quantized_scan: bool = Field(
        True,
        description="Retrieval scans an int8 copy of the item table and re-scores a shortlist in fp32 "
        "when a bound proves it holds the exact top-n (else it scans again in fp32): exact up to fp32 "
        "rounding, 4.4-5.2 against 12.1-12.3 ms at 1M items of dimension 64 (serving/scan.py). "
        "Tables under 65,536 rows or wider than 128 are scanned in fp32 anyway. False: always fp32.",
    )
    candidates: int = Field(100, ge=1, le=10_000, description="Candidates taken from each source.")
    fusion: str = Field(
        "learned",
        pattern=r"^(learned|rrf)$",
        description="How candidates from the sources are ranked: learned (an online softmax over each "
        "candidate's per-source ranks and scores, learning from each user's next event) or rrf (fixed "
        "reciprocal-rank fusion, re-ranked by the MF head).",
    )
    sources: list[str] = Field(
        default_factory=lambda: ["transformer", "cooccurrence", "popular", "mf"],
        description="Candidate sources a request uses (transformer, cooccurrence, popular) and the MF "
        "head's re-rank (mf); leaving one out is how the replay measures what it adds.",
    )
    fusion_learning_rate: float = Field(
        0.2, gt=0, le=10, description="AdaGrad step of the learned fusion's weights."
    )
    fusion_pending_users: int = Field(
        4_096,
        ge=0,
        le=1_000_000,
        description="Users whose last request's candidates are kept until their next event labels them "
        "(least recent dropped first; about 20 KB each at 300 candidates; 0: the fusion never learns).",
    )
    max_k: int = Field(100, ge=1, le=1_000, description="Largest k a request may ask for.")
    seed: int | None = Field(None, description="Seed of the exploration sampler (None: random).")
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Serving processes behind the API's port (`freshrec serve`): each serves one "
        "request at a time and keeps a full replica of the stream state and the model.",
    )
    torch_threads: int = Field(
        1,
        ge=1,
        le=256,
        description="torch intra-op threads of a serving process: one user state is a tiny forward "
        "pass, which more threads slow down (measured 8 ms with 2, 1 ms with 1).",
    )
    impressions_linger_ms: int = Field(
        1_000,
        ge=0,
        le=60_000,
        description="How long the decision log's producer gathers responses into one batch for the "
        "impressions topic. Each broker request costs CPU on the serving machine's cores: at 100k "
        "items with two processes, the API's p99 was 12.3 and 30.3 ms at 5 ms against 10.3 ms at "
        "1000 ms (bench/serving_latency.py --impressions-linger-ms). "
        "Events posted to the API have their own producer and are sent at once.",
    )
    max_request_bytes: int = Field(
        1_048_576,
        ge=65_536,
        le=256 * 1_048_576,
        description="Largest body POST /v1/events accepts; a larger one is a 413 before anything is "
        "parsed (its Content-Length, or the bytes counted as a chunked body streams in).",
    )
    max_request_events: int = Field(
        1_000,
        ge=1,
        le=1_000_000,
        description="Most events one POST /v1/events may hold; more is a 413 before any is validated.",
    )
    max_errors_listed: int = Field(
        20,
        ge=1,
        le=10_000,
        description="Most errors a 422 lists; the rest are counted (`omitted`), so an error body "
        "stays small however bad the request.",
    )
    max_head_bytes: int = Field(
        16_384,
        ge=1_024,
        le=1_048_576,
        description="Largest request line plus headers; a larger head is answered 431 and the "
        "connection closed.",
    )
    head_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="Longest a request's line and headers may take to arrive once begun; a slower "
        "one has its connection closed.",
    )
    keep_alive_s: int = Field(
        5,
        ge=1,
        le=3_600,
        description="An idle connection (a new one that sent nothing yet, or one between requests) "
        "is closed after this many seconds.",
    )
    publish_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="How long POST /v1/events waits for Kafka to acknowledge its events before it "
        "answers 503; a record not delivered by then is given up (never delivered later).",
    )
    ready_max_lag: int = Field(
        1_000,
        ge=0,
        description="GET /readyz is 503 while the replica's stream state is more than this many "
        "messages behind the end of its topics.",
    )
    bootstrap: bool = Field(
        True,
        description="A replica's stream state starts from the newest snapshots of the stream workers' "
        "changelog (state.<roles> of FRESHREC_STREAM__GROUP_ID, every role in one group) or its own, "
        "whichever is further on, then follows the topics; off: it reads the topics from offset 0.",
    )
    ready_kafka_timeout_s: float = Field(
        1.0,
        gt=0,
        le=30,
        description="How long GET /readyz waits for Kafka to answer (a metadata request and the "
        "topics' end offsets), checked at most once a second.",
    )
    dashboard_retry_s: float = Field(
        5.0,
        ge=0,
        description="After ClickHouse could not be reached, how long the dashboard waits before "
        "trying again (its data routes answer 503 meanwhile; serving never needs ClickHouse).",
    )


class Settings(BaseSettings):
    """All of freshrec's configuration. Build it once, in the CLI, and pass it down."""

    model_config = SettingsConfigDict(
        env_prefix="FRESHREC_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    home: Path = Field(
        default_factory=lambda: _xdg("XDG_DATA_HOME", ".local/share") / "freshrec",
        description="State: the local broker's data, the embedded ClickHouse, checkpoints.",
    )
    cache_dir: Path = Field(
        default_factory=lambda: _xdg("XDG_CACHE_HOME", ".cache") / "freshrec",
        description="Downloads that can be made again: the broker's jars, datasets.",
    )
    kafka_bootstrap: str | None = Field(
        None, description="Kafka bootstrap servers; unset means the local broker on broker_port."
    )
    kafka_options: dict[str, str] = Field(
        default_factory=dict, description="Extra librdkafka options (JSON object), e.g. SASL/TLS."
    )
    broker_port: int = Field(9092, ge=1, le=65535, description="Local broker's client port.")
    broker_controller_port: int | None = Field(
        None, ge=1, le=65535, description="Local broker's KRaft controller port (default broker_port+1)."
    )
    broker_heap: str = Field("1g", description="Local broker's JVM heap (-Xmx).")
    broker_partitions: int = Field(4, ge=1, le=1024, description="Partitions of each freshrec topic.")
    clickhouse_dsn: str | None = Field(
        None,
        description="clickhouse-connect DSN: chdb:///path (embedded) or http(s)://host:8123; "
        "unset means chdb://$FRESHREC_HOME/clickhouse.",
    )
    clickhouse_database: str = Field(
        "freshrec", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", description="ClickHouse database."
    )
    clickhouse_connect_timeout_s: int = Field(
        5,
        ge=1,
        le=600,
        description="Longest wait for a TCP connection to a ClickHouse server (not chDB) before the "
        "call fails with StoreUnavailable.",
    )
    clickhouse_query_timeout_s: int = Field(
        60,
        ge=1,
        le=86_400,
        description="Longest wait for a ClickHouse server (not chDB) to answer one query or insert: "
        "a server that accepts connections and never answers fails the call after this long "
        "instead of hanging the caller.",
    )
    topic_prefix: str = Field(
        "", pattern=r"^[A-Za-z0-9._-]{0,100}$", description="Prefix of every topic name."
    )
    datasets_dir: Path | None = Field(
        default_factory=default_datasets_dir,
        description="Where datasets are read from (default ../shared/data when it exists).",
    )
    api_host: str = Field("127.0.0.1", description="HTTP API address.")
    api_port: int = Field(8000, ge=1, le=65535, description="HTTP API port.")
    api_token: SecretStr | None = Field(None, description="Bearer token required by the HTTP API.")
    max_future_skew_ms: int = Field(
        600_000, ge=0, description="How far in the future an event's ts may be before it is rejected."
    )
    sink: SinkSettings = Field(default_factory=SinkSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)

    @property
    def topics(self) -> Topics:
        return Topics(prefix=self.topic_prefix)

    @property
    def bootstrap(self) -> str:
        """The Kafka bootstrap address in force: the configured cluster, else the local broker."""
        return self.kafka_bootstrap or f"127.0.0.1:{self.broker_port}"

    @property
    def uses_local_broker(self) -> bool:
        return self.kafka_bootstrap is None

    @property
    def controller_port(self) -> int:
        return self.broker_controller_port or self.broker_port + 1

    @property
    def dsn(self) -> str:
        return self.clickhouse_dsn or f"chdb://{self.home / 'clickhouse'}"

    def kafka_config(self, **overrides: Any) -> dict[str, Any]:
        """librdkafka configuration: bootstrap, pass-through options, then per-client overrides."""
        return {"bootstrap.servers": self.bootstrap, **self.kafka_options, **overrides}

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict that is safe to log: secrets and credentials masked."""
        data = self.model_dump(mode="json")
        data["api_token"] = "***" if self.api_token else None
        data["kafka_options"] = {
            key: "***" if any(hint in key.lower() for hint in _SECRET_HINTS) else value
            for key, value in self.kafka_options.items()
        }
        if "@" in (dsn := self.dsn):
            scheme, _, rest = dsn.partition("://")
            data["clickhouse_dsn"] = f"{scheme}://***@{rest.rpartition('@')[2]}"
        return data

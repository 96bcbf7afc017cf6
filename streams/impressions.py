"""The decision log: the ``impressions`` topic → ClickHouse ``impressions``, one row per served item.

Each message is one response of the API (:func:`encode_impression`): request id, user, policy, model
version, latency, the items in order with their score, source, explore flag and propensity, and the
response's :class:`Exploration`: what its policy could have shown and with which chance, so that
another policy can be evaluated on the same traffic (``freshrec eval ips --policy``). The record is
stored once per response, in the ``exploration`` column of its position-0 row. The sink writes one
row per item, exactly once across crashes by the same rule as the audit sink: rows
carry their Kafka ``(topic, partition, offset)``, and on assignment the sink reads the highest offset
each table holds for the partition (``I`` in ``impressions``, ``D`` in ``dead_letters``). A message
that is not a well-formed impression (only freshrec writes this topic, so a bug or a stranger) goes to
``dead_letters`` with reason ``bad_impression``: nothing is lost. A batch inserts its impressions
before its dead letters, so after a kill between the two a well-formed message is skipped when at or
below ``I``, a malformed one when at or below ``D``. A ClickHouse outage stalls the sink (retries with
backoff, :mod:`streams.outage`); offsets are stored only once a batch is written.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from confluent_kafka import Consumer, Message, TopicPartition

from freshrec.dead_letters import DEAD_LETTER_COLUMNS, DeadLetter
from freshrec.faults import fault_point
from freshrec.settings import Settings
from freshrec.store import Store
from streams.admin import check_consume_error, ensure_topics
from streams.consume import consume_loop
from streams.outage import StoreRetry

__all__ = [
    "IMPRESSION_COLUMNS",
    "Exploration",
    "Impression",
    "ImpressionSink",
    "ServedItem",
    "decode_impression",
    "encode_impression",
    "impression_rows",
]

logger = logging.getLogger(__name__)

IMPRESSION_COLUMNS = (
    "request_id", "user_id", "position", "item_id", "score", "source", "explore", "propensity",
    "policy", "model_version", "latency_ms", "served_at", "exploration", "topic", "partition", "offset",
)  # fmt: skip

_QUANTUM = 100_000  # CTR means and UCB bonuses travel as integers in units of 1e-5


@dataclass(frozen=True)
class Exploration:
    """What a response's policy could have shown, with enough of its state to recompute the chance of
    any item under this policy or another one (other parameters, another policy) on the same request.

    ``pool`` lists the fused ranking's first ``ranked`` items in order, then the other items the
    exploration could draw (young index rows, new arrivals). ``mean`` is each pool item's CTR
    posterior mean and ``bonus`` its uncertainty bonus per unit of ``ucb_c`` (the posterior's sd +
    0.1 x the embedding's uncertainty): the uncertainty policy's softmax is
    ``softmax((mean + ucb_c * bonus) / temperature)`` over the pool past the exploit slots.
    ``catalogue`` counts what epsilon draws from uniformly. ``params`` holds the policy's parameters
    (``explore_fraction``, ``ucb_c``, ``temperature``, ``epsilon``). Policies that draw no pool log
    the ranking's first ``k`` items only.

    On the wire, mean and bonus are integers in units of 1e-5 (a softmax logit moves by at most
    1e-5 / temperature): about 20 bytes per pool item with its id.

    >>> e = Exploration("uncertainty", {"ucb_c": 2.0}, k=2, catalogue=9, ranked=2, pool=["a", "b", "c"],
    ...                 mean=np.array([0.1, 0.05, 0.2]), bonus=np.array([0.0, 0.3, 0.123456]))
    >>> Exploration.from_json(e.to_json()).bonus.tolist()
    [0.0, 0.3, 0.12346]
    """

    policy: str
    params: dict[str, float]
    k: int
    catalogue: int
    ranked: int
    pool: list[str]
    mean: npt.NDArray[np.float64]  # (len(pool),)
    bonus: npt.NDArray[np.float64]  # (len(pool),)

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "params": self.params,
            "k": self.k,
            "catalogue": self.catalogue,
            "ranked": self.ranked,
            "pool": self.pool,
            "mean_e5": np.rint(self.mean * _QUANTUM).astype(np.int64).tolist(),
            "bonus_e5": np.rint(self.bonus * _QUANTUM).astype(np.int64).tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Exploration:
        """The record of :meth:`to_json`; ``ValueError`` if it is not one."""
        try:
            pool = [str(item) for item in data["pool"]]
            record = cls(
                policy=str(data["policy"]),
                params={str(k): float(v) for k, v in dict(data["params"]).items()},
                k=int(data["k"]),
                catalogue=int(data["catalogue"]),
                ranked=int(data["ranked"]),
                pool=pool,
                mean=np.asarray(data["mean_e5"], dtype=np.float64) / _QUANTUM,
                bonus=np.asarray(data["bonus_e5"], dtype=np.float64) / _QUANTUM,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an exploration record: {exc!r}") from exc
        if not (len(record.mean) == len(record.bonus) == len(pool)) or not 0 <= record.ranked <= len(pool):
            raise ValueError("not an exploration record: pool, mean_e5 and bonus_e5 differ in length")
        return record

    @classmethod
    def decode(cls, text: str) -> Exploration | None:
        """The ``exploration`` column's value (empty: the response logged none)."""
        return cls.from_json(orjson.loads(text)) if text else None


@dataclass(frozen=True, slots=True)
class ServedItem:
    """One slot of a response: what the API returns, the decision log records and evaluation scores."""

    item_id: str
    score: float
    source: str  # transformer, cooccurrence, popular, explore
    explore: bool
    propensity: float  # the probability the policy had of putting this item in this slot

    def to_json(self) -> dict[str, str | float | bool]:
        """The item as the API's JSON and the impressions message carry it."""
        return {
            "item_id": self.item_id,
            "score": self.score,
            "source": self.source,
            "explore": self.explore,
            "propensity": self.propensity,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServedItem:
        return cls(
            item_id=str(data["item_id"]),
            score=float(data["score"]),
            source=str(data["source"]),
            explore=bool(data["explore"]),
            propensity=float(data["propensity"]),
        )


@dataclass(frozen=True, slots=True)
class Impression:
    """One message of the ``impressions`` topic: a response as it was served."""

    request_id: str
    user_id: str
    policy: str
    model_version: int
    latency_ms: float
    served_at: datetime
    items: list[ServedItem]
    exploration: Exploration | None


def decode_impression(value: bytes, *, exploration: bool = True) -> Impression:
    """Inverse of :func:`encode_impression`; ``ValueError`` when ``value`` is not an impression.
    ``exploration=False`` skips the record (the CTR counters need only the items)."""
    try:
        data = orjson.loads(value)
        record = data.get("exploration") if exploration else None
        return Impression(
            request_id=str(data["request_id"]),
            user_id=str(data["user_id"]),
            policy=str(data["policy"]),
            model_version=int(data["model_version"]),
            latency_ms=float(data["latency_ms"]),
            served_at=datetime.fromtimestamp(int(data["served_at"]) / 1000, UTC),
            items=[ServedItem.from_json(item) for item in data["items"]],
            exploration=None if record is None else Exploration.from_json(record),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"not an impression: {exc}") from exc


def encode_impression(
    *,
    request_id: str,
    user_id: str,
    policy: str,
    model_version: int,
    latency_ms: float,
    items: list[ServedItem],
    served_at_ms: int | None = None,
    exploration: Exploration | None = None,
) -> bytes:
    """One response as the JSON message of the ``impressions`` topic."""
    message = {
        "request_id": request_id,
        "user_id": user_id,
        "policy": policy,
        "model_version": model_version,
        "latency_ms": latency_ms,
        "served_at": served_at_ms or int(time.time() * 1000),
        "items": [item.to_json() for item in items],
    }
    if exploration is not None:
        message["exploration"] = exploration.to_json()
    return orjson.dumps(message)


def impression_rows(value: bytes) -> list[tuple[Any, ...]]:
    """The table rows (without Kafka coordinates) of one message; ``ValueError`` if malformed (a
    bad exploration record included, so that it is dead-lettered, not stored)."""
    impression = decode_impression(value)
    record = impression.exploration
    exploration = "" if record is None else orjson.dumps(record.to_json()).decode()
    return [
        (
            impression.request_id,
            impression.user_id,
            position,
            item.item_id,
            item.score,
            item.source,
            item.explore,
            item.propensity,
            impression.policy,
            impression.model_version,
            impression.latency_ms,
            impression.served_at,
            exploration if position == 0 else "",
        )
        for position, item in enumerate(impression.items)
    ]


class ImpressionSink:
    """``impressions`` → ClickHouse, exactly once; see the module docstring."""

    def __init__(self, *, settings: Settings, store: Store) -> None:
        self._settings = settings
        self._store = store
        self._topic = settings.topics.impressions
        self._stop = threading.Event()
        self._stored: dict[int, int] = {}  # partition → highest offset in impressions
        self._stored_dead: dict[int, int] = {}  # partition → highest offset in dead_letters
        sink = settings.sink
        self.retry = StoreRetry(stop=self._stop, initial_s=sink.retry_initial_s, max_s=sink.retry_max_s,
                                name="impressions sink")  # fmt: skip
        self._assigned_at = 0.0
        self.rows = 0
        self.bad = 0

    def stop(self) -> None:
        self._stop.set()

    def run(self, *, until_idle_s: float | None = None) -> int:
        ensure_topics(self._settings)
        consumer = Consumer(
            self._settings.kafka_config(
                **{
                    "group.id": f"{self._settings.sink.group_id}.impressions",
                    "auto.offset.reset": "earliest",
                    "enable.auto.commit": True,
                    "enable.auto.offset.store": False,
                    "session.timeout.ms": self._settings.sink.session_timeout_ms,
                    "log_level": 3,
                }
            )
        )
        consumer.subscribe([self._topic], on_assign=self._on_assign)
        try:
            consume_loop(
                consumer,
                batch_size=self._settings.sink.batch_size,
                timeout_s=self._settings.sink.batch_timeout_s,
                stop=self._stop,
                on_batch=lambda messages: self._process(consumer, messages),
                until_idle_s=until_idle_s,
                assigned_at=lambda: self._assigned_at,
            )
        finally:
            consumer.close()
        return self.rows

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned_at = time.monotonic()
        numbers = [tp.partition for tp in partitions]
        self._stored.update(self._max_offsets("impressions", numbers))
        self._stored_dead.update(self._max_offsets("dead_letters", numbers))

    def _max_offsets(self, table: str, partitions: list[int]) -> dict[int, int]:
        query = (
            f"SELECT partition, max(offset) FROM {self._store.table(table)} "
            "WHERE topic = {topic:String} AND partition IN {p:Array(UInt32)} GROUP BY partition"
        )
        parameters = {"topic": self._topic, "p": partitions}
        rows = self.retry(f"read the stored offsets of {table}", lambda: self._store.rows(query, parameters))
        return {int(p): int(o) for p, o in rows}

    def _process(self, consumer: Consumer, messages: list[Message]) -> None:
        columns: list[list[Any]] = [[] for _ in IMPRESSION_COLUMNS]
        dead: list[list[Any]] = [[] for _ in DEAD_LETTER_COLUMNS]
        offsets: dict[int, int] = {}
        now = datetime.now(UTC)
        for message in messages:
            error = message.error()
            if error is not None:
                check_consume_error(error)
                continue
            partition: int = message.partition()  # type: ignore[assignment]
            offset: int = message.offset()  # type: ignore[assignment]
            offsets[partition] = offset + 1
            value = message.value() or b""
            try:
                rows = impression_rows(value)
            except ValueError as exc:
                if offset <= self._stored_dead.get(partition, -1):
                    continue  # dead-lettered before a crash
                self.bad += 1
                letter = DeadLetter.of(
                    message, reason="bad_impression", detail=str(exc)[:500], received_at=now
                )
                for column, cell in zip(dead, letter.row(), strict=True):
                    column.append(cell)
                continue
            if offset <= self._stored.get(partition, -1):
                continue  # written before a crash
            for row in rows:
                for column, cell in zip(columns, (*row, self._topic, partition, offset), strict=True):
                    column.append(cell)
        if columns[0]:
            self.retry(
                "insert into impressions",
                lambda: self._store.insert("impressions", columns, column_names=IMPRESSION_COLUMNS),
            )
            self.rows += len(columns[0])
        fault_point("impressions.after_impressions_insert")
        if dead[0]:
            self.retry(
                "insert into dead_letters",
                lambda: self._store.insert("dead_letters", dead, column_names=DEAD_LETTER_COLUMNS),
            )
        if offsets:
            consumer.store_offsets(offsets=[TopicPartition(self._topic, p, o) for p, o in offsets.items()])

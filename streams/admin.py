"""Kafka administration: the topics freshrec needs, created idempotently with their partitions."""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from freshrec.errors import KafkaUnavailable
from freshrec.settings import Settings

__all__ = ["check_consume_error", "ensure_topics"]

logger = logging.getLogger(__name__)

# Model updates can be large: allow up to 8 MiB per message on those topics (chunks stay below it).
# `events` stamps messages with the broker's append time: the sink measures future skew against it,
# which keeps validation deterministic when a crashed sink replays (see streams.sink).
_TOPIC_CONFIG: dict[str, dict[str, str]] = {
    "events": {"message.timestamp.type": "LogAppendTime"},
    "model.sparse": {"max.message.bytes": str(8 * 1024 * 1024)},
    "model.dense": {"max.message.bytes": str(8 * 1024 * 1024)},
}
# A model's version chain must stay in order: its topics have one partition whatever the setting.
_SINGLE_PARTITION = frozenset({"model.sparse", "model.dense"})


def ensure_topics(settings: Settings, *, timeout_s: float = 30.0) -> list[str]:
    """Create any of freshrec's topics that do not exist yet. Returns the names created."""
    admin = AdminClient(settings.kafka_config(log_level=3))
    try:
        existing = set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException as exc:
        raise KafkaUnavailable(
            f"cannot reach Kafka at {settings.bootstrap}: {exc}. Is the broker running "
            "(`freshrec broker start`), or is FRESHREC_KAFKA_BOOTSTRAP right?"
        ) from exc
    topics = settings.topics
    wanted = {name: _TOPIC_CONFIG.get(name.removeprefix(topics.prefix), {}) for name in topics.all()}
    new = [
        NewTopic(
            name,
            num_partitions=1
            if name.removeprefix(topics.prefix) in _SINGLE_PARTITION
            else settings.broker_partitions,
            replication_factor=-1,
            config=config,
        )
        for name, config in wanted.items()
        if name not in existing
    ]
    if not new:
        return []
    created = []
    for name, future in admin.create_topics(new, operation_timeout=timeout_s).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":  # a concurrent creator won the race
                raise KafkaUnavailable(f"cannot create topic {name}: {exc}") from exc
    logger.info("created topics %s", ", ".join(created))
    return created


def check_consume_error(error: KafkaError) -> None:
    """What every consume loop does with a message's error: raise a fatal one, log the rest (the
    client retries them), stay quiet about reaching a partition's end."""
    if error.fatal():
        raise KafkaUnavailable(f"fatal consumer error: {error}")
    if error.code() != KafkaError._PARTITION_EOF:
        logger.warning("consumer error (will retry): %s", error)

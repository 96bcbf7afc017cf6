"""User histories as training data for the sequential transformer.

Where histories come from: a dataset's records (offline training), or the freshest window of the
audit log, ClickHouse ``events`` (the scheduled fine-tune; it works with no stream worker running).
How they are cut: the leave-last-out split of the HSTU repository's protocol (last item for test, the
one before for validation, the rest for training) and fixed-length, left-padded training windows.

>>> split = leave_last_out({"u": ["a", "b", "c", "d"], "short": ["a", "b"]})
>>> split.train, split.valid, split.test
({'u': ['a', 'b'], 'short': ['a', 'b']}, {'u': 'c'}, {'u': 'd'})
>>> inputs, targets = windows([[1, 2, 3, 4, 5]], max_len=3)
>>> inputs.tolist(), targets.tolist()
([[2, 3, 4], [0, 0, 1]], [[3, 4, 5], [0, 0, 2]])
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import orjson

from freshrec.datasets import Record
from freshrec.store import Store

__all__ = [
    "LEARNED_TYPES",
    "Split",
    "last_window",
    "leave_last_out",
    "sequences_from_events",
    "sequences_from_records",
    "sequences_from_store",
    "windows",
]

# Event types that say "the user chose this item": the transformer learns the next of these.
LEARNED_TYPES: tuple[str, ...] = ("view", "click", "purchase", "rating")

Sequences = dict[str, list[str]]


@dataclass(frozen=True, slots=True)
class Split:
    """Leave-last-out: ``train`` prefixes; ``valid``/``test`` targets of users with ≥ 3 items."""

    train: Sequences
    valid: dict[str, str]
    test: dict[str, str]


def sequences_from_events(events: Iterable[tuple[str, str, int]]) -> Sequences:
    """``(user, item, ts_ms)`` → each user's items in time order (ties keep arrival order)."""
    stamped: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for index, (user, item, ts) in enumerate(events):
        stamped[user].append((ts, index, item))
    return {user: [item for _, _, item in sorted(rows)] for user, rows in stamped.items()}


def sequences_from_records(records: Sequence[Record], *, types: Sequence[str] = LEARNED_TYPES) -> Sequences:
    """Histories from a dataset's Kafka records (those of the learned types)."""
    wanted = set(types)
    events = []
    for record in records:
        value = orjson.loads(record.value)
        if value.get("type") in wanted:
            events.append((str(value["user_id"]), str(value["item_id"]), int(record.ts_ms or 0)))
    return sequences_from_events(events)


def sequences_from_store(
    store: Store, *, last_events: int, types: Sequence[str] = LEARNED_TYPES
) -> tuple[Sequences, int]:
    """The freshest window of ClickHouse ``events``: its last ``last_events`` events of the learned types.

    Returns the histories and how many events they hold. Reads ``FINAL`` so that a row the sink
    wrote twice counts once.
    """
    rows = store.rows(
        f"SELECT user_id, item_id, toUnixTimestamp64Milli(ts) AS t FROM {store.table('events')} FINAL "
        "WHERE type IN {types:Array(String)} ORDER BY ts DESC, event_id DESC LIMIT {n:UInt64}",
        {"types": list(types), "n": last_events},
    )
    rows.reverse()
    return sequences_from_events((str(u), str(i), int(t)) for u, i, t in rows), len(rows)


def leave_last_out(sequences: Sequences) -> Split:
    """Split each history: the last item for test, the one before for validation, the rest to train.

    Users with fewer than three items only train (as in the HSTU repository's preprocessing).
    """
    train: Sequences = {}
    valid: dict[str, str] = {}
    test: dict[str, str] = {}
    for user, items in sequences.items():
        if len(items) < 3:
            train[user] = list(items)
            continue
        train[user] = items[:-2]
        valid[user] = items[-2]
        test[user] = items[-1]
    return Split(train, valid, test)


def windows(
    sequences: Iterable[Sequence[int]], *, max_len: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Next-item training windows: (inputs, targets), each (M, max_len), left-padded with row 0.

    A history longer than ``max_len + 1`` is cut into consecutive windows from its end, so that every
    transition is learned once per epoch (SASRec keeps only the last window; long MovieLens
    histories would lose most of their data).
    """
    inputs: list[npt.NDArray[np.int64]] = []
    targets: list[npt.NDArray[np.int64]] = []
    for items in sequences:
        seq = np.asarray(items, dtype=np.int64)
        end = len(seq)
        while end >= 2:
            start = max(0, end - max_len - 1)
            chunk = seq[start:end]
            pad = max_len - (len(chunk) - 1)
            inputs.append(np.pad(chunk[:-1], (pad, 0)))
            targets.append(np.pad(chunk[1:], (pad, 0)))
            end = start + 1 if start > 0 else 0
    if not inputs:
        empty = np.zeros((0, max_len), dtype=np.int64)
        return empty, empty.copy()
    return np.stack(inputs), np.stack(targets)


def last_window(items: Sequence[int], *, max_len: int) -> npt.NDArray[np.int64]:
    """The most recent ``max_len`` rows of a history, left-padded: the model's input for a user."""
    seq = np.asarray(items[-max_len:], dtype=np.int64)
    return np.pad(seq, (max_len - len(seq), 0))

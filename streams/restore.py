"""Which snapshots a partition starts from: its own group's, or another group's that is further on.

A partition may have a snapshot in this group's changelog and in others' (the stream workers' group
a serving replica bootstraps from, or one group per role when the roles run apart). Each part of a
store (a role) comes from the snapshot furthest on among those that keep it, this group's own on a
tie; parts from several snapshots are loaded each from its own, and the store catches the others up
(:meth:`~streams.stores.PartitionStore.load_parts`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from freshrec.settings import Settings
from streams.changelog import Changelog, Snapshot
from streams.state_codec import gc_paused
from streams.stores import PartitionStore

__all__ = ["Candidate", "bootstrap_candidates", "load_newest", "position"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, eq=False)
class Candidate:
    """A snapshot a partition may start from, the roles its group keeps, and whether it is this
    group's own."""

    snapshot: Snapshot
    roles: frozenset[str]
    own: bool = False

    def state(self) -> dict[str, Any]:
        return self.snapshot.state()


def position(snapshot: Snapshot, *, events: str, impressions: str) -> tuple[int, int]:
    """How far into its partition a snapshot is: its ``events`` offset, then its ``impressions``
    one (a partition's snapshots of one stream are ordered by both alike)."""
    offsets = snapshot.offsets
    return offsets.get(events, 0), offsets.get(impressions, 0)


def load_newest(
    partition: int,
    candidates: list[Candidate],
    *,
    roles: frozenset[str],
    new_store: Callable[[], PartitionStore],
    events: str,
    impressions: str,
) -> tuple[PartitionStore, list[Candidate]]:
    """A store of ``partition`` built from the snapshots furthest on, and the ones it used.

    Each part (role) comes from the snapshot furthest on among those that keep it (this group's
    own on a tie). When one snapshot gives every part, it is loaded whole; when the parts come
    from several (stream workers split by role), each is loaded from its own and the store
    catches the others up (:meth:`~streams.stores.PartitionStore.load_parts`). A bootstrap
    snapshot that cannot be loaded (without a head this worker keeps) is left out, with a log
    line; this group's own must load."""
    options = list(candidates)
    while True:
        chosen: dict[str, Candidate] = {}
        for role in roles:
            keeping = [c for c in options if role in c.roles]
            if keeping:
                chosen[role] = max(
                    keeping, key=lambda c: position(c.snapshot, events=events, impressions=impressions)
                )
        if set(chosen) != roles:  # no own snapshot, and the others do not keep every part
            if options:
                logger.warning(
                    "partition %d: the stream state found (%s) does not keep %s: reading from offset 0",
                    partition,
                    ", ".join(sorted({role for c in options for role in c.roles})),
                    ", ".join(sorted(roles - set(chosen))),
                )
            return new_store(), []
        used = list({id(c): c for c in chosen.values()}.values())
        store = new_store()
        states: dict[int, dict[str, Any]] = {}
        try:
            with gc_paused():
                for candidate in used:
                    states[id(candidate)] = candidate.state()
                if len(used) == 1:
                    store.load_state_dict(states[id(used[0])])
                else:
                    store.load_parts({r: states[id(c)] for r, c in chosen.items()}, events=events)
        except ValueError as exc:
            culprit = _unloadable(chosen, states, new_store) if len(used) > 1 else used[0]
            if culprit is None or culprit.own:
                raise
            logger.warning(
                "partition %d cannot start from another group's snapshot (%s): trying the next",
                partition,
                exc,
            )
            options = [c for c in options if c is not culprit]
            continue
        if len(used) == 1 and store.offsets != used[0].snapshot.offsets:
            raise ValueError(f"snapshot of partition {partition} names other offsets than it holds")
        return store, used


def _unloadable(
    chosen: Mapping[str, Candidate],
    states: Mapping[int, dict[str, Any]],
    new_store: Callable[[], PartitionStore],
) -> Candidate | None:
    """The first snapshot whose part cannot be loaded (the slow path of a failed restore)."""
    for role, candidate in chosen.items():
        state = states.get(id(candidate))
        try:
            if state is None:  # its payload did not decode
                return candidate
            new_store().load_part(state, role)
        except ValueError:
            return candidate
    return None


def bootstrap_candidates(
    settings: Settings,
    bootstrap: Mapping[str, frozenset[str]],
    sources: MutableMapping[str, Changelog],
    partitions: Collection[int] | None,
) -> list[Candidate]:
    """The newest complete snapshot of each of ``partitions`` in each bootstrap changelog (topic →
    the roles its group keeps) that exists on the broker, opened once into ``sources``; when none
    exists, that is said in the log (once per restore)."""
    found: list[Candidate] = []
    missing: list[str] = []
    for topic, roles in bootstrap.items():
        source = sources.get(topic)
        if source is None:
            source = Changelog(settings, topic=topic, create=False)
            if not source.partitions:
                missing.append(topic)
                continue
            sources[topic] = source
        found.extend(Candidate(s, roles) for s in source.restore(partitions).values())
    if missing and not found:
        logger.warning(
            "no stream state to bootstrap from (%s not on the broker): reading the partitions "
            "from this group's last snapshot, or offset 0",
            ", ".join(missing),
        )
    return found

"""The snapshot store: every recent published version, whole, in files under ``$FRESHREC_HOME/models``.

Why files beside the Kafka topics: a replica that finds a gap in the chain, or an update that fails
its checksum, needs the *newest* whole version at once, and a rollback needs an *older* one exactly;
re-reading topics from the beginning gives neither cheaply. The publisher writes each version here
once its Kafka transaction has committed (so no version that failed to go out is ever healed to); a replica
that finds a gap heals to the newest version here, and waits for the next gap check if that is not
newer than what it has.
Files are written atomically (temporary file, fsync, rename) in the same ``.npz`` format as the
updates (:func:`publishers.updates.encode` of a snapshot), and the oldest are pruned past ``keep``.

In the docker-compose stack the folder is a volume shared by ``train`` and ``serve``; a replica on a
host without it still bootstraps from the snapshots published on ``model.dense``.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

from freshrec.errors import ConfigError
from freshrec.settings import Settings
from publishers.updates import ModelVersion, apply, decode, encode, snapshot_update

__all__ = ["SnapshotStore"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^v(\d{10})\.npz$")
_TMP_PREFIX = ".tmp-"


class SnapshotStore:
    """Whole model versions as files ``v<version>.npz``, newest ``keep`` kept."""

    def __init__(self, directory: Path, *, keep: int = 10) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.directory = directory
        self.keep = keep

    @classmethod
    def for_settings(cls, settings: Settings) -> SnapshotStore:
        """``$FRESHREC_HOME/models``, keeping ``FRESHREC_TRAIN__SNAPSHOTS_KEEP`` versions."""
        return cls(settings.home / "models", keep=settings.train.snapshots_keep)

    def versions(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        found = (_NAME.match(path.name) for path in self.directory.iterdir())
        return sorted(int(match.group(1)) for match in found if match)

    def latest_version(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def path(self, version: int) -> Path:
        return self.directory / f"v{version:010d}.npz"

    def save(self, model: ModelVersion) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.path(model.version)
        payload = encode(snapshot_update(model, parent=0))
        with tempfile.NamedTemporaryFile(dir=self.directory, prefix=_TMP_PREFIX, delete=False) as tmp:
            tmp.write(payload)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, target)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
        for old in self.versions()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)
        return target

    def clean(self) -> list[Path]:
        """Remove temporary files a writer killed mid-save left behind (call with no save under way:
        the chain's publisher, once it has fenced the previous one). Returns what it removed."""
        if not self.directory.is_dir():
            return []
        left = [path for path in self.directory.iterdir() if path.name.startswith(_TMP_PREFIX)]
        for path in left:
            path.unlink(missing_ok=True)
        if left:
            logger.warning("removed %d unfinished snapshot files from %s", len(left), self.directory)
        return left

    def load(self, version: int) -> ModelVersion:
        """Version ``version``, verified against its checksum."""
        try:
            payload = self.path(version).read_bytes()
        except FileNotFoundError as exc:
            kept = self.versions()
            raise ConfigError(
                f"model version {version} is not in the snapshot store {self.directory} "
                f"(it keeps the newest {self.keep}: {kept[0] if kept else '-'}..{kept[-1] if kept else '-'})"
            ) from exc
        return apply(None, decode(payload))

    def latest(self) -> ModelVersion | None:
        version = self.latest_version()
        return None if version is None else self.load(version)

"""Real public datasets as Kafka records in timestamp order, for ``freshrec replay``.

Where a file comes from, in order: ``FRESHREC_DATASETS_DIR`` (``../shared/data`` by default; the
``.gz`` copies there or the plain files of an unzipped download), then ``$FRESHREC_CACHE_DIR/datasets``,
then the dataset's official source, downloaded once into that cache. Whatever the source, the sha256
of the uncompressed content must match the published value: a truncated or edited copy fails loudly.
No dataset is shipped with freshrec: MovieLens' licence forbids redistribution.

Mapping to events (the contract of :mod:`freshrec.events`):

- ``ml-100k`` (``u.data``) and ``ml-latest-small`` (``ratings.csv``): one ``rating`` per line, ``value``
  = stars, ``ts`` = the rating's unix time in ms, ``event_id`` = ``"<dataset>:<user>:<item>"`` (each
  pair occurs once, so replaying a dataset twice is recognisable as duplicates).
- ``amazon-games`` (SASRec's ``Video.txt``, Amazon Video Games): ``user item`` lines, grouped by user,
  time-ordered within a user, **without timestamps**. Each line is a ``purchase`` (the source is review
  data; a review implies the product was bought). Timestamps are **synthesised**: monotone in file
  order, one second apart from 2015-01-01T00:00:00Z; :attr:`Dataset.synthetic_ts` says so.
- any other argument is a JSONL path: each non-blank line is published unchanged (an invalid line too,
  so that the sink dead-letters it: nothing is lost), ordered by its ``ts`` when readable.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson

from freshrec.errors import DatasetError, InvalidEvent
from freshrec.events import parse_ts

__all__ = ["DATASETS", "NAMES", "Dataset", "DatasetSpec", "Record", "item_titles", "load_dataset", "locate"]

logger = logging.getLogger(__name__)

AMAZON_GAMES_BASE_MS: Final = 1_420_070_400_000  # 2015-01-01T00:00:00Z
_DOWNLOAD_TIMEOUT_S: Final = 60


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record: ``key`` is the user id (orders a user's events within a partition)."""

    key: bytes | None
    value: bytes
    ts_ms: int | None


@dataclass(frozen=True, slots=True)
class Dataset:
    name: str
    records: list[Record]
    source: Path
    synthetic_ts: bool


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    """Where a dataset's file lives and how to check it.

    ``relpath`` is the file under the datasets folder (read as-is or with ``.gz``); ``url`` the
    official download; ``member`` the file inside it when it is a zip archive.
    """

    name: str
    relpath: str
    sha256: str
    url: str
    member: str | None = None


DATASETS: Final[dict[str, DatasetSpec]] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "ml-100k",
            "ml-100k/u.data",
            "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
            "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
            "ml-100k/u.data",
        ),
        DatasetSpec(
            "ml-latest-small",
            "ml-latest-small/ratings.csv",
            "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
            "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip",
            "ml-latest-small/ratings.csv",
        ),
        DatasetSpec(
            "amazon-games",
            "sasrec/Video.txt",
            "b7376fe24430743f411dc7f567285657b2adb3f74361cc7ba0aee94f3024b651",
            # The SASRec authors' repository, pinned to the commit the checksum was taken from.
            "https://raw.githubusercontent.com/kang205/SASRec/e3738967fddab206d6eeb4fda433e7a7034dd8b1/data/Video.txt",
        ),
    )
}
NAMES: Final = tuple(DATASETS)


def load_dataset(
    name_or_path: str,
    *,
    datasets_dir: Path | None,
    cache_dir: Path,
    limit: int | None = None,
    download: bool = True,
    specs: dict[str, DatasetSpec] | None = None,
) -> Dataset:
    """Read a named dataset or a JSONL file as records sorted by time (stable), first ``limit`` only."""
    specs = DATASETS if specs is None else specs
    if name_or_path in specs:
        path = locate(
            name_or_path, datasets_dir=datasets_dir, cache_dir=cache_dir, download=download, specs=specs
        )
        content = _read_text(path)
        if name_or_path == "amazon-games":
            records = _amazon_records(content)
        elif name_or_path == "ml-latest-small":
            records = _rating_records(name_or_path, _csv_rows(content))
        else:
            records = _rating_records(
                name_or_path, (line.split("\t") for line in content.splitlines() if line)
            )
        synthetic = name_or_path == "amazon-games"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise DatasetError(
                f"{name_or_path!r} is neither a known dataset ({', '.join(specs)}) nor an existing JSONL file"
            )
        records, synthetic = _jsonl_records(path), False
    return Dataset(
        name=name_or_path, records=records[:limit] if limit else records, source=path, synthetic_ts=synthetic
    )


def locate(
    name: str,
    *,
    datasets_dir: Path | None,
    cache_dir: Path,
    download: bool = True,
    specs: dict[str, DatasetSpec] | None = None,
) -> Path:
    """The verified file of a named dataset: local folder, else cache, else a download into the cache."""
    spec = (DATASETS if specs is None else specs)[name]
    candidates = []
    for root in (datasets_dir, cache_dir / "datasets"):
        if root is not None:
            candidates += [root / f"{spec.relpath}.gz", root / spec.relpath]
    for path in candidates:
        if path.is_file():
            _verify(path, spec)
            return path
    if not download:
        raise DatasetError(
            f"{name} not found (looked for {', '.join(map(str, candidates))}); set FRESHREC_DATASETS_DIR"
        )
    target = cache_dir / "datasets" / spec.relpath
    _download(spec, target)
    _verify(target, spec)
    return target


# The item catalogue beside a MovieLens ratings file: (file, column of the id, of the title, separator).
_TITLES: Final[dict[str, tuple[str, int, int, str]]] = {
    "ml-100k": ("u.item", 0, 1, "|"),
    "ml-latest-small": ("movies.csv", 0, 1, ","),
}


def item_titles(name: str, *, datasets_dir: Path | None, cache_dir: Path) -> dict[str, str]:
    """Item id → title for a MovieLens dataset whose catalogue file lies beside its ratings (as in
    ``FRESHREC_DATASETS_DIR`` or an unzipped download); empty when there is none.

    >>> item_titles("amazon-games", datasets_dir=None, cache_dir=Path("/nonexistent"))
    {}
    """
    if name not in _TITLES:
        return {}
    try:
        ratings = locate(name, datasets_dir=datasets_dir, cache_dir=cache_dir, download=False)
    except DatasetError:
        return {}
    filename, id_column, title_column, separator = _TITLES[name]
    for path in (ratings.parent / f"{filename}.gz", ratings.parent / filename):
        if path.is_file():
            text = _read_text(path)
            if separator == ",":
                rows: Iterator[list[str]] = csv.reader(io.StringIO(text))
                next(rows, None)  # the header
            else:
                rows = (line.split(separator) for line in text.splitlines())
            return {row[id_column]: row[title_column] for row in rows if len(row) > title_column}
    return {}


# ---------------------------------------------------------------------------- reading


def _read_bytes(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


def _read_text(path: Path) -> str:
    # MovieLens 100K is latin-1 in places (titles); the rating files are ASCII, so both decode alike.
    raw = _read_bytes(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _verify(path: Path, spec: DatasetSpec) -> None:
    digest = hashlib.sha256(_read_bytes(path)).hexdigest()
    if digest != spec.sha256:
        raise DatasetError(
            f"{path} fails its checksum (sha256 of the uncompressed content {digest}, expected "
            f"{spec.sha256}): the copy is truncated, edited or another release. Remove it to download again."
        )


def _download(spec: DatasetSpec, target: Path) -> None:
    logger.info("downloading %s from its official source %s", spec.name, spec.url)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(spec.url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            payload: bytes = response.read()
    except OSError as exc:
        raise DatasetError(
            f"cannot download {spec.name} from {spec.url}: {exc}. Put the file at "
            f"$FRESHREC_DATASETS_DIR/{spec.relpath} instead."
        ) from exc
    if spec.member is not None:
        try:
            with zipfile.ZipFile(io.BytesIO(payload)) as archive:
                payload = archive.read(spec.member)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DatasetError(f"the download of {spec.name} has no {spec.member}: {exc}") from exc
    # Write then rename: a crash never leaves a half-written file that looks complete.
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        tmp.write(payload)
    shutil.move(tmp.name, target)
    os.chmod(target, 0o644)


def _csv_rows(content: str) -> Iterator[list[str]]:
    rows = csv.reader(io.StringIO(content, newline=""))
    next(rows, None)  # header: userId,movieId,rating,timestamp
    return rows


def _rating_records(dataset: str, rows: Iterator[list[str]]) -> list[Record]:
    staged = []
    dumps = orjson.dumps
    for user, item, rating, seconds in rows:
        ts = int(seconds) * 1000
        event = {
            "event_id": f"{dataset}:{user}:{item}",
            "user_id": user,
            "item_id": item,
            "type": "rating",
            "ts": ts,
            "value": float(rating),
        }
        staged.append(Record(user.encode(), dumps(event), ts))
    staged.sort(key=lambda record: record.ts_ms or 0)  # stable: ties keep file order
    return staged


def _amazon_records(content: str) -> list[Record]:
    records = []
    dumps = orjson.dumps
    for index, line in enumerate(filter(None, content.splitlines())):
        user, item = line.split()
        ts = AMAZON_GAMES_BASE_MS + index * 1000
        event = {
            "event_id": f"amazon-games:{index}",
            "user_id": user,
            "item_id": item,
            "type": "purchase",
            "ts": ts,
        }
        records.append(Record(user.encode(), dumps(event), ts))
    return records


def _jsonl_records(path: Path) -> list[Record]:
    records = []
    previous_ts: int | None = None
    with path.open("rb") as lines:
        for raw_line in lines:
            value = raw_line.rstrip(b"\r\n")
            if not value.strip():
                continue
            key: bytes | None = None
            ts = previous_ts
            try:
                obj = orjson.loads(value)
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                if isinstance(user := obj.get("user_id"), str):
                    key = user.encode()
                try:
                    ts = parse_ts(obj.get("ts"))
                except InvalidEvent:
                    ts = previous_ts
            records.append(Record(key, value, ts))
            previous_ts = ts
    records.sort(key=lambda record: record.ts_ms if record.ts_ms is not None else -1)
    return records

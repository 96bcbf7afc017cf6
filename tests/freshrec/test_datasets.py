"""Dataset loaders on the real files in ../shared/data, checksums, and the download path (file://)."""

from __future__ import annotations

import gzip
import itertools
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from freshrec.datasets import DATASETS, load_dataset, locate
from freshrec.errors import DatasetError
from freshrec.settings import default_datasets_dir


@pytest.fixture(scope="module")
def data_dir() -> Path:
    path = default_datasets_dir()
    assert path is not None, "the shared datasets (../shared/data) must be beside the checkout"
    return path


def test_ml_100k(data_dir: Path, tmp_path: Path) -> None:
    started = time.perf_counter()
    data = load_dataset("ml-100k", datasets_dir=data_dir, cache_dir=tmp_path)
    assert time.perf_counter() - started < 5
    assert len(data.records) == 100_000 and not data.synthetic_ts
    assert len({r.key for r in data.records}) == 943
    stamps = [r.ts_ms for r in data.records]
    assert stamps == sorted(stamps)  # type: ignore[type-var]
    first = orjson.loads(data.records[0].value)
    assert first["ts"] == 874724710 * 1000  # the earliest timestamp in u.data
    assert set(first) == {"event_id", "user_id", "item_id", "type", "ts", "value"}
    assert first["type"] == "rating" and first["value"] in {1.0, 2.0, 3.0, 4.0, 5.0}
    assert len({orjson.loads(r.value)["event_id"] for r in data.records}) == 100_000
    assert [
        r.value for r in load_dataset("ml-100k", datasets_dir=data_dir, cache_dir=tmp_path, limit=5).records
    ] == [r.value for r in data.records[:5]]


def test_ml_latest_small(data_dir: Path, tmp_path: Path) -> None:
    data = load_dataset("ml-latest-small", datasets_dir=data_dir, cache_dir=tmp_path)
    assert len(data.records) == 100_836
    values = {orjson.loads(r.value)["value"] for r in data.records}
    assert values == {x / 2 for x in range(1, 11)}
    assert data.records[0].ts_ms == 828124615 * 1000


def test_amazon_games_has_synthetic_monotone_time(data_dir: Path, tmp_path: Path) -> None:
    data = load_dataset("amazon-games", datasets_dir=data_dir, cache_dir=tmp_path)
    assert len(data.records) == 287_107 and data.synthetic_ts
    stamps = [r.ts_ms or 0 for r in data.records]
    assert all(a < b for a, b in itertools.pairwise(stamps))
    assert len({r.key for r in data.records}) == 31_013


def test_jsonl_keeps_bad_lines_and_orders_by_ts(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        b'{"event_id":"b","user_id":"u2","item_id":"i","type":"view","ts":2000}\n'
        b"\n"
        b"not json at all\r\n"
        b'{"event_id":"a","user_id":"u1","item_id":"i","type":"view","ts":"1970-01-01T00:00:01Z"}\n'
    )
    data = load_dataset(str(path), datasets_dir=None, cache_dir=tmp_path)
    assert [r.value[:16] for r in data.records] == [
        b'{"event_id":"a",',
        b'{"event_id":"b",',
        b"not json at all",
    ]
    assert [r.key for r in data.records] == [b"u1", b"u2", None]


def test_unknown_names_and_missing_paths_say_what_is_known(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="ml-100k, ml-latest-small, amazon-games"):
        load_dataset("ml-1m", datasets_dir=None, cache_dir=tmp_path)


def test_a_corrupt_copy_fails_its_checksum(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "ml-100k").mkdir()
    lines = gzip.decompress((data_dir / "ml-100k" / "u.data.gz").read_bytes()).splitlines(keepends=True)
    (tmp_path / "ml-100k" / "u.data").write_bytes(b"".join(lines[:-1]))  # one line short
    with pytest.raises(DatasetError, match="fails its checksum"):
        load_dataset("ml-100k", datasets_dir=tmp_path, cache_dir=tmp_path / "cache", download=False)


def test_download_from_the_official_zip_layout(data_dir: Path, tmp_path: Path) -> None:
    """The download path, pointed at a local zip laid out like GroupLens's (no network here)."""
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-100k/u.data", gzip.decompress((data_dir / "ml-100k" / "u.data.gz").read_bytes()))
    specs = {"ml-100k": replace(DATASETS["ml-100k"], url=archive.as_uri())}
    cache = tmp_path / "cache"
    path = locate("ml-100k", datasets_dir=tmp_path / "empty", cache_dir=cache, specs=specs)
    assert path == cache / "datasets" / "ml-100k" / "u.data"
    data = load_dataset("ml-100k", datasets_dir=None, cache_dir=cache, download=False)
    assert len(data.records) == 100_000
    with pytest.raises(DatasetError, match="cannot download"):
        broken = {"ml-100k": replace(DATASETS["ml-100k"], url=(tmp_path / "missing.zip").as_uri())}
        locate("ml-100k", datasets_dir=None, cache_dir=tmp_path / "other", specs=broken)

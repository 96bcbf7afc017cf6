"""`freshrec train` and `freshrec model` end to end, as a user runs them (each its own process)."""

from __future__ import annotations

import gzip
import math
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest
from support import cli_env, freshrec_cli, sql_json

from freshrec.settings import Settings


def test_train_once_publishes_and_model_commands_list_and_roll_back(
    settings: Settings, tmp_path: Path
) -> None:
    env = cli_env(settings, dsn=f"chdb://{tmp_path / 'train-db'}")
    env.update({"FRESHREC_TRAIN__DIM": "16", "FRESHREC_TRAIN__BLOCKS": "1", "FRESHREC_TRAIN__EPOCHS": "1"})
    # Nothing ingested yet: a clear, retryable refusal, and the failure is on record.
    empty = freshrec_cli("train", "--once", env=env, check=False)
    assert empty.returncode == 1 and "nothing to learn yet" in " ".join(empty.stderr.split())
    freshrec_cli("replay", "ml-100k", "--limit", "3000", env=env)
    freshrec_cli("sink", "--until-idle", "2", env=env)

    first = orjson.loads(freshrec_cli("train", "--once", "--json", env=env).stdout)
    assert first["events"] == 3000 and first["steps"] > 0 and first["warm_started_from"] is None
    assert [(p["version"], p["kind"]) for p in first["published"]] == [(1, "snapshot")]
    second = orjson.loads(freshrec_cli("train", "--once", "--json", env=env).stdout)
    assert second["warm_started_from"] == 1
    assert [(p["version"], p["kind"], p["parent"]) for p in second["published"]] == [(2, "sparse", 1)]
    assert 0 < second["published"][0]["rows"] <= first["published"][0]["rows"]

    rolled = orjson.loads(freshrec_cli("model", "rollback", "--to", "1", "--json", env=env).stdout)
    assert (rolled["version"], rolled["parent"], rolled["kind"], rolled["rollback_of"]) == (
        3,
        2,
        "snapshot",
        1,
    )
    listed = orjson.loads(freshrec_cli("model", "list", "--json", env=env).stdout)
    assert [set(u) for u in listed] == [{"version", "parent", "kind", "bytes", "rows", "created_at"}] * 3
    assert [(u["version"], u["parent"], u["kind"]) for u in listed] == [
        (1, 0, "snapshot"),
        (2, 1, "sparse"),
        (3, 2, "snapshot"),
    ]
    assert listed[1]["bytes"] < listed[0]["bytes"]  # the delta is smaller than the model
    runs = sql_json("SELECT kind, status, events FROM training_runs ORDER BY started_at", env=env)
    assert [(r["kind"], r["status"], r["events"]) for r in runs] == [
        ("finetune", "failed", 0),
        ("finetune", "ok", 3000),
        ("finetune", "ok", 3000),
    ]
    missing = freshrec_cli("model", "rollback", "--to", "99", env=env, check=False)
    assert missing.returncode == 1 and "not in the snapshot store" in " ".join(missing.stderr.split())


def test_train_offline_prints_the_promised_json(settings: Settings, tmp_path: Path) -> None:
    env = cli_env(settings, dsn=f"chdb://{tmp_path / 'offline-db'}")
    env.update({"FRESHREC_TRAIN__DIM": "16", "FRESHREC_TRAIN__BLOCKS": "1", "FRESHREC_TRAIN__MAX_LEN": "50"})
    out = orjson.loads(
        freshrec_cli(
            "train", "--offline", "--dataset", "ml-100k", "--max-epochs", "2", "--json", env=env
        ).stdout
    )
    assert set(out) == {"dataset", "hr@10", "ndcg@10", "popularity", "wall_s"}
    assert out["dataset"] == "ml-100k" and out["wall_s"] > 0
    assert 0 <= out["ndcg@10"] <= out["hr@10"] <= 1
    hr, ndcg = _popularity_leave_last_out(settings)
    assert out["popularity"] == {"hr@10": pytest.approx(hr), "ndcg@10": pytest.approx(ndcg)}
    rows = sql_json("SELECT kind, source, hr_at_10 FROM training_runs", env=env)
    assert rows == [{"kind": "offline", "source": "ml-100k", "hr_at_10": out["hr@10"]}]
    bad = freshrec_cli("train", "--offline", env=env, check=False)
    assert bad.returncode == 1 and "--offline needs --dataset" in " ".join(bad.stderr.split())


def _popularity_leave_last_out(settings: Settings) -> tuple[float, float]:
    """The popularity baseline straight from ``u.data``: counts over each user's all-but-last-two
    items (in time order, ties in file order), the last item ranked among the unseen (strictly
    higher counts rank above it)."""
    assert settings.datasets_dir is not None
    histories: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    with gzip.open(settings.datasets_dir / "ml-100k" / "u.data.gz", "rt") as lines:
        for index, line in enumerate(lines):
            user, item, _rating, ts = line.split("\t")
            histories[user].append((int(ts), index, item))
    ordered = {user: [item for _, _, item in sorted(rows)] for user, rows in histories.items()}
    counts = Counter(item for items in ordered.values() for item in items[:-2])
    catalogue = {item for items in ordered.values() for item in items}
    hits = gain = 0.0
    users = [u for u, items in ordered.items() if len(items) >= 3]
    for user in users:
        items = ordered[user]
        seen, target = set(items[:-1]), items[-1]
        rank = sum(1 for item in catalogue - seen if counts[item] > counts[target])
        if rank < 10:
            hits += 1
            gain += 1 / math.log2(rank + 2)
    return hits / len(users), gain / len(users)

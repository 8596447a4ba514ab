"""A portable folder store: moved, copied, tarred and restored, it answers from where it is now,
and a copy writes only into its own folder. Also: a store that lost its mlflow.db says so."""

import json
import shutil
import sqlite3
import tarfile
import threading
from pathlib import Path

import pytest

from adapterhub_local import Hub
from adapterhub_local.errors import AhlError
from adapterhub_local.relocate import RELOCATED, STORE_TAG, relocate_if_moved
from conftest import file_digest
from test_cli import add, ahl

TEXTS = ["red crimson", "navy azure"]


@pytest.fixture
def store(colors_only_store, tmp_path) -> Path:
    """This test's own store, opened once where it is (so it records this folder as its home)."""
    folder = tmp_path / "store"
    shutil.copytree(colors_only_store, folder, symlinks=True)
    assert [t["task"] for t in tasks(folder)] == ["colors"]
    assert recorded_roots(folder) == {(folder / "artifacts").as_uri()}
    return folder


def tasks(store: Path) -> list[dict]:
    return json.loads(ahl("tasks", "--json", "--store", store).stdout)


def predict(store: Path) -> list[dict]:
    return json.loads(ahl("predict", *TEXTS, "--task", "colors", "--json", "--store", store).stdout)


def recorded_roots(store: Path) -> set[str]:
    """Every artifact root the store's database points into: experiments, runs, versions."""
    with sqlite3.connect(store / "mlflow.db") as db:
        rows = db.execute("SELECT artifact_location FROM experiments WHERE name = 'ahl' UNION "
                          "SELECT artifact_uri FROM runs UNION SELECT source FROM model_versions "
                          "UNION SELECT storage_location FROM model_versions").fetchall()
    return {value[:value.index("/artifacts") + len("/artifacts")] for (value,) in rows}


def test_a_moved_store_answers_and_writes_into_its_new_folder(store, tiny_data, tiny_base,
                                                              tmp_path):
    answers = predict(store)
    moved = tmp_path / "elsewhere" / "store"
    moved.parent.mkdir()
    shutil.move(store, moved)

    assert [t["task"] for t in tasks(moved)] == ["colors"]
    assert predict(moved) == answers
    assert recorded_roots(moved) == {(moved / "artifacts").as_uri()}
    assert json.loads(ahl("store", "verify", "--json", "--store", moved).stdout)["ok"]
    ahl("store", "export", "colors", tmp_path / "peft", "--store", moved)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "peft").iterdir()}

    add(moved, "animals", tiny_data, tiny_base)
    assert [t["task"] for t in tasks(moved)] == ["colors", "animals"]
    assert recorded_roots(moved) == {(moved / "artifacts").as_uri()}
    animals = json.loads(ahl("store", "show", "animals", "--json", "--store", moved).stdout)
    assert (moved / "artifacts" / animals["run_id"] / "artifacts").is_dir()
    assert not store.exists()  # nothing was written back at the old place
    tags = Hub(moved).store.client.get_experiment_by_name("ahl").tags
    relocated = json.loads(tags[RELOCATED])
    assert (relocated["from"], relocated["to"]) == ((store / "artifacts").as_uri(),
                                                    (moved / "artifacts").as_uri())


def test_a_copy_is_independent_of_its_original(store, tiny_data, tiny_base, tmp_path):
    answers = predict(store)
    copy = tmp_path / "copy"
    shutil.copytree(store, copy, symlinks=True)  # as cp -a
    original = file_digest(store)
    # MLflow caches each run's artifact folder by run id, process-wide (what a write to the
    # original does), and the copy's run ids are the original's: fill that private cache with the
    # original's folders first.
    from mlflow.tracking._tracking_service.utils import _artifact_repos_cache as cached

    client = Hub(store).store.client
    for run in (store / "artifacts").iterdir():
        cached.pop(run.name, None)
        client._tracking_client._get_artifact_repo(run.name)
        assert cached[run.name].artifact_uri.startswith(store.as_uri())

    add(copy, "animals", tiny_data, tiny_base)
    assert file_digest(store) == original  # byte for byte: the copy wrote only into its folder
    assert recorded_roots(copy) == {(copy / "artifacts").as_uri()}
    assert [t["task"] for t in tasks(copy)] == ["colors", "animals"]
    assert predict(copy) == answers
    assert json.loads(ahl("store", "verify", "--json", "--store", copy).stdout)["ok"]

    assert [t["task"] for t in tasks(store)] == ["colors"]  # the original still works alone
    assert predict(store) == answers
    assert recorded_roots(store) == {(store / "artifacts").as_uri()}


def test_a_tarred_store_restores_elsewhere(store, tmp_path):
    answers = predict(store)
    archive = tmp_path / "store.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(store, arcname="store")
    shutil.rmtree(store)
    restored = tmp_path / "restored here"  # a space: the URIs are percent-encoded
    with tarfile.open(archive) as tar:
        tar.extractall(restored, filter="data")

    assert [t["task"] for t in tasks(restored / "store")] == ["colors"]
    assert predict(restored / "store") == answers
    assert json.loads(ahl("store", "verify", "--json", "--store", restored / "store").stdout)["ok"]


def test_a_store_without_its_database_says_so_in_one_line(store):
    (store / "mlflow.db").unlink()
    before = file_digest(store)
    for args in (["tasks"], ["predict", "red", "--task", "colors"], ["store", "verify"]):
        result = ahl(*args, "--store", store, ok=False)
        assert result.exit_code == 1, args
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
        assert "has artifacts but no mlflow.db" in result.stderr and "backup" in result.stderr
    assert file_digest(store) == before  # and no new, empty database was made
    with pytest.raises(AhlError, match="no mlflow.db"):
        Hub(store).store.exists()


# -- the rewrite itself, on a small database shaped like MLflow's --------------------------------


def fake_store(folder: Path, recorded: Path) -> Path:
    """A database with MLflow's experiment tables and a few values that hold paths, recorded as
    if the store lived at `recorded`."""
    folder.mkdir(parents=True)
    root = (recorded / "artifacts").as_uri()
    with sqlite3.connect(folder / "mlflow.db") as db:
        db.executescript(
            "CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT, "
            "artifact_location TEXT);"
            "CREATE TABLE experiment_tags (key TEXT, value TEXT, experiment_id INTEGER, "
            "PRIMARY KEY (key, experiment_id));"
            "CREATE TABLE runs (run_uuid TEXT PRIMARY KEY, artifact_uri TEXT, start_time INTEGER);"
            "CREATE TABLE tags (key TEXT, value TEXT, run_uuid TEXT);")
        db.execute("INSERT INTO experiments VALUES (0, 'Default', '/elsewhere/mlruns/0')")
        db.execute("INSERT INTO experiments VALUES (1, 'ahl', ?)", (root,))
        db.execute("INSERT INTO experiment_tags VALUES (?, 'true', 1)", (STORE_TAG,))
        db.execute("INSERT INTO runs VALUES ('r1', ?, 5)", (f"{root}/r1/artifacts",))
        db.executemany("INSERT INTO tags VALUES (?, ?, 'r1')", [
            ("plain", f"{recorded}/artifacts/r1/artifacts/adapter"),
            ("json", json.dumps({"db": f"sqlite:///{recorded}/mlflow.db", "n": 1})),
            ("sibling", f"{recorded}2/data.csv"),  # another folder that starts alike: kept
            ("inside", f"/x{recorded}/artifacts")])  # a longer path that contains it: kept
    return folder / "mlflow.db"


def values(db_path: Path) -> dict:
    with sqlite3.connect(db_path) as db:
        return {"experiments": db.execute("SELECT artifact_location FROM experiments").fetchall(),
                "runs": db.execute("SELECT artifact_uri, start_time FROM runs").fetchall(),
                "tags": dict(db.execute("SELECT key, value FROM tags").fetchall())}


def test_rewrite_covers_uris_plain_paths_and_json_and_only_whole_paths(tmp_path):
    old, new = tmp_path / "old place" / "store", tmp_path / "new" / "store"
    db_path = fake_store(new, old)
    root = (new / "artifacts").as_uri()

    assert relocate_if_moved(db_path, root) == (old / "artifacts").as_uri()
    after = values(db_path)
    assert after["experiments"] == [("/elsewhere/mlruns/0",), (root,)]
    assert after["runs"] == [(f"{root}/r1/artifacts", 5)]
    assert after["tags"] == {"plain": f"{new}/artifacts/r1/artifacts/adapter",
                             "json": json.dumps({"db": f"sqlite:///{new}/mlflow.db", "n": 1}),
                             "sibling": f"{old}2/data.csv", "inside": f"/x{old}/artifacts"}
    assert relocate_if_moved(db_path, root) is None  # idempotent
    assert values(db_path) == after


def test_two_processes_opening_a_moved_store_relocate_it_once(tmp_path):
    old, new = tmp_path / "old" / "store", tmp_path / "new" / "store"
    db_path = fake_store(new, old)
    root = (new / "artifacts").as_uri()
    start, results = threading.Barrier(4), []

    def open_store():
        start.wait()
        results.append(relocate_if_moved(db_path, root))

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=str) == [None, None, None, (old / "artifacts").as_uri()]
    assert values(db_path)["runs"] == [(f"{root}/r1/artifacts", 5)]

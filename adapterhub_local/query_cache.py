"""A folder store's last answer to `tasks`, kept beside its database, so that a new process
answers without importing MLflow (over a second of imports before the first query).

The answer is used only while the registry rows it was computed from are unchanged: a read-only
SQLite query over MLflow's registry tables (model versions, their tags, aliases) and the sequence
runs' step counts fingerprints them in milliseconds. Whatever changes them (an ahl writer, the
MLflow UI, another client) changes the fingerprint, and the next query computes the answer again
through MLflow and keeps it. A database whose tables are not as expected (another MLflow schema)
is never fingerprinted: queries then always go through MLflow.
"""

import hashlib
import json
import os
import sqlite3
import tempfile
from pathlib import Path

from adapterhub_local.store import STEPS_TAG

CACHE_FILE = "tasks.json"  # {namespace: {"fingerprint", "tasks"}}
TEMPORARY = ".tasks."  # the prefix of a cache file being written
# The answer's shape: a new field (kind and metric, in 2) makes answers kept before it stale.
ANSWER_FORMAT = "2"
# Each query lists rows that a task table depends on; :prefix starts the namespace's model names.
OURS = "substr(name, 1, length(:prefix)) = :prefix"
FINGERPRINTED = [
    f"SELECT name, version, current_stage, last_updated_time FROM model_versions WHERE {OURS} "
    "ORDER BY name, version",
    f"SELECT name, version, key, value FROM model_version_tags WHERE {OURS} "
    "ORDER BY name, version, key",
    f"SELECT name, alias, version FROM registered_model_aliases WHERE {OURS} ORDER BY name, alias",
    f"SELECT name, last_updated_time FROM registered_models WHERE {OURS} ORDER BY name",
    "SELECT t.run_uuid, t.value, r.lifecycle_stage FROM tags t JOIN runs r ON r.run_uuid = "
    f"t.run_uuid WHERE t.key = '{STEPS_TAG}' ORDER BY t.run_uuid",
    "SELECT name, lifecycle_stage FROM experiments ORDER BY name",
]


def fingerprint(store) -> str | None:
    """sha256 of the registry rows of the store's namespace; None for a store that is not a
    folder, has no database yet, or whose tables are not as expected."""
    if store.folder is None or not (store.folder / "mlflow.db").is_file():
        return None
    try:
        db = sqlite3.connect(f"{(store.folder / 'mlflow.db').as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        sha = hashlib.sha256(f"{ANSWER_FORMAT}:{store.namespace}".encode())
        for query in FINGERPRINTED:
            for row in db.execute(query, {"prefix": f"{store.namespace}."}):
                sha.update(json.dumps(row).encode())
        return sha.hexdigest()
    except sqlite3.Error:
        return None
    finally:
        db.close()


def kept(store) -> dict:
    try:
        return json.loads((store.folder / CACHE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return {}


def read(store, key: str | None) -> list[dict] | None:
    """The kept answer, if it was computed from the registry as it is now (key: fingerprint)."""
    if key is None:
        return None
    mine = kept(store).get(store.namespace) or {}
    return mine.get("tasks") if mine.get("fingerprint") == key else None


def keep(store, before: str | None, tasks: list[dict]) -> None:
    """Keep an answer computed between two fingerprints: only if the registry did not change
    meanwhile (`before` was taken first; a change could be undone by the time it is kept).
    Written whole or not at all, as private as the database; a store this process may not
    write to keeps nothing."""
    if before is None or fingerprint(store) != before:
        return
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(dir=store.folder, prefix=TEMPORARY, suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump({**kept(store), store.namespace: {"fingerprint": before, "tasks": tasks}}, f)
        os.chmod(temporary, (store.folder / "mlflow.db").stat().st_mode & 0o666)
        os.replace(temporary, store.folder / CACHE_FILE)
    except OSError:
        if temporary:
            Path(temporary).unlink(missing_ok=True)

"""A portable folder store: one moved, copied or restored from a tar answers from where it is now.

MLflow records absolute paths in its database: the experiment's artifact location, each run's
artifact URI, each model version's source and storage location (and, as MLflow grows, more: logged
models, traces). A folder store that was moved then fails to find its files, and a copy silently
writes new artifacts into its original's folder. So before MLflow opens a folder store, the paths
recorded under the folder it was last opened at are rewritten to the folder it is at now.

This module touches MLflow's SQLite database with the standard library on purpose: MLflow has no
API to change an experiment's artifact location or a run's artifact URI, and the rewrite must be
done before MLflow reads them. It does not import mlflow (guard_artifact_cache, which patches
MLflow's client, does so lazily).
"""

import contextlib
import json
import logging
import re
import sqlite3
import time
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from adapterhub_local.errors import AhlError

DB = "mlflow.db"
ARTIFACTS = "artifacts"
STORE_TAG = "ahl.store"  # experiment tag on every experiment an AdapterStore creates
RELOCATED = "ahl.relocated"  # experiment tag: {"from", "to", "at"} of the last relocation
LOCK_WAIT_S = 60  # how long to wait for another process's write (e.g. its own relocation)

log = logging.getLogger(__name__)


def open_folder_store(folder: Path) -> None:
    """What AdapterStore does before MLflow opens a folder store: refuse a store whose database is
    gone, and relocate one that was moved or copied."""
    db = folder / DB
    if db.exists():
        relocate_if_moved(db, (folder / ARTIFACTS).as_uri())
    else:
        check_database_present(folder)


def check_database_present(folder: Path) -> None:
    """A folder with artifacts but no mlflow.db is a store that lost its database: without this
    check it would look like an empty store, and the next add-task would start a new one on top."""
    artifacts = folder / ARTIFACTS
    if not (folder / DB).exists() and artifacts.is_dir() and any(artifacts.iterdir()):
        raise AhlError(f"store {folder} has artifacts but no {DB}: its database was deleted or not "
                       f"copied; restore {DB} from a backup, or start over in a new --store")


def relocate_if_moved(db_path: Path, artifact_root_uri: str) -> str | None:
    """Rewrite the paths a folder store's database recorded under its old folder to its folder
    now, when the store's experiments record another artifact root than `artifact_root_uri`.

    One transaction: a second process opening the same moved store waits for it, then finds
    nothing to do. Returns the old artifact root, or None when the store had not moved.
    """
    db_path = Path(db_path)
    new_root = uri_to_path(artifact_root_uri)
    # Autocommit mode (isolation_level=None): the one transaction below is explicit.
    with contextlib.closing(sqlite3.connect(db_path, timeout=LOCK_WAIT_S,
                                            isolation_level=None)) as db:
        if not moved_roots(db, new_root):  # the common case: one read, no write lock
            return None
        try:
            db.execute("BEGIN IMMEDIATE")  # the write lock, then look again: another process
            old_roots = moved_roots(db, new_root)  # may have relocated it meanwhile
            for old_root in old_roots:
                rewrite_paths(db, *folder_pair(old_root, new_root))
                record_relocation(db, old_root, new_root)
            db.execute("COMMIT")
        except BaseException as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise AhlError(f"store {db_path.parent} was moved or copied and its {DB} cannot "
                               f"be updated to its new folder ({e}): make it writable and "
                               "retry") from None
            raise
    if not old_roots:
        return None
    log.info("relocated store %s from %s", db_path.parent, ", ".join(map(str, old_roots)))
    return Path(old_roots[0]).as_uri()


def moved_roots(db: sqlite3.Connection, new_root: Path) -> list[Path]:
    """The artifact roots, other than `new_root`, that the store's experiments record."""
    try:
        rows = db.execute(
            "SELECT DISTINCT e.artifact_location FROM experiments e JOIN experiment_tags t "
            "ON t.experiment_id = e.experiment_id WHERE t.key = ?", (STORE_TAG,)).fetchall()
    except sqlite3.OperationalError:  # not an MLflow database yet (MLflow creates the tables)
        return []
    roots = {uri_to_path(location) for (location,) in rows if location}
    return sorted(root for root in roots if root != new_root)


def folder_pair(old_root: Path, new_root: Path) -> tuple[Path, Path]:
    """Rewrite the whole store folder, not only its artifact root, so that any path to the old
    folder's mlflow.db is rewritten too; a root outside the FOLDER/artifacts layout is rewritten
    alone."""
    if old_root.name == new_root.name == ARTIFACTS:
        return old_root.parent, new_root.parent
    return old_root, new_root


def rewrite_paths(db: sqlite3.Connection, old: Path, new: Path) -> None:
    """Replace `old` by `new` in every text value of every table that holds it, as a file URI
    (file:///a%20b/...) or as a plain path (/a b/...). Every table, not a list of known columns:
    MLflow adds tables with paths in them from release to release."""
    old_uri, new_uri = old.as_uri(), new.as_uri()
    old_path, new_path = str(old), str(new)
    # A whole path only: followed by its end, a separator or a quote (in JSON), and a plain path
    # not preceded by a name character, so /a/store never matches inside /x/a/store2.
    pattern = re.compile(rf"(?:{re.escape(old_uri)}|(?<![\w.-]){re.escape(old_path)})"
                         r"(?=$|[/\"'\s,;}\]])")
    swap = lambda m: new_uri if m.group(0) == old_uri else new_path  # noqa: E731
    db.create_function("ahl_relocate", 1, lambda v: pattern.sub(swap, v), deterministic=True)
    tables = [name for (name,) in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    for table in tables:
        for column in [row[1] for row in db.execute(f"PRAGMA table_info({quote(table)})")]:
            col = quote(column)
            db.execute(f"UPDATE {quote(table)} SET {col} = ahl_relocate({col}) WHERE "
                       f"typeof({col}) = 'text' AND (instr({col}, ?) > 0 OR instr({col}, ?) > 0)",
                       (old_uri, old_path))


def record_relocation(db: sqlite3.Connection, old_root: Path, new_root: Path) -> None:
    """The store's experiments keep where they were relocated from, when, as a tag."""
    value = json.dumps({"from": old_root.as_uri(), "to": new_root.as_uri(),
                        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    db.execute("INSERT OR REPLACE INTO experiment_tags (key, value, experiment_id) "
               "SELECT ?, ?, experiment_id FROM experiment_tags WHERE key = ?",
               (RELOCATED, value, STORE_TAG))


def guard_artifact_cache(client, artifact_root_uri: str) -> None:
    """Keep a folder store's client writing into its own folder.

    MLflow caches each run's artifact repository process-wide by run id alone, whatever the
    tracking URI. A copied store shares its original's run ids, and a moved one keeps them: in one
    process (the Python API, the tests), writing to a run of the copy would reuse the original's
    cached folder (or recreate the folder a store was moved from). So before this client fetches a
    run's repository, a cached one outside this store's artifact root is dropped. MLflow is
    imported here only, lazily; without that private cache (another MLflow) there is nothing to do.
    """
    try:
        from mlflow.tracking._tracking_service import utils
    except ImportError:
        return
    tracking = getattr(client, "_tracking_client", None)
    fetch = getattr(tracking, "_get_artifact_repo", None)
    cache = getattr(utils, "_artifact_repos_cache", None)
    if fetch is None or not isinstance(cache, dict):
        return

    def get_artifact_repo(resource_id, *args, **kwargs):
        cached = cache.get(resource_id)
        home = getattr(cached, "artifact_uri", "")
        if cached is not None and not within(home, artifact_root_uri):
            cache.pop(resource_id, None)
        return fetch(resource_id, *args, **kwargs)

    tracking._get_artifact_repo = get_artifact_repo


def within(uri: str, root: str) -> bool:
    return uri == root or uri.startswith(root.rstrip("/") + "/")


def uri_to_path(location: str) -> Path:
    """An artifact location as a path: a file URI (percent-encoded) or a plain path."""
    if location.startswith("file:"):
        parsed = urlparse(location)
        return Path(url2pathname(parsed.path))
    return Path(location)


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'

"""AdapterStore: versioned adapters with lineage on MLflow.

A store is a namespace in one MLflow tracking backend: an experiment named after the namespace
(its runs are the add-tasks, plus one long-lived "sequence" run that collects the accuracy
matrices) and one registered model per task, named NAMESPACE.TASK, whose versions are the
adapters. A folder store keeps a SQLite backend and the artifact root inside the folder.
Artifacts are read back as safetensors and JSON only.
"""

import fcntl
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

from adapterhub_local.errors import AhlError, brief, quiet_loggers
from adapterhub_local.relocate import (check_database_present, guard_artifact_cache,
                                       open_folder_store)
from adapterhub_local.tracking import TrackingWrites, error_code

DEFAULT_STORE = "store"
DEFAULT_NAMESPACE = "ahl"
ROUTER = "_router"  # the router's registered model; task names cannot start with "_"
TAG = "ahl."  # prefix of every tag this package writes
PRODUCTION = "production"  # the alias that routing serves
REMOVED = f"{TAG}removed"  # version tag set by `ahl store rm`: hidden from queries and routing
HELD = f"{TAG}gate.held"  # version tag: the forgetting gate kept this version back (why)
GATE = f"{TAG}gate"  # experiment tag: the store's default forgetting gate
PENDING = f"{TAG}pending"  # version tag: made by a commit that has not completed (invisible)
STEP_TAG = f"{TAG}step"  # pending version tag: the step its commit will be recorded as
SEQUENCE_RUN = "sequence"  # the run that holds the sequence record (sequence.py)
STEPS_TAG = f"{TAG}steps"  # its tag: the number of committed steps
# What the MLflow UI (3.x) opens a store's experiment as: model training (its runs, charts and
# artifacts), not the GenAI view (traces, evaluation runs) it guesses for an unmarked one.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
LEASE = "_lease"  # the registered model whose existence is the store's write lease
PAGE = 1000  # MLflow's largest page for searches
LINEAGE_ARTIFACT = "lineage.json"  # per add-task run: what served when it was committed
# A version's PEFT files, as save_pretrained writes them; beside them, its classification head
# and label order, or, for a generate adapter, its decoding settings (inference.AdapterBank
# writes and reads them).
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
HEAD_FILE = "head.safetensors"
LABELS_FILE = "labels.json"
GENERATE_FILE = "generate.json"
ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'NAME', 'NAME@3' or 'NAME@production' -> (name, version or alias or None)."""
    if not isinstance(ref, str):
        raise AhlError(f"a version reference is text, got {type(ref).__name__} {ref!r}: write "
                       "'NAME', 'NAME@3' or 'NAME@production'")
    name, marked, at = ref.partition("@")
    if not name:
        raise AhlError(f"{ref!r} names no task: write TASK{ref if marked else ''} (ahl tasks "
                       "lists them)")
    if marked and not at:
        raise AhlError(f"{ref!r} names no version after '@': write {name}@3, {name}@production "
                       f"or {name}")
    return name, at or None


def whole_task(ref: str, command: str) -> str:
    """The task of a command that covers all its versions (store versions, store lineage):
    NAME@VERSION there is a mistake (it answered with no versions)."""
    task, at = parse_ref(ref)
    if at is not None:
        raise AhlError(f"ahl store {command} covers every version of a task: write {task} (ahl "
                       f"store show {ref} shows that one)")
    return task


class AdapterStore(TrackingWrites):
    """Registered adapter versions, their lineage and the sequence run, over an MLflow backend.
    This half reads; tracking.TrackingWrites writes."""

    def __init__(self, location: str | Path | None = None, namespace: str = DEFAULT_NAMESPACE):
        location = str(location or os.environ.get("AHL_STORE") or DEFAULT_STORE)
        if not ALIAS.match(namespace):  # model names are NAMESPACE.TASK: no dots in either
            raise AhlError(f"namespace {namespace!r} is not a plain name: use letters, digits, "
                           "'_' or '-', starting with a letter")
        self.namespace = namespace
        self.location = location
        if "://" in location:
            self.folder, self.uri, self.artifact_root = None, location, None
        else:
            self.folder = Path(location).resolve()
            if self.folder.exists() and not self.folder.is_dir():
                raise AhlError(f"store {location} is a file, not a store folder: pass --store "
                               "a folder (a new one, or a store's)")
            self.uri = f"sqlite:///{self.folder / 'mlflow.db'}"
            self.artifact_root = (self.folder / "artifacts").as_uri()
        self._client = None
        self._experiment_id = None
        self._artifact_location = None
        self._sequence_run = None

    # -- backend ------------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the store holds anything yet (reads never create a folder store)."""
        if self.folder is not None and not (self.folder / "mlflow.db").exists():
            check_database_present(self.folder)  # artifacts without a database: say so, not "empty"
            return False
        return self.experiment_id(create=False) is not None

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            if self.folder is None:
                self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
                return self._client
            open_folder_store(self.folder)  # a moved or copied store: its paths, before MLflow
            self.folder.mkdir(parents=True, exist_ok=True)
            # MLflow creates a new database's tables when its client is made and first used;
            # two processes doing it at once on one file collide, so a process's first use
            # waits for the others' (an advisory flock on the database file itself; SQLite's
            # own locks are separate).
            # Without MLflow's INFO lines as it creates a new store's tables ("Creating initial
            # MLflow database tables...", alembic's migrations): noise in a command's output.
            with open(self.folder / "mlflow.db", "ab") as lock, quiet_loggers(
                    "mlflow.store.db.utils", "alembic.runtime.migration", level=logging.WARNING):
                fcntl.flock(lock, fcntl.LOCK_EX)
                client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
                client.search_experiments(max_results=1)  # the tracking store's tables
                client.search_registered_models(max_results=1)  # the registry's (its own engine)
            guard_artifact_cache(client, self.artifact_root)  # it ignores copies and moves
            self._client = client
        return self._client

    def experiment_id(self, create: bool = True) -> str | None:
        if self._experiment_id is None:
            try:
                experiment = self.client.get_experiment_by_name(self.namespace)
            except Exception as e:
                # A server with MLflow's auth on refuses before anything else: MLflow's client
                # sends the credentials it finds in the environment, so say which to set.
                status = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}.get(error_code(e))
                if status:
                    fix = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
                           if status == 401 else "ask the server's admin for a permission on it")
                    raise AhlError(f"the store at {self.location} refused access (HTTP {status}): "
                                   f"{fix}") from None
                why = ("no MLflow tracking server answers there" if "Max retries" in str(e)
                       else brief(e, 160))
                fix = ("check --store, or run ahl store doctor" if self.folder is not None
                       else "start the server or check --store")
                raise AhlError(f"cannot reach the store at {self.location}: {why}; {fix}") from None
            if experiment is not None:
                self._experiment_id = experiment.experiment_id
            elif create:
                self._experiment_id = self._create_experiment()
        return self._experiment_id

    def _create_experiment(self) -> str:
        """Create the store's experiment; another writer may create it at the same moment, and
        the name is unique in MLflow, so the loser reads the winner's."""
        try:
            return self.client.create_experiment(self.namespace,
                                                 artifact_location=self.artifact_root,
                                                 tags={f"{TAG}store": "true",
                                                       EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1]})
        except Exception as e:
            if error_code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(self.namespace).experiment_id

    def mark_model_training(self) -> None:
        """Mark the store's experiment as model training where it is not yet (stores made
        before the mark existed; `ahl ui` calls this before it serves them)."""
        experiment = self.client.get_experiment(self.experiment_id())
        if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            self.client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)

    # -- base binding -------------------------------------------------------------------------

    def base_binding(self) -> tuple[str, str] | None:
        """(name, sha256) of the base the store was bound to at its first add-task."""
        if not self.exists():
            return None
        tags = self.client.get_experiment(self.experiment_id()).tags
        if f"{TAG}base.sha256" not in tags:
            return None
        return tags[f"{TAG}base.name"], tags[f"{TAG}base.sha256"]

    def check_base(self, name: str, sha256: str) -> None:
        bound = self.base_binding()
        if bound and bound[1] != sha256:
            raise AhlError(f"store {self.location} is bound to base {bound[0]!r} "
                           f"(sha256 {bound[1][:12]}), not {name!r} ({sha256[:12]}): drop --base "
                           "or use another --store")

    def bind_base(self, name: str, sha256: str, features: str) -> None:
        """Bind the store to its base and to the features its router reads, at its first commit."""
        if self.base_binding() is None:
            experiment = self.experiment_id()
            self.client.set_experiment_tag(experiment, f"{TAG}base.name", name)
            self.client.set_experiment_tag(experiment, f"{TAG}base.sha256", sha256)
            self.client.set_experiment_tag(experiment, f"{TAG}router.features", features)

    def router_features(self, default: str) -> str:
        """The features (router.FEATURES) the store's router reads: bound at its first commit;
        `default` for a store without one; "middle" for stores bound before features were."""
        if not self.exists() or self.base_binding() is None:
            return default
        return self.client.get_experiment(self.experiment_id()).tags.get(f"{TAG}router.features", "middle")

    # -- tasks and versions -------------------------------------------------------------------

    def model_name(self, task: str) -> str:
        return f"{self.namespace}.{task}"

    def task_of(self, model_name: str) -> str | None:
        """The task (or `_router`, `_lease`) a registered model name stands for in this store;
        None for another store's (MLflow's LIKE is a pattern, `_` matches any character)."""
        prefix = f"{self.namespace}."
        rest = model_name[len(prefix):]
        return rest if model_name.startswith(prefix) and "." not in rest else None

    def all_versions(self, include_removed: bool = False) -> dict[str, list]:
        """{task: its versions, oldest first}, tasks in order of their first version: one query,
        so that listing a store costs the same with 5 tasks or 500 versions."""
        if not self.exists():
            return {}
        prefix = f"{self.namespace}."
        found = pages(self.client.search_model_versions, filter_string=f"name LIKE '{prefix}%'")
        with_aliases(found, self.registered_models())
        by_task: dict[str, list] = {}
        for v in sorted(found, key=lambda v: (v.creation_timestamp, int(v.version))):
            task = self.task_of(v.name)
            if task and not task.startswith("_") and self.visible(v, include_removed):
                by_task.setdefault(task, []).append(v)
        return {t: sorted(vs, key=lambda v: int(v.version)) for t, vs in by_task.items()}

    def task_names(self) -> list[str]:
        """Tasks with a live version, in order of their first add-task."""
        return list(self.all_versions())

    def versions(self, task: str, include_removed: bool = False) -> list:
        """The task's model versions, oldest first (empty for an unknown task); removed
        versions (`ahl store rm`) only on request."""
        if not self.exists():
            return []
        found = pages(self.client.search_model_versions,
                      filter_string=f"name='{self.model_name(task)}'")
        if found:
            with_aliases(found, [self.client.get_registered_model(self.model_name(task))])
        return sorted((v for v in found if self.visible(v, include_removed)),
                      key=lambda v: int(v.version))

    def visible(self, version, include_removed: bool = False) -> bool:
        """Whether queries and routing see a version: not while its commit is pending, that is
        until its step is recorded (commit.py: a writer killed right after the commit point
        leaves its version pending, and the next writer finishes it)."""
        if REMOVED in version.tags and not include_removed:
            return False
        return PENDING not in version.tags or 0 < int(
            version.tags.get(STEP_TAG, "0")) <= self.steps_committed()

    def steps_committed(self) -> int:
        """The sequence record's step count (sequence.py): one look-up, when needed."""
        run_id = self.sequence_run_id()
        return int(self.run_info(run_id)[1].get(STEPS_TAG, "0")) if run_id else 0

    def sequence_run_id(self, create: bool = False, tags: dict | None = None) -> str | None:
        """The store's one sequence run (made by the first writer, who holds the lease); its id
        never changes, so it is looked up once per process."""
        if self._sequence_run is None and self.exists():
            self._sequence_run = self.find_run(f"{TAG}kind", SEQUENCE_RUN)
            if self._sequence_run is None and create:
                self._sequence_run = self.create_finished_run(
                    SEQUENCE_RUN, {f"{TAG}kind": SEQUENCE_RUN, **(tags or {})})
        return self._sequence_run

    def registered_models(self) -> list:
        """The store's registered models (tasks, the router, the lease), every page."""
        return [m for m in pages(self.client.search_registered_models,
                                 filter_string=f"name LIKE '{self.namespace}.%'")
                if self.task_of(m.name)]

    def task_aliases(self) -> dict[str, dict[str, str]]:
        """{task: {alias: version}} for every task with a registered model, in order of
        creation (one search, a page per 1,000 tasks)."""
        if not self.exists():
            return {}
        models = sorted(self.registered_models(), key=lambda m: m.creation_timestamp)
        return {self.task_of(m.name): {a: str(v) for a, v in (m.aliases or {}).items()}
                for m in models if not self.task_of(m.name).startswith("_")}

    def pending_versions(self) -> list:
        """Versions made by commits that never completed (a killed writer's), every model."""
        return [v for v in pages(self.client.search_model_versions,
                                 filter_string=f"name LIKE '{self.namespace}.%' AND "
                                               f"tags.`{PENDING}` = '1'")
                if self.task_of(v.name)]

    def current_version(self, task: str):
        """The task's newest live version (the parent of its next one)."""
        versions = self.versions(task)
        return versions[-1] if versions else None

    def serving(self) -> dict:
        """{task: the version that routing and prediction use}: its `production` alias where it
        has one, else its newest version that the forgetting gate did not hold back."""
        serving = {}
        for task, versions in self.all_versions().items():
            chosen = serving_version(versions)
            if chosen is not None:
                serving[task] = chosen
        return serving

    def resolve(self, ref: str):
        """The model version that 'NAME', 'NAME@VERSION' or 'NAME@ALIAS' names."""
        task, at = parse_ref(ref)
        versions = self.versions(task) if not task.startswith("_") else []  # ours, not a task
        if not versions:
            known = ", ".join(self.task_names()) or "none yet"
            raise AhlError(f"no task {task!r} in store {self.location} (tasks: {known}): "
                           "check the name or run ahl add-task")
        if at is None:
            return versions[-1]
        if at.isdigit():
            match = [v for v in versions if int(v.version) == int(at)]
            if not match:
                removed = [v for v in self.versions(task, include_removed=True)
                           if int(v.version) == int(at)]
                why = " (removed by ahl store rm; ahl store lineage keeps its history)" \
                    if removed else ""
                raise AhlError(f"task {task!r} has no version {at}{why} (versions: "
                               f"{', '.join(str(v.version) for v in versions)}): pick one of those")
            return match[0]
        if at.lower() == "latest":  # MLflow's own alias reads removed and pending versions too
            return versions[-1]
        try:
            number = self.client.get_model_version_by_alias(self.model_name(task), at).version
        except Exception:
            raise AhlError(f"task {task!r} has no version or alias {at!r}: see ahl store "
                           f"versions {task}") from None
        match = [v for v in versions if str(v.version) == str(number)]
        if not match:
            raise AhlError(f"{task}@{at} points at version {number}, removed by ahl store rm (or "
                           f"not committed): ahl store promote {task} VERSION --alias {at} moves it")
        return match[0]

    def check_promote(self, task: str, version: str, alias: str):
        """The version `promote` would point the alias at; AhlError on bad input."""
        if not ALIAS.match(alias) or alias.isdigit():
            raise AhlError(f"alias {alias!r} is not a plain name: use letters, digits, '_' or '-', "
                           "starting with a letter (e.g. production)")
        if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
            raise AhlError(f"alias {alias!r} is reserved by MLflow (latest and v1, v2, ... name "
                           "versions): pick another name, e.g. production or candidate")
        return self.resolve(f"{task}@{int(version) if str(version).isdigit() else version}")

    def promote(self, task: str, version: str, alias: str):
        """Point `alias` of a task at one of its versions (MLflow registered-model aliases)."""
        target = self.check_promote(task, version, alias)
        self.client.set_registered_model_alias(self.model_name(task), alias, str(target.version))
        return self.resolve(f"{task}@{alias}")

    def remove(self, version) -> None:
        """Take a version out of queries and routing; its run, files and tags stay (history)."""
        name = version.name
        for alias in version.aliases or []:
            self.client.delete_registered_model_alias(name, alias)
        self.client.set_model_version_tag(name, version.version, REMOVED,
                                          time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def gate(self) -> float | None:
        """The store's forgetting gate (largest allowed drop in routed accuracy), if set."""
        if not self.exists():
            return None
        value = self.client.get_experiment(self.experiment_id()).tags.get(GATE)
        return float(value) if value else None

    def store_tag(self, key: str) -> str | None:
        """A tag of the store's experiment (the store's own settings and markers)."""
        return self.client.get_experiment(self.experiment_id()).tags.get(key)

    def set_store_tag(self, key: str, value) -> None:
        """Set, or with None delete, a tag of the store's experiment."""
        if value is not None:
            self.client.set_experiment_tag(self.experiment_id(), key, str(value))
        elif self.store_tag(key) is not None:
            self.client.delete_experiment_tag(self.experiment_id(), key)

    def set_gate(self, value: float | None) -> None:
        self.set_store_tag(GATE, value)

    def verify(self) -> list[str]:
        """Re-hash the files of every version, and of every router version, against the
        checksums recorded when it was registered; one line per missing or altered file."""
        problems = []
        routers = [v for v in self.versions(ROUTER, include_removed=True)]
        for task, versions in [*self.all_versions(include_removed=True).items(), (ROUTER, routers)]:
            for version in versions:
                try:
                    folder = self.adapter_folder(version)
                except Exception:
                    problems.append(f"{task}@{version.version}: folder missing")
                    continue
                for name, sha in self.recorded_files(version).items():
                    path = folder / name
                    if not path.is_file():
                        problems.append(f"{task}@{version.version}: {name} missing")
                    elif sha256_file(path) != sha:
                        problems.append(f"{task}@{version.version}: {name} altered (sha256 "
                                        f"{sha256_file(path)[:12]}, recorded {sha[:12]})")
        return problems

    @staticmethod
    def recorded_files(version) -> dict[str, str]:
        """{file name: sha256} recorded when the version was registered."""
        return json.loads(version.tags.get(f"{TAG}files", "{}"))

    def adapter_folder(self, version) -> Path:
        """A local folder with the version's files (downloaded if the store is remote)."""
        return self.local_artifact(version.source)

    def artifact_folder(self, run_id: str, path: str) -> Path:
        """A run's artifact as a local path (downloaded if the store is remote)."""
        return self.local_artifact(f"{self.run_artifact_uri(run_id)}/{path}")

    def run_artifact_uri(self, run_id: str) -> str:
        """Where a run's artifacts live: MLflow puts them at EXPERIMENT_LOCATION/RUN_ID/artifacts,
        so no per-run look-up is needed (a commit reads every task's statistics)."""
        if self._artifact_location is None:
            self._artifact_location = self.client.get_experiment(
                self.experiment_id()).artifact_location
        return f"{self._artifact_location}/{run_id}/artifacts"

    def local_artifact(self, uri: str) -> Path:
        """A local path for an artifact URI: the file itself in a folder store (read in place,
        never written), a download from a tracking server."""
        import mlflow

        if uri.startswith("file://"):
            from urllib.parse import unquote, urlparse

            path = Path(unquote(urlparse(uri).path))
            if path.exists():
                return path
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=self.uri))

    def artifact_names(self, run_id: str, path: str) -> list[str]:
        """The paths of a run's artifacts directly under `path` (none if it does not exist)."""
        return [f.path for f in self.client.list_artifacts(run_id, path)]

    def read_json_artifact(self, run_id: str, path: str):
        try:
            return json.loads(self.artifact_folder(run_id, path).read_text(encoding="utf-8"))
        except AhlError:
            raise
        except Exception as e:  # a file deleted or edited by hand: MLflow's "No such artifact"
            raise AhlError(f"run {run_id[:12]}'s {path} is missing or damaged in store "
                           f"{self.location} ({type(e).__name__}): restore the store from a "
                           "copy, or ahl store rm that version") from None

def with_aliases(versions: list, models: list) -> None:
    """Fill in each version's aliases: MLflow's version search leaves them empty, while its
    registered models carry {alias: version}."""
    aliases: dict[tuple[str, str], list[str]] = {}
    for model in models:
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault((model.name, str(version)), []).append(alias)
    for v in versions:
        v.aliases = sorted(aliases.get((v.name, str(v.version)), []))


def serving_version(versions: list):
    """Of one task's live versions (oldest first): the production one, else the newest that the
    forgetting gate did not hold back, else None."""
    for v in versions:
        if PRODUCTION in (v.aliases or []):
            return v
    free = [v for v in versions if HELD not in v.tags]
    return free[-1] if free else None


def pages(search, **kwargs) -> list:
    """Every result of an MLflow search, page after page (one page holds at most 1,000)."""
    found, token = [], None
    while True:
        page = search(**kwargs, max_results=PAGE, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

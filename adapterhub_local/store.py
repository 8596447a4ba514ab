"""AdapterStore: versioned adapters with lineage on MLflow.

A store is a namespace in one MLflow tracking backend: an experiment named after the namespace
(its runs are the add-tasks, plus one long-lived "sequence" run that collects the accuracy
matrices) and one registered model per task, named NAMESPACE.TASK, whose versions are the
adapters. A folder store keeps a SQLite backend and the artifact root inside the folder.
Artifacts are read back as safetensors and JSON only.
"""

import hashlib
import json
import logging
import os
import re
import time
import warnings
from pathlib import Path

from adapterhub_local.errors import AhlError

DEFAULT_STORE = "store"
DEFAULT_NAMESPACE = "ahl"
SEQUENCE_RUN = "sequence"
ROUTER = "_router"  # the router's registered model; task names cannot start with "_"
TAG = "ahl."  # prefix of every tag this package writes
PRODUCTION = "production"  # the alias that routing serves
REMOVED = f"{TAG}removed"  # version tag set by `ahl store rm`: hidden from queries and routing
HELD = f"{TAG}gate.held"  # version tag: the forgetting gate kept this version back (why)
GATE = f"{TAG}gate"  # experiment tag: the store's default forgetting gate
ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'NAME', 'NAME@3' or 'NAME@production' -> (name, version or alias or None)."""
    name, _, at = ref.partition("@")
    return name, at or None


class AdapterStore:
    """Registered adapter versions, their lineage and the sequence run, over an MLflow backend."""

    def __init__(self, location: str | Path | None = None, namespace: str = DEFAULT_NAMESPACE):
        location = str(location or os.environ.get("AHL_STORE") or DEFAULT_STORE)
        self.namespace = namespace
        self.location = location
        if "://" in location:
            self.folder, self.uri, self.artifact_root = None, location, None
        else:
            self.folder = Path(location).resolve()
            self.uri = f"sqlite:///{self.folder / 'mlflow.db'}"
            self.artifact_root = (self.folder / "artifacts").as_uri()
        self._client = None
        self._experiment_id = None

    # -- backend ------------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the store holds anything yet (reads never create a folder store)."""
        if self.folder is not None and not (self.folder / "mlflow.db").exists():
            return False
        return self.experiment_id(create=False) is not None

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            # mlflow configures its loggers on import; its INFO lines are noise on our terminal.
            logging.getLogger("mlflow").setLevel(logging.WARNING)
            logging.getLogger("alembic").setLevel(logging.WARNING)

            if self.folder is not None:
                self.folder.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def experiment_id(self, create: bool = True) -> str | None:
        if self._experiment_id is None:
            try:
                experiment = self.client.get_experiment_by_name(self.namespace)
            except Exception as e:
                why = ("no MLflow tracking server answers there" if "Max retries" in str(e)
                       else str(e).splitlines()[0][:160])
                raise AhlError(f"cannot reach the store at {self.location}: {why}; start the "
                               "server or check --store") from None
            if experiment is not None:
                self._experiment_id = experiment.experiment_id
            elif create:
                self._experiment_id = self.client.create_experiment(
                    self.namespace, artifact_location=self.artifact_root,
                    tags={f"{TAG}store": "true"})
        return self._experiment_id

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

    def bind_base(self, name: str, sha256: str) -> None:
        if self.base_binding() is None:
            experiment = self.experiment_id()
            self.client.set_experiment_tag(experiment, f"{TAG}base.name", name)
            self.client.set_experiment_tag(experiment, f"{TAG}base.sha256", sha256)

    # -- tasks and versions -------------------------------------------------------------------

    def model_name(self, task: str) -> str:
        return f"{self.namespace}.{task}"

    def all_versions(self, include_removed: bool = False) -> dict[str, list]:
        """{task: its versions, oldest first}, tasks in order of their first version: one query,
        so that listing a store costs the same with 5 tasks or 500 versions."""
        if not self.exists():
            return {}
        prefix = f"{self.namespace}."
        found = self.client.search_model_versions(f"name LIKE '{prefix}%'", max_results=10000)
        with_aliases(found, self.client.search_registered_models(
            filter_string=f"name LIKE '{prefix}%'", max_results=1000))
        by_task: dict[str, list] = {}
        for v in sorted(found, key=lambda v: (v.creation_timestamp, int(v.version))):
            task = v.name[len(prefix):]
            if v.name.startswith(prefix) and not task.startswith("_") and (
                    include_removed or REMOVED not in v.tags):
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
        found = self.client.search_model_versions(f"name='{self.model_name(task)}'")
        if found:
            with_aliases(found, [self.client.get_registered_model(self.model_name(task))])
        return sorted((v for v in found if include_removed or REMOVED not in v.tags),
                      key=lambda v: int(v.version))

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
        versions = self.versions(task)
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
        try:
            return self.client.get_model_version_by_alias(self.model_name(task), at)
        except Exception:
            raise AhlError(f"task {task!r} has no version or alias {at!r}: see ahl store "
                           f"versions {task}") from None

    def promote(self, task: str, version: str, alias: str):
        """Point `alias` of a task at one of its versions (MLflow registered-model aliases)."""
        if not ALIAS.match(alias) or alias.isdigit():
            raise AhlError(f"alias {alias!r} is not a plain name: use letters, digits, '_' or '-', "
                           "starting with a letter (e.g. production)")
        target = self.resolve(f"{task}@{int(version) if str(version).isdigit() else version}")
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

    def set_gate(self, value: float | None) -> None:
        if value is None:
            if self.gate() is not None:
                self.client.delete_experiment_tag(self.experiment_id(), GATE)
        else:
            self.client.set_experiment_tag(self.experiment_id(), GATE, str(value))

    def verify(self) -> list[str]:
        """Re-hash every version's adapter files against the checksums recorded when it was
        registered; returns one line per missing or altered file."""
        problems = []
        for task, versions in self.all_versions(include_removed=True).items():
            for version in versions:
                recorded = json.loads(version.tags.get(f"{TAG}files", "{}"))
                try:
                    folder = self.adapter_folder(version)
                except Exception:
                    problems.append(f"{task}@{version.version}: adapter folder missing")
                    continue
                for name, sha in recorded.items():
                    path = folder / name
                    if not path.is_file():
                        problems.append(f"{task}@{version.version}: {name} missing")
                    elif sha256_file(path) != sha:
                        problems.append(f"{task}@{version.version}: {name} altered (sha256 "
                                        f"{sha256_file(path)[:12]}, recorded {sha[:12]})")
        return problems

    def adapter_folder(self, version) -> Path:
        """A local folder with the version's adapter files (downloaded if the store is remote)."""
        import mlflow

        return Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source,
                                                        tracking_uri=self.uri))

    def artifact_folder(self, run_id: str, path: str) -> Path:
        """A local copy of a run's artifact (the file itself for a folder store)."""
        import mlflow

        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                        tracking_uri=self.uri))

    def read_json_artifact(self, run_id: str, path: str):
        return json.loads(self.artifact_folder(run_id, path).read_text(encoding="utf-8"))

    def lineage(self, version, with_run: bool = True) -> dict:
        """A version's lineage, files and metrics, from its tags and run (DESIGN section 5);
        status: "removed" (ahl store rm), "held" (by the forgetting gate) or "live"."""
        tags = version.tags
        run = self.client.get_run(version.run_id) if with_run else None
        read = lambda key, default: json.loads(tags.get(f"{TAG}{key}", default))  # noqa: E731
        return {
            "task": tags.get(f"{TAG}task"), "version": int(version.version),
            "method": tags.get(f"{TAG}method"), "method_config": read("method.config", "{}"),
            "train": read("train", "{}"),
            "base": {"name": tags.get(f"{TAG}base.name"), "sha256": tags.get(f"{TAG}base.sha256")},
            "data": {"digest": tags.get(f"{TAG}data.digest"),
                     "rows": int(tags.get(f"{TAG}data.rows", 0)),
                     "test_rows": int(tags.get(f"{TAG}data.test_rows", 0)),
                     "source": tags.get(f"{TAG}data.source"), "split": read("data.split", "{}"),
                     "dropped": int(tags.get(f"{TAG}data.dropped", 0))},
            "labels": read("labels", "[]"),
            "parent": int(tags[f"{TAG}parent"]) if tags.get(f"{TAG}parent") else None,
            "after": [{"task": a["task"], "version": int(a["version"])} for a in read("after", "[]")],
            "router_version": int(tags[f"{TAG}router.version"]) if tags.get(f"{TAG}router.version") else None,
            "aliases": list(version.aliases or []),
            "run_id": version.run_id, "source": version.source,
            "files": read("files", "{}"), "metrics": dict(run.data.metrics) if run else {},
            "status": "removed" if REMOVED in tags else "held" if HELD in tags else "live",
            "held": read("gate.held", "null"),
            "package_version": tags.get(f"{TAG}package_version"),
        }

    # -- writing ------------------------------------------------------------------------------

    def start_run(self, task: str, params: dict, tags: dict) -> str:
        run = self.client.create_run(self.experiment_id(), run_name=task,
                                     tags={f"{TAG}task": task, **tags})
        self.client.log_batch(run.info.run_id, params=params_of(params))
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict, step: int, tags: list | None = None) -> None:
        """Metrics (and tags) in one batch: one transaction on a database backend."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step)
                                               for k, v in metrics.items()], tags=tags or [])

    def register(self, task: str, run_id: str, artifact_path: str, tags: dict):
        """Create the task's next version from a run's artifacts: the one atomic step.

        The lineage tags go in with the version in one call; if the registered model was made
        here and the version fails, the model is removed again, so nothing half-made is left.
        """
        name = self.model_name(task)
        created = False
        if not self.versions(task):
            try:
                self.client.get_registered_model(name)
            except Exception:
                self.client.create_registered_model(name, tags={f"{TAG}task": task})
                created = True
        try:
            source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
            return self.client.create_model_version(name, source=source, run_id=run_id,
                                                    tags={k: str(v) for k, v in tags.items()})
        except BaseException:
            if created:
                self.client.delete_registered_model(name)
            raise

    def set_version_tag(self, task: str, version, key: str, value) -> None:
        self.client.set_model_version_tag(self.model_name(task), str(version), key, str(value))

    def log_dataset(self, run_id: str, data) -> None:
        """A task's training rows as the run's MLflow dataset input (digest, rows, source)."""
        import pandas as pd
        from mlflow.data.pandas_dataset import from_pandas
        from mlflow.entities import DatasetInput, InputTag

        frame = pd.DataFrame({"text": data.train_texts,
                              "label": [data.labels[y] for y in data.train_labels]})
        with warnings.catch_warnings():  # mlflow registers the local-file source twice, says so
            warnings.simplefilter("ignore", UserWarning)
            dataset = from_pandas(frame, source=data.source, targets="label", name=data.name,
                                  digest=data.digest[:32])
        self.client.log_inputs(run_id, datasets=[DatasetInput(
            dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "train")])])

    def unregister(self, task: str, version: str) -> None:
        """Roll back a version made by a failed add-task (and its model if it was the first)."""
        name = self.model_name(task)
        self.client.delete_model_version(name, version)
        if not self.client.search_model_versions(f"name='{name}'"):
            self.client.delete_registered_model(name)

    def finish_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def sequence_run_id(self, create: bool = True) -> str | None:
        """The one long-lived run per store that collects the accuracy matrices."""
        if not self.exists() and not create:
            return None
        runs = self.client.search_runs([self.experiment_id()],
                                       filter_string=f"tags.`{TAG}kind` = '{SEQUENCE_RUN}'",
                                       max_results=1)
        if runs:
            return runs[0].info.run_id
        if not create:
            return None
        run = self.client.create_run(self.experiment_id(), run_name=SEQUENCE_RUN,
                                     tags={f"{TAG}kind": SEQUENCE_RUN})
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id


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


def params_of(values: dict) -> list:
    """MLflow params from a flat dict (values longer than MLflow's limit are cut, not refused)."""
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

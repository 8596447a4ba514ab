"""The writing half of a store: runs, metrics, artifacts, model versions, aliases and the lease
model, each one MLflow call (or a retry-safe few). AdapterStore inherits it; nothing outside the
store's modules touches MLflow's client.

Nothing written here grows with the number of tasks inside a tag or param (MLflow caps version
tags at 5,000 characters): lists that grow (`after`, a step's versions) go to artifacts.
"""

import json
import os
import socket
import tempfile
import time
import warnings
from pathlib import Path

RUN_OWNER = "ahl.owner"  # run tag: host:pid:start of the process that made it (repair reads it)


class TrackingWrites:
    """Mixed into AdapterStore: needs self.client, self.experiment_id(), self.model_name()."""

    # -- runs ---------------------------------------------------------------------------------

    def start_run(self, task: str, params: dict, tags: dict) -> str:
        from adapterhub_local.store import TAG

        run = self.client.create_run(self.experiment_id(), run_name=task, tags={
            f"{TAG}task": task, RUN_OWNER: process_owner(), **tags})
        self.client.log_batch(run.info.run_id, params=params_of(params))
        return run.info.run_id

    def finish_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def log_metrics(self, run_id: str, metrics: dict, step: int, tags: dict | None = None) -> None:
        """Metrics (and tags) in one batch: one transaction on a database backend (MLflow splits
        more than 1,000 metrics into several)."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step)
                                               for k, v in metrics.items()],
                              tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])

    def set_run_tag(self, run_id: str, key: str, value) -> None:
        self.client.set_tag(run_id, key, str(value))

    def run_info(self, run_id: str):
        """(status, tags, latest metrics) of a run."""
        run = self.client.get_run(run_id)
        return run.info.status, run.data.tags, run.data.metrics

    def running_runs(self) -> list:
        """The store's runs still marked RUNNING (a live writer's, or a killed one's)."""
        from adapterhub_local.store import pages

        return pages(self.client.search_runs, experiment_ids=[self.experiment_id()],
                     filter_string="attributes.status = 'RUNNING'")

    def find_run(self, tag: str, value: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id()],
                                       filter_string=f"tags.`{tag}` = '{value}'", max_results=1)
        return runs[0].info.run_id if runs else None

    def create_finished_run(self, name: str, tags: dict) -> str:
        run = self.client.create_run(self.experiment_id(), run_name=name, tags=tags)
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    # -- artifacts ----------------------------------------------------------------------------

    def log_artifacts(self, run_id: str, folder: Path, path: str) -> None:
        self.client.log_artifacts(run_id, str(folder), path)

    def log_json(self, run_id: str, path: str, value) -> None:
        """One JSON artifact at `path` (folder/name.json) of a run."""
        folder, name = os.path.split(path)
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / name
            file.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
            self.client.log_artifact(run_id, str(file), folder or None)

    def log_image(self, run_id: str, image, key: str, step: int) -> None:
        self.client.log_image(run_id, image, key=key, step=step)

    def log_dataset(self, run_id: str, data) -> None:
        """A task's training rows as the run's MLflow dataset input (digest, rows, source)."""
        import pandas as pd
        from mlflow.data.pandas_dataset import from_pandas
        from mlflow.entities import DatasetInput, InputTag

        target = "completion" if data.kind == "generate" else "label"
        frame = pd.DataFrame({"prompt": data.train_texts, "completion": data.train_targets}
                             if data.kind == "generate" else
                             {"text": data.train_texts,
                              "label": [data.labels[y] for y in data.train_labels]})
        with warnings.catch_warnings():  # mlflow registers the local-file source twice, says so
            warnings.simplefilter("ignore", UserWarning)
            dataset = from_pandas(frame, source=data.source, targets=target, name=data.name,
                                  digest=data.digest[:32])
        self.client.log_inputs(run_id, datasets=[DatasetInput(
            dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "train")])])

    # -- model versions and aliases -----------------------------------------------------------

    def register(self, task: str, run_id: str, artifact_path: str, tags: dict):
        """Create the task's next version from a run's artifacts, with its tags in the same call.
        Callers hold the store's lease; the registered model may still be made concurrently by
        an old client, so "already exists" is not an error."""
        name = self.model_name(task)
        try:
            self.client.create_registered_model(name, tags={"ahl.task": task})
        except Exception as e:
            if error_code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        return self.client.create_model_version(name, source=source, run_id=run_id,
                                                tags={k: str(v) for k, v in tags.items()})

    def unregister(self, name: str, version: str) -> None:
        """Delete a version (a rolled-back or never-committed one) and its model if now empty."""
        self.client.delete_model_version(name, str(version))
        from adapterhub_local.store import pages

        if not pages(self.client.search_model_versions, filter_string=f"name='{name}'"):
            self.client.delete_registered_model(name)

    def get_version(self, task: str, version):
        return self.client.get_model_version(self.model_name(task), str(version))

    def set_version_tag(self, task: str, version, key: str, value) -> None:
        self.client.set_model_version_tag(self.model_name(task), str(version), key, str(value))

    def delete_version_tag(self, task: str, version, key: str) -> None:
        self.client.delete_model_version_tag(self.model_name(task), str(version), key)

    def alias_version(self, task: str, alias: str):
        """The version an alias of a task points at, or None (a server that fails says so)."""
        try:
            return self.client.get_model_version_by_alias(self.model_name(task), alias)
        except Exception as e:
            # MLflow's basic-auth app answers 403, not 404, for a model that does not exist yet.
            if error_code(e) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE",
                                 "NOT_FOUND", "PERMISSION_DENIED"):
                return None
            raise

    def set_alias(self, task: str, alias: str, version) -> None:
        self.client.set_registered_model_alias(self.model_name(task), alias, str(version))

    def delete_alias(self, task: str, alias: str) -> None:
        self.client.delete_registered_model_alias(self.model_name(task), alias)

    # -- the lease model (commit.py builds the lock on these) ---------------------------------

    def create_model(self, name: str, tags: dict) -> bool:
        """Create a registered model; False if one of that name exists. MLflow's model names are
        unique in its database, so of two writers at once exactly one gets True."""
        try:
            self.client.create_registered_model(self.model_name(name),
                                                tags={k: str(v) for k, v in tags.items()})
            return True
        except Exception as e:
            if error_code(e) == "RESOURCE_ALREADY_EXISTS":
                return False
            raise

    def model_tags(self, name: str) -> dict | None:
        """A registered model's tags, or None if there is no such model."""
        try:
            return dict(self.client.get_registered_model(self.model_name(name)).tags)
        except Exception as e:
            if error_code(e) in ("RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED"):  # 403: as above
                return None
            raise

    def set_model_tag(self, name: str, key: str, value) -> None:
        self.client.set_registered_model_tag(self.model_name(name), key, str(value))

    def rename_model(self, name: str, new_name: str) -> bool:
        """Rename a registered model; False if it is gone or the new name is taken (another
        writer got there first)."""
        try:
            self.client.rename_registered_model(self.model_name(name), self.model_name(new_name))
            return True
        except Exception as e:
            if error_code(e) in ("RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS"):
                return False
            raise

    def delete_model(self, name: str) -> None:
        try:
            self.client.delete_registered_model(self.model_name(name))
        except Exception as e:
            if error_code(e) != "RESOURCE_DOES_NOT_EXIST":
                raise


def error_code(error: Exception) -> str | None:
    """MLflow's error code of an exception (RESOURCE_ALREADY_EXISTS, ...), if it has one."""
    return getattr(error, "error_code", None)


def params_of(values: dict) -> list:
    """MLflow params from a flat dict (values longer than MLflow's limit are cut, not refused)."""
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def process_owner() -> str:
    """host:pid:start of this process: the start time (from /proc where there is one) tells a
    reused pid from the process that took the lease or made the run."""
    return f"{socket.gethostname()}:{os.getpid()}:{process_start(os.getpid())}"


def process_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22: start time in ticks
    except OSError:
        return "?"


def owner_is_dead(owner: str) -> bool:
    """Whether the process named by process_owner() is gone. Only provable on its own host;
    elsewhere we cannot tell, and say it is alive."""
    host, _, rest = owner.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return start not in ("?", "") and process_start(int(pid)) != start

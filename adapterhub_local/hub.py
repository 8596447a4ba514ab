"""Hub: the Python face of adapterhub-local; the CLI is a thin layer over it.

    from adapterhub_local import Hub
    hub = Hub("store")
    hub.add_task("sentiment", train="train.csv")
    hub.metrics()
"""

import hashlib
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

from adapterhub_local import __version__
from adapterhub_local.base import load_base, resolve_base, fingerprint
from adapterhub_local.dashboards import MODES, log_step, read_matrices
from adapterhub_local.data import TaskData, check_task_name, load_spec, load_task_data
from adapterhub_local.errors import AhlError
from adapterhub_local.forgetting import first_steps, summarize
from adapterhub_local.inference import adapter_name, bank_for
from adapterhub_local.methods import get_method, method_options
from adapterhub_local.store import TAG, AdapterStore
from adapterhub_local.trainer import TrainOptions, train_adapter

ADAPTER_ARTIFACT = "adapter"
TEST_ARTIFACT = "eval/test.json"


class Hub:
    """A store of task adapters over one frozen base."""

    def __init__(self, store: str | Path | None = None, namespace: str = "ahl"):
        self.store = AdapterStore(store, namespace)
        self._test_splits: dict[str, dict] = {}

    # -- adding a task ------------------------------------------------------------------------

    def add_task(self, name: str | None = None, train: str | Path | None = None,
                 test: str | Path | None = None, *, spec: str | Path | None = None,
                 text_column: str | None = None, label_column: str | None = None,
                 method: str | None = None, method_args: dict | None = None,
                 base: str | None = None, progress: Callable[[int, int], None] | None = None,
                 **train_args) -> dict:
        """Learn an adapter for task `name`, register it as the task's next version, and
        re-evaluate every task. Options not given come from the spec, then the defaults.

        train_args: epochs, lr, batch_size, max_length, seed (see TrainOptions).
        """
        # 1. Validate everything before touching the store: a bad input changes nothing.
        defaults = {}
        if spec is not None:
            task_spec = load_spec(spec)
            name, train, test = name or task_spec.name, train or task_spec.train, test or task_spec.test
            text_column = text_column or task_spec.text_column
            label_column = label_column or task_spec.label_column
            defaults = task_spec.defaults
        if train is None:
            raise AhlError("no training data: pass --train FILE or --spec FILE")
        check_task_name(name)
        method = method or defaults.get("method", "lora")
        get_method(method)
        options = method_options(method, {**defaults.get("method_args", {}), **(method_args or {})})
        known = set(TrainOptions.__dataclass_fields__)
        unknown = sorted(set(train_args) - known)
        if unknown:
            raise AhlError(f"unknown training option {', '.join(unknown)}: use {', '.join(sorted(known))}")
        train_options = TrainOptions(**{**{k: v for k, v in defaults.items() if k in known},
                                        **{k: v for k, v in train_args.items() if v is not None}})
        data = load_task_data(name, train, test, text_column or "text", label_column or "label",
                              seed=train_options.seed)
        base_name = base or (self.store.base_binding() or (None,))[0]
        base_name, base_path = resolve_base(base_name)
        self.store.check_base(base_name, fingerprint(base_path))

        # 2. Load the base once and every task's current adapter (needed to re-evaluate).
        loaded = load_base(base_name)
        bank = bank_for(loaded)
        current = {t: self.store.current_version(t) for t in self.store.task_names()}
        for task, version in current.items():
            self._load_version(bank, task, version)
        parent = current.get(name)
        peft_config = get_method(method).build(options, loaded)

        # 3. Train, evaluate, register, log: the version appears only if every step succeeds.
        run_id = self.store.start_run(name, params={
            "task": name, "method": method, **{f"method.{k}": v for k, v in vars(options).items()},
            **train_options.as_dict(), "base": loaded.name, "data.source": data.source,
            "data.rows": len(data.train_texts), "data.test_rows": len(data.test_texts),
        }, tags={f"{TAG}base.sha256": loaded.sha256})
        log_dataset(self.store, run_id, data)
        new_adapter = adapter_name(name, run_id)
        registered = None
        try:
            started = time.time()
            report = train_adapter(bank, new_adapter, peft_config, data, train_options,
                                   log=lambda m, step: self.store.log_metrics(run_id, m, step),
                                   progress=progress)
            train_seconds = time.time() - started
            accuracy = bank.accuracy(new_adapter, data.test_texts, data.test_labels,
                                     train_options.max_length)
            self.store.log_metrics(run_id, {"test_accuracy": accuracy,
                                            "train_seconds": train_seconds,
                                            "trainable_params": report.trainable_params},
                                   report.steps)
            files = self._log_adapter(bank, new_adapter, run_id, data)
            after = [{"task": t, "version": int(v.version)} for t, v in current.items() if t != name]
            self.store.bind_base(loaded.name, loaded.sha256)
            registered = self.store.register(name, run_id, ADAPTER_ARTIFACT, tags={
                f"{TAG}task": name, f"{TAG}method": method,
                f"{TAG}method.config": json.dumps(vars(options)),
                f"{TAG}train": json.dumps(train_options.as_dict()),
                f"{TAG}base.name": loaded.name, f"{TAG}base.sha256": loaded.sha256,
                f"{TAG}data.digest": data.digest, f"{TAG}data.rows": len(data.train_texts),
                f"{TAG}data.test_rows": len(data.test_texts), f"{TAG}data.source": data.source,
                f"{TAG}data.split": json.dumps(data.split), f"{TAG}data.dropped": data.dropped,
                f"{TAG}parent": parent.version if parent else "",
                f"{TAG}after": json.dumps(after), f"{TAG}labels": json.dumps(data.labels),
                f"{TAG}files": json.dumps(files), f"{TAG}accuracy": f"{accuracy:.6f}",
                f"{TAG}package_version": __version__,
            })
            step = self._evaluate_step(bank, name, registered, accuracy)
        except BaseException as e:
            if registered is not None:
                self.store.unregister(name, registered.version)
            bank.remove_adapter(new_adapter)
            self.store.finish_run(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        self.store.finish_run(run_id)
        return {"task": name, "version": int(registered.version), "method": method,
                "accuracy": accuracy, "val_accuracy": report.val_accuracy,
                "train_seconds": round(train_seconds, 2), "steps": report.steps,
                "train_rows": report.train_rows, "test_rows": len(data.test_texts),
                "dropped_rows": data.dropped, "trainable_params": report.trainable_params,
                "parent": int(parent.version) if parent else None, "run_id": run_id, **step}

    def _log_adapter(self, bank, adapter: str, run_id: str, data: TaskData) -> dict:
        """Save the adapter and the test split as run artifacts; return {file: sha256}."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / ADAPTER_ARTIFACT
            bank.save_adapter(adapter, folder)
            files = {f.name: sha256_file(f) for f in sorted(folder.iterdir())}
            self.store.client.log_artifacts(run_id, str(folder), ADAPTER_ARTIFACT)
            test_file = Path(tmp) / Path(TEST_ARTIFACT).name
            test_file.write_text(json.dumps({"texts": data.test_texts, "labels": data.test_labels},
                                            ensure_ascii=False), encoding="utf-8")
            self.store.client.log_artifact(run_id, str(test_file), str(Path(TEST_ARTIFACT).parent))
        return files

    def _load_version(self, bank, task: str, version) -> str:
        name = adapter_name(task, version.run_id)
        bank.load_adapter(name, self.store.adapter_folder(version))
        return name

    def _test_split(self, version) -> dict:
        if version.run_id not in self._test_splits:
            self._test_splits[version.run_id] = self.store.read_json_artifact(version.run_id,
                                                                              TEST_ARTIFACT)
        return self._test_splits[version.run_id]

    def _evaluate_step(self, bank, new_task: str, new_version, new_accuracy: float) -> dict:
        """Evaluate every task's current version, append a row to each matrix, log it."""
        tasks, matrices = read_matrices(self.store)
        if new_task not in tasks:
            tasks = tasks + [new_task]
        row, versions = [], {}
        for task in tasks:
            version = new_version if task == new_task else self.store.current_version(task)
            versions[task] = int(version.version)
            if task == new_task:
                row.append(new_accuracy)
                continue
            split = self._test_split(version)
            max_length = json.loads(version.tags.get(f"{TAG}train", "{}")).get("max_length", 128)
            row.append(bank.accuracy(self._load_version(bank, task, version), split["texts"],
                                     split["labels"], max_length))
        R = [r + [None] * (len(tasks) - len(r)) for r in matrices["oracle"]] + [row]
        log_step(self.store, tasks, {"oracle": R}, versions)
        learned = [R[first][j] for j, first in enumerate(first_steps(R))]
        return {"step": len(R), "tasks": tasks, "row": row, "learned": learned, **{
            k: v for k, v in summarize(R).items() if k != "matrix"}}

    # -- queries ------------------------------------------------------------------------------

    def tasks(self) -> list[dict]:
        """Each task with its current version, method, aliases and latest oracle accuracy."""
        tasks, matrices = read_matrices(self.store)
        last_row = dict(zip(tasks, matrices["oracle"][-1])) if matrices["oracle"] else {}
        result = []
        for task in self.store.task_names():
            version = self.store.current_version(task)
            accuracy = last_row.get(task)
            result.append({"task": task, "version": int(version.version),
                           "method": version.tags.get(f"{TAG}method"),
                           "aliases": list(version.aliases or []),
                           "accuracy": accuracy if accuracy is not None
                           else float(version.tags.get(f"{TAG}accuracy", "nan"))})
        return result

    def metrics(self) -> dict:
        """The accuracy matrix and forgetting summary per mode (DESIGN section 5)."""
        self.require_tasks()
        tasks, matrices = read_matrices(self.store)
        return {"tasks": tasks, "modes": {mode: summarize(matrices[mode]) for mode in MODES}}

    def show(self, ref: str) -> dict:
        """A version's lineage, files and metrics: 'NAME', 'NAME@VERSION' or 'NAME@ALIAS'."""
        version = self.store.resolve(ref)
        tags = version.tags
        run = self.store.client.get_run(version.run_id)
        return {
            "task": tags.get(f"{TAG}task"), "version": int(version.version),
            "method": tags.get(f"{TAG}method"),
            "method_config": json.loads(tags.get(f"{TAG}method.config", "{}")),
            "train": json.loads(tags.get(f"{TAG}train", "{}")),
            "base": {"name": tags.get(f"{TAG}base.name"), "sha256": tags.get(f"{TAG}base.sha256")},
            "data": {"digest": tags.get(f"{TAG}data.digest"),
                     "rows": int(tags.get(f"{TAG}data.rows", 0)),
                     "test_rows": int(tags.get(f"{TAG}data.test_rows", 0)),
                     "source": tags.get(f"{TAG}data.source"),
                     "split": json.loads(tags.get(f"{TAG}data.split", "{}")),
                     "dropped": int(tags.get(f"{TAG}data.dropped", 0))},
            "labels": json.loads(tags.get(f"{TAG}labels", "[]")),
            "parent": int(tags[f"{TAG}parent"]) if tags.get(f"{TAG}parent") else None,
            "after": [{"task": a["task"], "version": int(a["version"])}
                      for a in json.loads(tags.get(f"{TAG}after", "[]"))],
            "aliases": list(version.aliases or []),
            "run_id": version.run_id, "source": version.source,
            "files": json.loads(tags.get(f"{TAG}files", "{}")),
            "metrics": dict(run.data.metrics),
            "package_version": tags.get(f"{TAG}package_version"),
        }

    def require_tasks(self) -> None:
        if not self.store.task_names():
            raise AhlError(f"store {self.store.location} has no tasks yet: add one with "
                           "ahl add-task NAME --train FILE")


def log_dataset(store, run_id: str, data: TaskData) -> None:
    """The training rows as an MLflow dataset input (digest, rows, source) of the run."""
    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.entities import DatasetInput, InputTag

    frame = pd.DataFrame({"text": data.train_texts,
                          "label": [data.labels[y] for y in data.train_labels]})
    with warnings.catch_warnings():  # mlflow registers the local-file source twice and says so
        warnings.simplefilter("ignore", UserWarning)
        dataset = from_pandas(frame, source=data.source, targets="label", name=data.name,
                              digest=data.digest[:32])
    store.client.log_inputs(run_id, datasets=[DatasetInput(
        dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "train")])])


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()

"""Hub: the Python face of adapterhub-local; the CLI is a thin layer over it.

    from adapterhub_local import Hub
    hub = Hub("store")
    hub.add_task("sentiment", train="train.csv")
    hub.predict(["what a lovely day", "wo ist der bahnhof?"])
    hub.metrics()
"""

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from adapterhub_local import __version__
from adapterhub_local.base import fingerprint, load_base, resolve_base
from adapterhub_local.dashboards import MODES, log_step, read_matrices, read_confusion
from adapterhub_local.data import TaskData, check_task_name, load_spec, load_task_data
from adapterhub_local.errors import AhlError
from adapterhub_local.evaluation import COMPOSE_TOP_K, evaluate_task
from adapterhub_local.forgetting import first_steps, regressions, summarize
from adapterhub_local.inference import answer, adapter_name, bank_for
from adapterhub_local.methods import get_method, method_options
from adapterhub_local.router import GaussianRouter, Route, TaskStats, task_stats
from adapterhub_local.store import (HELD, PRODUCTION, ROUTER, TAG, AdapterStore, parse_ref,
                                    sha256_file)
from adapterhub_local.trainer import TrainOptions, split_validation, train_adapter

ADAPTER_ARTIFACT, STATS_ARTIFACT, ROUTER_ARTIFACT = "adapter", "router_stats", "router"
TEST_ARTIFACT = "eval/test.json"
PREDICT_MODES = ("pick", "compose")


@dataclass
class Plan:
    """A validated add-task: everything checked before the store is touched."""

    data: TaskData
    method: str
    options: object
    peft_config: object
    """What the method's builder made of the options for this base."""
    train: TrainOptions
    base: str


class Hub:
    """A store of task adapters over one frozen base."""

    def __init__(self, store: str | Path | None = None, namespace: str = "ahl"):
        self.store = AdapterStore(store, namespace)
        self._cache: dict[tuple[str, str], object] = {}  # (run id, what) -> test split, outputs
        self._opened = None  # (router version, what _open_router returned for it)

    # -- adding a task ------------------------------------------------------------------------

    def add_task(self, name: str | None = None, train: str | Path | None = None,
                 test: str | Path | None = None, *, spec: str | Path | None = None,
                 text_column: str | None = None, label_column: str | None = None,
                 method: str | None = None, method_args: dict | None = None,
                 base: str | None = None, gate: float | None = None,
                 progress: Callable[[int, int], None] | None = None, **train_args) -> dict:
        """Learn an adapter for task `name`, register it as the task's next version, refit the
        router, and re-evaluate every task in every mode. Options not given come from the spec,
        then the defaults. train_args: epochs, lr, batch_size, max_length, seed (TrainOptions).

        With a forgetting gate (`gate`, else the store's), the new version gets the production
        alias only if no earlier task's routed accuracy dropped by more than the gate; otherwise
        it is kept as a candidate and result["gate"]["passed"] is False.
        """
        plan = self._plan(name, train, test, spec, text_column, label_column, method,
                          method_args, base, train_args)
        gate = self.store.gate() if gate is None else check_gate(gate)
        name, data = plan.data.name, plan.data
        loaded = load_base(plan.base)
        bank = bank_for(loaded)
        current = self.store.serving()  # the new version is measured beside what serves now
        parent = self.store.current_version(name)
        run_id = self.store.start_run(name, params={
            "task": name, "method": plan.method, **plan.train.as_dict(), "base": loaded.name,
            **{f"method.{k}": v for k, v in vars(plan.options).items()},
            "data.source": data.source, "data.rows": len(data.train_texts),
            "data.test_rows": len(data.test_texts)}, tags={f"{TAG}base.sha256": loaded.sha256})
        self.store.log_dataset(run_id, data)
        new_adapter = adapter_name(name, run_id)
        registered = router_version = None
        try:
            started = time.time()
            report = train_adapter(bank, new_adapter, plan.peft_config, data, plan.train,
                                   get_method(plan.method),
                                   log=lambda m, step: self.store.log_metrics(run_id, m, step),
                                   progress=progress)
            train_seconds = time.time() - started
            probs = bank.probabilities(data.test_texts, [new_adapter] * len(data.test_texts),
                                       plan.train.max_length)
            accuracy = sum(int(p.argmax()) == y for p, y in zip(probs, data.test_labels)) / len(probs)
            self._cache[(run_id, "probs")] = probs
            self._cache[(run_id, "test")] = {"texts": data.test_texts, "labels": data.test_labels}
            self.store.log_metrics(run_id, {"test_accuracy": accuracy, "train_seconds": train_seconds,
                                            "trainable_params": report.trainable_params}, report.steps)
            stats = {t: self._task_stats(v) for t, v in current.items() if t != name}
            stats[name] = self._fit_stats(bank, data, plan.train)
            router = GaussianRouter().fit(stats)
            files = self._log_artifacts(bank, new_adapter, run_id, data, stats[name])
            self.store.bind_base(loaded.name, loaded.sha256)
            registered = self.store.register(name, run_id, ADAPTER_ARTIFACT, tags={
                **lineage_tags(plan, loaded, data, parent, current, files, accuracy)})
            versions = {t: int(v.version) for t, v in current.items()} | {name: int(registered.version)}
            router_version = self._register_router(router, run_id, versions)
            self.store.set_version_tag(name, registered.version, f"{TAG}router.version",
                                       router_version.version)
            evaluated = {**current, name: registered}
            step, record = self._evaluate_step(bank, router, evaluated)
            step["gate"] = self._apply_gate(gate, name, registered, step)
            self._sync_router()
            # Last, in one batch: a step is in the matrices only if everything else succeeded.
            log_step(self.store, *record, {t: int(v.version) for t, v in evaluated.items()})
        except BaseException as e:
            for task, made in ((ROUTER, router_version), (name, registered)):
                if made is not None:
                    self.store.unregister(task, made.version)
            if registered is not None:  # deleting a version drops its aliases: put them back
                self._restore_production(name, current.get(name))
            bank.remove_adapter(new_adapter)
            self.store.finish_run(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        self.store.finish_run(run_id)
        return {"task": name, "version": int(registered.version), "method": plan.method,
                "accuracy": accuracy, "val_accuracy": report.val_accuracy,
                "train_seconds": round(train_seconds, 2), "steps": report.steps,
                "train_rows": report.train_rows, "test_rows": len(data.test_texts),
                "dropped_rows": data.dropped, "trainable_params": report.trainable_params,
                "parent": int(parent.version) if parent else None, "run_id": run_id,
                "router_version": int(router_version.version),
                "serving": int(registered.version) == int(getattr(
                    self.store.serving().get(name), "version", 0)), **step}

    def _plan(self, name, train, test, spec, text_column, label_column, method, method_args,
              base, train_args) -> Plan:
        """Validate every input; raises AhlError before anything is written."""
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
        options = method_options(method, {**defaults.get("method_args", {}), **(method_args or {})})
        known = set(TrainOptions.__dataclass_fields__)
        unknown = sorted(set(train_args) - known)
        if unknown:
            raise AhlError(f"unknown training option {', '.join(unknown)}: use {', '.join(sorted(known))}")
        train_options = TrainOptions(**{**{k: v for k, v in defaults.items() if k in known},
                                        **{k: v for k, v in train_args.items() if v is not None}})
        data = load_task_data(name, train, test, text_column or "text", label_column or "label",
                              seed=train_options.seed)
        base_name, base_path = resolve_base(base or (self.store.base_binding() or (None,))[0])
        self.store.check_base(base_name, fingerprint(base_path))
        loaded = load_base(base_name)
        get_method(method).check_base(loaded)
        peft_config = get_method(method).build(options, loaded)  # bad combinations fail here
        return Plan(data, method, options, peft_config, train_options, base_name)

    def _fit_stats(self, bank, data: TaskData, options: TrainOptions) -> TaskStats:
        """The router's statistics of a task: its training rows' features, with the trainer's
        validation rows held out to calibrate the router."""
        fit_rows, held_rows = split_validation(data.train_labels, options.seed)
        features = bank.features(data.train_texts, options.max_length)
        return task_stats(features[fit_rows], [data.train_labels[i] for i in fit_rows],
                          data.labels, features[held_rows])

    def _log_artifacts(self, bank, adapter: str, run_id: str, data: TaskData,
                       stats: TaskStats) -> dict:
        """The adapter (PEFT folder + head + labels), the router statistics and the test split,
        as run artifacts; returns {adapter file: sha256}."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / ADAPTER_ARTIFACT
            bank.save_adapter(adapter, folder)
            files = {f.name: sha256_file(f) for f in sorted(folder.iterdir())}
            self.store.client.log_artifacts(run_id, str(folder), ADAPTER_ARTIFACT)
            stats.save(Path(tmp) / STATS_ARTIFACT)
            self.store.client.log_artifacts(run_id, str(Path(tmp) / STATS_ARTIFACT), STATS_ARTIFACT)
            test_file = Path(tmp) / Path(TEST_ARTIFACT).name
            test_file.write_text(json.dumps({"texts": data.test_texts, "labels": data.test_labels},
                                            ensure_ascii=False), encoding="utf-8")
            self.store.client.log_artifact(run_id, str(test_file), str(Path(TEST_ARTIFACT).parent))
        return files

    def _register_router(self, router: GaussianRouter, run_id: str, versions: dict[str, int]):
        with tempfile.TemporaryDirectory() as tmp:
            router.save(Path(tmp), versions)
            self.store.client.log_artifacts(run_id, tmp, ROUTER_ARTIFACT)
        return self.store.register(ROUTER, run_id, ROUTER_ARTIFACT, tags={
            f"{TAG}versions": json.dumps(versions), f"{TAG}shrinkage": router.shrinkage_,
            f"{TAG}threshold": router.threshold_, f"{TAG}package_version": __version__})

    def _evaluate_step(self, bank, router: GaussianRouter, versions: dict) -> tuple[dict, tuple]:
        """Evaluate the given version of every task in every mode: (the step's summary, what
        log_step records: tasks, the matrices with the new row, the router's confusion)."""
        tasks, matrices = read_matrices(self.store)
        tasks = tasks + [t for t in versions if t not in tasks]
        adapters = {t: self._load_version(bank, t, v) for t, v in versions.items()}
        results = {}
        for task, version in versions.items():  # a removed task keeps its column, empty
            split = self._cached(version.run_id, "test", lambda: self.store.read_json_artifact(
                version.run_id, TEST_ARTIFACT))
            max_length = max_length_of(version)
            probs = self._cached(version.run_id, "probs", lambda: bank.probabilities(
                split["texts"], [adapters[task]] * len(split["texts"]), max_length))
            features = self._cached(version.run_id, "features", lambda: bank.features(
                split["texts"], max_length))
            results[task] = evaluate_task(bank, router, task, adapters, split["texts"],
                                          split["labels"], probs, features, max_length)
        for mode in (*MODES, "routing"):
            old = [r + [None] * (len(tasks) - len(r)) for r in matrices[mode]]
            matrices[mode] = old + [[getattr(results[t], mode) if t in results else None
                                     for t in tasks]]
        confusion = {"tasks": router.tasks_, "true_tasks": list(results),
                     "matrix": [results[t].confusion for t in results]}
        R = matrices["oracle"]
        return {"step": len(R), "tasks": tasks, "row": R[-1],
                "learned": [R[first][j] for j, first in enumerate(first_steps(R))],
                "routed_row": matrices["routed"][-1], "routing_row": matrices["routing"][-1],
                "routed_regressions": regressions(matrices["routed"], 0.0),
                **{k: v for k, v in summarize(R).items() if k != "matrix"},
                "routed_average_accuracy": summarize(matrices["routed"])["average_accuracy"],
                "composed_average_accuracy": summarize(matrices["composed"])["average_accuracy"]
                }, (tasks, matrices, confusion)

    def _apply_gate(self, gate: float | None, task: str, version, step: dict) -> dict | None:
        """Promote the new version to production if no earlier task's routed accuracy dropped by
        more than the gate; else mark it held (a candidate) and leave the alias where it was."""
        if gate is None:
            return None
        dropped = [{"task": step["tasks"][j], "before": before, "after": after,
                    "drop": before - after}
                   for j, before, after in step["routed_regressions"]
                   if before - after > gate and step["tasks"][j] != task]
        if dropped:
            self.store.set_version_tag(task, version.version, HELD, json.dumps(
                {"gate": gate, "regressions": dropped}))
        else:
            self.store.client.set_registered_model_alias(self.store.model_name(task), PRODUCTION,
                                                         str(version.version))
        return {"threshold": gate, "passed": not dropped, "regressions": dropped}

    def _sync_router(self) -> None:
        """Point the router's production alias at a router fit for exactly the serving versions:
        the newest such router version, else a new one fit from the stored statistics."""
        serving = self.store.serving()
        wanted = {t: int(v.version) for t, v in serving.items()}
        name = self.store.model_name(ROUTER)
        for router_version in reversed(self.store.versions(ROUTER)):
            if router_versions(router_version) == wanted:
                self.store.client.set_registered_model_alias(name, PRODUCTION,
                                                             str(router_version.version))
                return
        if not serving:
            if self._serving_router() is not None:
                self.store.client.delete_registered_model_alias(name, PRODUCTION)
            return
        router = GaussianRouter().fit({t: self._task_stats(v) for t, v in serving.items()})
        run_id = self.store.start_run(ROUTER, params={"versions": json.dumps(wanted)},
                                      tags={f"{TAG}kind": "router"})
        try:
            made = self._register_router(router, run_id, wanted)
            self.store.client.set_registered_model_alias(name, PRODUCTION, str(made.version))
        except BaseException:
            self.store.finish_run(run_id, "FAILED")
            raise
        self.store.finish_run(run_id)

    def _restore_production(self, task: str, version) -> None:
        if version is not None and PRODUCTION in (version.aliases or []):
            self.store.client.set_registered_model_alias(self.store.model_name(task), PRODUCTION,
                                                         str(version.version))
        self._sync_router()

    def _serving_router(self):
        """The router version prediction uses: the router's production alias (stores made before
        aliases existed: its newest version)."""
        try:
            return self.store.client.get_model_version_by_alias(self.store.model_name(ROUTER),
                                                                PRODUCTION)
        except Exception:
            return self.store.current_version(ROUTER)

    # -- loading ------------------------------------------------------------------------------

    def _cached(self, run_id: str, what: str, compute: Callable):
        if (run_id, what) not in self._cache:
            self._cache[(run_id, what)] = compute()
        return self._cache[(run_id, what)]

    def _load_version(self, bank, task: str, version) -> str:
        name = adapter_name(task, version.run_id)
        method = get_method(version.tags.get(f"{TAG}method", "lora"))
        bank.load_adapter(name, self.store.adapter_folder(version), method)
        return name

    def _task_stats(self, version) -> TaskStats:
        return self._cached(version.run_id, "stats", lambda: TaskStats.load(
            self.store.artifact_folder(version.run_id, STATS_ARTIFACT)))

    def _open_router(self):
        """(bank, router, {task: adapter name}, {task: version}) of the current router version:
        the adapters loaded are exactly the versions that router was fit for."""
        self.require_tasks()
        version = self._serving_router()
        if version is None:
            raise AhlError(f"store {self.store.location} has no serving versions (the gate held "
                           "them all back): promote one with ahl store promote NAME VERSION "
                           "--alias production")
        if self._opened and self._opened[0] == version.version:
            return self._opened[1]
        router = GaussianRouter.load(self.store.adapter_folder(version))
        bank = bank_for(load_base(self.store.base_binding()[0]))
        versions = router_versions(version)
        adapters = {t: self._load_version(bank, t, self.store.resolve(f"{t}@{v}"))
                    for t, v in versions.items()}
        self._opened = (version.version, (bank, router, adapters, versions))
        return self._opened[1]

    # -- predicting ---------------------------------------------------------------------------

    def route(self, texts: list[str], top_k: int = 1) -> list[Route]:
        """Which task(s) each text belongs to, with weights; abstains on empty or unknown text."""
        texts = check_texts(texts)
        if not texts:
            return []
        bank, router, _, _ = self._open_router()
        return self._route(bank, router, texts, top_k)[0]

    def _route(self, bank, router, texts: list[str], top_k: int, keep_states: bool = False):
        """(routes, states): the states after the base's bottom half are kept on request, so
        that prediction goes on from them instead of running the bottom half again."""
        filled = [i for i, t in enumerate(texts) if t.strip()]
        routes = [Route([], [], 0.0, "empty text")] * len(texts)
        states = [None] * len(texts)
        if filled:
            features, kept = bank.encode([texts[i] for i in filled], keep_states=keep_states)
            for k, (i, route) in enumerate(zip(filled, router.route(features, top_k))):
                routes[i] = route
                states[i] = kept[k] if keep_states else None
        return routes, states

    def predict(self, texts: list[str], mode: str = "pick", top_k: int = COMPOSE_TOP_K,
                task: str | None = None) -> list[dict]:
        """One answer per text: {"text", "task", "label", "score", "adapters"}. Without `task`
        the router decides: "pick" one adapter, or "compose" the top_k. task/label are None
        when it abstains ("reason" says why)."""
        texts = check_texts(texts)
        if mode not in PREDICT_MODES:
            raise AhlError(f"unknown mode {mode!r}: use pick or compose")
        if top_k < 1:
            raise AhlError(f"top_k must be at least 1, got {top_k}: try --top-k 2")
        if not texts:
            return []
        bank, router, adapters, versions = self._open_router()
        if task is not None:
            if task not in adapters:
                raise AhlError(f"no task {task!r} in store {self.store.location} (tasks: "
                               f"{', '.join(adapters)}): check the name")
            routes = [Route([task], [1.0], 1.0) if t.strip() else Route([], [], 0.0, "empty text")
                      for t in texts]
            states = None
        else:
            routes, states = self._route(bank, router, texts,
                                         1 if mode == "pick" else top_k,
                                         keep_states=True)
        pairs = [(row, t) for row, r in enumerate(routes) for t in r.tasks]
        probs = bank.probabilities([texts[row] for row, _ in pairs], [adapters[t] for _, t in pairs],
                                   states=states and [states[row] for row, _ in pairs])
        by_row: list[dict[str, torch.Tensor]] = [{} for _ in texts]
        for (row, t), p in zip(pairs, probs):
            by_row[row][t] = p
        labels = {t: bank.labels[name] for t, name in adapters.items()}
        results = []
        for text, route, row_probs in zip(texts, routes, by_row):
            result = answer(route, row_probs, labels)
            results.append({"text": text, "task": result["task"], "label": result["label"],
                            "score": result["score"],
                            "adapters": [{"task": t, "version": versions[t], "weight": w}
                                         for t, w in zip(route.tasks, route.weights)],
                            **({"reason": route.reason} if route.reason else {})})
        return results

    # -- queries ------------------------------------------------------------------------------

    def tasks(self) -> list[dict]:
        """Each task with the version that serves (None while the gate holds back its only
        versions), its method, aliases and latest oracle accuracy."""
        last_row = last_oracle_row(self.store)
        serving = self.store.serving()
        result = []
        for task, versions in self.store.all_versions().items():
            version = serving.get(task, versions[-1])
            accuracy = last_row.get(task) if task in serving else None
            result.append({"task": task,
                           "version": int(version.version) if task in serving else None,
                           "method": version.tags.get(f"{TAG}method"),
                           "aliases": list(version.aliases or []),
                           "accuracy": accuracy if accuracy is not None
                           else float(version.tags.get(f"{TAG}accuracy", "nan"))})
        return result

    def metrics(self, confusion: bool = False) -> dict:
        """Accuracy matrices and forgetting per mode, the routing-accuracy matrix (DESIGN 5),
        and with confusion=True the router's task confusion at the last step."""
        self.require_tasks()
        tasks, matrices = read_matrices(self.store)
        result = {"tasks": tasks, "modes": {mode: summarize(matrices[mode]) for mode in MODES},
                  "routing_accuracy": matrices["routing"]}
        if confusion:
            result["confusion"] = read_confusion(self.store)
        return result

    def show(self, ref: str) -> dict:
        """A version's lineage, files and metrics: 'NAME', 'NAME@VERSION' or 'NAME@ALIAS'."""
        return self.store.lineage(self.store.resolve(ref))

    def versions(self, task: str) -> list[dict]:
        """Every version of a task, oldest first, as `show` gives each."""
        self.store.resolve(task)  # an unknown task is a one-line error naming the known ones
        return [self.store.lineage(v) for v in self.store.versions(task)]

    def promote(self, task: str, version: int | str, alias: str) -> dict:
        """Point a task's alias (e.g. production) at one of its versions; routing follows the
        production alias."""
        promoted = self.store.promote(task, version, alias)
        if alias == PRODUCTION:
            self._sync_router()
        return self.store.lineage(promoted)

    def remove(self, ref: str) -> dict:
        """Take NAME@VERSION out of queries and routing; its run and files stay, and
        `lineage` still shows it. The router is refit without it if it was serving."""
        task, at = parse_ref(ref)
        if at is None:
            raise AhlError(f"say which version to remove: {task}@VERSION (see ahl store "
                           f"versions {task})")
        version = self.store.resolve(ref)
        self.store.remove(version)
        self._sync_router()
        return self.store.lineage(self.store.client.get_model_version(version.name,
                                                                      version.version))

    def lineage(self, task: str) -> dict:
        """Every version of a task, removed ones included, as a tree: each version's parent,
        the tasks it was trained after, base, data digest, method, accuracy and status."""
        versions = self.store.versions(task, include_removed=True)
        if not versions:
            self.store.resolve(task)  # the one-line error naming the known tasks
        serving = getattr(self.store.serving().get(task), "version", None)
        nodes = []
        for v in versions:
            info = self.store.lineage(v, with_run=False)
            nodes.append({k: info[k] for k in ("version", "parent", "after", "base", "method",
                                               "aliases", "status")}
                         | {"data_digest": info["data"]["digest"],
                            "accuracy": float(v.tags.get(f"{TAG}accuracy", "nan")),
                            "serving": v.version == serving,
                            "children": [int(c.version) for c in versions
                                         if c.tags.get(f"{TAG}parent") == str(v.version)]})
        return {"task": task, "versions": nodes}

    def gate(self, value: float | None = None, off: bool = False) -> float | None:
        """The store's default forgetting gate: read it, set it (value) or clear it (off)."""
        if off or value is not None:
            self.store.set_gate(None if off else check_gate(value))
        return self.store.gate()

    def export(self, ref: str, folder: str | Path, force: bool = False) -> dict:
        """Copy a version's adapter into a plain PEFT folder (adapter_config.json and
        adapter_model.safetensors, plus head.safetensors and labels.json) that
        `PeftModel.from_pretrained(base, folder)` loads. Refuses a non-empty folder unless force."""
        version = self.store.resolve(ref)
        folder = Path(folder)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not force:
            raise AhlError(f"{folder} is not an empty folder: pass --force to overwrite, or "
                           "export into a new folder")
        recorded = json.loads(version.tags.get(f"{TAG}files", "{}"))
        source = self.store.adapter_folder(version)
        altered = [name for name, sha in recorded.items()
                   if not (source / name).is_file() or sha256_file(source / name) != sha]
        if altered:
            raise AhlError(f"{ref}: stored files {', '.join(altered)} are missing or altered: "
                           "run ahl store verify")
        folder.mkdir(parents=True, exist_ok=True)
        for name in recorded:
            shutil.copyfile(source / name, folder / name)
        return {"task": version.tags.get(f"{TAG}task"), "version": int(version.version),
                "folder": str(folder), "files": sorted(recorded)}

    def verify(self) -> list[str]:
        """Missing or altered artifacts, one line each (empty when the store is intact)."""
        self.require_tasks()
        return self.store.verify()

    def require_tasks(self) -> None:
        if not self.store.task_names():
            raise AhlError(f"store {self.store.location} has no tasks yet: add one with "
                           "ahl add-task NAME --train FILE")


def check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise AhlError("predict takes a list of texts, not one string: wrap it in [ ]")
    texts = list(texts)
    wrong = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if wrong:
        raise AhlError(f"item {wrong[0]} is a {type(texts[wrong[0]]).__name__}, not a string: "
                       "pass texts as strings")
    return texts


def check_gate(gate: float) -> float:
    if not 0 <= gate < 1:
        raise AhlError(f"gate {gate} is not an accuracy drop between 0 and 1: try --gate 0.02")
    return float(gate)


def router_versions(router_version) -> dict[str, int]:
    """{task: version} that a router version was fit for."""
    return {t: int(v) for t, v in json.loads(router_version.tags[f"{TAG}versions"]).items()}


def last_oracle_row(store) -> dict[str, float]:
    """{task: oracle accuracy at the last step}: MLflow keeps each metric's latest value on the
    run, so this is one query however long the sequence."""
    run_id = store.sequence_run_id(create=False)
    if run_id is None:
        return {}
    prefix = "oracle/acc/"
    return {k[len(prefix):]: v for k, v in store.client.get_run(run_id).data.metrics.items()
            if k.startswith(prefix)}


def max_length_of(version) -> int:
    return json.loads(version.tags.get(f"{TAG}train", "{}")).get("max_length", 128)


def lineage_tags(plan: Plan, base, data: TaskData, parent, current: dict, files: dict,
                 accuracy: float) -> dict:
    """What a version records of where it came from (DESIGN section 5, `store show`)."""
    after = [{"task": t, "version": int(v.version)} for t, v in current.items() if t != data.name]
    return {
        f"{TAG}task": data.name, f"{TAG}method": plan.method,
        f"{TAG}method.config": json.dumps(vars(plan.options)),
        f"{TAG}train": json.dumps(plan.train.as_dict()),
        f"{TAG}base.name": base.name, f"{TAG}base.sha256": base.sha256,
        f"{TAG}data.digest": data.digest, f"{TAG}data.rows": len(data.train_texts),
        f"{TAG}data.test_rows": len(data.test_texts), f"{TAG}data.source": data.source,
        f"{TAG}data.split": json.dumps(data.split), f"{TAG}data.dropped": data.dropped,
        f"{TAG}parent": parent.version if parent else "", f"{TAG}after": json.dumps(after),
        f"{TAG}labels": json.dumps(data.labels), f"{TAG}files": json.dumps(files),
        f"{TAG}accuracy": f"{accuracy:.6f}", f"{TAG}package_version": __version__,
    }

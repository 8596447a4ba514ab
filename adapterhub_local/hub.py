"""Hub: the Python face of adapterhub-local; the CLI is a thin layer over it.

    from adapterhub_local import Hub
    hub = Hub("store")
    hub.add_task("sentiment", train="train.csv")
    hub.predict(["what a lovely day", "wo ist der bahnhof?"])
    hub.metrics()

It composes the modules that do the work: plan (inputs checked), trainer (unlocked, in
parallel with other writers), commit (the lease and the transaction), serving (what answers),
sequence (the matrices).
"""

import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from adapterhub_local.commit import DEFAULT_WAIT, Candidate, Lease, commit_add_task, repair
from adapterhub_local.errors import AhlError
from adapterhub_local.evaluation import COMPOSE_TOP_K
from adapterhub_local.plan import plan_add_task, run_params
from adapterhub_local.sequence import MODES, last_step, read_steps, matrices_of
from adapterhub_local.serving import (ADAPTER_ARTIFACT, STATS_ARTIFACT, TEST_ARTIFACT, Loader,
                                      check_gate, sync_router)
from adapterhub_local.store import PRODUCTION, TAG, AdapterStore, parse_ref, sha256_file

PREDICT_MODES = ("pick", "compose")


class Hub:
    """A store of task adapters over one frozen base. `wait`: how long a writer waits for the
    store's lock (another writer's commit) before giving up, in seconds."""

    def __init__(self, store: str | Path | None = None, namespace: str = "ahl",
                 wait: float = DEFAULT_WAIT):
        self.store = AdapterStore(store, namespace)
        self.loader = Loader(self.store)
        self.wait = wait

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

        Training runs without the store's lock; the commit (registration, router, evaluation,
        the step) holds it, so several add-tasks may run at once on one store. With a
        forgetting gate (`gate`, else the store's), the new version gets the production alias
        only if no earlier task's routed accuracy dropped by more than the gate; otherwise it is
        kept as a candidate and result["gate"]["passed"] is False.
        """
        from adapterhub_local.base import load_base
        from adapterhub_local.inference import adapter_name, bank_for
        from adapterhub_local.methods import get_method
        from adapterhub_local.trainer import train_adapter

        plan = plan_add_task(self.store, name, train, test, spec, text_column, label_column,
                             method, method_args, base, train_args)
        gate = self.store.gate() if gate is None else check_gate(gate)
        loaded = load_base(plan.base)
        bank = bank_for(loaded)
        run_id = self.store.start_run(plan.data.name, params=run_params(plan, loaded),
                                      tags={f"{TAG}base.sha256": loaded.sha256})
        adapter = adapter_name(plan.data.name, run_id)
        try:
            self.store.log_dataset(run_id, plan.data)
            started = time.time()
            report = train_adapter(bank, adapter, plan.peft_config, plan.data, plan.train,
                                   get_method(plan.method), progress=progress,
                                   log=lambda m, step: self.store.log_metrics(run_id, m, step))
            train_seconds = time.time() - started
            candidate = self._measure(plan, loaded, bank, run_id, adapter, report, train_seconds)
            with Lease(self.store, self.wait) as lease:
                committing = time.time()
                record = commit_add_task(self.store, self.loader, candidate, gate, lease)
                commit_seconds = time.time() - committing
        except BaseException as e:
            bank.remove_adapter(adapter)
            self.store.finish_run(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        serving = self.store.serving().get(plan.data.name)
        return {"task": record["task"], "version": record["version"], "method": plan.method,
                "accuracy": candidate.accuracy, "val_accuracy": report.val_accuracy,
                "train_seconds": round(train_seconds, 2), "steps": report.steps,
                "train_rows": report.train_rows, "test_rows": len(plan.data.test_texts),
                "dropped_rows": plan.data.dropped, "trainable_params": report.trainable_params,
                "parent": self.store.lineage(self.store.get_version(
                    record["task"], record["version"]), with_run=False)["parent"],
                "run_id": run_id, "router_version": record["router"],
                "lock_wait_seconds": round(lease.waited, 2), "commit_seconds": round(commit_seconds, 2),
                "serving": serving is not None and int(serving.version) == record["version"],
                **step_summary(record)}

    def _measure(self, plan, loaded, bank, run_id, adapter, report, train_seconds) -> Candidate:
        """Test accuracy and router statistics of a freshly trained adapter, and its files as
        run artifacts: everything of an add-task that needs no lock."""
        from adapterhub_local.router import task_stats
        from adapterhub_local.trainer import split_validation

        data = plan.data
        probs = bank.probabilities(data.test_texts, [adapter] * len(data.test_texts),
                                   plan.train.max_length)
        accuracy = sum(int(p.argmax()) == y for p, y in zip(probs, data.test_labels)) / len(probs)
        self.store.log_metrics(run_id, {"test_accuracy": accuracy, "train_seconds": train_seconds,
                                        "trainable_params": report.trainable_params}, report.steps)
        fit_rows, held_rows = split_validation(data.train_labels, plan.train.seed)
        features = bank.features(data.train_texts, plan.train.max_length)
        stats = task_stats(features[fit_rows], [data.train_labels[i] for i in fit_rows],
                           data.labels, features[held_rows])
        split = {"texts": data.test_texts, "labels": data.test_labels}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / ADAPTER_ARTIFACT
            bank.save_adapter(adapter, folder)
            files = {f.name: sha256_file(f) for f in sorted(folder.iterdir())}
            self.store.log_artifacts(run_id, folder, ADAPTER_ARTIFACT)
            stats.save(Path(tmp) / STATS_ARTIFACT)
            self.store.log_artifacts(run_id, Path(tmp) / STATS_ARTIFACT, STATS_ARTIFACT)
        self.store.log_json(run_id, TEST_ARTIFACT, split)
        # The commit scores every task again; these are the very weights it will find in memory.
        self.loader.cache[(run_id, "test")] = split
        self.loader.cache[(run_id, "probs", bank.digest(adapter))] = probs
        return Candidate(plan, loaded, bank, run_id, adapter, files, accuracy, stats)

    # -- predicting ---------------------------------------------------------------------------

    def route(self, texts: list[str], top_k: int = 1) -> list:
        """Which task(s) each text belongs to, with weights (Route values); abstains on empty
        or unknown text."""
        texts = check_texts(texts)
        if not texts:
            return []
        self.require_tasks()
        bank, router, *_ = self.loader.open_router(self.store.base_binding()[0])
        return route_texts(bank, router, texts, top_k)[0]

    def predict(self, texts: list[str], mode: str = "pick", top_k: int = COMPOSE_TOP_K,
                task: str | None = None) -> list[dict]:
        """One answer per text: {"text", "task", "label", "score", "adapters"}. Without `task`
        the router decides: "pick" one adapter, or "compose" the top_k. task/label are None
        when it abstains ("reason" says why) or when the adapter it needs failed its checksum
        ("error" names it; other inputs are answered)."""
        from adapterhub_local.inference import answer
        from adapterhub_local.router import Route

        texts = check_texts(texts)
        if mode not in PREDICT_MODES:
            raise AhlError(f"unknown mode {mode!r}: use pick or compose")
        if top_k < 1:
            raise AhlError(f"top_k must be at least 1, got {top_k}: try --top-k 2")
        if not texts:
            return []
        self.require_tasks()
        bank, router, adapters, versions, broken = self.loader.open_router(self.store.base_binding()[0])
        if task is not None:
            if task not in versions:
                raise AhlError(f"no task {task!r} in store {self.store.location} (tasks: "
                               f"{', '.join(versions)}): check the name")
            routes = [Route([task], [1.0], 1.0) if t.strip() else Route([], [], 0.0, "empty text")
                      for t in texts]
            states = None
        else:
            routes, states = route_texts(bank, router, texts, 1 if mode == "pick" else top_k)
        pairs = [(row, t) for row, r in enumerate(routes) for t in r.tasks if t in adapters]
        probs = bank.probabilities([texts[row] for row, _ in pairs], [adapters[t] for _, t in pairs],
                                   states=states and [states[row] for row, _ in pairs])
        by_row: list[dict] = [{} for _ in texts]
        for (row, t), p in zip(pairs, probs):
            by_row[row][t] = p
        labels = {t: bank.labels[name] for t, name in adapters.items()}
        results = []
        for text, route, row_probs in zip(texts, routes, by_row):
            failed = [broken[t] for t in route.tasks if t in broken]
            result = answer(route, row_probs, labels) if not failed else {
                "task": None, "label": None, "score": 0.0}
            results.append({"text": text, "task": result["task"], "label": result["label"],
                            "score": result["score"],
                            "adapters": [{"task": t, "version": versions[t], "weight": w}
                                         for t, w in zip(route.tasks, route.weights)],
                            **({"reason": route.reason} if route.reason else {}),
                            **({"error": failed[0]} if failed else {})})
        return results

    # -- queries ------------------------------------------------------------------------------

    def tasks(self) -> list[dict]:
        """Each task with the version that serves (None while the gate holds back its only
        versions), its method, aliases and its oracle accuracy at the last step."""
        last = last_step(self.store) or {"tasks": [], "rows": {"oracle": []}}
        last_row = dict(zip(last["tasks"], last["rows"]["oracle"]))
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
        from adapterhub_local.forgetting import summarize

        self.require_tasks()
        records = read_steps(self.store)
        tasks, matrices = matrices_of(records)
        result = {"tasks": tasks, "modes": {mode: summarize(matrices[mode]) for mode in MODES},
                  "routing_accuracy": matrices["routing"]}
        if confusion:
            result["confusion"] = records[-1]["confusion"] if records else None
        return result

    def show(self, ref: str) -> dict:
        """A version's lineage, files and metrics: 'NAME', 'NAME@VERSION' or 'NAME@ALIAS'."""
        return self.store.lineage(self.store.resolve(ref))

    def versions(self, task: str) -> list[dict]:
        """Every version of a task, oldest first, as `show` gives each."""
        self.store.resolve(task)  # an unknown task is a one-line error naming the known ones
        return [self.store.lineage(v) for v in self.store.versions(task)]

    def lineage(self, task: str) -> dict:
        """Every version of a task, removed ones included, as a tree: each version's parent,
        the tasks it was trained after, base, data digest, method, accuracy and status."""
        return self.store.lineage_tree(task)

    # -- changing what serves (each under the store's lock) -----------------------------------

    def promote(self, task: str, version: int | str, alias: str) -> dict:
        """Point a task's alias (e.g. production) at one of its versions; routing follows the
        production alias."""
        self.store.check_promote(task, version, alias)  # bad input: nothing locked or written
        with Lease(self.store, self.wait):
            repair(self.store, self.loader)
            promoted = self.store.promote(task, version, alias)
            if alias == PRODUCTION:
                sync_router(self.store, self.loader)
        return self.store.lineage(promoted)

    def remove(self, ref: str) -> dict:
        """Take NAME@VERSION out of queries and routing; its run and files stay, and
        `lineage` still shows it. The router is refit without it if it was serving."""
        task, at = parse_ref(ref)
        if at is None:
            raise AhlError(f"say which version to remove: {task}@VERSION (see ahl store "
                           f"versions {task})")
        self.store.resolve(ref)  # bad input: nothing locked or written
        with Lease(self.store, self.wait):
            repair(self.store, self.loader)
            version = self.store.resolve(ref)
            self.store.remove(version)
            sync_router(self.store, self.loader)
        return self.store.lineage(self.store.get_version(task, version.version))

    def gate(self, value: float | None = None, off: bool = False) -> float | None:
        """The store's default forgetting gate: read it, set it (value) or clear it (off)."""
        if off or value is not None:
            self.store.set_gate(None if off else check_gate(value))
        return self.store.gate()

    def doctor(self) -> dict:
        """Finish or roll back what killed writers left (pending versions, runs marked RUNNING
        by dead processes, a dead holder's lock), then check every file: {"repaired",
        "problems"}."""
        self.require_tasks()
        with Lease(self.store, self.wait):
            repaired = repair(self.store, self.loader)
        return {"repaired": repaired, "problems": self.store.verify()}

    # -- files --------------------------------------------------------------------------------

    def export(self, ref: str, folder: str | Path, force: bool = False) -> dict:
        """Copy a version's adapter into a plain PEFT folder (adapter_config.json and
        adapter_model.safetensors, plus head.safetensors and labels.json) that
        `PeftModel.from_pretrained(base, folder)` loads. Refuses a non-empty folder unless force."""
        version = self.store.resolve(ref)
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise AhlError(f"{folder} is a file, not a folder: export into a folder")
        if folder.exists() and any(folder.iterdir()) and not force:
            raise AhlError(f"{folder} is not an empty folder: pass --force to overwrite, or "
                           "export into a new folder")
        source = self.loader.folder(version)  # checked against its recorded checksums
        folder.mkdir(parents=True, exist_ok=True)
        files = sorted(self.store.recorded_files(version))
        for name in files:
            shutil.copyfile(source / name, folder / name)
        return {"task": version.tags.get(f"{TAG}task"), "version": int(version.version),
                "folder": str(folder), "files": files}

    def verify(self) -> list[str]:
        """Missing or altered files of every version and router, one line each (empty when the
        store is intact)."""
        self.require_tasks()
        return self.store.verify()

    def require_tasks(self) -> None:
        if not self.store.task_names():
            raise AhlError(f"store {self.store.location} has no tasks yet: add one with "
                           "ahl add-task NAME --train FILE")


def route_texts(bank, router, texts: list[str], top_k: int):
    """(routes, states) of texts: empty ones abstain; the states after the base's bottom half
    are kept so that prediction goes on from them instead of running it again."""
    from adapterhub_local.router import Route

    filled = [i for i, t in enumerate(texts) if t.strip()]
    routes = [Route([], [], 0.0, "empty text")] * len(texts)
    states = [None] * len(texts)
    if filled:
        features, kept = bank.encode([texts[i] for i in filled], keep_states=True)
        for k, (i, route) in enumerate(zip(filled, router.route(features, top_k))):
            routes[i], states[i] = route, kept[k]
    return routes, states


def step_summary(record: dict) -> dict:
    """What add-task reports of its step: the rows, each task's value when learned, summaries."""
    oracle = record["rows"]["oracle"]
    learned = record["first"]["oracle"]
    return {"step": record["step"], "tasks": record["tasks"], "row": oracle,
            "learned": [learned.get(t) for t in record["tasks"]],
            "routed_row": record["rows"]["routed"], "routing_row": record["rows"]["routing"],
            **record["summaries"]["oracle"],
            "routed_average_accuracy": record["summaries"]["routed"]["average_accuracy"],
            "composed_average_accuracy": record["summaries"]["composed"]["average_accuracy"],
            "gate": record.get("gate")}


def check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise AhlError("predict takes a list of texts, not one string: wrap it in [ ]")
    texts = list(texts)
    wrong = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if wrong:
        raise AhlError(f"item {wrong[0]} is a {type(texts[wrong[0]]).__name__}, not a string: "
                       "pass texts as strings")
    return texts

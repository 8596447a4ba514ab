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

import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from adapterhub_local import query_cache
from adapterhub_local.candidate import measure_candidate
from adapterhub_local.commit import (DEFAULT_WAIT, Lease, change_serving, commit_add_task,
                                     repair)
from adapterhub_local.dashboards import draw_in_background
from adapterhub_local.device import check_device_name
from adapterhub_local.errors import AhlError
from adapterhub_local.lineage import lineage_tree, version_lineage
from adapterhub_local.sequence import (MODES, last_step, matrices_of, read_steps,
                                       step_summary)
from adapterhub_local.serving import Loader, check_gate, kind_of, metric_of, serving_set
from adapterhub_local.store import PRODUCTION, TAG, AdapterStore, parse_ref, whole_task

PREDICT_MODES = ("pick", "compose")
MODE_NAMES = {"routed": "pick", "composed": "compose"}  # the CLI's (and the matrices') names


class Hub:
    """A store of task adapters over one frozen base. `wait`: how long a writer waits for the
    store's lock (another writer's commit) before giving up, in seconds."""

    def __init__(self, store: str | Path | None = None, namespace: str = "ahl",
                 wait: float = DEFAULT_WAIT, device: str | None = None):
        self.device = check_device_name(device)
        """auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps; default $AHL_DEVICE,
        else auto. Checked where the base loads: a device that is not there is one line."""
        if not 0 <= wait < math.inf:  # nan and inf too: a lease's deadline must be a time
            raise AhlError(f"--wait {wait} is not a number of seconds: give the seconds to wait "
                           "for the store's lock, e.g. --wait 300")
        self.store = AdapterStore(store, namespace)
        self.loader = Loader(self.store, self.device)
        self.wait = wait
        self.drawing = None
        """The thread drawing the last add-task's heatmaps (join it to wait for them)."""

    # -- adding a task ------------------------------------------------------------------------

    def add_task(self, name: str | None = None, train: str | Path | None = None,
                 test: str | Path | None = None, *, spec: str | Path | None = None,
                 text_column: str | None = None, label_column: str | None = None,
                 kind: str | None = None, prompt_column: str | None = None,
                 completion_column: str | None = None,
                 method: str | None = None, method_args: dict | None = None,
                 base: str | None = None, gate: float | None = None,
                 progress: Callable[[int, int], None] | None = None, **train_args) -> dict:
        """Learn an adapter for task `name`, register it as the task's next version, refit the
        router, and re-evaluate every task in every mode. Options not given come from the spec,
        then the defaults. train_args: epochs, lr, batch_size, max_length, seed (TrainOptions).
        kind: "classify" (text_column -> label_column, the default) or "generate"
        (prompt_column -> completion_column, on a causal-LM base; its score is the spec's
        `metric`, default exact match).

        Training runs without the store's lock; the commit (registration, router, evaluation,
        the step) holds it, so several add-tasks may run at once on one store. With a
        forgetting gate (`gate`, else the store's), the new version gets the production alias
        only if no earlier task's routed accuracy dropped by more than the gate; otherwise it is
        kept as a candidate and result["gate"]["passed"] is False.
        """
        from adapterhub_local.methods import get_method
        from adapterhub_local.plan import plan_add_task
        from adapterhub_local.trainer import train_adapter

        plan = plan_add_task(self.store, name, train, test, spec, text_column, label_column,
                             method, method_args, base, train_args, self.device, kind,
                             prompt_column, completion_column)
        gate = self.store.gate() if gate is None else check_gate(gate)

        def train_it(bank, adapter: str, log):
            return train_adapter(bank, adapter, plan.peft_config, plan.data, plan.train,
                                 get_method(plan.method), progress=progress,
                                 router_features=plan.features, generate=plan.generate, log=log)

        return self._new_version(plan, gate, train_it)

    def import_adapter(self, name: str, folder: str | Path, train: str | Path | None = None,
                       test: str | Path | None = None, spec: str | Path | None = None,
                       text_column: str | None = None, label_column: str | None = None,
                       kind: str | None = None, prompt_column: str | None = None,
                       completion_column: str | None = None, method: str | None = None,
                       base: str | None = None, gate: float | None = None, **train_args) -> dict:
        """Make a PEFT adapter trained elsewhere (`folder`: what save_pretrained writes, with
        head.safetensors and labels.json or without: then a head is fitted on the frozen adapter)
        the next version of task `name`, as add-task does with one it trains: the task's rows
        (`train`, `test`, `spec`, the columns, `kind`) give its test split and the router's
        statistics; it is evaluated, gated and recorded as a step. `method` tells QLoRA or LoftQ
        from LoRA; train_args: max_length, seed. Everything is checked before the store is
        touched (importer.py)."""
        import tempfile

        from adapterhub_local.base import load_base
        from adapterhub_local.importer import (check_named_base, check_weights, fit_head,
                                               in_label_order, read_adapter_folder, read_head,
                                               stage)
        from adapterhub_local.inference import bank_for
        from adapterhub_local.methods import get_method, virtual_tokens
        from adapterhub_local.plan import plan_add_task
        from adapterhub_local.trainer import TrainReport

        source = read_adapter_folder(folder, method)
        unused = sorted(k for k, v in train_args.items() if v is not None
                        and k not in ("max_length", "seed"))
        if unused:
            raise AhlError(f"an import trains nothing: drop {', '.join(unused)} (it takes "
                           "max_length and seed)")
        if base is None and self.store.base_binding() is None:  # an empty store: the adapter's
            base = source.config.get("base_model_name_or_path")
        plan = plan_add_task(self.store, name, train, test, spec, text_column, label_column,
                             source.method, None, base, train_args, self.device, kind,
                             prompt_column, completion_column)
        loaded = load_base(plan.base, plan.device)
        check_named_base(source, loaded)
        head = read_head(source, loaded, plan.data.labels) if plan.data.kind == "classify" else None
        if head is not None:
            plan.data = in_label_order(plan.data, head[1])
        plan.options = SimpleNamespace(**{k: v for k, v in source.config.items()
                                          if isinstance(v, (int, float, str, bool, list))})
        plan.origin = source.origin
        gate = self.store.gate() if gate is None else check_gate(gate)
        bank = bank_for(loaded)
        staging = f"import-{source.origin['weights_sha256'][:16]}"
        with tempfile.TemporaryDirectory() as tmp:  # checked in full before the store is touched
            staged = Path(tmp) / "adapter"
            stage(source, staged, loaded, plan, head)
            params = check_weights(bank, staged, get_method(source.method))
            bank.remove_adapter(staging)
            bank.load_adapter(staging, staged, get_method(source.method))
            try:
                model = bank.model(staging)
                loaded.check_length(plan.train.max_length, virtual_tokens(model.peft_config[staging]))
                val = (fit_head(bank, staging, plan.data, plan.train)
                       if head is None and plan.data.kind == "classify" else None)
            except BaseException:
                bank.remove_adapter(staging)
                raise

        def imported(bank, adapter: str, log):
            return TrainReport(steps=0, final_loss=0.0, val_accuracy=val, trainable_params=params,
                               train_rows=len(plan.data.train_texts), val_rows=0)

        try:
            return self._new_version(plan, gate, imported, adapter=staging)
        finally:
            bank.remove_adapter(staging)  # the version serves from its stored files

    def _new_version(self, plan, gate: float | None, make: Callable, adapter: str | None = None) -> dict:
        """The run of a new version: `make(bank, adapter, log)` trains (or stages) the adapter
        and reports; then it is measured, committed under the lease (registration, router,
        evaluation of every task, the step, the gate) and its heatmaps drawn after."""
        from adapterhub_local.base import load_base
        from adapterhub_local.inference import adapter_name, bank_for
        from adapterhub_local.methods import virtual_tokens
        from adapterhub_local.plan import run_params

        loaded = load_base(plan.base, plan.device)
        if adapter is None:  # to be trained (an import's was checked with its own config)
            loaded.check_length(plan.train.max_length, virtual_tokens(plan.peft_config))
        bank = bank_for(loaded)
        run_id = self.store.start_run(plan.data.name, params=run_params(plan, loaded),
                                      tags={f"{TAG}base.sha256": loaded.sha256})
        adapter = adapter or adapter_name(plan.data.name, run_id)
        try:
            self.store.log_dataset(run_id, plan.data)
            started = time.time()
            report = make(bank, adapter, lambda m, step: self.store.log_metrics(run_id, m, step))
            train_seconds = time.time() - started
            self.store.set_run_tag(run_id, f"{TAG}precision", report.precision)
            candidate = measure_candidate(self.store, self.loader, plan, loaded, bank, run_id,
                                          adapter, report, train_seconds)
            with Lease(self.store, self.wait) as lease:
                committing = time.time()
                record = commit_add_task(self.store, self.loader, candidate, gate, lease)
                commit_seconds = time.time() - committing
        except BaseException as e:
            bank.remove_adapter(adapter)
            self.store.finish_run(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        self.drawing = draw_in_background(self.store)  # the step's heatmaps, after its commit
        serving = serving_set(self.store).get(plan.data.name)
        return {"task": record["task"], "version": record["version"], "method": plan.method,
                "kind": plan.data.kind, "metric": plan.data.metric,
                "accuracy": candidate.accuracy, "val_accuracy": report.val_accuracy,
                "train_seconds": round(train_seconds, 2), "steps": report.steps,
                "precision": report.precision,
                "train_rows": report.train_rows, "test_rows": len(plan.data.test_texts),
                "dropped_rows": plan.data.dropped, "test_rows_seen": plan.data.test_seen,
                "trainable_params": report.trainable_params,
                "parent": record["parent"],
                "run_id": run_id, "router_version": record["router"],
                "lock_wait_seconds": round(lease.waited, 2), "commit_seconds": round(commit_seconds, 2),
                "serving": serving is not None and int(serving.version) == record["version"],
                **({"origin": plan.origin} if plan.origin else {}),
                **step_summary(record)}

    # -- predicting ---------------------------------------------------------------------------

    def route(self, texts: list[str], top_k: int = 1) -> list:
        """Which task(s) each text belongs to, with weights (Route values); abstains on empty
        or unknown text."""
        from adapterhub_local.inference import route_texts

        texts = check_texts(texts)
        check_predict_options("pick", top_k)
        if not texts:
            return []
        self.require_tasks()
        bank, router, *_ = self.loader.open_router(self.store.base_binding()[0])
        return route_texts(bank, router, texts, top_k)[0]

    def predict(self, texts: list[str], mode: str = "pick", top_k: int | None = None,
                task: str | None = None) -> list[dict]:
        """One answer per text: {"text", "task", "label", "score", "adapters"}, with
        "completion" instead of "label" where a generate task answers. Without `task`
        the router decides: "pick" one adapter, or "compose" the top_k (default: the k the
        composed matrix is measured with, evaluation.COMPOSE_TOP_K); the CLI's names for them,
        "routed" and "composed", work too. Given `task`, its adapter answers every text: the
        serving version's, or the one `task` names as NAME@VERSION or NAME@ALIAS. task/label are None
        when it abstains ("reason" says why) or when the adapter it needs failed its checksum
        ("error" names it; other inputs are answered)."""
        texts = check_texts(texts)
        mode = check_predict_options(mode, top_k)
        if not texts:
            return []
        return self.answerer(mode, top_k, task)(texts)

    def answerer(self, mode: str = "pick", top_k: int | None = None,
                 task: str | None = None) -> Callable[[list[str]], list[dict]]:
        """predict() with these options, as a function of the texts, the serving set opened
        (and the task checked) once: what a stream of chunks calls."""
        self.require_tasks()
        # Imported after the checks: a mistake is answered without loading torch.
        from adapterhub_local.evaluation import COMPOSE_TOP_K
        from adapterhub_local.inference import answer_routes, route_texts
        from adapterhub_local.router import Route

        top_k = COMPOSE_TOP_K if top_k is None else top_k
        # NAME@VERSION (or @ALIAS) pins a version, serving or not: a candidate the gate holds
        # back can be tried before it is promoted. Resolved before the model loads.
        pinned = self.store.resolve(task) if task is not None and "@" in task else None
        bank, router, adapters, versions, broken = self.loader.open_router(self.store.base_binding()[0])
        if pinned is not None:
            task = parse_ref(task)[0]
            adapters, versions = dict(adapters), {**versions, task: int(pinned.version)}
            broken = {t: why for t, why in broken.items() if t != task}
            adapters[task] = self.loader.load_version(bank, task, pinned)
        if task is not None and task not in versions:
            held = [] if task.startswith("_") else self.store.versions(task)  # "_": ours
            if held:
                raise AhlError(f"task {task!r} has no serving version (the gate holds its versions "
                               f"back): name one, e.g. --task {task}@{held[-1].version} (ahl store "
                               f"versions {task})")
            raise AhlError(f"no task {task!r} in store {self.store.location} (tasks: "
                           f"{', '.join(versions)}): check the name")

        def answer(texts: list[str]) -> list[dict]:
            if task is not None:
                routes = [Route([task], [1.0], 1.0) if t.strip() else Route([], [], 0.0, "empty text")
                          for t in texts]
                states = None
            else:
                routes, states = route_texts(bank, router, texts, 1 if mode == "pick" else top_k)
            return answer_routes(bank, texts, routes, states, adapters, versions, broken)

        return answer

    def predict_file(self, source: str | Path, output: str | Path, text_column: str = "text",
                     mode: str = "pick", top_k: int | None = None, task: str | None = None,
                     progress: Callable[[int, int], None] | None = None) -> dict:
        """predict() over every text of a file (.txt, .csv, .jsonl, .parquet), read and answered
        in chunks into `output` (.jsonl or .parquet; see stream.py): {"input", "output", "rows",
        "answered", "abstained", "errors"}."""
        from adapterhub_local.stream import check_paths, predict_file

        mode = check_predict_options(mode, top_k)
        check_paths(Path(source), Path(output))  # before the model loads
        return predict_file(self.answerer(mode, top_k, task), source, output, text_column,
                            progress=progress)

    # -- queries ------------------------------------------------------------------------------

    def tasks(self) -> list[dict]:
        """Each task with the version that serves (None while the gate holds back its only
        versions), its method, aliases and its oracle accuracy at the last step: a constant
        number of registry calls however many versions the store holds. A folder store answers
        from its query cache while the registry is unchanged (query_cache.py)."""
        key = query_cache.fingerprint(self.store)
        kept = query_cache.read(self.store, key)
        if kept is not None:
            return kept
        result = self.task_table()
        query_cache.keep(self.store, key, result)
        return result

    def task_table(self) -> list[dict]:
        """tasks(), computed through MLflow."""
        last = last_step(self.store) or {"tasks": [], "rows": {"oracle": []}}
        last_row = dict(zip(last["tasks"], last["rows"]["oracle"]))
        serving = serving_set(self.store)
        result = []
        for task, aliases in self.store.task_aliases().items():
            version = serving.get(task)
            if version is None:  # held back by the gate, or every version removed
                versions = self.store.versions(task)
                if not versions:
                    continue
                version = versions[-1]
            evaluated = str(last.get("versions", {}).get(task)) == str(version.version)
            accuracy = last_row.get(task) if task in serving and evaluated else None
            result.append({"task": task,
                           "version": int(version.version) if task in serving else None,
                           "method": version.tags.get(f"{TAG}method"),
                           "kind": kind_of(version), "metric": metric_of(version),
                           "aliases": sorted(a for a, v in aliases.items()
                                             if v == str(version.version)),
                           "accuracy": accuracy if accuracy is not None
                           else float(version.tags.get(f"{TAG}accuracy", "nan"))})
        return result

    def metrics(self, confusion: bool = False) -> dict:
        """Score matrices and forgetting per mode, the routing-accuracy matrix (DESIGN 5),
        what each task's column measures ("metrics": accuracy, or a generate task's metric),
        the generate tasks' soft metric at the last step ("soft"), and with confusion=True the
        router's task confusion at the last step."""
        records = read_steps(self.store)
        if not records:
            self.require_tasks()
        tasks, matrices = matrices_of(records)
        # Each step recorded its summaries (carried step to step: no pass over the matrix).
        summaries = records[-1]["summaries"] if records else {}
        result = {"tasks": tasks, "modes": {mode: {"matrix": matrices[mode], **summaries.get(
                      mode, {"average_accuracy": None, "bwt": None, "forgetting": None})}
                      for mode in MODES},
                  "routing_accuracy": matrices["routing"],
                  "metrics": {t: m for r in records for t, m in r.get("metrics", {}).items()},
                  "soft": records[-1].get("soft", {}) if records else {}}
        if confusion:
            result["confusion"] = records[-1]["confusion"] if records else None
        return result

    def show(self, ref: str) -> dict:
        """A version's lineage, files and metrics: 'NAME', 'NAME@VERSION' or 'NAME@ALIAS'."""
        return version_lineage(self.store, self.store.resolve(ref))

    def versions(self, task: str) -> list[dict]:
        """Every version of a task, oldest first, as `show` gives each."""
        task = whole_task(task, "versions")
        self.store.resolve(task)  # an unknown task is a one-line error naming the known ones
        return [version_lineage(self.store, v) for v in self.store.versions(task)]

    def lineage(self, task: str) -> dict:
        """Every version of a task, removed ones included, as a tree: each version's parent,
        the tasks it was trained after, base, data digest, method, accuracy and status."""
        return lineage_tree(self.store, whole_task(task, "lineage"))

    # -- changing what serves (each under the store's lock) -----------------------------------

    def promote(self, task: str, version: int | str, alias: str) -> dict:
        """Point a task's alias (e.g. production) at one of its versions; routing follows the
        production alias."""
        self.store.check_promote(task, version, alias)  # bad input: nothing locked or written
        with Lease(self.store, self.wait):
            repair(self.store, self.loader)
            if alias == PRODUCTION:
                change_serving(self.store, self.loader, task,
                               lambda: self.store.promote(task, version, alias))
            else:
                self.store.promote(task, version, alias)
        return version_lineage(self.store, self.store.resolve(f"{task}@{alias}"))

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
            change_serving(self.store, self.loader, task, lambda: self.store.remove(version))
        return version_lineage(self.store, self.store.get_version(task, version.version))

    def gate(self, value: float | None = None, off: bool = False) -> float | None:
        """The store's default forgetting gate: read it, set it (value) or clear it (off)."""
        if off and value is not None:
            raise AhlError(f"a gate of {value} and --off contradict each other: give one of them")
        if off or value is not None:
            self.store.set_gate(None if off else check_gate(value))
        return self.store.gate()

    def doctor(self) -> dict:
        """Finish or roll back what killed writers left (pending versions, runs marked RUNNING
        by dead processes, a dead holder's lock), then check every file: {"repaired",
        "problems"}."""
        if not self.store.exists():
            raise AhlError(f"no store at {self.store.location}: check --store")
        with Lease(self.store, self.wait):
            repaired = repair(self.store, self.loader)
        return {"repaired": repaired, "problems": self.store.verify()}

    # -- files --------------------------------------------------------------------------------

    def export(self, ref: str, folder: str | Path, force: bool = False) -> dict:
        """Write a version into a folder that its users load without ahl (export.py): a plain
        PEFT folder for `PeftModel.from_pretrained` (a bottleneck adapter: safetensors and a
        loader of a few lines), with head.safetensors and labels.json or generate.json, and a
        model card (README.md) that says what it is and how to load it. Refuses a non-empty
        folder unless force."""
        from adapterhub_local.export import export_version

        version = self.store.resolve(ref)
        folder = Path(folder)
        if self.store.folder is not None and folder.resolve().is_relative_to(self.store.folder):
            raise AhlError(f"{folder} is inside the store {self.store.location}: export into a "
                           "folder outside it (it would overwrite the store's own files)")
        if folder.exists() and not folder.is_dir():
            raise AhlError(f"{folder} is a file, not a folder: export into a folder")
        if folder.exists() and any(folder.iterdir()) and not force:
            raise AhlError(f"{folder} is not an empty folder: pass --force to overwrite, or "
                           "export into a new folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AhlError(f"cannot make folder {folder} ({e.strerror}): export into a folder "
                           "you can write") from None
        files = export_version(self.store, self.loader, version, folder)
        return {"task": version.tags.get(f"{TAG}task"), "version": int(version.version),
                "folder": str(folder), "files": files}

    def package(self) -> dict:
        """Log the serving set (router, serving adapters with heads and labels, the base's name
        and fingerprint, pinned requirements) as an MLflow pyfunc model, registered as the
        production version of the store's `_serving` model (serve.py): {"model_uri",
        "tracking_uri", "version", "tasks", "new"}; an unchanged serving set keeps its version."""
        from adapterhub_local.serve import package

        self.require_tasks()
        with Lease(self.store, self.wait):
            repair(self.store, self.loader)
            return package(self.store, self.loader)

    def verify(self) -> list[str]:
        """Missing or altered files of every version and router, one line each (empty when the
        store is intact)."""
        self.require_tasks()
        return self.store.verify()

    def require_tasks(self) -> None:
        """A one-line error on a store without tasks (cheap: a recorded step says enough)."""
        if not self.store.exists() or (not self.store.steps_committed()
                                       and not self.store.task_names()):
            raise AhlError(f"store {self.store.location} has no tasks yet: add one with "
                           "ahl add-task NAME --train FILE")


def check_predict_options(mode: str, top_k: int | None) -> str:
    """The mode as predict names it (pick, compose), given by that name or by the CLI's and the
    matrices' (routed, composed)."""
    mode = MODE_NAMES.get(mode, mode) if isinstance(mode, str) else mode
    if mode not in PREDICT_MODES:
        raise AhlError(f"unknown mode {mode!r}: use routed (pick) or composed (compose)")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
        raise AhlError(f"top_k must be a whole number, got {top_k!r}: try 2")
    if top_k is not None and top_k < 1:
        raise AhlError(f"top_k must be at least 1, got {top_k}: try 2")
    return mode


def check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise AhlError("predict takes a list of texts, not one string: wrap it in [ ]")
    texts = list(texts)
    wrong = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if wrong:
        raise AhlError(f"item {wrong[0]} is a {type(texts[wrong[0]]).__name__}, not a string: "
                       "pass texts as strings")
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a byte that is not UTF-8, as Python decodes argv
            raise AhlError(f"text {i} holds a byte that is not UTF-8 ({text[:30]!r}): give "
                           "UTF-8 text (e.g. iconv -f latin1 -t utf-8)") from None
    return texts

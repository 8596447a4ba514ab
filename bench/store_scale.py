"""Query speed and add-task's store overhead on a large store: 1,000 tasks, 10,000 versions.

Builds the store through AdapterStore with what add-task writes: a run per task, each version
registered with its lineage tags, its router statistics, a step record per task added (the rows
of every mode; the per-step MLflow metrics for the UI charts are left out to keep the build
short), and a router fit for the serving set. No training: queries never read adapter weights.

Then, in process (what a notebook or service pays per query, best of 3) and against a store of
8 tasks and 8 versions built the same way in the same run:
  - the queries: `tasks`, `metrics`, `store versions`, `store show`, `store lineage`;
  - add-task's store overhead: one real commit (repair, registration, router registration,
    the step's record, finalize) with training left out and evaluation replaced by fixed
    scores; the router fit is timed on its own (it grows with the tasks by design: it is fit
    from every task's statistics).

    .venv/bin/python bench/store_scale.py [--tasks 1000] [--versions 10]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")

import torch  # noqa: E402

from adapterhub_local import Hub, evaluation  # noqa: E402
from adapterhub_local.candidate import Candidate  # noqa: E402
from adapterhub_local.commit import Lease, commit_add_task  # noqa: E402
from adapterhub_local.evaluation import TaskEval  # noqa: E402
from adapterhub_local.router import GaussianRouter, task_stats  # noqa: E402
from adapterhub_local.sequence import commit_step, sequence_run, write_step  # noqa: E402
from adapterhub_local.serving import STATS_ARTIFACT, register_router  # noqa: E402
from adapterhub_local.store import PRODUCTION, ROUTER, TAG, AdapterStore  # noqa: E402

DIM = 32


def fake_stats(seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, DIM, generator=gen)
    return task_stats(x[:30], [i % 2 for i in range(30)], ["a", "b"], x[30:])


def build(folder: Path, tasks: int, versions: int) -> None:
    store = AdapterStore(folder)
    store.bind_base("bench", "0" * 64, "middle")
    sequence = sequence_run(store, create=True)
    names = [f"task{i:04d}" for i in range(tasks)]
    serving, first, best, tmp = {}, {}, {}, Path(tempfile.mkdtemp())
    for i, task in enumerate(names):
        run_id = store.start_run(task, {"task": task, "method": "lora"}, {})
        fake_stats(i).save(tmp / task)
        store.log_artifacts(run_id, tmp / task, STATS_ARTIFACT)
        for v in range(1, versions + 1):
            made = store.register(task, run_id, "adapter", tags={
                f"{TAG}task": task, f"{TAG}method": "lora", f"{TAG}base.name": "bench",
                f"{TAG}base.sha256": "0" * 64, f"{TAG}data.digest": f"{i:064x}",
                f"{TAG}data.rows": 100, f"{TAG}parent": v - 1 or "", f"{TAG}accuracy": 0.9,
                f"{TAG}files": "{}"})
        store.finish_run(run_id)
        serving[task] = made
        row = [0.9] * (i + 1)
        write_step(store, sequence, {
            "step": i + 1, "task": task, "version": versions, "router": 0, "run_id": run_id,
            "tasks": names[: i + 1], "versions": {t: int(v.version) for t, v in serving.items()},
            "rows": {m: row for m in ("oracle", "routed", "composed", "routing")},
            "first": first, "best": best, "summaries": {}, "confusion": {}}, metrics=False)
        commit_step(store, sequence, i + 1)
    router = GaussianRouter().fit({t: fake_stats(i) for i, t in enumerate(names)})
    run_id = store.start_run(ROUTER, {"tasks": tasks}, {})
    made = register_router(store, router, run_id, serving)
    store.set_alias(ROUTER, PRODUCTION, made.version)
    store.finish_run(run_id)


def best_of(call, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def queries(store: Path) -> dict[str, float]:
    hub = Hub(store)
    hub.tasks()  # the first query opens the database
    return {"tasks": best_of(hub.tasks), "metrics": best_of(hub.metrics),
            "store versions task0007": best_of(lambda: hub.versions("task0007")),
            "store show task0007@1": best_of(lambda: hub.show("task0007@1")),
            "store lineage task0007": best_of(lambda: hub.lineage("task0007"))}


class FakeBank:
    """What commit_add_task asks of the bank when evaluation is replaced: nothing loads."""


def commit_overhead(store_folder: Path) -> tuple[float, float]:
    """(seconds of one add-task commit without training and evaluation, seconds of its router
    fit). Evaluation is replaced by fixed scores; everything the store does is real."""
    hub = Hub(store_folder)
    store, loader = hub.store, hub.loader
    run_id = store.start_run("task0007", {"task": "task0007"}, {})
    stats = fake_stats(7)
    fit_seconds = []
    real_fit = GaussianRouter.fit

    def timed_fit(self, all_stats):
        started = time.perf_counter()
        result = real_fit(self, all_stats)
        fit_seconds.append(time.perf_counter() - started)
        return result

    def fixed_scores(bank, router, loader, versions):
        return {t: TaskEval(0.9, 0.9, 0.9, 1.0, [0] * (len(router.tasks_) + 1)) for t in versions}

    class Plan:  # what lineage_tags reads of a plan
        method, options, features = "lora", type("O", (), {})(), "middle"
        train = type("T", (), {"as_dict": lambda self: {}})()
        data = type("D", (), {"name": "task0007", "digest": "0" * 64, "train_texts": [],
                              "test_texts": [], "source": "bench", "split": {}, "dropped": 0,
                              "labels": ["a", "b"]})()

    base = type("B", (), {"name": "bench", "sha256": "0" * 64})()
    candidate = Candidate(Plan(), base, FakeBank(), run_id, "bench", {}, 0.9, stats)
    evaluation.evaluate_step, real_evaluate = fixed_scores, evaluation.evaluate_step
    GaussianRouter.fit = timed_fit
    try:
        started = time.perf_counter()
        with Lease(store) as lease:
            commit_add_task(store, loader, candidate, None, lease)
        total = time.perf_counter() - started
    finally:
        evaluation.evaluate_step, GaussianRouter.fit = real_evaluate, real_fit
    return total - sum(fit_seconds), sum(fit_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--versions", type=int, default=10)
    args = parser.parse_args()
    print(f"# bench/store_scale.py, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, "
          f"python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        large, small = Path(tmp) / "large", Path(tmp) / "small"
        started = time.perf_counter()
        build(large, args.tasks, args.versions)
        print(f"built {args.tasks * args.versions} versions across {args.tasks} tasks "
              f"({args.tasks} steps) in {time.perf_counter() - started:.0f} s")
        build(small, 8, 1)
        q_small, q_large = queries(small), queries(large)
        c_small, c_large = commit_overhead(small), commit_overhead(large)
    print(f"\n| query | {args.tasks * args.versions} versions | 8 versions | ratio |")
    print("|---|---:|---:|---:|")
    for name in q_large:
        print(f"| `{name}` | {q_large[name] * 1000:.0f} ms | {q_small[name] * 1000:.0f} ms | "
              f"{q_large[name] / q_small[name]:.1f}x |")
    print(f"| add-task's store overhead (one commit) | {c_large[0] * 1000:.0f} ms | "
          f"{c_small[0] * 1000:.0f} ms | {c_large[0] / c_small[0]:.1f}x |")
    print(f"| its router fit (from every task's statistics) | {c_large[1] * 1000:.0f} ms | "
          f"{c_small[1] * 1000:.0f} ms | {c_large[1] / c_small[1]:.1f}x |")


if __name__ == "__main__":
    main()

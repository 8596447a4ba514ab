"""Query speed of a large store: 500 registered versions across 50 tasks.

Builds the store through AdapterStore with the same runs, lineage tags and sequence-run metrics
that add-task writes (no training: the queries never read adapter weights), then times
`ahl tasks`, `ahl store versions`, `ahl store show` and `ahl store lineage`:
  - in process (Hub calls, what a notebook or service pays per query), best of 5;
  - as commands (a new `ahl` process each: Python, torch and mlflow imports included).
The baseline, measured in the same run, is the same calls on a store of 8 tasks, 1 version each:
the ratio says how much the query slows down with the store's size.

    .venv/bin/python bench/store_scale.py [--tasks 50] [--versions 10]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from adapterhub_local import Hub  # noqa: E402
from adapterhub_local.dashboards import accuracy_key  # noqa: E402
from adapterhub_local.store import TAG, AdapterStore  # noqa: E402


def build(folder: Path, tasks: int, versions: int) -> None:
    store = AdapterStore(folder)
    sequence = store.sequence_run_id()
    names = [f"task{i:02d}" for i in range(tasks)]
    for v in range(versions):
        for i, task in enumerate(names):
            run_id = store.start_run(task, {"task": task, "method": "lora"}, {})
            after = [{"task": t, "version": v + (j < i)} for j, t in enumerate(names) if j != i]
            store.register(task, run_id, "adapter", tags={
                f"{TAG}task": task, f"{TAG}method": "lora", f"{TAG}base.name": "bench",
                f"{TAG}base.sha256": "0" * 64, f"{TAG}data.digest": f"{i:064x}",
                f"{TAG}data.rows": 100, f"{TAG}parent": v or "", f"{TAG}accuracy": 0.9,
                f"{TAG}after": json.dumps(after[:20]), f"{TAG}files": "{}"})
            store.finish_run(run_id)
    step = tasks * versions
    store.log_metrics(sequence, {accuracy_key("oracle", t): 0.9 for t in names}, step)


def timed(call, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def command_seconds(args: list[str], store: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "adapterhub_local.cli", *args, "--store", str(store)],
                   check=True, capture_output=True)
    return time.perf_counter() - started


def measure(store: Path) -> dict[str, tuple[float, float]]:
    hub = Hub(store)
    hub.tasks()  # the first query opens the database
    queries = {"tasks": (lambda: hub.tasks(), ["tasks"]),
               "store versions": (lambda: hub.versions("task07"), ["store", "versions", "task07"]),
               "store show": (lambda: hub.show("task07@1"), ["store", "show", "task07@1"]),
               "store lineage": (lambda: hub.lineage("task07"), ["store", "lineage", "task07"])}
    return {name: (timed(call), command_seconds(args, store)) for name, (call, args) in queries.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--versions", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        build(Path(tmp) / "large", args.tasks, args.versions)
        print(f"built {args.tasks * args.versions} versions across {args.tasks} tasks in "
              f"{time.perf_counter() - started:.0f} s")
        build(Path(tmp) / "small", 8, 1)
        small, large = measure(Path(tmp) / "small"), measure(Path(tmp) / "large")
    print(f"{'query':16} {'in process':>12} {'vs 8 versions':>14} {'ahl command':>12} {'vs 8':>6}")
    for name, (inside, command) in large.items():
        print(f"{name:16} {inside * 1000:9.0f} ms {inside / small[name][0]:13.1f}x "
              f"{command:10.2f} s {command / small[name][1]:5.2f}x")


if __name__ == "__main__":
    main()

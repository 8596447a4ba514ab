"""What one add-task costs as the store grows: wall time split into load, training, evaluation,
store and dashboards, on stores of 1, 10, 30 and 100 tasks.

The stores are built in this process from synthetic tasks: task i takes a seeded sample of one
bundled task's rows (120 training, 200 test), trained for one epoch (filling a store is not what
is measured). At each size a copy of the store gets one more task, the bundled chat_language
with its full data and ahl's defaults, in a fresh process, as `ahl add-task` would run: nothing
of the earlier tasks is in memory there. "answer" is when add-task returns, "exit" when the
process could exit; "all but training" counts to the exit. Buckets:
  - load: the process's imports, reading and checking the inputs, loading the base;
  - training: train_adapter;
  - evaluation: scoring the new adapter's test split, then every task in every mode;
  - store: the rest (runs, artifacts, registration, the router fit, the step's record);
  - dashboards: the heatmaps, drawn on a thread after the commit (add-task has answered by
    then; the process waits for the thread before it exits).

    .venv/bin/python bench/step_cost.py [--sizes 1,10,30] [--keep DIR]

100 tasks works too, but filling the store to 99 took 27 minutes on 2 cores: its synthetic tasks
come from six sources, so most of them have twins the router cannot tell apart, and each step's
composed mode must run the twins' adapters on each other's texts.
"""

import time

STARTED = time.perf_counter()  # the probe's process start, for its load bucket

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")

TASKS = Path(__file__).resolve().parent.parent / "tasks"
BUNDLED = ["wordnet_things", "fortune_topic", "chat_language", "wordnet_actions",
           "fortune_language", "wordnet_concepts"]
PROBE = "chat_language"
WARM_PROBE = "wordnet_actions"  # the warm row's task: as many training rows, another domain
BUCKETS = ["load", "training", "evaluation", "store", "dashboards"]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows({"text": r["text"], "label": r["label"]} for r in rows)
    return path


def synthetic_task(i: int, folder: Path) -> tuple[Path, Path]:
    source = TASKS / "data" / BUNDLED[i % len(BUNDLED)]
    rng = random.Random(i)
    train, test = read_rows(source / "train.csv"), read_rows(source / "test.csv")
    return (write_rows(folder / f"s{i}_train.csv", rng.sample(train, 120)),
            write_rows(folder / f"s{i}_test.csv", rng.sample(test, min(200, len(test)))))


def fill(hub, start: int, stop: int, folder: Path) -> None:
    """Synthetic tasks start..stop-1, one epoch each, heatmaps drawn as usual."""
    for i in range(start, stop):
        train, test = synthetic_task(i, folder)
        hub.add_task(f"s{i:03d}", train, test, epochs=1)
        hub.drawing.join()


def probe(store: Path) -> dict:
    """In this fresh process: add the probe task to `store`, timing each bucket ("cold", as the
    CLI runs it), then one more task in the same process ("warm", as in a Python session or
    `ahl demo`: imports done, the base and the earlier adapters in memory)."""
    from adapterhub_local import Hub, candidate, dashboards, evaluation, plan, trainer

    seconds = dict.fromkeys(BUCKETS, 0.0)

    def timed(module, name: str, bucket: str) -> None:
        inner = getattr(module, name)

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds[bucket] += time.perf_counter() - started

        setattr(module, name, wrapper)

    timed(plan, "plan_add_task", "load")
    timed(trainer, "train_adapter", "training")
    timed(candidate, "compute_scores", "evaluation")
    timed(evaluation, "evaluate_step", "evaluation")
    timed(dashboards, "draw_steps", "dashboards")
    hub = Hub(store)
    costs = {}
    for row, task in (("cold", PROBE), ("warm", WARM_PROBE)):
        for bucket in BUCKETS:
            seconds[bucket] = 0.0
        before = time.perf_counter() - STARTED if row == "cold" else 0.0  # imports, the store
        started = time.perf_counter()
        hub.add_task(task, TASKS / "data" / task / "train.csv", TASKS / "data" / task / "test.csv")
        inside = time.perf_counter() - started  # add-task's answer is printed here
        hub.drawing.join()  # the heatmaps, drawn on a thread after the commit
        cost = dict(seconds, store=inside - seconds["load"] - seconds["training"] - seconds["evaluation"])
        cost["load"] += before
        cost["answer"] = before + inside
        cost["total"] = before + time.perf_counter() - started
        costs[row] = cost
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,30")
    parser.add_argument("--keep", type=Path, help="fill the store in this folder and keep it; "
                        "a later run goes on from the tasks it holds")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: run the probe on a store
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(Path(args.probe))))
        return
    from adapterhub_local import Hub

    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ahl-step-cost-"))
    store, rows = (args.keep or work) / "store", []
    try:
        hub = Hub(store)
        have = len(hub.tasks()) if store.exists() else 0
        for size in sizes:
            if size - 1 < have:
                raise SystemExit(f"{store} holds {have} tasks already: give sizes above that")
            fill(hub, have, size - 1, work)  # the probe is the size-th task
            have = size - 1
            copy = work / f"probe{size}"
            if store.exists():  # a store of 1 task is the probe alone, on an empty store
                shutil.copytree(store, copy)
            out = subprocess.run([sys.executable, __file__, "--probe", str(copy)], check=True,
                                 capture_output=True, text=True).stdout
            costs = json.loads(out.strip().splitlines()[-1])
            shutil.rmtree(copy, ignore_errors=True)
            for row, cost in costs.items():
                rows.append((size, row, cost))
                print(f"  {size:4d} tasks, {row}: " + ", ".join(f"{b} {cost[b]:.1f} s" for b in BUCKETS)
                      + f"; answer {cost['answer']:.1f} s, exit {cost['total']:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{date.today()}, {platform.machine()}, {os.cpu_count()} cores; cold: {PROBE} (full "
          "data, defaults) added as the last task in a fresh process; warm: then "
          f"{WARM_PROBE} in the same process")
    print("| tasks | process | " + " | ".join(BUCKETS) + " | answer | exit | all but training / training |")
    print("|---:|---|" + "---:|" * (len(BUCKETS) + 3))
    for size, row, cost in rows:
        other = cost["total"] - cost["training"]
        print(f"| {size} | {row} | " + " | ".join(f"{cost[b]:.1f}" for b in BUCKETS)
              + f" | {cost['answer']:.1f} | {cost['total']:.1f} | {other / cost['training']:.2f}x |")


if __name__ == "__main__":
    main()

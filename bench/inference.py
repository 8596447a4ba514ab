"""Inference throughput: routed Hub.predict vs a bare base forward and a naive per-input loop.

Over mixed test texts of every task in a store (run `make demo` first), in one process:
  floor   the bare base, batched by length: no routing, no adapter (the most one can hope for)
  naive   for each input, switch to its task's adapter and run it alone (the task is even given)
  routed  Hub.predict(texts): route every input, then one mixed-adapter pass

    .venv/bin/python bench/inference.py [--store store] [--per-task 100]
"""

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from adapterhub_local import Hub  # noqa: E402
from adapterhub_local.hub import TEST_ARTIFACT  # noqa: E402
from routing import last_layer_features  # noqa: E402  (bench/ is on the path when run)


def mixed_inputs(hub: Hub, per_task: int) -> tuple[list[str], list[str]]:
    texts, tasks = [], []
    for task in hub.store.task_names():
        version = hub.store.current_version(task)
        split = hub.store.read_json_artifact(version.run_id, TEST_ARTIFACT)
        texts += split["texts"][:per_task]
        tasks += [task] * len(split["texts"][:per_task])
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    return [texts[i] for i in order], [tasks[i] for i in order]


def naive_loop(bank, adapters: dict[str, str], texts: list[str], tasks: list[str]) -> None:
    for text, task in zip(texts, tasks):
        bank.predict(adapters[task], [text])


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="store")
    parser.add_argument("--per-task", type=int, default=100)
    args = parser.parse_args()
    hub = Hub(args.store)
    texts, tasks = mixed_inputs(hub, args.per_task)
    bank, _, adapters, _ = hub._open_router()
    hub.predict(texts[:8])  # warm up: adapters loaded, kernels initialised

    floor = timed(lambda: last_layer_features(bank, texts))
    naive = timed(lambda: naive_loop(bank, adapters, texts, tasks))
    routed = timed(lambda: hub.predict(texts))
    n = len(texts)
    print(f"{n} mixed texts from {len(adapters)} tasks, torch threads {torch.get_num_threads()}")
    print(f"{'':34}{'texts/s':>9}{'vs floor':>10}")
    for name, seconds in (("bare base forward (floor)", floor),
                          ("naive: switch adapter per input", naive),
                          ("ahl routed Hub.predict", routed)):
        print(f"{name:34}{n / seconds:>9.1f}{floor / seconds:>9.2f}x")
    print(f"routed / naive: {naive / routed:.1f}x faster")


if __name__ == "__main__":
    main()

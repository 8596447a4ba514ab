"""Concurrent writers and killed writers on one store, on a folder store and on a PostgreSQL-backed
MLflow server.

1. Four `ahl add-task` processes at once (three tasks, one of them twice): all must land, the
   steps must be 1..4, the last row must cover the three tasks, the serving router must know
   all three, and the twice-added task must have versions 1 and 2, version 2's parent 1.
2. Twenty more add-tasks, four at a time, each killed with SIGKILL after a random delay (some
   during training, some while committing, some never): afterwards `ahl store doctor` (what any
   next writer does first), then the same invariants: steps contiguous, the tasks listed are
   those of the last row, every file verifies, each task's versions rise with the right parent.

The base is a tiny random BERT built here (the protocol is what is measured, not the model:
a MiniLM add-task only trains longer, which widens the windows the kills land in). The
baseline is the same four add-tasks one after another: wall time at once / one by one.

    .venv/bin/python bench/concurrency.py [--kills 20] [--seed 0] [--no-server]
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import TINY_TASKS, tiny_rows, write_csv  # noqa: E402

TASKS = list(TINY_TASKS)  # colors, animals, moods
TRAIN = ["--epochs", "6", "--lr", "5e-3", "--batch-size", "16"]


def build_tiny_base(folder: Path) -> str:
    """The tests' tiny random BERT (conftest.tiny_base), saved as a base folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from conftest import FILLER, SPECIAL

    words = SPECIAL + FILLER + sorted({w for t in TINY_TASKS.values() for ws in t.values() for w in ws})
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=256)).save_pretrained(folder)
    return str(folder)


def ahl(*args, store: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "adapterhub_local.cli", *map(str, args),
                           "--store", store], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SystemExit(f"ahl {' '.join(map(str, args))} failed: {done.stderr.strip()[-400:]}")
    return done


def add_task_process(task: str, data: dict, base: str, store: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adapterhub_local.cli", "add-task", task,
                             "--train", data[task]["train"], "--test", data[task]["test"],
                             "--base", base, "--store", store, *TRAIN, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_store(store: str, expect_tasks: set[str]) -> dict:
    """The invariants; returns the figures they were read from."""
    metrics = json.loads(ahl("metrics", "--json", store=store).stdout)
    tasks = json.loads(ahl("tasks", "--json", store=store).stdout)
    matrix = metrics["modes"]["oracle"]["matrix"]
    last = {t for t, v in zip(metrics["tasks"], matrix[-1]) if v is not None}
    listed = {t["task"] for t in tasks if t["version"] is not None}
    assert listed == last == expect_tasks, (listed, last)
    assert json.loads(ahl("store", "verify", "--json", store=store).stdout)["ok"]
    routed = json.loads(ahl("predict", "--json", *[tiny_rows(t, 1, seed=9)[0][0] for t in TASKS],
                            store=store).stdout)
    assert {a["task"] for a in routed} <= expect_tasks | {None}
    for task in expect_tasks:
        versions = json.loads(ahl("store", "versions", task, "--json", store=store).stdout)
        numbers = [v["version"] for v in versions]
        assert numbers == sorted(numbers) and versions[0]["parent"] is None
        assert all(v["parent"] == p for v, p in zip(versions[1:], numbers)), versions
    return {"steps": len(matrix), "versions": {t["task"]: t["version"] for t in tasks}}


def at_once(data: dict, base: str, store: str) -> dict:
    started = time.perf_counter()
    writers = [add_task_process(t, data, base, store) for t in ("colors", "animals", "moods", "colors")]
    results = []
    for w in writers:
        out, err = w.communicate()
        if w.returncode != 0:
            raise SystemExit(f"a writer failed: {err.strip()[-400:]}")
        results.append(json.loads(out))
    wall = time.perf_counter() - started
    figures = check_store(store, set(TASKS))
    assert sorted(r["step"] for r in results) == [1, 2, 3, 4]
    assert figures["steps"] == 4
    colors = json.loads(ahl("store", "versions", "colors", "--json", store=store).stdout)
    assert [(v["version"], v["parent"]) for v in colors] == [(1, None), (2, 1)]
    router = json.loads(ahl("store", "show", "colors@2", "--json", store=store).stdout)
    return {"wall": wall, "waits": [r["lock_wait_seconds"] for r in results],
            "commits": [r["commit_seconds"] for r in results],
            "train": [r["train_seconds"] for r in results], "router_of_last": router["router_version"]}


def one_by_one(data: dict, base: str, store: str) -> float:
    started = time.perf_counter()
    for task in ("colors", "animals", "moods", "colors"):
        w = add_task_process(task, data, base, store)
        w.communicate()
    return time.perf_counter() - started


def killed(data: dict, base: str, store: str, kills: int, rng: random.Random) -> dict:
    landed = repairs = 0
    for wave in range(0, kills, 4):
        writers = [(add_task_process(rng.choice(TASKS), data, base, store), rng.uniform(1, 25))
                   for _ in range(min(4, kills - wave))]
        started = time.perf_counter()
        for w, delay in sorted(writers, key=lambda x: x[1]):
            time.sleep(max(0.0, delay - (time.perf_counter() - started)))
            if w.poll() is None:
                w.send_signal(signal.SIGKILL)
            _, err = w.communicate()
            landed += w.returncode == 0
            repairs += err.count("repaired: ")  # what the next writers finished or rolled back
    repaired = json.loads(ahl("store", "doctor", "--json", store=store).stdout)["repaired"]
    figures = check_store(store, set(TASKS))
    return {"landed": landed, "killed": kills - landed, "repairs": repairs,
            "doctor": len(repaired), **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-server", action="store_true", help="Only the folder store.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ahl-concurrency-"))
    try:
        base = build_tiny_base(work / "base")
        data = {t: {"train": write_csv(work / f"{t}_train.csv", tiny_rows(t, 40, seed=1)),
                    "test": write_csv(work / f"{t}_test.csv", tiny_rows(t, 10, seed=2))}
                for t in TASKS}
        stores = [("folder store", lambda name: str(work / name), lambda: None)]
        if not args.no_server:
            stores.append(("PostgreSQL-backed MLflow server", *server_stores(work)))
        print(f"# bench/concurrency.py, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, "
              f"tiny random BERT, seed {args.seed}")
        for label, store_for, stop in stores:
            try:
                report(label, data, base, store_for, args.kills, args.seed)
            finally:
                stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(label: str, data: dict, base: str, store_for, kills: int, seed: int) -> None:
    store = store_for("together")
    together = at_once(data, base, store)
    alone = one_by_one(data, base, store_for("alone"))
    after = killed(data, base, store, kills, random.Random(seed))
    print(f"\n## {label}")
    print(f"4 writers at once: {together['wall']:.1f} s wall vs {alone:.1f} s one after another "
          f"({together['wall'] / alone:.2f}x); steps 1..4, colors v1 -> v2 (parent 1)")
    print(f"  lock waits (s): {together['waits']}; commits (s): {together['commits']}; "
          f"training (s): {together['train']}")
    print(f"{kills} writers killed at random moments: {after['killed']} killed, {after['landed']} "
          f"landed first; writers repaired {after['repairs']} leftover(s) of killed ones, the "
          f"doctor {after['doctor']} more; then {after['steps']} "
          f"contiguous steps, tasks listed == last row == {sorted(after['versions'])}, verify ok, "
          f"versions {after['versions']}")


def server_stores(work: Path):
    """(store_for(name), stop): one server per store name, on one PostgreSQL."""
    from adapterhub_local.dashboards import start_server, stop_ui, wait_for_ui
    from services import free_port, postgres_server

    database = postgres_server()
    uri = database.__enter__()
    servers = []

    def store_for(name: str) -> str:
        import psycopg

        with psycopg.connect(uri, autocommit=True) as connection:  # a database per store
            connection.execute(f"CREATE DATABASE {name}")
        port = free_port()
        db = f"{uri.rsplit('/', 1)[0]}/{name}"
        server = start_server(db, port, ["--artifacts-destination", str(work / f"art-{name}")])
        servers.append(server)
        url = f"http://127.0.0.1:{port}"
        if not wait_for_ui(url, server, timeout=180):
            raise SystemExit(f"mlflow server did not start: {server.stderr.read().decode()[-400:]}")
        return url

    def stop():
        for server in servers:
            stop_ui(server)
        database.__exit__(None, None, None)

    return store_for, stop


if __name__ == "__main__":
    main()

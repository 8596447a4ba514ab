"""Crash safety and concurrent writers, with real processes: an add-task killed with SIGKILL at
each stage of its commit, or stopped with SIGTERM or SIGINT, leaves a store whose listed tasks
are those of its last matrix row, whose files verify, and whose next add-task numbers sanely;
writers at once each land, with contiguous steps."""

import json
import signal
import subprocess
import sys
import time

import pytest

from adapterhub_local import Hub
from conftest import FAST, copy_store
from test_cli import FAST_ARGS

# Runs `ahl ARGS...` after replacing one function of the add-task with a SIGKILL of the
# process itself (or, for "pause", with a pause that a test interrupts with a signal).
KILLER = """
import os, signal, sys, time
import adapterhub_local.commit as commit
import adapterhub_local.evaluation as evaluation
import adapterhub_local.trainer as trainer

stage, marker = sys.argv[1], sys.argv[2]
# Ctrl-C as in a terminal, however the tests were started: a shell's background job (make test
# &) inherits SIGINT ignored, and Python then leaves it ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def train_then(after_step):
    original = trainer.train_adapter
    def train(*args, progress=None, **kwargs):
        def step(i, total):
            if i == 2:
                after_step()
        return original(*args, progress=step, **kwargs)
    return train

def pause():
    open(marker, "w").close()
    time.sleep(600)

if stage == "training":
    trainer.train_adapter = train_then(die)
elif stage == "pause":
    trainer.train_adapter = train_then(pause)
elif stage == "registered":
    commit.register_router = die
elif stage == "router_registered":
    evaluation.evaluate_step = die  # commit_add_task imports it when it runs
elif stage == "evaluating":
    evaluation.score_task = die
elif stage == "step_logging":
    commit.commit_step = die
elif stage == "finalizing":
    commit.finalize = die
from adapterhub_local.cli import app
app(sys.argv[3:], prog_name="ahl")
"""


def ahl_process(stage: str, marker, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", KILLER, stage, str(marker), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def add_args(task, tiny_data, tiny_base, store):
    return ["add-task", task, "--train", tiny_data[task]["train"], "--test",
            tiny_data[task]["test"], "--base", tiny_base, "--store", store, *FAST_ARGS]


def check_invariants(store) -> dict:
    """What must hold after any crash; returns the metrics."""
    hub = Hub(store)
    metrics = hub.metrics()
    last_row = metrics["modes"]["oracle"]["matrix"][-1]
    in_last_row = {t for t, v in zip(metrics["tasks"], last_row) if v is not None}
    assert {t["task"] for t in hub.tasks() if t["version"] is not None} == in_last_row
    assert hub.verify() == []
    return metrics


@pytest.fixture(scope="module")
def crashed_store(tmp_path_factory, colors_only_store):
    """One store that outlives a kill at every stage; each test checks one stage."""
    return copy_store(colors_only_store, tmp_path_factory.mktemp("crash") / "store")


@pytest.mark.parametrize("stage", ["training", "registered", "router_registered", "evaluating",
                                   "step_logging", "finalizing"])
def test_a_kill_at_any_stage_leaves_a_consistent_store(stage, crashed_store, tiny_data,
                                                       tiny_base, tmp_path):
    steps_before = len(check_invariants(crashed_store)["modes"]["oracle"]["matrix"])
    process = ahl_process(stage, tmp_path / "marker",
                          *add_args("animals", tiny_data, tiny_base, crashed_store))
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    metrics = check_invariants(crashed_store)
    committed = stage == "finalizing"  # killed after the commit point: the step counts
    assert len(metrics["modes"]["oracle"]["matrix"]) == steps_before + committed
    # The next writer repairs what the killed one left, and numbers its step next.
    hub = Hub(crashed_store)
    result = hub.add_task("moods", tiny_data["moods"]["train"], tiny_data["moods"]["test"],
                          base=tiny_base, **FAST)
    assert result["step"] == steps_before + committed + 1
    assert hub.store.pending_versions() == []
    assert not [r for r in hub.store.running_runs()]  # no run left RUNNING
    versions = [v["version"] for v in hub.versions("moods")]
    assert versions == sorted(versions) and result["parent"] == (versions[-2] if len(versions) > 1 else None)
    check_invariants(crashed_store)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_roll_back_and_exit_cleanly(signum, colors_only_store, tiny_data,
                                                       tiny_base, tmp_path):
    store_dir = copy_store(colors_only_store, tmp_path / "store")
    marker = tmp_path / "marker"
    process = ahl_process("pause", marker, *add_args("animals", tiny_data, tiny_base, store_dir))
    try:
        while not marker.exists() and process.poll() is None:
            time.sleep(0.2)  # no deadline: training starts when the machine gets to it
        process.send_signal(signum)
        _, stderr = process.communicate()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == (143 if signum == signal.SIGTERM else 130)
    assert stderr.strip().splitlines()[-1].startswith("interrupted:")
    hub = Hub(store_dir)
    assert [t["task"] for t in hub.tasks()] == ["colors"]
    assert not hub.store.running_runs() and hub.verify() == []
    killed = hub.store.client.search_runs([hub.store.experiment_id()], "attributes.status = 'KILLED'")
    assert [r.info.run_name for r in killed] == ["animals"]


def test_writers_at_once_all_land_with_contiguous_steps(store_dir, tiny_data, tiny_base):
    """Three add-tasks at once (one task twice): one commit at a time, each sees the others."""
    Hub(store_dir).add_task("moods", tiny_data["moods"]["train"], tiny_data["moods"]["test"],
                            base=tiny_base, **FAST)
    writers = [ahl_process("none", "-", *add_args(task, tiny_data, tiny_base, store_dir), "--json")
               for task in ("colors", "animals", "colors")]
    results = []
    for w in writers:
        out, err = w.communicate()
        assert w.returncode == 0, err
        results.append(json.loads(out))
    assert sorted(r["step"] for r in results) == [2, 3, 4]
    hub = Hub(store_dir)
    metrics = hub.metrics()
    assert len(metrics["modes"]["oracle"]["matrix"]) == 4
    assert all(v is not None for v in metrics["modes"]["oracle"]["matrix"][-1])
    assert [(v["version"], v["parent"]) for v in hub.versions("colors")] == [(1, None), (2, 1)]
    router = hub.loader.open_router(hub.store.base_binding()[0])
    assert set(router[3]) == {"moods", "colors", "animals"} and router[3]["colors"] == 2

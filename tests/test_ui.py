"""`ahl ui` serves the MLflow UI for a store on 127.0.0.1, stops on Ctrl-C or SIGTERM, and takes
its server down with it when it is killed outright."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from adapterhub_local import Hub
from conftest import copy_store
from services import free_port, wait_until
from test_cli import ahl


@pytest.fixture
def trained_store(two_task_store, tmp_path) -> Path:
    """A copy of the session's trained store (the UI only reads it; a copy keeps it so)."""
    return copy_store(two_task_store, tmp_path / "store")


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_ui(store_dir: Path, port: int) -> subprocess.Popen:
    # SIGINT starts ignored, as in a background job of a non-interactive shell (how a test suite
    # is often run): `ahl ui` must still stop on Ctrl-C. It once ignored it there for half an hour.
    return subprocess.Popen([sys.executable, "-m", "adapterhub_local.cli", "ui", "--port",
                             str(port), "--store", str(store_dir)], stdout=subprocess.PIPE,
                            text=True, preexec_fn=ignore_sigint)


def experiment(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name"
                                    "?experiment_name=ahl", timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


def nothing_listens(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            return True
        except OSError:
            return False


def live_processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every process that is not a zombie, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # it ended meanwhile
        if state != "Z":
            found.append((int(stat.parent.name), int(parent), int(group)))
    return found


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ui_serves_the_store_and_stops_on_a_signal(trained_store, stop):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ui = start_ui(trained_store, port)
    try:
        assert wait_until(lambda: experiment(url), 120)
        found = experiment(url)["experiment"]
        assert found["name"] == "ahl"
        # Marked as model training: the UI opens its runs, not the GenAI view.
        assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in found["tags"]
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
        assert url in ui.stdout.readline()
        run = Hub(trained_store).store.sequence_run_id()
        link = f"{url}/#/experiments/{found['experiment_id']}/runs/{run}?workflowType=machine_learning"
        assert link in ui.stdout.readline()
        ui.send_signal(stop)
        assert ui.wait(timeout=60) == 0
        assert "stopped" in ui.stdout.read()
        assert nothing_listens(port)  # stop_ui waited for the server and its worker to end
    finally:
        if ui.poll() is None:  # the test failed: its server goes with it (see the next test)
            ui.kill()
            ui.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_a_killed_ui_takes_its_server_down(trained_store):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ui, groups = start_ui(trained_store, port), set()
    try:
        assert wait_until(lambda: experiment(url), 120)
        # The groups of what `ahl ui` started: the server's (mlflow server and its uvicorn
        # worker) and its watchdog's.
        groups = {group for pid, parent, group in live_processes() if parent == ui.pid}
        assert len(groups) == 2
        ui.kill()  # SIGKILL: no handler, no finally, no atexit runs in ahl
        ui.wait()
        assert wait_until(lambda: nothing_listens(port), 60)
        assert wait_until(lambda: not [p for p in live_processes() if p[2] in groups], 60)
    finally:
        if ui.poll() is None:
            ui.kill()
            ui.wait()
        for group in groups:  # only if the test failed: nothing is left otherwise
            with contextlib.suppress(OSError):
                os.killpg(group, signal.SIGKILL)


def test_ui_on_a_busy_port_says_so(trained_store):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = ahl("ui", "--port", busy.getsockname()[1], "--store", trained_store, ok=False)
    assert result.exit_code == 1 and "is busy" in result.stderr


def test_ui_on_an_empty_store_names_add_task(tmp_path):
    result = ahl("ui", "--store", tmp_path / "nothing", ok=False)
    assert result.exit_code == 1 and "ahl add-task" in result.stderr

"""`ahl ui` serves the MLflow UI for a store on 127.0.0.1, and stops on Ctrl-C."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from adapterhub_local import Hub
from conftest import FAST
from test_cli import ahl


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_store_and_stops_on_ctrl_c(store_dir, tiny_data, tiny_base):
    Hub(store_dir).add_task("colors", tiny_data["colors"]["train"], tiny_data["colors"]["test"],
                            base=tiny_base, **FAST)
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "adapterhub_local.cli", "ui", "--port", str(port),
                           "--store", str(store_dir)], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline, answer = time.time() + 90, None
        while time.time() < deadline and answer is None:
            try:
                with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name"
                                            "?experiment_name=ahl", timeout=2) as response:
                    answer = json.loads(response.read())
            except OSError:
                time.sleep(1)
        assert answer and answer["experiment"]["name"] == "ahl"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
        assert url in ui.stdout.readline()
    finally:
        ui.send_signal(signal.SIGINT)
        ui.wait(timeout=30)
    assert ui.returncode is not None
    with socket.socket() as s:  # the server is gone: nothing listens on its port any more
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_ui_on_a_busy_port_says_so(store_dir, tiny_data, tiny_base):
    Hub(store_dir).add_task("colors", tiny_data["colors"]["train"], base=tiny_base, **FAST)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = ahl("ui", "--port", busy.getsockname()[1], "--store", store_dir, ok=False)
    assert result.exit_code == 1 and "is busy" in result.stderr


def test_ui_on_an_empty_store_names_add_task(tmp_path):
    result = ahl("ui", "--store", tmp_path / "nothing", ok=False)
    assert result.exit_code == 1 and "ahl add-task" in result.stderr

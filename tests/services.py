"""Real services for integration tests: a PostgreSQL server on loopback in a temporary data
directory, and headless Chromium. When they are not installed the tests that need them skip,
unless AHL_REQUIRE_SERVICES=1 (set by .ci/run, which installs them) turns the skip into a failure.
"""

import contextlib
import glob
import os
import shutil
import socket
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def missing(what: str, how: str):
    if os.environ.get("AHL_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what} is not installed: {how}")
    pytest.skip(f"{what} is not installed ({how})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float) -> bool:
    """Poll: a busy 2-core machine can take long for anything, so no short fixed waits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(1)
    return False


@contextmanager
def mlflow_model_server(model_uri: str, tracking_uri: str, log: Path):
    """`mlflow models serve` of a model on 127.0.0.1 (the local environment); yields its URL,
    once /ping answers. Stopped with its workers (its process group) however the test ends."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           # it starts uvicorn by name: this Python's scripts first
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        assert wait_until(ready, 600), f"no answer on {url}/ping: {log.read_text()[-2000:]}"
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def postgres_tool(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))  # Debian keeps them here
    return found[-1] if found else shutil.which(name)


@contextmanager
def postgres_server():
    """A throwaway PostgreSQL on 127.0.0.1; yields its SQLAlchemy URI. PostgreSQL refuses to
    run as root, so as root the server runs as the `postgres` user the Debian package made."""
    initdb, pg_ctl = postgres_tool("initdb"), postgres_tool("pg_ctl")
    if not (initdb and pg_ctl):
        missing("PostgreSQL", "apt-get install postgresql")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="ahl-pg-"))  # in /tmp: the postgres user can reach it
    if as_user:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    run = lambda *args: subprocess.run([*as_user, *args], check=True,  # noqa: E731
                                       capture_output=True, text=True)
    run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
    run(pg_ctl, "-D", str(data), "-w", "-l", str(folder / "log"), "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        missing("Chromium", "apt-get install chromium")
    return path


def chromium_page(url: str, screenshot: Path, wait_ms: int = 20000) -> str:
    """The DOM of `url` after its scripts ran for wait_ms of virtual time, and a screenshot."""
    binary = chromium()
    with tempfile.TemporaryDirectory() as profile:
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1000",
                 f"--virtual-time-budget={wait_ms}"]
        subprocess.run([binary, *flags, f"--screenshot={screenshot}", url], check=True,
                       capture_output=True, timeout=120 + wait_ms // 1000)
        return subprocess.run([binary, *flags, "--dump-dom", url], check=True,
                              capture_output=True, text=True, timeout=120 + wait_ms // 1000).stdout

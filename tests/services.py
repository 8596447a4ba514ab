"""Real services for integration tests: a PostgreSQL server on loopback in a temporary data
directory, and headless Chromium. When they are not installed the tests that need them skip,
unless AHL_REQUIRE_SERVICES=1 (set by .ci/run, which installs them) turns the skip into a failure.
"""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
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

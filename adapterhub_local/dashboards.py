"""What goes to MLflow for the forgetting dashboards, and the MLflow UI server.

The store's sequence run holds, at step s (the number of add-tasks so far), one metric per task
and mode, `MODE/acc/TASK` (a generate task's own metric, and its soft one as
`MODE/SOFT_METRIC/TASK`), and the summaries `MODE/average_accuracy`, `MODE/bwt`,
`MODE/forgetting` (sequence.py writes them with the step's record). MLflow's UI groups metrics by
their prefix, so each mode is a section whose charts show how every earlier task held up after
each step; the heatmaps here are the matrices as images, one per step, drawn after the step is
committed, on a thread (draw_in_background): add-task returns meanwhile, and a drawing that
fails or dies with its process costs only pictures, which the next drawing makes up for.
"""

import logging
import threading

from adapterhub_local.forgetting import Matrix
from adapterhub_local.sequence import MATRICES, matrices_of, read_steps, sequence_run

log = logging.getLogger("adapterhub_local")
_DRAWING = threading.Lock()  # one drawing at a time per process
THREAD = "ahl-dashboards"
LAST_KEY = "router_confusion"  # the image a step's drawing makes last
CATCH_UP = 10  # how many of the latest steps a drawing checks for missing pictures
ANNOTATED = 20  # heatmaps with more columns than this have no numbers in their cells



def heatmap(title: str, values: list[list[float | None]], rows: list[str], columns: list[str]):
    """A heatmap of shares in [0, 1] as an RGB array, its cells annotated up to ANNOTATED
    columns (None cells are left blank)."""
    # A figure of its own on the Agg canvas, never pyplot: this runs on a drawing thread, and
    # pyplot's global state (and backend) belong to the user's process.
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    # Past ANNOTATED columns a cell is too small for its number, and the image would grow
    # without bound: the figure keeps a readable size and its ticks thin out.
    fig = Figure(figsize=(min(2.5 + 0.9 * len(columns), 16), min(1.2 + 0.45 * len(rows), 12)),
                 dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    if len(columns) <= ANNOTATED:
        for (i, j), v in np.ndenumerate(data):
            if not np.isnan(v):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center",
                        color="white" if v < 0.6 else "black", fontsize=8)
    every_column, every_row = -(-len(columns) // 40), -(-len(rows) // 40)
    ax.set_xticks(range(0, len(columns), every_column), columns[::every_column], rotation=30,
                  ha="right", fontsize=8)
    ax.set_yticks(range(0, len(rows), every_row), rows[::every_row], fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_images(store, run_id: str, step: int, tasks: list[str], matrices: dict[str, Matrix],
               confusion: dict, metrics: dict[str, str]) -> None:
    steps = [str(i + 1) for i in range(step)]
    # A row says its task's metric where it is not accuracy (a generate task's).
    rows = [t if metrics.get(t, "accuracy") == "accuracy" else f"{t} ({metrics[t]})" for t in tasks]
    for mode in MATRICES:
        by_task = [[row[j] for row in matrices[mode]] for j in range(len(tasks))]
        used = sorted({m.replace("_", " ") for m in metrics.values()} or {"accuracy"})
        what = "accuracy" if mode == "routing" else used[0] if len(used) == 1 else "score"
        store.log_image(run_id, heatmap(f"{mode} {what} % (rows: tasks, columns: steps)",
                                        by_task, rows, steps), key=f"{mode}_matrix", step=step)
    shares = [[n / max(1, sum(row)) for n in row] for row in confusion["matrix"]]
    store.log_image(run_id, heatmap("router confusion % (rows: true task)", shares,
                                    confusion["true_tasks"], confusion["tasks"] + ["abstain"]),
                    key="router_confusion", step=step)


def draw_steps(store) -> list[int]:
    """Draw the heatmaps of each of the latest CATCH_UP committed steps that has none yet (the
    step just committed, and any whose drawing died with its process); returns those steps."""
    with _DRAWING:
        run = sequence_run(store)
        records = read_steps(store)
        drawn = {int(name.split("+step+")[1].split("+")[0])
                 for name in store.artifact_names(run, "images") if f"/{LAST_KEY}+step+" in name}
        missing = [r["step"] for r in records[-CATCH_UP:] if r["step"] not in drawn]
        for step in missing:
            record = records[step - 1]
            log_images(store, run, step, *matrices_of(records[:step]), record["confusion"],
                       record.get("metrics", {}))
        return missing


def draw_in_background(store) -> threading.Thread:
    """draw_steps on a daemon thread: `ahl` waits for it (wait_for_drawings); a process that
    ends first loses the drawing, which the next add-task's makes up."""
    def draw():
        try:
            draw_steps(store)
        except Exception as e:  # pictures only: the step itself is committed
            log.warning("could not draw the forgetting heatmaps (%s); the next add-task "
                        "draws them", str(e).splitlines()[0] if str(e) else type(e).__name__)

    thread = threading.Thread(target=draw, name=THREAD, daemon=True)
    thread.start()
    return thread


def wait_for_drawings() -> None:
    """Wait for every heatmap drawing this process started."""
    for thread in threading.enumerate():
        if thread.name == THREAD:
            thread.join()


def serve_ui(store, port: int):
    """Start the MLflow UI for a store on 127.0.0.1:port, lean (one worker, no job runner).
    Returns the server process; the caller stops it with stop_ui."""
    from adapterhub_local.errors import AhlError

    if store.uri.startswith(("http://", "https://")):
        raise AhlError(f"store {store.location} is already a tracking server: open it in a browser")
    if not store.exists():
        raise AhlError(f"store {store.location} has no tasks yet: add one with ahl add-task "
                       "NAME --train FILE")
    return start_server(store.uri, port, ["--default-artifact-root", store.artifact_root])


def start_server(backend_uri: str, port: int, artifact_options: list[str],
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None):
    """`mlflow server` on 127.0.0.1:port over a backend (sqlite:///..., postgresql://...), with
    one worker and no job runner; artifact_options say where artifacts go
    (`--default-artifact-root URI`, or `--artifacts-destination DIR` to serve them itself);
    extra_args and env go to the server as they are (`--app-name basic-auth` and its settings).
    The server dies with this process, however it ends (see WATCHDOG); stop it with stop_ui."""
    import collections
    import os
    import socket
    import subprocess
    import sys
    import threading

    from adapterhub_local.errors import AhlError

    with socket.socket() as probe:
        # As the server will: connections of a server that just stopped (TIME_WAIT) don't count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise AhlError(f"port {port} on 127.0.0.1 is busy: pass --port with a free one") from None
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *artifact_options,
               *(extra_args or [])]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    # Its own session: a Ctrl-C meant for us does not reach it half-way; we stop it in order.
    server = subprocess.Popen(command, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server.watchdog = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", WATCHDOG, str(server.pid)], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # Keep reading its stderr (the last lines say why it failed): a pipe nobody reads fills up
    # over a long session and then blocks the server in the middle of a write, shutdown included.
    server.log = collections.deque(maxlen=20)
    server.drain = threading.Thread(target=server.log.extend, args=(server.stderr,), daemon=True)
    server.drain.start()
    return server


# `mlflow server` runs the app in a uvicorn child process, which a death signal set on the first
# (prctl PR_SET_PDEATHSIG) would not reach, and which outlives it when it is SIGKILLed. So a tiny
# process of its own session waits for EOF on its stdin, a pipe whose write end only the server's
# parent holds: the kernel closes it however the parent ends, SIGKILL included (and stop_ui closes
# it on purpose). Then it stops the server's whole process group: SIGTERM, SIGKILL after 15 s.
WATCHDOG = """
import os, signal, sys, time
group = int(sys.argv[1])
sys.stdin.buffer.read()
try:
    os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        time.sleep(0.2)
        os.killpg(group, 0)  # raises once no process of the group is left
    os.killpg(group, signal.SIGKILL)
except OSError:
    pass
"""


def server_log(server) -> str:
    """The last lines the server wrote on stderr (up to its very last, once it has exited)."""
    if server.poll() is not None:
        server.drain.join(timeout=5)
    return b"".join(list(server.log)).decode(errors="replace")


def wait_for_ui(url: str, server, timeout: float = 60.0) -> bool:
    """Whether the server answers at url within timeout seconds (False if it died)."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def stop_ui(server) -> None:
    """Stop the server and its worker (its process group) the way its watchdog does when this
    process dies: closing the watchdog's pipe is the one way to stop it."""
    import os
    import signal
    import subprocess

    server.watchdog.stdin.close()
    try:
        server.wait(timeout=30)  # reap it now, or the watchdog would wait on its zombie
    except subprocess.TimeoutExpired:  # only if someone killed the watchdog
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    server.watchdog.wait()

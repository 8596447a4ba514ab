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

from adapterhub_local.errors import brief
from adapterhub_local.forgetting import Matrix
from adapterhub_local.sequence import MATRICES, matrices_of, read_steps, sequence_run

log = logging.getLogger("adapterhub_local")
_DRAWING = threading.Lock()  # one drawing at a time per process
THREAD = "ahl-dashboards"
LAST_KEY = "router_confusion"  # the image a step's drawing makes last
CATCH_UP = 10  # how many of the latest steps a drawing checks for missing pictures
ANNOTATED = 20  # heatmaps with more columns than this have no numbers in their cells



VIRIDIS = ["#440154", "#482878", "#3e4a89", "#31688e", "#26828e", "#1f9e89", "#35b779",
           "#6dcd59", "#b4de2c", "#fde725"]  # matplotlib's viridis at 0, 1/9, ..., 1
FONT_SIZE = 12
PAD = 6  # pixels around the title, the labels and the grid


def shade(value: float) -> tuple[int, int, int]:
    """The viridis colour of a share in [0, 1], interpolated between VIRIDIS's stops."""
    place = min(max(value, 0.0), 1.0) * (len(VIRIDIS) - 1)
    low = min(int(place), len(VIRIDIS) - 2)
    ends = [[int(c[k:k + 2], 16) for k in (1, 3, 5)] for c in VIRIDIS[low:low + 2]]
    return tuple(round(a + (place - low) * (b - a)) for a, b in zip(*ends))


def heatmap(title: str, values: list[list[float | None]], rows: list[str], columns: list[str]):
    """A heatmap of shares in [0, 1] as an RGB array: rows labelled on the left, columns below
    (turned upright where a label is wider than its cell), cells annotated up to ANNOTATED
    columns (None cells are left blank). Drawn with Pillow: matplotlib took a second and a half
    a step at 30 tasks (its import and its text layout), longer than the evaluation."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=FONT_SIZE)
    width = lambda text: int(font.getlength(text))  # noqa: E731
    annotated = len(columns) <= ANNOTATED
    # Past ANNOTATED columns a cell is too small for its number, and the image would grow
    # without bound: cells shrink to keep a readable size, and the labels thin out.
    cell_w = 40 if annotated else max(8, min(40, 1200 // len(columns)))
    cell_h = 24 if len(rows) <= 30 else max(8, 720 // len(rows))
    every_column, every_row = -(-len(columns) // 40), -(-len(rows) // 40)
    column_labels = {j: columns[j] for j in range(0, len(columns), every_column)}
    upright = any(width(c) > cell_w * every_column - 4 for c in column_labels.values())
    line = FONT_SIZE + 4
    left = max((width(r) for r in rows[::every_row]), default=0) + 2 * PAD
    top = line + 2 * PAD
    below = (max(map(width, column_labels.values()), default=0) if upright else line) + 2 * PAD
    size = (max(left + cell_w * len(columns), width(title)) + 2 * PAD, top + cell_h * len(rows) + below)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((PAD, PAD), title, fill="black", font=font)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if value is None:
                continue
            x, y = left + j * cell_w, top + i * cell_h
            draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=shade(value))
            if annotated:
                draw.text((x + cell_w / 2, y + cell_h / 2), f"{100 * value:.0f}", font=font,
                          fill="white" if value < 0.6 else "black", anchor="mm")
    for i in range(0, len(rows), every_row):
        draw.text((left - PAD, top + i * cell_h + cell_h / 2), rows[i], fill="black", font=font,
                  anchor="rm")
    grid_bottom = top + cell_h * len(rows) + PAD
    for j, label in column_labels.items():
        middle = left + j * cell_w + cell_w // 2
        if not upright:
            draw.text((middle, grid_bottom), label, fill="black", font=font, anchor="mt")
            continue
        text = Image.new("L", (width(label) + 2, line), 0)
        ImageDraw.Draw(text).text((1, 0), label, fill=255, font=font)
        text = text.rotate(90, expand=True)  # reads bottom to top, its end at the grid
        image.paste((0, 0, 0), (middle - text.width // 2, grid_bottom), mask=text)
    return np.asarray(image).copy()


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
                        "draws them", brief(e))

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

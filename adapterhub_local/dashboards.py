"""What goes to MLflow for the forgetting dashboards, and how the matrices are read back.

The store's sequence run holds, at step s (the number of add-tasks so far), one metric per task
and mode, `MODE/acc/TASK`, and the summaries `MODE/average_accuracy`, `MODE/bwt`,
`MODE/forgetting`. MLflow's UI groups metrics by their prefix, so each mode is a section whose
charts show how every earlier task held up after each step. The same metrics are the source of
the matrices that `ahl metrics` prints: there is no second copy to drift.
"""

import json
import tempfile
from pathlib import Path

from adapterhub_local.forgetting import Matrix, summarize
from adapterhub_local.store import TAG

MODES = ("oracle", "routed", "composed")
MATRICES = (*MODES, "routing")  # routing: share of task j's inputs routed to j after step i
CONFUSION_ARTIFACT = "confusion"


def accuracy_key(mode: str, task: str) -> str:
    return f"{mode}/acc/{task}"


def step_metrics(mode: str, tasks: list[str], R: Matrix) -> dict[str, float]:
    """The metrics of the last row of one mode's matrix."""
    metrics = {accuracy_key(mode, t): v for t, v in zip(tasks, R[-1]) if v is not None}
    summary = summarize(R)
    for key in ("average_accuracy", "bwt", "forgetting"):
        if summary[key] is not None:
            metrics[f"{mode}/{key}"] = summary[key]
    return metrics


DESCRIPTION = """**How each earlier task held up after each new task.**

Step *s* = the number of add-tasks so far. Metric sections:
- `oracle/…`: accuracy when the task is given (isolated adapters: these never drop).
- `routed/…`: the router picks the adapter; a wrong pick is a wrong answer.
- `composed/…`: the router's top 2 adapters answer together.
- `routing/acc/TASK`: share of the task's test inputs routed to it.
Each section has `acc/TASK` per task and `average_accuracy`, `bwt` (backward transfer: below 0
means forgetting) and `forgetting` summaries. Images: the accuracy matrices (rows: tasks,
columns: steps) and the router's confusion, one per step (use the step slider).
"""


def heatmap(title: str, values: list[list[float | None]], rows: list[str], columns: list[str]):
    """An annotated heatmap of shares in [0, 1] as an RGB array (None cells are left blank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(columns), 1.2 + 0.45 * len(rows)), dpi=100)
    ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(data):
        if not np.isnan(v):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center",
                    color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def log_images(store, run_id: str, step: int, tasks: list[str], matrices: dict[str, Matrix],
               confusion: dict) -> None:
    steps = [str(i + 1) for i in range(step)]
    for mode in MATRICES:
        by_task = [[row[j] for row in matrices[mode]] for j in range(len(tasks))]
        store.client.log_image(run_id, heatmap(f"{mode} accuracy % (rows: tasks, columns: steps)",
                                               by_task, tasks, steps), key=f"{mode}_matrix", step=step)
    shares = [[n / max(1, sum(row)) for n in row] for row in confusion["matrix"]]
    store.client.log_image(run_id, heatmap("router confusion % (rows: true task)", shares,
                                           confusion["true_tasks"], confusion["tasks"] + ["abstain"]),
                           key="router_confusion", step=step)


def log_step(store, tasks: list[str], matrices: dict[str, Matrix], confusion: dict,
             versions: dict[str, int]) -> None:
    """Append one step to the sequence run: the router's confusion and the heatmaps first, then
    every metric and the step count in one batch, so a step is either all there or not at all."""
    from mlflow.entities import RunTag

    step = len(matrices["oracle"])
    run_id = store.sequence_run_id()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"step_{step:03d}.json"
        path.write_text(json.dumps(confusion), encoding="utf-8")
        store.client.log_artifact(run_id, str(path), CONFUSION_ARTIFACT)
    log_images(store, run_id, step, tasks, matrices, confusion)
    metrics = {}
    for mode in MODES:
        metrics.update(step_metrics(mode, tasks, matrices[mode]))
    metrics.update({accuracy_key("routing", t): v
                    for t, v in zip(tasks, matrices["routing"][-1]) if v is not None})
    store.log_metrics(run_id, metrics, step, tags=[
        RunTag(f"{TAG}tasks", json.dumps(tasks)),
        RunTag(f"{TAG}steps", str(step)),
        RunTag(f"{TAG}step.{step}", json.dumps(versions)),
        RunTag("mlflow.note.content", DESCRIPTION),
    ])


def read_matrices(store) -> tuple[list[str], dict[str, Matrix]]:
    """(tasks in order of addition, {mode: matrix}) from the sequence run; empty if none yet."""
    run_id = store.sequence_run_id(create=False)
    if run_id is None:
        return [], {mode: [] for mode in MATRICES}
    tags = store.client.get_run(run_id).data.tags
    tasks = json.loads(tags.get(f"{TAG}tasks", "[]"))
    steps = int(tags.get(f"{TAG}steps", "0"))
    matrices = {}
    for mode in MATRICES:
        R = [[None] * len(tasks) for _ in range(steps)]
        for j, task in enumerate(tasks):
            history = store.client.get_metric_history(run_id, accuracy_key(mode, task))
            # A step logged twice (a retried add-task) keeps its latest value.
            for m in sorted(history, key=lambda m: m.timestamp):
                if 1 <= m.step <= steps:
                    R[m.step - 1][j] = m.value
        matrices[mode] = R
    return tasks, matrices


def read_confusion(store) -> dict | None:
    """The router's task confusion at the last step: rows are the tasks' test inputs, columns
    the router's tasks and then "abstain"."""
    run_id = store.sequence_run_id(create=False)
    steps = int(store.client.get_run(run_id).data.tags.get(f"{TAG}steps", "0")) if run_id else 0
    if not steps:
        return None
    return store.read_json_artifact(run_id, f"{CONFUSION_ARTIFACT}/step_{steps:03d}.json")


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


def start_server(backend_uri: str, port: int, artifact_options: list[str]):
    """`mlflow server` on 127.0.0.1:port over a backend (sqlite:///..., postgresql://...), with
    one worker and no job runner; artifact_options say where artifacts go
    (`--default-artifact-root URI`, or `--artifacts-destination DIR` to serve them itself)."""
    import os
    import socket
    import subprocess
    import sys

    from adapterhub_local.errors import AhlError

    with socket.socket() as probe:
        # As the server will: connections of a server that just stopped (TIME_WAIT) don't count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise AhlError(f"port {port} on 127.0.0.1 is busy: pass --port with a free one") from None
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *artifact_options]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.Popen(command, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


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
    """Stop the server and its workers (they share its process group)."""
    import os
    import signal
    import subprocess

    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

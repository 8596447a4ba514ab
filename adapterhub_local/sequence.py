"""The sequence record: one step per committed add-task, read back in a constant number of calls.

The store's one `sequence` run holds, for step s (1-based, contiguous):
- the artifact `steps/step_{s:06d}.json`: the step's record: the task and version it added, the
  version of every task evaluated, the router version, one row per mode aligned with `tasks`
  (the columns so far, in order of addition), the router's confusion and the gate's verdict;
- metrics `MODE/acc/TASK` and the summaries at step s, for MLflow's charts (dashboards.py);
- the tag `ahl.steps`: the number of committed steps. Setting it is the commit point of an
  add-task (commit.py): a record beyond it belongs to a writer that died, is ignored by
  readers and overwritten by the next writer (MLflow keeps such a writer's metric points in the
  charts' history: the step's record is the one that counts).
Step lists live in artifacts, never in tags: their size grows with the number of tasks.
"""

from adapterhub_local.forgetting import Matrix
import json
from pathlib import Path

from adapterhub_local.store import STEPS_TAG

STEPS_ARTIFACT, CARRY_ARTIFACT = "steps", "carry"
MODES = ("oracle", "routed", "composed")
MATRICES = (*MODES, "routing")  # routing: share of task j's inputs routed to j after step i


def step_path(step: int, folder: str = STEPS_ARTIFACT) -> str:
    return f"{folder}/step_{step:06d}.json"


# The sequence run's description in the MLflow UI: what is where.
DESCRIPTION = """**How each earlier task held up after each new task.**

Step *s* = the number of add-tasks so far. Metric sections:
- `oracle/…`: accuracy when the task is given (isolated adapters: these never drop).
- `routed/…`: the router picks the adapter; a wrong pick is a wrong answer.
- `composed/…`: the router's top 2 adapters answer together.
- `routing/acc/TASK`: share of the task's test inputs routed to it.
A generate task's `acc` is its own metric (exact match by default); its soft metric (chrF) is
`MODE/chrf/TASK`.
Each section has `acc/TASK` per task and `average_accuracy`, `bwt` (backward transfer: below 0
means forgetting) and `forgetting` summaries. Images: the accuracy matrices (rows: tasks,
columns: steps) and the router's confusion, one per step (use the step slider).
"""


def sequence_run(store, create: bool = False) -> str | None:
    """The store's sequence run (made by the first writer, who holds the lease)."""
    return store.sequence_run_id(create, tags={"mlflow.note.content": DESCRIPTION})


def read_step(store, step: int) -> dict | None:
    """One committed step's record (None beyond the last); store.steps_committed() is the one
    place that says how many steps count."""
    if not 1 <= step <= store.steps_committed():
        return None
    return store.read_json_artifact(store.sequence_run_id(), step_path(step))


def last_step(store) -> dict | None:
    return read_step(store, store.steps_committed()) if store.exists() else None


def read_steps(store) -> list[dict]:
    """Every committed step's record, oldest first: one download of the steps folder."""
    steps = store.steps_committed() if store.exists() else 0
    if not steps:
        return []
    folder = store.artifact_folder(store.sequence_run_id(), STEPS_ARTIFACT)
    return [json.loads((folder / Path(step_path(s)).name).read_text(encoding="utf-8"))
            for s in range(1, steps + 1)]


def matrices_of(records: list[dict]) -> tuple[list[str], dict[str, Matrix]]:
    """(tasks in order of addition, {mode: matrix}) from step records; a column a step did not
    evaluate (a removed task, or one not added yet) is None."""
    tasks = records[-1]["tasks"] if records else []
    # A step's columns are the first ones of every later step's (tasks keep their column).
    return tasks, {mode: [r["rows"][mode] + [None] * (len(tasks) - len(r["tasks"]))
                          for r in records] for mode in MATRICES}


def read_matrices(store) -> tuple[list[str], dict[str, Matrix]]:
    return matrices_of(read_steps(store))


def write_step(store, run_id: str, record: dict, previous: dict | None = None,
               metrics: bool = True) -> None:
    """Write step `record["step"]`'s record and metrics; it counts once commit_step ran. What
    only the next step needs (each column's first and best values so far) goes to its own
    artifact, so that reading the matrices reads the rows alone."""
    carried = {k: record[k] for k in ("first", "best")}
    store.log_json(run_id, step_path(record["step"], CARRY_ARTIFACT), carried)
    store.log_json(run_id, step_path(record["step"]),
                   {k: v for k, v in record.items() if k not in carried})
    if metrics:
        store.log_metrics(run_id, step_metrics(record, previous or {}), record["step"])


def read_carry(store, step: int) -> dict:
    """{"first", "best"} as step `step` left them ({} before the first step)."""
    if step < 1:
        return {}
    return store.read_json_artifact(store.sequence_run_id(), step_path(step, CARRY_ARTIFACT))


def commit_step(store, run_id: str, step: int) -> None:
    """The commit point: one tag, one call."""
    store.set_run_tag(run_id, STEPS_TAG, step)


def step_metrics(record: dict, previous: dict) -> dict[str, float]:
    """The step's row of every mode as metric points, with each mode's summaries. A task's
    point is logged when its value moved since the previous step's record (an isolated adapter's
    oracle score never does), so a step writes what changed, not a point per task: MLflow's
    charts draw each task's line through the steps where it moved."""
    metrics = {}
    for mode in MATRICES:
        before = dict(zip(previous.get("tasks", []), previous.get("rows", {}).get(mode, [])))
        metrics.update({f"{mode}/acc/{t}": v for t, v in zip(record["tasks"], record["rows"][mode])
                        if v is not None and before.get(t) != v})
    for task, soft in record.get("soft", {}).items():
        before = previous.get("soft", {}).get(task, {})
        metrics.update({f"{mode}/{soft['metric']}/{task}": soft[mode] for mode in MODES
                        if before.get(mode) != soft[mode]})
    for mode, summary in record.get("summaries", {}).items():
        metrics.update({f"{mode}/{k}": v for k, v in summary.items() if v is not None})
    return metrics


def step_summary(record: dict) -> dict:
    """What add-task reports of its step: the rows, each task's value when learned, summaries."""
    oracle = record["rows"]["oracle"]
    learned = record["first"]["oracle"]
    return {"step": record["step"], "tasks": record["tasks"], "row": oracle,
            "learned": [learned.get(t) for t in record["tasks"]],
            "routed_row": record["rows"]["routed"], "routing_row": record["rows"]["routing"],
            **record["summaries"]["oracle"],
            "routed_average_accuracy": record["summaries"]["routed"]["average_accuracy"],
            "composed_average_accuracy": record["summaries"]["composed"]["average_accuracy"],
            "gate": record.get("gate")}

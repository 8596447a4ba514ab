"""`ahl`: a thin Typer app over Hub. Each command parses, calls the library, prints.

`--json` prints one JSON document on stdout and nothing else (progress goes to stderr).
User mistakes print one line on stderr and exit 1; Ctrl-C exits 130 with the store unchanged.
An add-task that the forgetting gate holds back exits 3 (its version is kept as a candidate).
"""

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.tree import Tree

# The `ahl` process's defaults, set before transformers, datasets or mlflow are imported (a
# user's environment still wins): no telemetry, no progress bars or INFO lines of the libraries
# on our terminal, and a tracking server that is down fails in seconds, not after MLflow's
# default of 7 retries with exponential backoff (minutes). The library itself sets none.
for _name, _value in {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                      "TOKENIZERS_PARALLELISM": "false",
                      "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                      # MLflow prints "View run ... at URL" on stdout for a tracking server's
                      # runs: --json promises one JSON document there and nothing else.
                      "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
                      "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                      "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}.items():
    os.environ.setdefault(_name, _value)
for _logger in ("mlflow", "alembic"):
    logging.getLogger(_logger).setLevel(logging.WARNING)

from adapterhub_local import query_cache  # noqa: E402
from adapterhub_local.card import percent, signed  # noqa: E402
from adapterhub_local.dashboards import wait_for_drawings  # noqa: E402
from adapterhub_local.errors import AhlError, brief  # noqa: E402
from adapterhub_local.hub import MODE_NAMES, Hub  # noqa: E402

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="Teach one frozen transformer new tasks, one adapter per task, "
                       "without forgetting the old ones.")
store_app = typer.Typer(no_args_is_help=True, help="Query the versioned adapter store.")
app.add_typer(store_app, name="store")
# Piped or redirected, rich lays tables out 80 columns wide, which wraps task names and cuts
# a metrics table's names to "wor…" from a few tasks on: wider there (COLUMNS still wins).
PIPED_WIDTH = 160
out = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else PIPED_WIDTH)
err = Console(stderr=True)

StoreOption = Annotated[Optional[str], typer.Option(
    "--store", envvar="AHL_STORE", help="Store folder or MLflow tracking URI (default: ./store).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
DeviceOption = Annotated[Optional[str], typer.Option(
    "--device", help="auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps (default: $AHL_DEVICE, else auto).")]
WaitOption = Annotated[float, typer.Option(
    "--wait", help="Seconds to wait for the store's lock while another writer commits.")]
# Options that add-task and store import share.
TestOption = Annotated[Optional[Path], typer.Option(help="Test rows; default: a seeded stratified 80/20 split.")]
TextColumnOption = Annotated[Optional[str], typer.Option(help="Column with the text (default: text).")]
LabelColumnOption = Annotated[Optional[str], typer.Option(help="Column with the label (default: label).")]
PromptColumnOption = Annotated[Optional[str], typer.Option(help="Column with the prompt of a generate task (default: prompt).")]
CompletionColumnOption = Annotated[Optional[str], typer.Option(help="Column with the completion of a generate task (default: completion).")]
MaxLengthOption = Annotated[Optional[int], typer.Option(help="Tokens per text (default: 128).")]
TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
SEQUENCES = {"classify": TASKS_DIR, "generate": TASKS_DIR / "generate"}
GATE_HELD_EXIT = 3
# The MLflow UI (3.x) opens in its GenAI view unless a link asks for model training.
MODEL_TRAINING_VIEW = "?workflowType=machine_learning"


def command(group: typer.Typer, name: str):
    """Register a command whose user errors become one line on stderr and a non-zero exit.
    SIGTERM (a scheduler, `docker stop`, `kill`) unwinds like Ctrl-C: an add-task rolls back."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            previous = signal.signal(signal.SIGTERM, interrupt_on_sigterm)
            done = "nothing was registered, the store is unchanged"
            try:
                result = fn(*args, **kwargs)
                done = "every step is committed; the next add-task draws the heatmaps"
                wait_for_drawings()  # the heatmaps, drawn on a thread after each commit
                return result
            except AhlError as e:
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(1) from None
            except KeyboardInterrupt as e:
                typer.echo(f"interrupted: {done}", err=True)
                raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None
            finally:
                signal.signal(signal.SIGTERM, previous)
        return group.command(name)(run)
    return wrap


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, as Ctrl-C's KeyboardInterrupt is."""


def interrupt_on_sigterm(signum, frame):
    raise Terminated()


def print_json(value) -> None:
    typer.echo(json.dumps(clean_floats(value), ensure_ascii=False, indent=2))


def clean_floats(value):
    """NaN is not JSON: report it as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: clean_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_floats(v) for v in value]
    return value


@contextlib.contextmanager
def progress_bar(label: str):
    """A training progress bar on stderr, shown from the first step (so errors found before
    training stay one line) and only on a terminal; yields the callback that moves it."""
    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=err, transient=True, disable=not err.is_terminal)
    task = bar.add_task(label, total=None)

    def advance(step: int, total: int | None) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=step, total=total)

    try:
        yield advance
    finally:
        bar.stop()


def matrix_table(title: str, tasks: list[str], summary: dict) -> Table:
    """The accuracy matrix transposed: a row per task, a column per step (tasks have long names)."""
    table = Table(title=title)
    table.add_column("task \\ after step")
    for step in range(1, len(summary["matrix"]) + 1):
        table.add_column(str(step), justify="right")
    for j, task in enumerate(tasks):
        table.add_row(task, *[percent(row[j]) for row in summary["matrix"]])
    table.caption = (f"average accuracy {percent(summary['average_accuracy'])}  "
                     f"BWT {signed(summary['bwt'])}  forgetting {signed(summary['forgetting'])}")
    return table


def parse_method_args(items: list[str]) -> dict:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AhlError(f"--method-arg {item!r} is not KEY=VALUE: e.g. --method-arg r=16")
        pairs[key] = value
    return pairs


@command(app, "add-task")
def add_task(
    name: Annotated[Optional[str], typer.Argument(help="Task name (letters, digits, _ and -).")] = None,
    train: Annotated[Optional[Path], typer.Option(help="Training rows: .csv, .jsonl or .parquet.")] = None,
    test: TestOption = None,
    spec: Annotated[Optional[Path], typer.Option(help="A task spec (TOML) naming files, columns and defaults.")] = None,
    text_column: TextColumnOption = None,
    label_column: LabelColumnOption = None,
    kind: Annotated[Optional[str], typer.Option(help="classify (text -> label) or generate (prompt -> completion, on a causal-LM base such as smollm2) (default: classify, or the spec's kind).")] = None,
    prompt_column: PromptColumnOption = None,
    completion_column: CompletionColumnOption = None,
    method: Annotated[Optional[str], typer.Option(help="Adaptation method (see ahl methods) (default: lora).")] = None,
    method_arg: Annotated[Optional[list[str]], typer.Option(help="A method option KEY=VALUE (repeatable).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the training rows (default 3; up to 5 for a small classify task, so that it trains at least 100 steps).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default: 2e-3).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Rows per step (default: 32).")] = None,
    max_length: MaxLengthOption = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the split, the init and the batch order (default: 0).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="Training arithmetic: bf16, fp32, or auto: bf16 where the CPU has it natively (default: auto).")] = None,
    base: Annotated[Optional[str], typer.Option(help="Base model: a known name, a local folder or a cached id (default: the store's base, else all-MiniLM-L6-v2).")] = None,
    gate: Annotated[Optional[float], typer.Option(help="Forgetting gate: promote to production only if no earlier task's routed accuracy drops by more than this (e.g. 0.02) (default: the store's, see ahl store gate).")] = None,
    device: DeviceOption = None,
    store: StoreOption = None,
    wait: WaitOption = 300.0,
    as_json: JsonOption = False,
):
    """Learn a new adapter for a task on the frozen base and register it as a new version.

    Training runs in parallel with other writers; the commit waits for the store's lock.
    Exits 3 when the forgetting gate holds the new version back as a candidate."""
    if not name and spec is None:
        raise AhlError("name the task: ahl add-task NAME --train FILE (or --spec FILE)")
    hub = Hub(store, wait=wait, device=device)
    with progress_bar(f"training {name or spec.stem}") as advance:
        result = hub.add_task(name, train, test, spec=spec, text_column=text_column,
                              label_column=label_column, kind=kind, prompt_column=prompt_column,
                              completion_column=completion_column, method=method,
                              method_args=parse_method_args(method_arg or []), base=base,
                              gate=gate, progress=advance, epochs=epochs, lr=lr, batch_size=batch_size,
                              max_length=max_length, seed=seed, precision=precision)
    if as_json:
        print_json(result)
    else:
        print_step(result)
    exit_if_held(result)


def exit_if_held(result: dict) -> None:
    """Exit 3, saying why and how to promote anyway, when the forgetting gate held the new
    version back."""
    check = result.get("gate")
    if check and not check["passed"]:
        worst = regressions_text(check["regressions"])
        typer.echo(f"gate {check['threshold']}: routed accuracy dropped ({worst}); "
                   f"{result['task']} version {result['version']} is kept as a candidate and "
                   f"production is unchanged: promote it with ahl store promote {result['task']} "
                   f"{result['version']} --alias production", err=True)
        raise typer.Exit(GATE_HELD_EXIT)


def regressions_text(regressions: list[dict]) -> str:
    return ", ".join(f"{r['task']} {percent(r['before'])}% -> {percent(r['after'])}%"
                     for r in regressions)


def print_step(result: dict) -> None:
    out.print(f"[bold]{result['task']}[/bold] version {result['version']} ({result['method']}): "
              f"test {result['metric'].replace('_', ' ')} "
              f"{percent(result['accuracy'])}%, {result['train_rows']} rows, "
              + (f"imported from {result['origin']['folder']}" if result.get("origin") else
                 f"{result['steps']} steps in {result['train_seconds']:.0f}s")
              + (f", {result['dropped_rows']} empty rows dropped" if result["dropped_rows"] else "")
              + (f"; {result['test_rows_seen']} of its {result['test_rows']} test texts are training "
                 "texts too (the test score overstates: give --test rows it never saw)"
                 if result.get("test_rows_seen") else ""))
    table = Table(title=f"after step {result['step']}: oracle score % per task (accuracy, or a "
                        "generate task's metric)")
    for column in ("task", "now", "when learned", "change", "routed", "routing"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, now, learned, routed, routing in zip(result["tasks"], result["row"], result["learned"],
                                                   result["routed_row"], result["routing_row"]):
        # A removed task keeps its column of the matrices, without values from its removal on
        change = None if now is None or learned is None else now - learned
        table.add_row(task, percent(now), percent(learned), signed(change), percent(routed),
                      percent(routing))
    table.caption = (f"oracle: average {percent(result['average_accuracy'])}  "
                     f"BWT {signed(result['bwt'])}  forgetting {signed(result['forgetting'])}\n"
                     f"routed average {percent(result['routed_average_accuracy'])}  "
                     f"composed average {percent(result['composed_average_accuracy'])}")
    out.print(table)


@command(app, "methods")
def methods(as_json: JsonOption = False):
    """The adapter methods, their options (--method-arg KEY=VALUE) and what they work on."""
    from adapterhub_local.methods import describe_methods

    rows = describe_methods()
    if as_json:
        return print_json(rows)
    table = Table(title="adapter methods (ahl add-task --method NAME --method-arg KEY=VALUE)")
    for column in ("method", "family", "options (defaults)", "mixed batch", "bases"):
        table.add_column(column)
    for row in rows:
        options = ", ".join(f"{o['name']}={o['default']}" for o in row["options"]) or "-"
        table.add_row(row["name"], row["family"], options, "yes" if row["mixed_batch"] else "grouped",
                      ", ".join(row["architectures"]))
    out.print(table)


@command(app, "tasks")
def tasks(store: StoreOption = None, as_json: JsonOption = False):
    """The tasks with their current version, kind, method, aliases and score (accuracy, or a
    generate task's metric)."""
    hub = Hub(store)
    rows = hub.tasks()
    if as_json:
        return print_json(rows)
    table = Table(title="tasks")
    for column in ("task", "version", "kind", "method", "aliases", "score %", "metric"):
        # a narrow terminal folds a task's name, never cuts it ("fortune_langua…")
        table.add_column(column, **({"overflow": "fold", "min_width": 10} if column == "task" else {}))
    for row in rows:
        table.add_row(row["task"], "held" if row["version"] is None else str(row["version"]),
                      row["kind"], row["method"], ", ".join(row["aliases"]),
                      percent(row["accuracy"]), row["metric"])
    # The store's location: a mistyped --store reads as an empty store, never made by reading
    out.print(table if rows else f"no tasks yet in store {hub.store.location}: add one with "
              "ahl add-task NAME --train FILE")


MODE_TITLES = {"oracle": "oracle % (the task is given)",
               "routed": "routed % (the router picks; a wrong pick is wrong)",
               "composed": "composed % (the router's top 2 answer together)"}


@command(app, "metrics")
def metrics(store: StoreOption = None, as_json: JsonOption = False,
            confusion: Annotated[bool, typer.Option(help="Also show the router's task confusion at the last step.")] = False):
    """The score matrices (accuracy, or a generate task's metric) and forgetting summary per
    mode, and routing accuracy."""
    result = Hub(store).metrics(confusion=confusion)
    if as_json:
        return print_json(result)
    used = sorted({m.replace("_", " ") for m in result["metrics"].values()} or {"accuracy"})
    what = used[0] if len(used) == 1 else f"score ({', '.join(used)})"
    for mode, summary in result["modes"].items():
        title = MODE_TITLES[mode].replace("%", f"{what} %", 1)
        out.print(matrix_table(title, result["tasks"], summary))
    routing = {"matrix": result["routing_accuracy"], "average_accuracy": None, "bwt": None,
               "forgetting": None}
    table = matrix_table("routing accuracy % (inputs of a task routed to it)", result["tasks"], routing)
    table.caption = None
    out.print(table)
    if confusion and result.get("confusion"):
        out.print(confusion_table(result["confusion"]))


def confusion_table(confusion: dict) -> Table:
    # Columns by number, named in the rows: task names as headers of a dozen columns are cut to
    # "wordne…" at 80 characters, three tasks alike
    numbers = {task: str(i) for i, task in enumerate(confusion["tasks"], 1)}
    table = Table(title="router confusion at the last step (rows: true task, columns: routed to, "
                  "by number)")
    table.add_column("true \\ routed", overflow="fold")
    for task in confusion["tasks"]:
        table.add_column(numbers[task], justify="right")
    table.add_column("abstain", justify="right")
    for task, row in zip(confusion["true_tasks"], confusion["matrix"]):
        label = f"{numbers[task]} {task}" if task in numbers else task
        table.add_row(label, *[str(n) for n in row])
    return table


@command(app, "predict")
def predict(
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts to answer.")] = None,
    file: Annotated[Optional[Path], typer.Option(help="More texts: .txt (one a line), .csv, .jsonl or .parquet.")] = None,
    text_column: Annotated[str, typer.Option(help="The text column of --file tables.")] = "text",
    task: Annotated[Optional[str], typer.Option(help="Answer with this task's adapter (no routing): NAME for its serving version, NAME@VERSION or NAME@ALIAS for another (e.g. a candidate the gate holds back).")] = None,
    mode: Annotated[str, typer.Option(help="routed: the router picks one adapter; composed: its top-k answer together.")] = "routed",
    top_k: Annotated[int, typer.Option(help="Adapters to compose in composed mode.")] = 2,
    output: Annotated[Optional[Path], typer.Option(help="Write the answers of --file here (.jsonl or .parquet), in chunks: memory stays the same however long the file.")] = None,
    device: DeviceOption = None,
    store: StoreOption = None,
    as_json: JsonOption = False,
):
    """Answer texts without being told their task: the router picks or composes adapters."""
    from adapterhub_local.data import read_texts

    if mode not in MODE_NAMES:
        raise AhlError(f"unknown --mode {mode!r}: use routed or composed")
    if task is not None and mode != "routed":
        raise AhlError(f"--task {task} answers with that task's adapter alone, so --mode {mode} "
                       "would be ignored: drop one of them")
    if output is not None:
        return predict_to_file(texts, file, output, text_column, MODE_NAMES[mode], top_k, task,
                               Hub(store, device=device), as_json)
    inputs = list(texts or []) + (read_texts(file, text_column) if file else [])
    if not inputs:
        raise AhlError("no texts: pass TEXT arguments or --file PATH")
    answers = Hub(store, device=device).predict(inputs, mode=MODE_NAMES[mode], top_k=top_k, task=task)
    for error in dict.fromkeys(a["error"] for a in answers if "error" in a):
        typer.echo(f"error: {error} (the inputs routed to it have no answer)", err=True)
    if as_json:
        print_json(answers)
    else:
        out.print(answers_table(answers, f"task {task}" if task else mode))
    if any("error" in a for a in answers):
        raise typer.Exit(1)


def predict_to_file(texts, file, output, text_column, mode, top_k, task, hub, as_json) -> None:
    if texts or file is None:
        raise AhlError("--output writes the answers of --file: pass the texts in --file PATH, "
                       "not as arguments")
    with progress_bar("answering") as advance:
        summary = hub.predict_file(file, output, text_column, mode, top_k, task, advance)
    if as_json:
        print_json(summary)
    else:
        out.print(f"{summary['rows']} rows -> {summary['output']}: {summary['answered']} answered, "
                  f"{summary['abstained']} abstained, {summary['errors']} errors")
    if summary["errors"]:
        typer.echo(f"error: {summary['errors']} rows have no answer (their adapter failed its "
                   f"checksum): see their error field in {summary['output']}", err=True)
        raise typer.Exit(1)


def answers_table(answers: list[dict], what: str) -> Table:
    table = Table(title=f"{len(answers)} answer{'s' if len(answers) != 1 else ''} ({what})")
    for column in ("text", "task", "answer", "score", "adapters (weight)"):
        table.add_column(column, overflow="fold" if column in ("text", "answer") else "ellipsis")
    for a in answers:
        adapters = ", ".join(f"{x['task']}@{x['version']} ({x['weight']:.2f})" for x in a["adapters"])
        table.add_row(a["text"][:80], a["task"] or "-", a.get("label") or a.get("completion") or "-",
                      f"{a['score']:.2f}", adapters or a.get("reason", "-"))
    return table


@command(store_app, "show")
def store_show(ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS.")],
               store: StoreOption = None, as_json: JsonOption = False):
    """A version's lineage, files and metrics."""
    info = Hub(store).show(ref)
    if as_json:
        return print_json(info)
    table = Table(title=f"{info['task']} version {info['version']}", show_header=False)
    after = ", ".join(f"{a['task']}@{a['version']}" for a in info["after"]) or "-"
    for key, value in [("method", info["method"]), ("base", info["base"]["name"]),
                       ("base sha256", info["base"]["sha256"]), ("data", info["data"]["source"]),
                       ("data digest", info["data"]["digest"]),
                       ("rows", f"{info['data']['rows']} train, {info['data']['test_rows']} test"),
                       ("kind", info["kind"]), ("labels", ", ".join(info["labels"]) or "-"),
                       ("parent", str(info["parent"] or "-")), ("after", after),
                       ("router version", str(info["router_version"] or "-")),
                       ("aliases", ", ".join(info["aliases"]) or "-"), ("run", info["run_id"]),
                       (f"test {info['metric'].replace('_', ' ')}",
                        percent(info["metrics"].get(f"test_{info['metric']}"))),
                       ("status", info["status"])]:
        table.add_row(key, value)
    if info["held"]:  # what the README promises beside "held": the regressions
        table.add_row("held by gate", f"{info['held']['gate']}: "
                      f"{regressions_text(info['held']['regressions'])}")
    if info["origin"]:
        table.add_row("imported from", f"{info['origin'].get('folder')} "
                      f"({info['origin'].get('peft_type', '?')})")
    for file, sha in info["files"].items():
        table.add_row(file, sha[:16])
    out.print(table)


@command(store_app, "versions")
def store_versions(name: Annotated[str, typer.Argument(help="Task name.")],
                   store: StoreOption = None, as_json: JsonOption = False):
    """The versions of one task, oldest first."""
    rows = Hub(store).versions(name)
    if as_json:
        return print_json(rows)
    table = Table(title=f"{name} versions")
    for column in ("version", "method", "parent", "data digest", "aliases", "status",
                   "test score %"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["version"]), row["method"], str(row["parent"] or "-"),
                      row["data"]["digest"][:12], ", ".join(row["aliases"]), row["status"],
                      percent(row["metrics"].get(f"test_{row['metric']}")))
    out.print(table)


@command(store_app, "lineage")
def store_lineage(name: Annotated[str, typer.Argument(help="Task name.")],
                  store: StoreOption = None, as_json: JsonOption = False):
    """The versions of a task as a tree: parent, earlier tasks, base, data, method, accuracy."""
    info = Hub(store).lineage(name)
    if as_json:
        return print_json(info)
    nodes = {n["version"]: n for n in info["versions"]}
    tree = Tree(f"[bold]{name}[/bold]")

    def grow(branch: Tree, node: dict) -> None:
        after = ", ".join(f"{a['task']}@{a['version']}" for a in node["after"]) or "-"
        flags = [*node["aliases"], *(["serving"] if node["serving"] else []),
                 *([node["status"]] if node["status"] != "live" else [])]
        child = branch.add(
            f"[bold]v{node['version']}[/bold] {node['method']}  acc {percent(node['accuracy'])}%  "
            f"data {(node['data_digest'] or '')[:12]}  base {node['base']['name']}  after {after}"
            + (f"  ({', '.join(flags)})" if flags else ""))
        for version in node["children"]:
            grow(child, nodes[version])

    for node in info["versions"]:
        if node["parent"] not in nodes:
            grow(tree, node)
    out.print(tree)


@command(store_app, "rm")
def store_rm(ref: Annotated[str, typer.Argument(help="NAME@VERSION (or NAME@ALIAS) to remove.")],
             store: StoreOption = None, wait: WaitOption = 300.0, as_json: JsonOption = False):
    """Take a version out of queries and routing; its run and files stay for its history."""
    info = Hub(store, wait=wait).remove(ref)
    if as_json:
        return print_json(info)
    out.print(f"{info['task']}@{info['version']} removed from queries and routing "
              f"(history kept: ahl store lineage {info['task']})")


@command(store_app, "gate")
def store_gate(value: Annotated[Optional[float], typer.Argument(help="Largest allowed drop in an earlier task's routed accuracy, e.g. 0.02.")] = None,
               off: Annotated[bool, typer.Option("--off", help="Clear the store's gate.")] = False,
               store: StoreOption = None, as_json: JsonOption = False):
    """Show or set the store's default forgetting gate for add-task."""
    gate = Hub(store).gate(value, off)
    if as_json:
        return print_json({"gate": gate})
    out.print(f"forgetting gate: {gate}" if gate is not None else "no forgetting gate")


@command(store_app, "promote")
def store_promote(name: Annotated[str, typer.Argument(help="Task name.")],
                  version: Annotated[int, typer.Argument(help="The version to point the alias at.")],
                  alias: Annotated[str, typer.Option(help="Alias name, e.g. production.")],
                  store: StoreOption = None, wait: WaitOption = 300.0, as_json: JsonOption = False):
    """Point an alias of a task at one of its versions."""
    info = Hub(store, wait=wait).promote(name, version, alias)
    if as_json:
        return print_json(info)
    out.print(f"{name}@{alias} -> version {info['version']}")


@command(store_app, "export")
def store_export(ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS.")],
                 folder: Annotated[Path, typer.Argument(help="Where to write the export.")],
                 force: Annotated[bool, typer.Option(help="Overwrite files in a non-empty folder.")] = False,
                 store: StoreOption = None, as_json: JsonOption = False):
    """Write a version as a folder that loads without ahl: a plain PEFT folder
    (PeftModel.from_pretrained; a bottleneck adapter as safetensors and a few lines), its head
    or decoding settings, and a model card (README.md) saying what it is and how to load it."""
    info = Hub(store).export(ref, folder, force)
    if as_json:
        return print_json(info)
    out.print(f"{info['task']}@{info['version']} -> {info['folder']}: {', '.join(info['files'])}")


@command(store_app, "import")
def store_import(
    name: Annotated[str, typer.Argument(help="Task name: a new task, or the next version of one.")],
    folder: Annotated[Path, typer.Argument(help="A PEFT adapter folder (adapter_config.json, adapter_model.safetensors; for classify, head.safetensors and labels.json or neither).")],
    train: Annotated[Optional[Path], typer.Option(help="The task's rows: the router learns the task from them, and a head is fitted on them when the folder has none.")] = None,
    test: TestOption = None,
    spec: Annotated[Optional[Path], typer.Option(help="A task spec (TOML) naming files and columns.")] = None,
    text_column: TextColumnOption = None,
    label_column: LabelColumnOption = None,
    kind: Annotated[Optional[str], typer.Option(help="classify, or generate for a causal-LM adapter (default: classify, or the task's kind).")] = None,
    prompt_column: PromptColumnOption = None,
    completion_column: CompletionColumnOption = None,
    method: Annotated[Optional[str], typer.Option(help="For a LORA folder: lora, qlora or loftq (its base 4-bit NF4) (default: from the peft type).")] = None,
    max_length: MaxLengthOption = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the split and the head's fitting rows (default: 0).")] = None,
    base: Annotated[Optional[str], typer.Option(help="Base model of an empty store (default: the store's, else the one the adapter names).")] = None,
    gate: Annotated[Optional[float], typer.Option(help="Forgetting gate, as for add-task (default: the store's).")] = None,
    device: DeviceOption = None,
    store: StoreOption = None,
    wait: WaitOption = 300.0,
    as_json: JsonOption = False,
):
    """Make a PEFT adapter trained elsewhere the next version of a task: checked against the
    store's base, evaluated, routed and gated like one add-task trains. Exits 3 when the
    forgetting gate holds it back."""
    hub = Hub(store, wait=wait, device=device)
    result = hub.import_adapter(name, folder, train, test, spec=spec, text_column=text_column,
                                label_column=label_column, kind=kind, prompt_column=prompt_column,
                                completion_column=completion_column, method=method, base=base,
                                gate=gate, max_length=max_length, seed=seed)
    if as_json:
        print_json(result)
    else:
        print_step(result)
    exit_if_held(result)


@command(store_app, "package")
def store_package(store: StoreOption = None, wait: WaitOption = 300.0, as_json: JsonOption = False):
    """Log the serving set as an MLflow pyfunc model (mlflow models serve, spark_udf)."""
    info = Hub(store, wait=wait).package()
    if as_json:
        return print_json({k: info[k] for k in ("model_uri", "tracking_uri", "version")})
    tasks = ", ".join(f"{t}@{v}" for t, v in info["tasks"].items())
    out.print(f"{'packaged' if info['new'] else 'unchanged since'} {info['model_uri']} ({tasks})")
    out.print(f"serve it: MLFLOW_TRACKING_URI={info['tracking_uri']} mlflow models serve "
              f"-m {info['model_uri']} --env-manager local")


@command(store_app, "verify")
def store_verify(store: StoreOption = None, as_json: JsonOption = False):
    """Re-hash every stored adapter file against its recorded checksum."""
    problems = Hub(store).verify()
    if as_json:
        print_json({"ok": not problems, "problems": problems})
    else:
        for line in problems:
            typer.echo(line, err=True)
        out.print("every adapter file matches its checksum" if not problems
                  else f"{len(problems)} problem(s)")
    if problems:
        raise typer.Exit(1)


@command(store_app, "doctor")
def store_doctor(store: StoreOption = None, wait: WaitOption = 300.0, as_json: JsonOption = False):
    """Finish or roll back what killed writers left, then verify every file."""
    report = Hub(store, wait=wait).doctor()
    if as_json:
        print_json({"ok": not report["problems"], **report})
    else:
        for line in report["repaired"]:
            out.print(f"repaired: {line}")
        for line in report["problems"]:
            typer.echo(line, err=True)
        out.print("nothing to repair" if not report["repaired"] else
                  f"{len(report['repaired'])} repair(s)")
        out.print("every file matches its checksum" if not report["problems"]
                  else f"{len(report['problems'])} problem(s): see ahl store verify")
    if report["problems"]:
        raise typer.Exit(1)


@command(app, "ui")
def ui(port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
       store: StoreOption = None):
    """Serve the MLflow UI for this store on 127.0.0.1 (Ctrl-C stops it)."""
    import signal
    import time

    from adapterhub_local.dashboards import serve_ui, server_log, stop_ui, wait_for_ui
    from adapterhub_local.sequence import sequence_run

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    def last_line() -> str:
        return (server_log(server).strip().splitlines() or ["?"])[-1][:160]

    if not 1 <= port <= 65535:
        raise AhlError(f"--port must be 1..65535, got {port}: try --port 5000")
    hub = Hub(store)
    server = serve_ui(hub.store, port)  # dies with this process, however it ends
    hub.store.mark_model_training()
    url = f"http://127.0.0.1:{port}"
    run = sequence_run(hub.store)
    # Ctrl-C and SIGTERM stop the UI, for this command only. Set even over an inherited "ignore"
    # (a background job of a non-interactive shell starts with SIGINT ignored, and Python then
    # never raises KeyboardInterrupt: the UI would ignore Ctrl-C for good).
    previous = {n: signal.signal(n, interrupt) for n in (signal.SIGINT, signal.SIGTERM)}
    try:
        if not wait_for_ui(url, server):
            reason = last_line() if server.poll() is not None else "no answer within 60 s"
            raise AhlError(f"the MLflow UI did not start ({reason}): try another --port")
        typer.echo(f"MLflow UI: {url}  (store {hub.store.location})")  # plain: never wrapped
        typer.echo(f"The forgetting dashboards (experiment '{hub.store.namespace}', run "
                   f"'sequence': Model metrics, Artifacts): {url}/#/experiments/"
                   f"{hub.store.experiment_id()}/runs/{run}{MODEL_TRAINING_VIEW}  Ctrl-C stops it.")
        while server.poll() is None:  # short sleeps: a signal is handled at once, never deferred
            time.sleep(0.5)
        raise AhlError(f"the MLflow UI stopped by itself (exit {server.returncode}: {last_line()})")
    except KeyboardInterrupt:
        out.print("stopped")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        stop_ui(server)


@command(app, "demo")
def demo(
    store: StoreOption = None,
    fresh: Annotated[bool, typer.Option(help="Start from an empty store (deletes the folder store's MLflow database and artifacts).")] = False,
    sequence: Annotated[str, typer.Option(help="The bundled sequence: classify (six text classification tasks on MiniLM) or generate (three prompt -> completion tasks on SmolLM2-135M).")] = "classify",
    tasks_dir: Annotated[Optional[Path], typer.Option(help="Folder with sequence.toml and the task specs (default: the bundled sequence's).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Override every task's epochs.")] = None,
    device: DeviceOption = None,
):
    """Add the bundled task sequence to the store, end to end, and show how it held up."""
    import tomllib

    from adapterhub_local.device import resolve_device

    if sequence not in SEQUENCES:
        raise AhlError(f"unknown sequence {sequence!r}: use {' or '.join(SEQUENCES)}")
    tasks_dir = tasks_dir or SEQUENCES[sequence]
    sequence_file = tasks_dir / "sequence.toml"
    if not sequence_file.is_file():
        raise AhlError(f"no task sequence at {sequence_file}: pass --tasks-dir DIR")
    try:
        names = tomllib.loads(sequence_file.read_text(encoding="utf-8"))["tasks"]
    except (tomllib.TOMLDecodeError, KeyError) as e:
        raise AhlError(f"{sequence_file} is not a task sequence ({brief(e)}): write "
                       'tasks = ["first_task", "second_task"] in it') from None
    if epochs is not None:  # a bad value fails before --fresh clears anything
        from adapterhub_local.trainer import TrainOptions

        TrainOptions(epochs=epochs)
    hub = Hub(store, device=device)
    resolve_device(hub.device)  # a device that is not there fails before --fresh clears anything
    if fresh:
        clear_store(hub)
    elif hub.store.task_names():
        raise AhlError(f"store {hub.store.location} already has tasks: pass --fresh to start "
                       "over or --store DIR for a new store")
    for i, task in enumerate(names, 1):
        out.rule(f"step {i}/{len(names)}: {task}")
        with progress_bar(f"training {task}") as advance:
            result = hub.add_task(spec=tasks_dir / f"{task}.toml", progress=advance, epochs=epochs)
        print_step(result)
    out.rule("after the whole sequence")
    metrics(store=store, as_json=False, confusion=True)
    out.print(f"Each step is an MLflow run, each adapter a model version. Look at the forgetting "
              f"dashboards with:\n  ahl ui{'' if store is None else f' --store {store}'}\nthen "
              f"open http://127.0.0.1:5000, experiment '{hub.store.namespace}', run 'sequence'.")


def clear_store(hub: Hub) -> None:
    folder = hub.store.folder
    if folder is None:
        raise AhlError("--fresh only clears a folder store: pass --store DIR")
    kept = {"mlflow.db", "artifacts", ".gitkeep", query_cache.CACHE_FILE}
    if folder.exists() and {p.name for p in folder.iterdir() if not p.name.startswith(
            query_cache.TEMPORARY)} - kept:
        raise AhlError(f"{folder} holds files that are not a store's: clear it yourself or "
                       "pass another --store")
    (folder / "mlflow.db").unlink(missing_ok=True)
    (folder / query_cache.CACHE_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder / "artifacts", ignore_errors=True)


if __name__ == "__main__":
    app()

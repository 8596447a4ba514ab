"""Read and validate task data: CSV and TSV through pandas, JSON Lines and Parquet through the
`datasets` library (which reads CSV with pandas too).

A task is of one of KINDS: `classify`, (text, label) rows with its own label set, or `generate`,
(prompt, completion) rows. Rows are split into train and test; without a test file the train file
is split 80/20, seeded (stratified by label for classify), and the split is recorded in the lineage.
Every user mistake raises AhlError with a one-line message that names the problem and the fix.
"""

import contextlib
import hashlib
import json
import random
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from adapterhub_local.errors import AhlError

FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PREDICT_FORMATS = {**FORMATS, ".txt": "text"}  # texts to answer: also plain text, one a line
TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
TEST_FRACTION = 0.2
KINDS = ("classify", "generate")


@dataclass
class TaskData:
    """One task's validated rows, ready to train on."""

    name: str
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    labels: list[str]
    """The label names; label ids index this list."""
    source: str
    """Where the rows came from: the train file, and the test file or the split used."""
    digest: str
    """sha256 over the train and test rows, so two add-tasks on the same data are recognisable."""
    dropped: int = 0
    """Rows dropped because their text was empty or whitespace."""
    split: dict = field(default_factory=dict)
    kind: str = "classify"
    """classify: texts -> labels; generate: prompts (the texts) -> completions (the targets)."""
    train_targets: list[str] = field(default_factory=list)
    test_targets: list[str] = field(default_factory=list)
    """The completions of a generate task (empty for classify)."""
    metric: str = "accuracy"
    """What its scores measure: accuracy for classify; for generate, scoring.METRICS' name."""
    license: str = ""
    """The data's licence where its task spec says it (`license = "..."`): model cards name it."""

    @property
    def test_seen(self) -> int:
        """How many test texts are training texts too (a file given as both, or duplicate rows
        on both sides of a split): their score measures memory, not learning."""
        seen = set(self.train_texts)
        return sum(text in seen for text in self.test_texts)

    def strata(self) -> list[int]:
        """What splits keep in proportion: the labels of classify rows, one class otherwise."""
        return self.train_labels if self.kind == "classify" else [0] * len(self.train_texts)


def check_task_name(name: str) -> str:
    if name and len(name) > 64:
        raise AhlError(f"task name {name[:20]}... is {len(name)} characters long: use at most 64")
    if not TASK_NAME.match(name or ""):
        raise AhlError(f"task name {name!r} is not a plain identifier: use letters, digits, '_' "
                       "or '-', starting with a letter (e.g. 'sentiment_v2')")
    return name


def read_table(path: str | Path, columns: dict[str, str]) -> dict[str, list]:
    """The needed columns of a file, checked, as lists (a missing cell None, in a CSV an empty
    string: as_written); columns maps each to the option naming it."""
    path = Path(path)
    kind = check_data_file(path)
    table = read_csv(path, **as_written(columns)) if kind == "csv" else load_table(path, kind)
    found = list(table) if kind == "csv" else table.column_names
    for column, option in columns.items():
        check_column(path, column, found, option)
    return {column: table[column] for column in columns}


def as_written(columns) -> dict:
    """pandas' options that read a CSV's `columns` as written: "007" stays "007" (not 7), and
    "None", "NA" or "null" are texts and labels like any other (pandas' defaults read them as
    missing cells: a class called "None" vanished); only an empty cell is empty."""
    return {"dtype": {c: str for c in columns}, "keep_default_na": False}


def check_data_file(path: Path, formats=FORMATS) -> str:
    """The file's kind (formats' value for its extension), once it exists, is known and not empty."""
    if path.is_dir():
        raise AhlError(f"data file {str(path)!r} is a folder: give a file in it")
    if not path.is_file():
        raise AhlError(f"data file {str(path)!r} does not exist: check the path")
    kind = formats.get(path.suffix.lower())
    if kind is None:
        raise AhlError(f"unknown data format {path.suffix or '(no extension)'!r} for {path.name}: "
                       f"use one of {', '.join(sorted(formats))}")
    if path.stat().st_size == 0:
        wanted = "one text a line" if kind == "text" else "a header and rows"
        raise AhlError(f"data file {path.name} is empty: give it {wanted}")
    if kind != "parquet":
        check_utf8(path)
    return kind


def check_column(path: Path, column: str, found: list[str], option: str) -> None:
    if column in found:
        return
    # A header read as one column holding the separator: the file is not comma-separated.
    separator = next((c for c in ";\t|" if len(found) == 1 and c in found[0]), None)
    if separator is not None:
        raise AhlError(f"{path.name}'s header reads as one column {found[0]!r}: its fields are "
                       f"separated by {separator!r}, not commas; save it comma-separated (a "
                       "tab-separated file: name it .tsv)")
    raise AhlError(f"{path.name} has no column {column!r} (columns found: "
                   f"{', '.join(found) or 'none'}): pass {option} NAME")


def read_texts(path: str | Path, text_column: str = "text") -> list[str]:
    """Texts to predict: a .txt file (one a line), or the text column of a table."""
    return [text for chunk in text_chunks(path, text_column) for text in chunk]


def read_rows(path: str | Path, text_column: str, label_column: str) -> tuple[list[str], list[str], int]:
    """Read (texts, labels, dropped) from one file, both as text without surrounding spaces
    ("pos " is "pos"); a row without either is dropped."""
    path = Path(path)
    table = read_table(path, {text_column: "--text-column", label_column: "--label-column"})
    texts, labels, dropped = [], [], 0
    for text, label in zip(table[text_column], table[label_column]):
        check_text(path, text_column, text)
        check_text(path, label_column, label)
        text, label = ("" if v is None else str(v).strip() for v in (text, label))
        if not text or not label:
            dropped += 1
            continue
        texts.append(text)  # a JSON number is its text
        labels.append(label)
    if not texts:
        raise AhlError(f"{path.name} has no rows with a non-empty text and a label: fill in "
                       f"the {text_column!r} and {label_column!r} columns")
    return texts, labels, dropped


def check_text(path: Path, column: str, value) -> None:
    """Refuse a JSON list or object where a text belongs (str() would read "['a']")."""
    if isinstance(value, (list, dict)):
        raise AhlError(f"{path.name}: a {column!r} value is {type(value).__name__} "
                       f"{str(value)[:40]}, not text: give each row one text")


def check_utf8(path: Path) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            for _ in f:
                pass
    except UnicodeDecodeError as e:
        raise AhlError(f"{path.name} is not valid UTF-8 (byte {e.start}): re-save it as UTF-8, "
                       "e.g. iconv -f latin1 -t utf-8") from None


def read_csv(path: Path, **options) -> dict[str, list]:
    """{column: values} of a CSV or TSV file, read by pandas as the datasets library reads it
    with the same options (its CSV reader is pandas'), without importing datasets: half a
    second of every add-task process, where MLflow has imported pandas already. ahl passes
    as_written's options for the columns it reads."""
    frame = next(csv_frames(path, **options))
    return {str(column): frame[column].tolist() for column in frame.columns}


def csv_frames(path: Path, chunksize: int | None = None, **options):
    """A CSV or TSV file's rows as pandas frames (the whole file, or `chunksize` rows at a
    time), a missing cell None (with as_written's options, an empty one is "")."""
    import pandas as pd

    with parse_errors(path, "csv"):
        read = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",",
                           encoding="utf-8", chunksize=chunksize, **options)
        for frame in [read] if chunksize is None else read:
            if not isinstance(frame.index, pd.RangeIndex):  # pandas took extra leading fields as one
                raise AhlError(f"{path.name}'s first row has more fields than its header's "
                               f"{len(frame.columns)}: quote a text that holds the delimiter, or "
                               "fix the header")
            yield frame.astype(object).where(frame.notna(), None)


@contextlib.contextmanager
def quiet_datasets():
    """Without the datasets library's progress bars and its log lines ("Failed to read
    schema", before the error that says the same): for this block only, the user's settings
    put back after."""
    from datasets.utils import logging as ds_logging

    bars, verbosity = ds_logging.is_progress_bar_enabled(), ds_logging.get_verbosity()
    ds_logging.disable_progress_bar()
    ds_logging.set_verbosity(ds_logging.CRITICAL)  # it logs parse failures as errors, then raises
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars:
            ds_logging.enable_progress_bar()


def load_table(path: Path, kind: str, streaming: bool = False, **options):
    """The file through the datasets library: in memory, or read lazily as it is iterated
    (iterate it within quiet_datasets too)."""
    import datasets

    if path.suffix.lower() == ".tsv":
        options["delimiter"] = "\t"
    with parse_errors(path, kind), quiet_datasets():
        return datasets.load_dataset(kind, data_files=str(path), split="train",
                                     **({"streaming": True} if streaming else {"keep_in_memory": True}),
                                     **options)


@contextlib.contextmanager
def parse_errors(path: Path, kind: str):
    """A parser's error as one line naming the file (datasets wraps them in several types)."""
    try:
        yield
    except AhlError:
        raise
    except Exception as e:
        bad = first_bad_json_line(path) if path.suffix.lower() == ".jsonl" else None
        if bad is not None:  # datasets says only "An error occurred while generating the dataset"
            raise AhlError(f"line {bad[0]} of {path.name} is not valid JSON ({bad[1]}): fix or "
                           "drop that line (JSON Lines: one object a line)") from None
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise AhlError(f"could not parse {path.name} as {kind}: {reason[:200]}; fix the file "
                       "or save it as CSV with a header row") from None


def first_bad_json_line(path: Path) -> tuple[int, str] | None:
    """(line number, the parser's reason) of a JSON Lines file's first line that is not JSON."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                if line.strip():
                    json.loads(line)
            except ValueError as e:
                return number, getattr(e, "msg", str(e))
    return None


def text_chunks(path: str | Path, text_column: str = "text", size: int = 1000):
    """The texts of a file to predict (as read_texts reads them), `size` at a time, read
    lazily: memory stays the same however long the file. A missing cell or a blank line is an
    empty text (answered as one), so that the answers line up with the rows."""
    path = Path(path)
    kind = check_data_file(path, PREDICT_FORMATS)
    if kind == "text":
        # utf-8-sig: an editor's byte-order mark is not part of the first text
        with open(path, encoding="utf-8-sig") as f:  # a blank line too: answer i is line i's
            yield from batched((line.strip() for line in f), size)
        return
    if kind == "csv":  # pandas in chunks, checked as add-task's files are (csv_frames)
        for frame in csv_frames(path, chunksize=size, **as_written([text_column])):
            check_column(path, text_column, list(frame), "--text-column")
            yield ["" if t is None else str(t) for t in frame[text_column]]
        return
    rows = load_table(path, kind, streaming=True)
    with parse_errors(path, kind), quiet_datasets():
        for batch in rows.iter(batch_size=size):
            check_column(path, text_column, list(batch), "--text-column")
            texts = batch[text_column]
            for text in texts:
                check_text(path, text_column, text)
            yield ["" if t is None else str(t) for t in texts]


def batched(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def check_columns_differ(input_option: str, input_column: str, answer_option: str,
                         answer_column: str) -> None:
    """Refuse one column read as both a task's input and its answer (it would learn to copy)."""
    if input_column == answer_column:
        raise AhlError(f"{input_option} and {answer_option} are both {input_column!r}: a task "
                       "must not read its answer in its input; name the two columns apart")


def load_task_data(name: str, train: str | Path, test: str | Path | None = None,
                   text_column: str = "text", label_column: str = "label",
                   seed: int = 0) -> TaskData:
    """Read, validate and split one task's data."""
    check_task_name(name)
    check_columns_differ("--text-column", text_column, "--label-column", label_column)
    texts, labels, dropped = read_rows(train, text_column, label_column)
    label_names = sorted(set(labels))
    if len(label_names) < 2:
        raise AhlError(f"{Path(train).name} has a single label {label_names[0]!r}: a task needs "
                       "at least two labels to classify")
    if test is not None:
        test_texts, test_label_names, test_dropped = read_rows(test, text_column, label_column)
        dropped += test_dropped
        unseen = sorted(set(test_label_names) - set(label_names))
        if unseen:
            raise AhlError(f"test labels {unseen} never appear in {Path(train).name}: add "
                           "training rows for them or drop them from the test file")
        train_texts, train_label_names = texts, labels
        split = {"test_file": str(test)}
        source = f"{train} + {test}"
    else:
        train_idx, test_idx = stratified_split(labels, TEST_FRACTION, seed)
        train_texts = [texts[i] for i in train_idx]
        train_label_names = [labels[i] for i in train_idx]
        test_texts = [texts[i] for i in test_idx]
        test_label_names = [labels[i] for i in test_idx]
        split = {"test_fraction": TEST_FRACTION, "seed": seed, "stratified": True}
        source = str(train)
    index = {label: i for i, label in enumerate(label_names)}
    return TaskData(
        name=name,
        train_texts=train_texts,
        train_labels=[index[label] for label in train_label_names],
        test_texts=test_texts,
        test_labels=[index[label] for label in test_label_names],
        labels=label_names,
        source=source,
        digest=digest_rows(train_texts, train_label_names, test_texts, test_label_names),
        dropped=dropped,
        split=split,
    )


def load_generate_data(name: str, train: str | Path, test: str | Path | None = None,
                       prompt_column: str = "prompt", completion_column: str = "completion",
                       seed: int = 0) -> TaskData:
    """Read, validate and split one generate task's (prompt, completion) rows."""
    check_task_name(name)
    check_columns_differ("--prompt-column", prompt_column, "--completion-column", completion_column)
    prompts, completions, dropped = read_pairs(train, prompt_column, completion_column)
    if test is not None:
        test_prompts, test_completions, test_dropped = read_pairs(test, prompt_column,
                                                                  completion_column)
        dropped += test_dropped
        split, source = {"test_file": str(test)}, f"{train} + {test}"
    else:
        if len(prompts) < 5:
            raise AhlError(f"{Path(train).name} has {len(prompts)} rows, too few to split off a "
                           "test set: add rows or pass --test FILE")
        order = list(range(len(prompts)))
        random.Random(seed).shuffle(order)
        held = set(order[: round(len(order) * TEST_FRACTION)])
        test_prompts = [prompts[i] for i in sorted(held)]
        test_completions = [completions[i] for i in sorted(held)]
        prompts = [p for i, p in enumerate(prompts) if i not in held]
        completions = [c for i, c in enumerate(completions) if i not in held]
        split, source = {"test_fraction": TEST_FRACTION, "seed": seed}, str(train)
    return TaskData(name=name, train_texts=prompts, train_labels=[], test_texts=test_prompts,
                    test_labels=[], labels=[], source=source,
                    digest=digest_rows(prompts, completions, test_prompts, test_completions),
                    dropped=dropped, split=split, kind="generate", train_targets=completions,
                    test_targets=test_completions, metric="exact_match")


def read_pairs(path: str | Path, prompt_column: str, completion_column: str):
    """(prompts, completions, dropped) from one file: rows without a prompt are dropped, a row
    with a prompt and no completion is an error (there is nothing to learn from it)."""
    path = Path(path)
    table = read_table(path, {prompt_column: "--prompt-column",
                              completion_column: "--completion-column"})
    prompts, completions, dropped = [], [], 0
    for row, (prompt, completion) in enumerate(zip(table[prompt_column], table[completion_column])):
        check_text(path, prompt_column, prompt)  # not a list of chat messages: one text each
        check_text(path, completion_column, completion)
        prompt = None if prompt is None else str(prompt)
        if not prompt or not prompt.strip():
            dropped += 1
            continue
        if completion is None or not str(completion).strip():
            raise AhlError(f"row {row + 1} of {path.name} has a prompt but an empty "
                           f"{completion_column!r}: fill it in or drop the row")
        prompts.append(prompt.strip())  # a JSON number is its text
        completions.append(str(completion).strip())
    if not prompts:
        raise AhlError(f"{path.name} has no rows with a prompt: fill in the {prompt_column!r} "
                       "column")
    return prompts, completions, dropped


def stratified_split(labels: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of (train, test): each label keeps at least one training row."""
    from sklearn.model_selection import train_test_split

    counts = {label: labels.count(label) for label in set(labels)}
    rare = [label for label, n in counts.items() if n < 2]
    if rare:
        named = ", ".join(repr(label) for label in sorted(rare)[:5]) + (
            f" and {len(rare) - 5} more" if len(rare) > 5 else "")
        raise AhlError(f"{len(rare)} labels have a single row ({named}), too few to split off a "
                       "test set: add rows or pass --test FILE")
    indices = list(range(len(labels)))
    n_test = max(len(counts), round(len(labels) * fraction))
    if len(labels) - n_test < len(counts):
        raise AhlError(f"{len(labels)} rows are too few to split {len(counts)} labels into train "
                       "and test: add rows or pass --test FILE")
    train_idx, test_idx = train_test_split(indices, test_size=n_test, random_state=seed,
                                           stratify=labels)
    return sorted(train_idx), sorted(test_idx)


def digest_rows(*columns: list[str]) -> str:
    sha = hashlib.sha256()
    for column in columns:
        sha.update(json.dumps(column, ensure_ascii=False).encode("utf-8"))
    return sha.hexdigest()


@dataclass
class TaskSpec:
    """A task spec file (TOML): its data files and columns, and training defaults."""

    name: str
    train: Path
    test: Path | None = None
    text_column: str = "text"
    label_column: str = "label"
    description: str = ""
    kind: str = "classify"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    license: str = ""
    """The data's licence, for the model cards of its versions."""
    defaults: dict = field(default_factory=dict)
    """Training options (method, epochs, lr, ...) used unless the command line sets them."""


def load_spec(path: str | Path) -> TaskSpec:
    """Read a task spec; relative data paths resolve against the spec's folder."""
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise AhlError(f"could not read task spec {path}: {e}; fix the TOML file") from None
    if "train" not in spec:
        raise AhlError(f"task spec {path.name} names no train file: add train = \"FILE\"")
    kind = spec.get("kind", "classify")
    if kind not in KINDS:
        raise AhlError(f"task spec {path.name}: kind = {kind!r} is unknown: use one of "
                       f"{', '.join(KINDS)}")
    known = {"name", "train", "test", "text_column", "label_column", "description", "kind",
             "prompt_column", "completion_column", "license"}
    for key in sorted(known | {"method", "metric", "base"}):  # text, or a traceback later
        if key in spec and not isinstance(spec[key], str):
            raise AhlError(f"task spec {path.name}: {key} must be text, got {spec[key]!r}: "
                           f"write {key} = \"...\" (in quotes)")
    if not isinstance(spec.get("method_args", {}), dict):
        raise AhlError(f"task spec {path.name}: method_args must be a table, got "
                       f"{spec['method_args']!r}: write [method_args] with one option a line")
    return TaskSpec(
        name=spec.get("name", path.stem),
        train=path.parent / spec["train"],
        test=path.parent / spec["test"] if spec.get("test") else None,
        text_column=spec.get("text_column", "text"),
        label_column=spec.get("label_column", "label"),
        description=spec.get("description", ""),
        kind=kind,
        prompt_column=spec.get("prompt_column", "prompt"),
        completion_column=spec.get("completion_column", "completion"),
        license=str(spec.get("license", "")),
        defaults={k: v for k, v in spec.items() if k not in known},
    )

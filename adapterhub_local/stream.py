"""Predict a large file: its texts read in chunks, answered, and written as they come, so memory
stays the same for a thousand rows or ten million (`ahl predict --file IN --output OUT`).

The answers go to a temporary file beside OUT, renamed to OUT when every row is written: a
failure or Ctrl-C leaves no half-written output.
"""

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from adapterhub_local.data import PREDICT_FORMATS, check_data_file, text_chunks
from adapterhub_local.errors import AhlError

OUTPUTS = (".jsonl", ".parquet")
CHUNK_ROWS = 1024  # texts a chunk: 16 batches; their kept bottom-half states are the most memory


def check_paths(source: Path, output: Path) -> None:
    """A one-line error for an input that cannot be read or an output that cannot be written,
    before anything is loaded."""
    check_data_file(source, PREDICT_FORMATS)
    if output.suffix.lower() not in OUTPUTS:
        raise AhlError(f"unknown output format {output.suffix or '(no extension)'!r} for "
                       f"{output.name}: use {' or '.join(OUTPUTS)}")
    if not output.parent.is_dir():
        raise AhlError(f"folder {output.parent} does not exist: create it, or write elsewhere")
    if output.exists() and output.resolve() == source.resolve():
        raise AhlError(f"--output {output} is the input file: write the answers elsewhere")


def predict_file(predict: Callable[[list[str]], list[dict]], source: str | Path,
                 output: str | Path, text_column: str = "text", chunk_rows: int = CHUNK_ROWS,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Answer every text of `source` with `predict` (a list of texts -> predict's answers),
    `chunk_rows` at a time, into `output` (.jsonl: predict --json's objects, a line each;
    .parquet: the same fields as columns). {"input", "output", "rows", "answered",
    "abstained", "errors"}."""
    source, output = Path(source), Path(output)
    check_paths(source, output)
    # The total is known without reading the rows only for parquet; elsewhere the bar counts.
    total = parquet_rows(source)
    counts = {"rows": 0, "answered": 0, "abstained": 0, "errors": 0}
    handle, partial = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    os.close(handle)
    try:
        with answer_writer(output.suffix.lower(), Path(partial)) as write:
            for texts in text_chunks(source, text_column, chunk_rows):
                answers = predict(texts)
                write(answers)
                counts["rows"] += len(answers)
                counts["errors"] += sum("error" in a for a in answers)
                counts["abstained"] += sum(a["task"] is None and "error" not in a for a in answers)
                if progress:
                    progress(counts["rows"], total)
        os.replace(partial, output)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    counts["answered"] = counts["rows"] - counts["abstained"] - counts["errors"]
    return {"input": str(source), "output": str(output), **counts}


def parquet_rows(path: Path) -> int | None:
    if path.suffix.lower() != ".parquet":
        return None
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


@contextlib.contextmanager
def answer_writer(suffix: str, path: Path):
    """write(answers) into a .jsonl file (a JSON object a line) or a .parquet file."""
    if suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            yield lambda answers: f.writelines(json.dumps(a) + "\n" for a in answers)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    adapter = pa.struct([("task", pa.string()), ("version", pa.int64()), ("weight", pa.float64())])
    schema = pa.schema([("text", pa.string()), ("task", pa.string()), ("label", pa.string()),
                        ("completion", pa.string()), ("score", pa.float64()), ("adapters", pa.list_(adapter)),
                        ("reason", pa.string()), ("error", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        yield lambda answers: writer.write_table(pa.Table.from_pylist(
            [{name: a.get(name) for name in schema.names} for a in answers], schema))

"""Reading and validating task data: formats, splits, and a clear error for each mistake."""

import json

import pytest

from adapterhub_local.data import load_spec, load_task_data
from adapterhub_local.errors import AhlError
from conftest import tiny_rows, write_csv


def test_csv_with_a_test_file(tiny_data):
    data = load_task_data("colors", **tiny_data["colors"])
    assert data.labels == ["blue", "red"]
    assert len(data.train_texts) == 80 and len(data.test_texts) == 20
    assert set(data.train_labels) == {0, 1}
    assert len(data.digest) == 64


def test_no_test_file_gives_a_seeded_stratified_80_20_split(tiny_data):
    a = load_task_data("colors", tiny_data["colors"]["train"], seed=3)
    b = load_task_data("colors", tiny_data["colors"]["train"], seed=3)
    c = load_task_data("colors", tiny_data["colors"]["train"], seed=4)
    assert len(a.test_texts) == 16 and len(a.train_texts) == 64
    assert a.test_labels.count(0) == a.test_labels.count(1) == 8  # stratified
    assert a.test_texts == b.test_texts and a.digest == b.digest  # seeded
    assert a.test_texts != c.test_texts
    assert a.split == {"test_fraction": 0.2, "seed": 3, "stratified": True}


def test_jsonl_and_parquet_read_like_csv(tmp_path):
    import pandas as pd

    rows = tiny_rows("moods", 5)
    jsonl = tmp_path / "moods.jsonl"
    jsonl.write_text("\n".join(json.dumps({"sentence": t, "y": l}) for t, l in rows), encoding="utf-8")
    parquet = tmp_path / "moods.parquet"
    pd.DataFrame({"sentence": [t for t, _ in rows], "y": [l for _, l in rows]}).to_parquet(parquet)
    a = load_task_data("moods", jsonl, text_column="sentence", label_column="y")
    b = load_task_data("moods", parquet, text_column="sentence", label_column="y")
    assert a.digest == b.digest and a.labels == ["happy", "sad"]


def test_empty_texts_are_dropped_and_counted(tmp_path):
    rows = tiny_rows("colors", 5) + [("", "red"), ("   ", "blue")]
    data = load_task_data("colors", write_csv(tmp_path / "c.csv", rows))
    assert data.dropped == 2
    assert len(data.train_texts) + len(data.test_texts) == 10


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.csv", "does not exist"),
    (lambda p: write_csv(p / "x.xlsx", tiny_rows("colors", 3)), "unknown data format"),
    (lambda p: write_csv(p / "x.csv", tiny_rows("colors", 3), header=("sentence", "label")),
     "no column 'text' (columns found: sentence, label)"),
    (lambda p: (p / "x.csv").write_text("") and p / "x.csv" or p / "x.csv", "is empty"),
    (lambda p: write_csv(p / "x.csv", [("red thing", "red")] * 5), "single label"),
    (lambda p: (p / "x.csv").write_text("text;label\nred thing;red\n") and p / "x.csv",
     "separated by ';', not commas"),
    (lambda p: write_csv(p / "x.csv", [(f"thing {i}", f"l{i}") for i in range(9)]),
     "9 labels have a single row ('l0', 'l1', 'l2', 'l3', 'l4' and 4 more)"),
    (lambda p: (p / "x.csv").write_bytes("text,label\ncaf\xe9,a\nb,b\n".encode("latin-1"))
     and p / "x.csv", "not valid UTF-8"),
    (lambda p: write_csv(p / "x.csv", [("", "a"), (" ", "b")]), "no rows with a non-empty text"),
    (lambda p: (p / "x.jsonl").write_text('{"text": "a", "label": "b"}\n{"text": "c", label}\n')
     and p / "x.jsonl", "line 2 of x.jsonl is not valid JSON"),
    (lambda p: (p / "x.jsonl").write_text('{"text": "a", "label": ["b"]}\n') and p / "x.jsonl",
     "a 'label' value is list"),
    (lambda p: (p / "x.csv").write_text("text,label\nhi, there,a\nb,c\n") and p / "x.csv",
     "first row has more fields than its header's 2"),  # an unquoted comma in a text
])
def test_bad_files_give_one_clear_line(tmp_path, make, message):
    with pytest.raises(AhlError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_task_data("t", make(tmp_path))
    assert "\n" not in str(info.value)


def test_a_test_label_never_seen_in_training_is_refused(tmp_path):
    train = write_csv(tmp_path / "train.csv", tiny_rows("colors", 5))
    test = write_csv(tmp_path / "test.csv", tiny_rows("moods", 2))
    with pytest.raises(AhlError, match=r"test labels \['happy', 'sad'\] never appear"):
        load_task_data("colors", train, test)


@pytest.mark.parametrize("name", ["../x", "has space", "", "1abc", "a/b"])
def test_task_names_must_be_plain_identifiers(tiny_data, name):
    with pytest.raises(AhlError, match="not a plain identifier"):
        load_task_data(name, tiny_data["colors"]["train"])


def test_a_task_name_too_long_says_so(tiny_data):
    load_task_data("a" * 64, tiny_data["colors"]["train"])
    with pytest.raises(AhlError, match="is 65 characters long: use at most 64"):
        load_task_data("a" * 65, tiny_data["colors"]["train"])


def test_spec_resolves_files_next_to_it_and_keeps_defaults(tmp_path, tiny_data):
    (tmp_path / "colors.toml").write_text(
        f'name = "colors"\ntrain = "{tiny_data["colors"]["train"]}"\nepochs = 2\n', encoding="utf-8")
    spec = load_spec(tmp_path / "colors.toml")
    assert spec.name == "colors" and spec.train == tiny_data["colors"]["train"]
    assert spec.test is None and spec.defaults == {"epochs": 2}


def test_bundled_specs_load():
    from pathlib import Path

    import tomllib

    tasks = Path(__file__).parent.parent / "tasks"
    for folder in (tasks, tasks / "confusable"):  # the bundled sequence and the development one
        names = tomllib.loads((folder / "sequence.toml").read_text(encoding="utf-8"))["tasks"]
        assert sorted(names) == sorted(p.stem for p in folder.glob("*.toml") if p.stem != "sequence")
        for name in names:
            spec = load_spec(folder / f"{name}.toml")
            data = load_task_data(spec.name, spec.train, spec.test)
            assert len(data.labels) >= 3 and len(data.test_texts) >= 100, spec.name


@pytest.mark.parametrize("as_text", [False, True])
def test_csv_reads_as_the_datasets_library_reads_it(tmp_path, as_text):
    """CSV and TSV files are read by pandas directly (no import of datasets in add-task): the
    same values of the same types as datasets' own CSV reader gives, edge cases included."""
    from adapterhub_local.data import as_written, load_table, read_csv

    csv_file = tmp_path / "edge.csv"
    csv_file.write_text('text,label,n\n"hello, world",007,1\n"two\nlines",NA,\n,True,2.5\n'
                        'plain,1.0,3\n"a ""quoted"" one",,4\nnull,None,nan\n  spaced  , x ,5\n',
                        encoding="utf-8")
    tsv_file = tmp_path / "edge.tsv"
    tsv_file.write_text("text\tlabel\nhello\t007\nworld\tNA\n", encoding="utf-8")
    for path in (csv_file, tsv_file):
        columns = list(read_csv(path))
        ours = read_csv(path, **(as_written(columns) if as_text else {}))
        # datasets' CsvConfig takes no dtype: its converters say the same
        theirs = load_table(path, "csv", **({"converters": {c: str for c in columns},
                                             "keep_default_na": False} if as_text else {}))
        assert list(ours) == theirs.column_names
        for column in ours:
            assert [repr(v) for v in ours[column]] == [repr(v) for v in theirs[column]], column
    assert read_csv(csv_file)["n"][:3] == [1.0, None, 2.5]  # pandas' types and missing cells


def test_labels_and_texts_are_read_as_written(tmp_path):
    """A class called "None" or "NA" is a class, "007" is not 7, "pos " is "pos", and a JSON
    number is a text: pandas' defaults had dropped, merged or renamed such rows silently."""
    from adapterhub_local.data import read_rows

    rows = tmp_path / "rows.csv"
    written = ["None", "NA", "007", "7", "pos ", "pos", "null", "#N/A", ""]
    rows.write_text("text,label\n" + "".join(f"t{i},{label}\n" for i, label in enumerate(written))
                    + "NA,x\n", encoding="utf-8")
    texts, labels, dropped = read_rows(rows, "text", "label")
    assert labels == ["None", "NA", "007", "7", "pos", "pos", "null", "#N/A", "x"] and dropped == 1
    assert texts[-1] == "NA"
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"text": 42, "label": 1}\n{"text": "hi", "label": 2}\n', encoding="utf-8")
    assert read_rows(numbers, "text", "label")[:2] == (["42", "hi"], ["1", "2"])


def test_test_texts_that_are_training_texts_are_counted(tmp_path):
    rows = [(f"text {i}", "ab"[i % 2]) for i in range(20)]
    train = write_csv(tmp_path / "train.csv", rows)
    fresh = write_csv(tmp_path / "fresh.csv", [(f"new {i}", "ab"[i % 2]) for i in range(6)])
    assert load_task_data("t", train, train).test_seen == 20  # one file as both
    assert load_task_data("t", train, fresh).test_seen == 0
    twice = write_csv(tmp_path / "twice.csv", rows * 2)  # each row on both sides of the split
    data = load_task_data("t", twice)
    assert data.test_seen == len(data.test_texts) > 0


def test_chat_messages_are_not_read_as_a_generate_tasks_text(tmp_path):
    """TRL's conversational rows (lists of messages) would have trained on their repr."""
    from adapterhub_local.data import load_generate_data

    rows = tmp_path / "chat.jsonl"
    rows.write_text('{"prompt": [{"role": "user", "content": "hi"}], "completion": "hello"}\n',
                    encoding="utf-8")
    with pytest.raises(AhlError, match="a 'prompt' value is list"):
        load_generate_data("g", rows)


def test_texts_to_predict_are_read_as_written_in_chunks_and_checked(tmp_path):
    """predict --file's CSV texts: as written ("007" stays "007"), a chunk at a time, and a
    text with an unquoted comma refused as add-task refuses it (it was answered as its tail)."""
    from adapterhub_local.data import read_texts, text_chunks

    good = tmp_path / "good.csv"
    good.write_text('text\nhello\n007\n"a, quoted"\n\nNA\n""\nlast\n', encoding="utf-8")
    assert read_texts(good) == ["hello", "007", "a, quoted", "NA", "", "last"]
    assert list(text_chunks(good, size=3)) == [["hello", "007", "a, quoted"], ["NA", "", "last"]]
    lines = tmp_path / "bom.txt"
    lines.write_bytes("\ufefffirst\nsecond\n".encode("utf-8"))
    assert read_texts(lines) == ["first", "second"]
    bad = tmp_path / "bad.csv"
    bad.write_text("text\nCiao, come stai?\nhello world\n", encoding="utf-8")
    with pytest.raises(AhlError, match="first row has more fields than its header's 1: quote"):
        read_texts(bad)
    with pytest.raises(AhlError, match="is a folder: give a file in it"):
        read_texts(tmp_path)


def test_texts_that_are_not_text_and_an_empty_text_file_are_one_line(tmp_path):
    from adapterhub_local.data import read_texts

    lines = tmp_path / "rows.jsonl"
    lines.write_text('{"text": "fine"}\n{"text": ["a"]}\n', encoding="utf-8")
    with pytest.raises(AhlError, match=r"a 'text' value is list \['a'\], not text"):
        read_texts(lines)  # was answered as the text "['a']"
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(AhlError, match="is empty: give it one text a line"):
        read_texts(tmp_path / "empty.txt")


def test_another_librarys_message_is_one_whole_line():
    from adapterhub_local.errors import brief

    error = ValueError("Couldn't instantiate the backend tokenizer from one of:\n(1) a file\n(2) a slow one")
    assert brief(error) == "Couldn't instantiate the backend tokenizer from one of: (1) a file (2) a slow one"
    assert brief(ValueError("word " * 100), limit=23) == "word word word word ..."

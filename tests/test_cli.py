"""The CLI through typer's CliRunner: contracts of --json, and one clean line per user mistake."""

import json
import re

import pytest
from typer.testing import CliRunner

from adapterhub_local import AhlError, Hub
from adapterhub_local.cli import app
from conftest import FAST, copy_store, file_digest

runner = CliRunner()
FAST_ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]


def ahl(*args, ok=True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + str(result.exception)
    return result


def add(store, task, tiny_data, tiny_base, *extra, ok=True):
    return ahl("add-task", task, "--train", tiny_data[task]["train"], "--test",
               tiny_data[task]["test"], "--base", tiny_base, "--store", store, *FAST_ARGS, *extra, ok=ok)


def test_two_tasks_then_a_second_version(store_dir, tiny_data, tiny_base):
    first = json.loads(add(store_dir, "colors", tiny_data, tiny_base, "--json").stdout)
    assert first["version"] == 1 and first["task"] == "colors"
    add(store_dir, "animals", tiny_data, tiny_base)

    tasks = json.loads(ahl("tasks", "--json", "--store", store_dir).stdout)
    assert [(t["task"], t["version"], t["method"]) for t in tasks] == [
        ("colors", 1, "lora"), ("animals", 1, "lora")]
    assert all(set(t) == {"task", "version", "method", "aliases", "accuracy", "kind", "metric"}
               for t in tasks)
    assert {(t["kind"], t["metric"]) for t in tasks} == {("classify", "accuracy")}

    metrics = json.loads(ahl("metrics", "--json", "--store", store_dir).stdout)
    oracle = metrics["modes"]["oracle"]
    assert metrics["tasks"] == ["colors", "animals"]
    assert len(oracle["matrix"]) == 2 and oracle["matrix"][0][1] is None
    assert oracle["bwt"] == 0

    add(store_dir, "colors", tiny_data, tiny_base)
    shown = json.loads(ahl("store", "show", "colors@2", "--json", "--store", store_dir).stdout)
    assert shown["parent"] == 1 and shown["version"] == 2
    assert len(shown["base"]["sha256"]) == 64 and len(shown["data"]["digest"]) == 64
    assert shown["after"] == [{"task": "animals", "version": 1}]
    assert {"task", "version", "method", "base", "data", "parent", "after", "run_id", "files",
            "metrics"} <= set(shown)
    versions = json.loads(ahl("store", "versions", "colors", "--json", "--store", store_dir).stdout)
    assert [v["version"] for v in versions] == [1, 2]
    # The tables print too.
    assert "colors" in ahl("metrics", "--store", store_dir).stdout
    assert "animals" in ahl("tasks", "--store", store_dir).stdout
    confusion = ahl("metrics", "--confusion", "--store", store_dir).stdout
    assert re.search(r"│ [12] colors ", confusion) and re.search(r"│ [12] animals ", confusion)


def test_spec_file_supplies_name_files_and_defaults(store_dir, tiny_data, tiny_base, tmp_path):
    spec = tmp_path / "moods.toml"
    spec.write_text(f'name = "moods"\ntrain = "{tiny_data["moods"]["train"]}"\n'
                    f'test = "{tiny_data["moods"]["test"]}"\nepochs = 2\nvalidate = false\n',
                    encoding="utf-8")
    result = json.loads(ahl("add-task", "--spec", spec, "--base", tiny_base, "--store",
                            store_dir, "--json").stdout)
    assert result["task"] == "moods"
    # validate = false: the adapter trained on every row, so there is no validation accuracy.
    rows = sum(1 for _ in open(tiny_data["moods"]["train"], encoding="utf-8")) - 1
    assert result["train_rows"] == rows and result["val_accuracy"] is None
    train = json.loads(ahl("store", "show", "moods", "--json", "--store", store_dir).stdout)["train"]
    assert train["epochs"] == 2 and train["validate"] is False


@pytest.mark.parametrize("args, message", [
    (["add-task", "x", "--train", "missing.csv"], "does not exist"),
    (["add-task", "../x", "--train", "{colors}"], "not a plain identifier"),
    (["add-task", "x", "--train", "{colors}", "--method", "nope"], "unknown method 'nope'"),
    (["add-task", "x", "--train", "{colors}", "--method-arg", "r"], "is not KEY=VALUE"),
    (["add-task", "x", "--train", "{colors}", "--method-arg", "rank=4"], "has no option rank"),
    (["add-task", "x", "--train", "{colors}", "--method-arg", "r=x"], "r='x' is not of type int"),
    (["add-task", "x", "--train", "{colors}", "--method-arg", "layers=bottom"], "layers must be one of"),
    (["add-task", "x", "--train", "{colors}", "--text-column", "body"], "no column 'body'"),
    (["add-task", "x", "--train", "{colors}", "--base", "no/such-model"], "neither a known base"),
    (["store", "show", "colors@9"], "has no version 9"),
    (["store", "show", "ghost"], "no task 'ghost'"),
    (["add-task", "x", "--train", "{colors_dir}"], "is a folder: give a file in it"),
    (["add-task", "x", "--train", "{colors}", "--seed", "-1"], "--seed must be 0..4294967295, got -1"),
    (["add-task", "x", "--train", "{colors}", "--lr", "inf"], "--lr must be a positive number"),
    (["add-task", "x", "--train", "{colors}", "--lr", "nan"], "--lr must be a positive number"),
    (["ui", "--port", "99999"], "--port must be 1..65535"),
    (["store", "show", "colors@"], "names no version after '@'"),
    (["store", "show", "@1"], "'@1' names no task: write TASK@1"),
    (["store", "rm", "colors@1", "--wait", "nan"], "--wait nan is not a number of seconds"),
    (["predict", "hi", "--task", "colors", "--mode", "composed"], "would be ignored: drop one"),
    # the tiny base reads 256 positions: training failed on the first longer text
    (["add-task", "x", "--train", "{colors}", "--max-length", "257"],
     "--max-length 257 is more than the 256 positions base"),
    (["add-task", "x", "--train", "{colors}", "--max-length", "256", "--method", "prompt-tuning"],
     "--max-length 256 plus the adapter's 20 virtual tokens is 276 tokens"),
    (["add-task", "x", "--train", "{colors}", "--max-length", "8", "--method", "prompt-tuning",
      "--method-arg", "num_virtual_tokens=250"], "that add up to 256 or less"),
    (["store", "promote", "colors", "1", "--alias", "Latest"], "is reserved by MLflow"),
    (["store", "versions", "colors@1"], "covers every version of a task: write colors"),
    (["store", "lineage", "colors@production"], "covers every version of a task: write colors"),
    # checked before --fresh clears the store (it emptied it, then failed)
    (["demo", "--fresh", "--epochs", "0"], "--epochs must be at least 1"),
])
def test_user_mistakes_print_one_line_and_change_nothing(store_dir, tiny_data, tiny_base, args,
                                                         message):
    add(store_dir, "colors", tiny_data, tiny_base)
    before = file_digest(store_dir)
    train = tiny_data["colors"]["train"]
    args = [a.replace("{colors}", str(train)).replace("{colors_dir}", str(train.parent))
            for a in args]
    result = ahl(*args, "--store", store_dir, ok=False)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert file_digest(store_dir) == before


@pytest.mark.parametrize("spec, message", [
    ("epoch = 1", "unknown key 'epoch' (did you mean epochs?)"),
    ("name = 5", "name must be text, got 5"),
    ("test = 5", "test must be text, got 5"),
    ("method_args = 5", "method_args must be a table"),
    ("[method_args]\ntarget_modules = 5", "target_modules=5 is not of type list"),
])
def test_spec_mistakes_are_one_line_and_write_nothing(tmp_path, tiny_data, tiny_base, spec, message):
    path = tmp_path / "x.toml"
    path.write_text(f'train = "{tiny_data["colors"]["train"].as_posix()}"\n{spec}\n', encoding="utf-8")
    result = ahl("add-task", "--spec", path, "--base", tiny_base, "--store", tmp_path / "s", ok=False)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert message in result.stderr and not (tmp_path / "s").exists()


def weights_of_another_model(folder):
    import torch
    from safetensors.torch import save_file

    save_file({"unrelated": torch.zeros(2)}, folder / "model.safetensors")


def no_tokenizer_files(folder):
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)


def unknown_architecture(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "nonsense"}))


@pytest.mark.parametrize("damage, message", [
    # transformers loads each of these with random weights and a report, with a tokenizer of
    # five special tokens (every word unknown), or not at all: ahl would have trained on noise
    # and bound the store to it, or shown transformers' reason without the fix.
    (weights_of_another_model, "its weights file lacks or mis-shapes"),
    (no_tokenizer_files, "its tokenizer has 5 tokens for the model's"),
    (unknown_architecture, "(point --base at a folder transformers loads"),
])
def test_a_broken_base_folder_is_refused_in_one_line(tmp_path, tiny_data, tiny_base, damage, message):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_base, broken)
    damage(broken)
    result = ahl("add-task", "x", "--train", tiny_data["colors"]["train"], "--base", broken,
                 "--store", tmp_path / "s", ok=False)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert message in result.stderr and "LOAD REPORT" not in result.output
    assert not (tmp_path / "s").exists()


def test_the_positions_a_base_reads(tiny_base, tiny_llama):
    from adapterhub_local.base import load_base

    assert load_base(tiny_base).max_positions == 256  # rows of its learned position table
    assert load_base(tiny_llama).max_positions == 256  # the context its config names (rotary)


def test_a_test_file_of_training_rows_is_flagged(tmp_path, tiny_data, tiny_base):
    train = tiny_data["colors"]["train"]
    printed = ahl("add-task", "colors", "--train", train, "--test", train, "--base", tiny_base,
                  "--epochs", "1", "--store", tmp_path / "s").stdout
    assert "test texts are training texts too (the test score overstates" in printed


def test_a_file_given_as_the_store_is_one_line(tmp_path):
    (tmp_path / "a.csv").write_text("text\nhi\n")
    result = ahl("tasks", "--store", tmp_path / "a.csv", ok=False)
    assert result.exit_code == 1 and "is a file, not a store folder" in result.stderr


def test_metrics_on_an_empty_store_says_how_to_start(tmp_path):
    result = ahl("metrics", "--store", tmp_path / "empty", ok=False)
    assert result.exit_code == 1 and "ahl add-task" in result.stderr
    assert not (tmp_path / "empty").exists()


def test_an_empty_name_and_the_internal_router_model_are_one_line_errors(store_dir, tiny_data,
                                                                       tiny_base, tmp_path):
    result = ahl("add-task", "", "--train", tiny_data["colors"]["train"], "--store", store_dir,
                 ok=False)
    assert result.exit_code == 1 and result.stderr.startswith("error: name the task")
    add(store_dir, "colors", tiny_data, tiny_base)
    before = file_digest(store_dir)
    for args in (["store", "versions", "_router"], ["store", "show", "_router@1"],
                 ["store", "lineage", "_router"], ["store", "rm", "_router@1"],
                 ["store", "export", "_router@1", tmp_path / "out"]):
        result = ahl(*args, "--store", store_dir, ok=False)
        assert result.exit_code == 1 and "no task '_router'" in result.stderr, args
        assert result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists() and file_digest(store_dir) == before
    (tmp_path / "a_file").write_text("x")
    result = ahl("store", "export", "colors@1", tmp_path / "a_file", "--force", "--store",
                 store_dir, ok=False)
    assert result.exit_code == 1 and "is a file" in result.stderr
    # --force into the store's own files overwrote another version's, exit 0
    inside = next(store_dir.glob("artifacts/*/artifacts"))
    (tmp_path / "no_dir").write_text("x")
    for target, message in [(inside, "is inside the store"),
                            (tmp_path / "no_dir" / "sub", "cannot make folder")]:
        result = ahl("store", "export", "colors@1", target, "--force", "--store", store_dir,
                     ok=False)
        assert result.exit_code == 1 and message in result.stderr, result.output
        assert result.stderr.count("\n") == 1
    assert file_digest(store_dir) == before


def test_a_stored_file_deleted_by_hand_is_one_line_and_a_bad_sequence_too(
        colors_only_store, tiny_data, tmp_path):
    store = copy_store(colors_only_store, tmp_path / "store")
    next(store.glob("artifacts/*/artifacts/eval/test.json")).unlink()
    result = ahl("add-task", "animals", "--train", tiny_data["animals"]["train"], "--epochs", "1",
                 "--store", store, ok=False)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert "eval/test.json is missing or damaged" in result.stderr
    (tmp_path / "seq").mkdir()
    (tmp_path / "seq" / "sequence.toml").write_text("tasks = [\n")
    result = ahl("demo", "--tasks-dir", tmp_path / "seq", "--store", tmp_path / "d", ok=False)
    assert result.exit_code == 1 and "is not a task sequence" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "d").exists()


def test_another_tasks_data_under_a_taken_name_and_one_column_as_both_are_refused(
        colors_only_store, tiny_data, tiny_base, tmp_path):
    """A new version must share a label with the one before it (otherwise it is another task,
    which would replace colors' answers everywhere), and a task must not read its answer in its
    input: one line each, the store unchanged."""
    store = copy_store(colors_only_store, tmp_path / "store")
    ahl("tasks", "--store", store)  # a moved store rewrites its locations when first opened
    before = file_digest(store)
    cases = [(["colors", "--train", tiny_data["animals"]["train"]],
              "task 'colors' (version 1: blue, red) shares no label with this data's: add it "
              "under a new name, or remove the task's version first (ahl store rm colors@1)"),
             (["shapes", "--train", tiny_data["animals"]["train"], "--text-column", "label"],
              "--text-column and --label-column are both 'label'")]
    for args, message in cases:
        result = ahl("add-task", *args, "--base", tiny_base, "--epochs", "1", "--store", store,
                     ok=False)
        assert result.exit_code == 1 and message in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1
    assert file_digest(store) == before


def test_fresh_clears_a_store_with_its_query_cache_but_not_foreign_files(store_dir):
    from adapterhub_local.cli import clear_store

    (store_dir / "tasks.json").write_text("{}")
    (store_dir / ".tasks.abc.tmp").write_text("")  # a cache write that died
    clear_store(Hub(store_dir))
    assert not (store_dir / "mlflow.db").exists() and not (store_dir / "tasks.json").exists()
    (store_dir / "notes.txt").write_text("mine")
    with pytest.raises(AhlError, match="holds files that are not a store's"):
        clear_store(Hub(store_dir))


def test_device_option_records_the_device_and_refuses_a_missing_one(store_dir, tiny_data, tiny_base,
                                                                     monkeypatch):
    import torch

    from adapterhub_local.device import resolve_device

    result = json.loads(add(store_dir, "colors", tiny_data, tiny_base, "--device", "cpu", "--json").stdout)
    hub = Hub(store_dir)
    assert hub.store.client.get_run(result["run_id"]).data.params["device"] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    before = file_digest(store_dir)
    for args, message in [(["--device", "cuda"], "error: no CUDA device here: use --device cpu"),
                          (["--device", "mps"], "error: no MPS device here: use --device cpu"),
                          (["--device", "tpu"], "error: unknown device 'tpu': use auto, cpu, "
                                                "cuda, cuda:N or mps")]:
        failed = add(store_dir, "animals", tiny_data, tiny_base, *args, ok=False)
        assert failed.exit_code == 1 and failed.stderr.strip() == message, failed.stderr
        failed = ahl("predict", "red", "--store", store_dir, *args, ok=False)
        assert failed.exit_code == 1 and failed.stderr.strip() == message, failed.stderr
    assert file_digest(store_dir) == before
    monkeypatch.setenv("AHL_DEVICE", "cuda")  # the environment's choice, when no option is given
    assert add(store_dir, "animals", tiny_data, tiny_base, ok=False).stderr.strip() == \
        "error: no CUDA device here: use --device cpu"
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"

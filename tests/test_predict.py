"""Routed prediction from Python and the CLI, with no task given."""

import json

import pytest

from adapterhub_local import Hub
from adapterhub_local.errors import AhlError
from conftest import FAST, tiny_rows, write_csv
from test_cli import ahl


def test_predict_routes_mixed_inputs_without_a_task(two_task_store):
    hub = Hub(two_task_store)
    colors, animals = tiny_rows("colors", 10, seed=5), tiny_rows("animals", 10, seed=6)
    texts = [t for pair in zip(colors, animals) for t, _ in pair]
    truth = [task for _ in range(len(colors)) for task in ("colors", "animals")]
    answers = hub.predict(texts)
    assert len(answers) == len(texts)
    assert sum(a["task"] == t for a, t in zip(answers, truth)) / len(texts) >= 0.95
    labels = {"colors": {"red", "blue"}, "animals": {"cat", "dog", "bird"}}
    assert all(a["label"] in labels[a["task"]] for a in answers if a["task"])
    assert all(a["adapters"][0]["version"] == 1 and a["adapters"][0]["weight"] == 1.0
               for a in answers if a["task"])


def sample(task: str, seed: int = 9) -> str:
    """An unseen text of a tiny task (the tiny random base only knows texts shaped like these)."""
    return tiny_rows(task, 1, seed=seed)[0][0]


def test_compose_weights_sum_to_one(two_task_store):
    texts = [sample("colors"), sample("animals"), sample("colors", 3)]
    hub = Hub(two_task_store)
    answers = hub.predict(texts, mode="compose", top_k=2)
    for a in answers:
        assert len(a["adapters"]) == 2
        assert sum(x["weight"] for x in a["adapters"]) == pytest.approx(1.0)
    # The CLI's names for the modes work as well
    assert hub.predict(texts, mode="composed", top_k=2) == answers
    assert hub.predict(texts, mode="routed") == hub.predict(texts, mode="pick")
    assert all(len(a["adapters"]) == 1 for a in hub.predict(texts, mode="routed"))


def test_route_and_oracle_paths(two_task_store):
    hub = Hub(two_task_store)
    assert [r.tasks for r in hub.route([sample("colors"), sample("animals")])] == [["colors"], ["animals"]]
    oracle = hub.predict([sample("animals")], task="colors")[0]
    assert oracle["task"] == "colors" and oracle["label"] in {"red", "blue"}



def test_python_callers_mistakes_are_ahl_errors(two_task_store):
    """Wrong values from Python are one AhlError each, as the CLI's are (they were IndexError,
    TypeError from the tokenizer, AttributeError)."""
    hub = Hub(two_task_store)
    for call, message in [(lambda: hub.route([sample("colors")], top_k=0), "top_k must be at least 1"),
                          (lambda: hub.predict(["fine", "caf\udce9 rouge"]), "text 1 holds a byte"),
                          (lambda: hub.show(5), "a version reference is text, got int 5"),
                          (lambda: hub.versions(None), "a version reference is text")]:
        with pytest.raises(AhlError, match=message):
            call()


def test_metrics_have_every_mode_and_routing(two_task_store):
    metrics = Hub(two_task_store).metrics(confusion=True)
    assert set(metrics["modes"]) == {"oracle", "routed", "composed"}
    assert len(metrics["routing_accuracy"]) == 2 and metrics["routing_accuracy"][0][1] is None
    assert metrics["modes"]["routed"]["matrix"][1][1] <= metrics["modes"]["oracle"]["matrix"][1][1]
    confusion = metrics["confusion"]
    assert confusion["tasks"] == ["colors", "animals"]
    assert [sum(row) for row in confusion["matrix"]] == [20, 30]  # every test input counted once


@pytest.mark.parametrize("texts, expected", [
    ([], []),
    (["", "   "], [("empty text", None), ("empty text", None)]),
])
def test_empty_inputs(two_task_store, texts, expected):
    answers = Hub(two_task_store).predict(texts)
    assert [(a.get("reason"), a["task"]) for a in answers] == expected


def test_bad_inputs_are_one_line_errors(two_task_store, tmp_path):
    hub = Hub(two_task_store)
    with pytest.raises(AhlError, match="not a string"):
        hub.predict(["ok", 3])
    with pytest.raises(AhlError, match="not one string"):
        hub.predict("red cat")
    with pytest.raises(AhlError, match="no task 'ghost'"):
        hub.predict(["red"], task="ghost")
    with pytest.raises(AhlError, match="top_k must be at least 1"):
        hub.predict(["red"], mode="compose", top_k=0)
    with pytest.raises(AhlError, match="top_k must be a whole number, got '2'"):
        hub.predict(["red"], mode="compose", top_k="2")
    with pytest.raises(AhlError, match="unknown mode 'best': use routed"):
        hub.predict(["red"], mode="best")
    with pytest.raises(AhlError, match="ahl add-task"):
        Hub(tmp_path / "empty").predict(["red"])


def test_cli_predict_file_json_and_errors(two_task_store, tmp_path):
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(f"{sample('colors')}\n\n{sample('animals')}\n", encoding="utf-8")
    answers = json.loads(ahl("predict", "--file", mixed, "--json", "--store", two_task_store).stdout)
    # A blank line is an empty text, answered as one: answer i is line i's
    assert [(a["task"], a.get("reason")) for a in answers] == [
        ("colors", None), (None, "empty text"), ("animals", None)]
    assert set(answers[0]) >= {"text", "task", "label", "score", "adapters"}
    composed = json.loads(ahl("predict", sample("animals"), "--mode", "composed", "--json", "--store",
                              two_task_store).stdout)
    assert sum(x["weight"] for x in composed[0]["adapters"]) == pytest.approx(1.0)
    table = write_csv(tmp_path / "t.csv", [("blue", "x")], header=("body", "y"))
    for args, message in [(["--file", tmp_path / "missing.txt"], "does not exist"),
                          (["--file", table], "no column 'text'"),
                          (["x", "--task", "ghost"], "no task 'ghost'"),
                          (["x", "--task", "colors@5"], "task 'colors' has no version 5"),
                          (["x", "--task", "colors@"], "names no version after '@'"),
                          (["x", "--mode", "mixed"], "unknown --mode"),
                          ([], "no texts")]:
        result = ahl("predict", *args, "--store", two_task_store, ok=False)
        assert result.exit_code == 1 and message in result.stderr
        assert result.stderr.count("\n") == 1
    assert "colors" in ahl("predict", sample("colors"), "--store", two_task_store).stdout


def test_dashboards_in_the_mlflow_store(two_task_store):
    """The sequence run holds metrics by step and PNG heatmaps, for MLflow's UI."""
    import sqlite3

    db = sqlite3.connect(two_task_store / "mlflow.db")
    steps = lambda key: {row[0] for row in db.execute(  # noqa: E731
        "SELECT step FROM metrics WHERE key = ?", (key,))}
    assert steps("oracle/average_accuracy") == {1, 2}  # summaries at every step
    assert steps("oracle/acc/colors") == {1}  # a point where a value moved: an isolated
    assert steps("oracle/acc/animals") == {2}  # adapter's oracle score never moves
    keys = {row[0] for row in db.execute("SELECT DISTINCT key FROM metrics")}
    assert {"oracle/bwt", "routed/average_accuracy", "routing/acc/animals"} <= keys
    pngs = list((two_task_store / "artifacts").rglob("*.png"))
    for step in (1, 2):  # each step's heatmaps
        assert {key for key in ("oracle_matrix", "router_confusion")
                if any(f"{key}+step+{step}+" in p.name for p in pngs)} == {"oracle_matrix", "router_confusion"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_a_heatmap_shows_each_share_in_viridis_and_leaves_missing_cells_blank():
    import numpy as np

    from adapterhub_local.dashboards import heatmap, shade

    assert shade(0.0) == (68, 1, 84) and shade(1.0) == (253, 231, 37)  # viridis's ends
    assert max(abs(a - b) for a, b in zip(shade(0.5), (33, 145, 140))) <= 2  # and its middle
    image = heatmap("t", [[0.0, None], [1.0, 0.25]], ["task_a", "task_b"], ["1", "2"])
    colours = {tuple(int(c) for c in pixel) for pixel in image.reshape(-1, 3)}
    assert {shade(0.0), shade(1.0), shade(0.25)} <= colours
    white = (image == 255).all(-1).sum()
    cells_only = heatmap("t", [[0.0, 0.5], [1.0, 0.25]], ["task_a", "task_b"], ["1", "2"])
    assert white - (cells_only == 255).all(-1).sum() >= 40 * 24 * 0.8  # the None cell is blank
    assert (image < 40).all(-1).sum() > 100  # labels and title in black
    # Column labels wider than their cells stand upright below the grid: a taller image
    upright = heatmap("t", [[0.5, 0.5]], ["task_a"], ["a_long_task_name", "another_long_one"])
    level = heatmap("t", [[0.5, 0.5]], ["task_a"], ["1", "2"])
    assert upright.shape[0] > level.shape[0] + 40 and upright.shape[2] == 3
    assert np.asarray(upright).dtype == np.uint8


def test_a_drawing_that_failed_is_made_up_by_the_next(store_dir, tiny_data, tiny_base, monkeypatch,
                                                      caplog):
    """Heatmaps are drawn after the commit, on a thread: a failed drawing costs no step (the
    metrics are there), and the next add-task draws the pictures the last one lacks."""
    from adapterhub_local import dashboards

    hub = Hub(store_dir)
    draw = dashboards.log_images
    monkeypatch.setattr(dashboards, "log_images", lambda *args: 1 / 0)
    hub.add_task("colors", tiny_data["colors"]["train"], tiny_data["colors"]["test"],
                 base=tiny_base, **FAST)
    hub.drawing.join()
    assert "could not draw the forgetting heatmaps" in caplog.text
    assert hub.metrics()["modes"]["oracle"]["matrix"][0][0] is not None
    assert not list((store_dir / "artifacts").rglob("*.png"))
    monkeypatch.setattr(dashboards, "log_images", draw)
    hub.add_task("moods", tiny_data["moods"]["train"], tiny_data["moods"]["test"],
                 base=tiny_base, **FAST)
    hub.drawing.join()
    assert dashboards.draw_steps(hub.store) == []  # steps 1 and 2 are drawn


def test_predict_file_writes_what_predict_answers(two_task_store, tmp_path):
    import pyarrow.parquet as pq

    rows = [(i, sample("colors", i) if i % 3 else sample("animals", i)) for i in range(25)]
    table = write_csv(tmp_path / "in.csv", rows + [(25, "")], header=("id", "body"))
    hub = Hub(two_task_store)
    expected = hub.predict([text for _, text in rows] + [""])
    for output in (tmp_path / "out.jsonl", tmp_path / "out.parquet"):
        result = json.loads(ahl("predict", "--file", table, "--text-column", "body", "--output",
                                output, "--json", "--store", two_task_store).stdout)
        assert result == {"input": str(table), "output": str(output), "rows": 26, "answered": 25,
                          "abstained": 1, "errors": 0}
        written = ([json.loads(line) for line in output.read_text().splitlines()]
                   if output.suffix == ".jsonl" else pq.read_table(output).to_pylist())
        assert [(a["text"], a["task"], a["label"], a["adapters"]) for a in written] == \
            [(a["text"], a["task"], a["label"], a["adapters"]) for a in expected]
        assert written[-1]["reason"] == "empty text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.jsonl", "out.parquet"]


def test_predict_file_bad_output_is_one_line_and_writes_nothing(two_task_store, tmp_path):
    texts = tmp_path / "in.txt"
    texts.write_text("red\nblue\n", encoding="utf-8")
    for args, message in [
            (["--file", texts, "--output", tmp_path / "out.csv"], "unknown output format '.csv'"),
            (["--file", texts, "--output", tmp_path / "no" / "out.jsonl"], "does not exist"),
            (["--file", texts, "--output", texts.with_suffix(".jsonl"), "--mode", "best"], "unknown --mode"),
            (["red", "--file", texts, "--output", tmp_path / "out.jsonl"], "pass the texts in --file"),
            (["--file", tmp_path / "missing.csv", "--output", tmp_path / "out.jsonl"], "does not exist")]:
        result = ahl("predict", *args, "--store", two_task_store, ok=False)
        assert result.exit_code == 1 and message in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["in.txt"]


PEAK_RSS = """
import resource, sys
from adapterhub_local.cli import app
store, *files = sys.argv[1:]
for source in files:  # the peak so far (KiB on Linux) after each file
    app(["predict", "--file", source, "--output", source + ".out.jsonl", "--store", store],
        standalone_mode=False)
    print("peak KiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_a_long_file_is_answered_in_constant_memory(two_task_store, tmp_path):
    """200,000 rows take no more memory than 2,000 did in the same process before them: the file
    is read, answered and written in chunks (answers held at once would take hundreds of MB)."""
    import subprocess
    import sys

    texts = [text for text, _ in tiny_rows("colors", 50, seed=7) + tiny_rows("animals", 50, seed=8)]
    sources = []
    for rows in (2_000, 200_000):
        sources.append(tmp_path / f"in-{rows}.jsonl")
        with open(sources[-1], "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": texts[i % len(texts)], "n": i}) + "\n" for i in range(rows))
    run = subprocess.run([sys.executable, "-c", PEAK_RSS, two_task_store, *sources],
                         capture_output=True, text=True, check=True)
    small, large = (int(line.split()[-1]) / 1024 for line in run.stdout.splitlines()
                    if line.startswith("peak KiB"))
    for source, rows in zip(sources, (2_000, 200_000)):
        with open(f"{source}.out.jsonl", encoding="utf-8") as f:
            assert sum(1 for _ in f) == rows
    assert large - small < 60, (small, large)  # MiB


def test_each_version_keeps_word_counts_for_the_router(two_task_store):
    """add-task stores each task's gram counts per class beside its feature statistics, the
    held-out rows' grams beside their features (the router fits its words' weight on them),
    and the test split's grams beside its texts (each step routes it again)."""
    hub = Hub(two_task_store)
    for task in ("colors", "animals"):
        stats = hub.loader.task_stats(hub.store.get_version(task, 1))
        assert stats.grams is not None and stats.grams.shape[0] == 3
        assert int(stats.grams[0].max()) < len(stats.labels) and int(stats.grams[2].min()) >= 1
        assert len(stats.calibration_grams) == len(stats.calibration) > 0
        assert stats.gram_space > int(stats.grams[1].max())
        split = hub.loader.test_split(hub.store.get_version(task, 1))  # its grams, for later steps
        assert len(split["grams"]) == len(split["texts"])
        assert all(g == sorted(set(g)) and g for g in split["grams"])

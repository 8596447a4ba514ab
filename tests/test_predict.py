"""Routed prediction from Python and the CLI, with no task given."""

import json

import pytest

from adapterhub_local import Hub
from adapterhub_local.errors import AhlError
from conftest import FAST, tiny_rows, write_csv
from test_cli import ahl


@pytest.fixture
def two_task_store(store_dir, tiny_data, tiny_base):
    hub = Hub(store_dir)
    for task in ("colors", "animals"):
        hub.add_task(task, tiny_data[task]["train"], tiny_data[task]["test"], base=tiny_base, **FAST)
    hub.drawing.join()
    return store_dir


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
    answers = Hub(two_task_store).predict(texts, mode="compose", top_k=2)
    for a in answers:
        assert len(a["adapters"]) == 2
        assert sum(x["weight"] for x in a["adapters"]) == pytest.approx(1.0)


def test_route_and_oracle_paths(two_task_store):
    hub = Hub(two_task_store)
    assert [r.tasks for r in hub.route([sample("colors"), sample("animals")])] == [["colors"], ["animals"]]
    oracle = hub.predict([sample("animals")], task="colors")[0]
    assert oracle["task"] == "colors" and oracle["label"] in {"red", "blue"}


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
    with pytest.raises(AhlError, match="ahl add-task"):
        Hub(tmp_path / "empty").predict(["red"])


def test_cli_predict_file_json_and_errors(two_task_store, tmp_path):
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(f"{sample('colors')}\n\n{sample('animals')}\n", encoding="utf-8")
    answers = json.loads(ahl("predict", "--file", mixed, "--json", "--store", two_task_store).stdout)
    assert [a["task"] for a in answers] == ["colors", "animals"]
    assert set(answers[0]) >= {"text", "task", "label", "score", "adapters"}
    composed = json.loads(ahl("predict", sample("animals"), "--mode", "composed", "--json", "--store",
                              two_task_store).stdout)
    assert sum(x["weight"] for x in composed[0]["adapters"]) == pytest.approx(1.0)
    table = write_csv(tmp_path / "t.csv", [("blue", "x")], header=("body", "y"))
    for args, message in [(["--file", tmp_path / "missing.txt"], "does not exist"),
                          (["--file", table], "no column 'text'"),
                          (["x", "--task", "ghost"], "no task 'ghost'"),
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

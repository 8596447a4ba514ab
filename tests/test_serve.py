"""The serving set as an MLflow pyfunc model: `ahl store package`, the model loaded in a fresh
process without its store, `mlflow models serve` answering like `ahl predict --json`, and bad
input answered in one line."""

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pandas as pd
import pytest

from adapterhub_local import Hub
from conftest import file_digest
from services import mlflow_model_server
from test_cli import ahl

TEXTS = ["the red scarlet one here", "a puppy and a kitten today", "", "navy azure very near",
         "bird wing nest and the"]


@pytest.fixture(scope="module")
def served_store(tmp_path_factory, two_task_store):
    """A copy of the two-task store (colors, animals) and its package: (folder, package JSON)."""
    folder = tmp_path_factory.mktemp("serve") / "store"
    shutil.copytree(two_task_store, folder)
    return folder, json.loads(ahl("store", "package", "--json", "--store", folder).stdout)


@pytest.fixture(scope="module")
def model_folder(served_store, tmp_path_factory):
    """The packaged model downloaded into a folder of its own: all it needs travels with it."""
    import mlflow

    version = Hub(served_store[0]).store.alias_version("_serving", "production")
    return mlflow.artifacts.download_artifacts(artifact_uri=version.source,
                                               dst_path=str(tmp_path_factory.mktemp("model")))


def same_answers(got: list[dict], expected: list[dict]) -> None:
    """Equal answers (text, task, label, adapters and weights), scores to float precision."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g["text"], g["task"], g["label"], g.get("reason")) == \
            (e["text"], e["task"], e["label"], e.get("reason"))
        assert [(a["task"], a["version"]) for a in g["adapters"]] == \
            [(a["task"], a["version"]) for a in e["adapters"]]
        assert [a["weight"] for a in g["adapters"]] == pytest.approx([a["weight"] for a in e["adapters"]], abs=1e-5)
        assert g["score"] == pytest.approx(e["score"], abs=1e-5)


def test_package_registers_the_serving_set_once(served_store):
    store, info = served_store
    assert set(info) == {"model_uri", "tracking_uri", "version"}
    assert info["version"] == 1 and info["model_uri"].endswith("._serving/1")
    hub = Hub(store)
    assert [t["task"] for t in hub.tasks()] == ["colors", "animals"]  # the package is no task
    again = hub.package()
    assert (again["version"], again["new"], again["tasks"]) == (1, False, {"colors": 1, "animals": 1})


def test_package_follows_the_serving_set(served_store, tmp_path):
    folder = tmp_path / "store"
    shutil.copytree(served_store[0], folder)
    hub = Hub(folder)
    hub.remove("animals@1")
    info = hub.package()
    assert (info["version"], info["new"], info["tasks"]) == (2, True, {"colors": 1})
    production = hub.store.alias_version("_serving", "production")
    assert int(production.version) == 2


def test_the_model_loads_in_a_fresh_process_without_the_store(served_store, model_folder, tmp_path):
    store, _ = served_store
    expected = Hub(store).predict(TEXTS)
    code = ("import json, sys, mlflow; model = mlflow.pyfunc.load_model(sys.argv[1]); "
            "print(model.predict(json.loads(sys.argv[2])).to_json(orient='records'))")
    moved = tmp_path / "away"
    shutil.move(store, moved)  # no store where it was made: the model needs nothing of it
    try:
        out = subprocess.run([sys.executable, "-c", code, model_folder, json.dumps(TEXTS)],
                             capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    finally:
        shutil.move(moved, store)
    same_answers(json.loads(out.splitlines()[-1]), expected)


def test_bad_input_is_one_line_and_other_rows_are_answered(served_store, model_folder):
    import mlflow

    model = mlflow.pyfunc.load_model(model_folder)
    answers = model.predict(pd.DataFrame({"text": [TEXTS[0], None, 7, TEXTS[1]]})).to_dict("records")
    assert [a["error"] for a in answers] == [None, "row 1 is empty: send a text in every row",
                                             "row 2 is a int, not a string: send texts as strings", None]
    same_answers([answers[0], answers[3]], Hub(served_store[0]).predict([TEXTS[0], TEXTS[1]]))
    with pytest.raises(mlflow.exceptions.MlflowException, match="no 'text' column") as missing:
        model.predict(pd.DataFrame({"sentence": ["a"]}))
    assert "\n" not in missing.value.message
    with pytest.raises(mlflow.exceptions.MlflowException, match="unknown mode 'best': use routed"):
        model.predict(["a"], params={"mode": "best"})


def test_the_model_refuses_another_base(model_folder, tiny_llama):
    import mlflow

    with pytest.raises(Exception, match="packaged for base") as refused:
        mlflow.pyfunc.load_model(model_folder, model_config={"base": tiny_llama})
    assert "\n" not in str(refused.value)


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_mlflow_models_serve_answers_like_ahl_predict(served_store, tmp_path):
    store, info = served_store
    cli = lambda *extra: json.loads(ahl("predict", *TEXTS, "--json", "--store", store, *extra).stdout)  # noqa: E731
    with mlflow_model_server(info["model_uri"], info["tracking_uri"], tmp_path / "serve.log") as url:
        status, body = post(url, {"inputs": TEXTS})
        assert status == 200
        same_answers(body["predictions"], cli())
        status, body = post(url, {"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]},
                                  "params": {"mode": "composed", "top_k": 2}})
        assert status == 200
        same_answers(body["predictions"], cli("--mode", "composed", "--top-k", "2"))
        status, body = post(url, {"dataframe_split": {"columns": ["sentence"], "data": [["a"]]}})
        assert status == 400 and "the input has no 'text' column (columns: sentence)" in body["message"]


def test_package_of_an_empty_store_is_one_line(store_dir):
    before = file_digest(store_dir)
    result = ahl("store", "package", "--store", store_dir, ok=False)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: store {store_dir} has no tasks yet: add one with ahl add-task NAME --train FILE"]
    assert file_digest(store_dir) == before

"""Queries answer at once: `ahl --help`, the query commands, `ahl store ...` and predict's
argument errors never import torch, transformers or peft (seconds each), as the modules a fresh
process holds after each command show; `python -X importtime` records every module a real `ahl`
process imports where the tasks cache is checked."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from adapterhub_local import Hub
from conftest import copy_store

HEAVY = {"torch", "transformers", "peft"}


@pytest.fixture(scope="module")
def one_task_store(tmp_path_factory, colors_only_store):
    """A store with one trained task, shared by the read-only commands."""
    return copy_store(colors_only_store, tmp_path_factory.mktemp("imports") / "store")


def run_ahl(args: list, cwd) -> tuple[subprocess.CompletedProcess, set[str], str]:
    """(the finished `ahl ARGS` process, the top-level packages it imported, its stderr
    without the import-time lines)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "adapterhub_local.cli",
                           *map(str, args)], cwd=cwd, env=os.environ.copy(),
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines
                if line.startswith("import time:") and "imported package" not in line}
    errors = "\n".join(line for line in lines if not line.startswith("import time:"))
    return done, imported, errors


# Commands one after another in one fresh process, the packages imported so far after each: an
# import stays, so the first command that imports a heavy package is the one that shows it (a
# process per command cost 3 s each, most of it the same start).
IN_ONE_PROCESS = """
import json, sys
from typer.testing import CliRunner
from adapterhub_local.cli import app
answers = []
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(app, args)
    answers.append({"code": result.exit_code, "stderr": result.stderr,
                    "packages": sorted({name.split(".")[0] for name in sys.modules})})
print(json.dumps(answers))
"""


def check_light(commands: list[tuple[list, int, str]], cwd) -> None:
    """Each (args, exit code, message in stderr) of `commands`, run in order in one process,
    exits as said and imports none of HEAVY."""
    done = subprocess.run([sys.executable, "-c", IN_ONE_PROCESS,
                           json.dumps([[str(a) for a in args] for args, _, _ in commands])],
                          cwd=cwd, env=os.environ.copy(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for (args, exit_code, message), answer in zip(commands, json.loads(done.stdout), strict=True):
        assert answer["code"] == exit_code, (args, answer["stderr"])
        assert message in answer["stderr"], (args, answer["stderr"])
        heavy = sorted(set(answer["packages"]) & HEAVY)
        assert not heavy, f"ahl {' '.join(map(str, args))} imported {', '.join(heavy)}"


def test_help_methods_and_argument_errors_import_no_torch(tmp_path):
    check_light([(["--help"], 0, ""),
                 (["methods"], 0, ""),
                 (["predict"], 1, "no texts"),
                 (["predict", "hello", "--mode", "sideways"], 1, "unknown --mode"),
                 (["predict", "hello", "--top-k", "0"], 1, "top_k must be at least 1"),
                 (["predict", "hello", "--no-such-option"], 2, "No such option")], tmp_path)


def test_queries_import_no_torch(one_task_store, tmp_path):
    queries = [["tasks"], ["metrics"], ["store", "show", "colors@1"],
               ["store", "versions", "colors"], ["store", "lineage", "colors"], ["store", "gate"],
               ["store", "verify"], ["store", "export", "colors", tmp_path / "out"],
               ["store", "promote", "colors", "1", "--alias", "production"], ["store", "doctor"]]
    check_light([([*args, "--store", one_task_store], 0, "") for args in queries], tmp_path)


def test_removing_the_last_version_imports_no_torch(one_task_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(one_task_store, store)  # the other tests read the module's store
    check_light([(["store", "rm", "colors@1", "--store", store], 0, "")], tmp_path)


def test_tasks_answers_from_its_cache_without_mlflow_until_the_registry_changes(
        one_task_store, tmp_path):
    """The first `ahl tasks` computes through MLflow and keeps the answer beside the database;
    the next answers from it without importing MLflow. A change made through MLflow itself, not
    ahl, is seen by the next query."""
    store = tmp_path / "store"
    shutil.copytree(one_task_store, store)
    (store / "tasks.json").unlink(missing_ok=True)
    answers, packages = [], []
    for _ in range(2):
        done, imported, errors = run_ahl(["tasks", "--json", "--store", store], tmp_path)
        assert done.returncode == 0, errors
        answers.append(json.loads(done.stdout))
        packages.append({m.split(".")[0] for m in imported})
    assert answers[0] == answers[1] and answers[0][0]["task"] == "colors"
    assert "mlflow" in packages[0] and "mlflow" not in packages[1]

    hub = Hub(store)
    hub.store.client.set_registered_model_alias(hub.store.model_name("colors"), "staging", "1")
    done, imported, _ = run_ahl(["tasks", "--json", "--store", store], tmp_path)
    assert "staging" in json.loads(done.stdout)[0]["aliases"]
    assert "mlflow" in {m.split(".")[0] for m in imported}  # computed again


def test_a_database_of_another_schema_is_never_answered_from_the_cache(tmp_path):
    import sqlite3

    from adapterhub_local import query_cache
    from adapterhub_local.store import AdapterStore

    (tmp_path / "store").mkdir()
    sqlite3.connect(tmp_path / "store" / "mlflow.db").execute("CREATE TABLE other (x)").connection.commit()
    assert query_cache.fingerprint(AdapterStore(tmp_path / "store")) is None

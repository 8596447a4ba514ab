"""The team store: every command against an MLflow tracking server backed by PostgreSQL, as the
README's "Team store" section starts it; and a server that is down is one clean line."""

import json
import time

import pytest

from adapterhub_local.dashboards import start_server, stop_ui, wait_for_ui
from conftest import file_digest
from services import free_port, postgres_server
from test_cli import FAST_ARGS, ahl


@pytest.fixture
def team_store(tmp_path):
    with postgres_server() as database:
        port = free_port()
        server = start_server(database, port, ["--artifacts-destination", str(tmp_path / "artifacts")])
        url = f"http://127.0.0.1:{port}"
        try:
            assert wait_for_ui(url, server, timeout=120), server.stderr.read().decode()[-2000:]
            yield url
        finally:
            stop_ui(server)


def test_every_command_works_against_a_postgresql_backed_server(team_store, tiny_data, tiny_base,
                                                                tmp_path):
    store = ["--store", team_store]
    for task in ("colors", "animals", "colors"):
        ahl("add-task", task, "--train", tiny_data[task]["train"], "--test",
            tiny_data[task]["test"], "--base", tiny_base, *FAST_ARGS, *store)
    tasks = json.loads(ahl("tasks", "--json", *store).stdout)
    assert [(t["task"], t["version"]) for t in tasks] == [("colors", 2), ("animals", 1)]
    metrics = json.loads(ahl("metrics", "--json", *store).stdout)
    assert len(metrics["modes"]["oracle"]["matrix"]) == 3 and metrics["modes"]["oracle"]["bwt"] == 0
    answers = json.loads(ahl("predict", "crimson red scarlet", "puppy dog bark", "--json",
                             *store).stdout)
    assert {a["task"] for a in answers} <= {"colors", "animals", None} and len(answers) == 2
    assert [v["version"] for v in json.loads(ahl("store", "versions", "colors", "--json",
                                                 *store).stdout)] == [1, 2]
    ahl("store", "promote", "colors", "1", "--alias", "production", *store)
    shown = json.loads(ahl("store", "show", "colors@production", "--json", *store).stdout)
    assert shown["version"] == 1 and shown["base"]["sha256"]
    lineage = json.loads(ahl("store", "lineage", "colors", "--json", *store).stdout)
    assert [v["children"] for v in lineage["versions"]] == [[2], []]
    exported = json.loads(ahl("store", "export", "colors@2", tmp_path / "out", "--json",
                              *store).stdout)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and exported["version"] == 2
    assert json.loads(ahl("store", "verify", "--json", *store).stdout)["ok"]
    ahl("store", "rm", "animals@1", *store)
    assert [t["task"] for t in json.loads(ahl("tasks", "--json", *store).stdout)] == ["colors"]


def test_an_unreachable_tracking_server_is_one_line_naming_it(tiny_data, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    before = file_digest(tmp_path)
    started = time.monotonic()
    for args in (["tasks"], ["add-task", "colors", "--train", tiny_data["colors"]["train"]]):
        result = ahl(*args, "--store", uri, ok=False)
        assert result.exit_code == 1 and result.stderr.count("\n") == 1
        assert result.stderr.startswith(f"error: cannot reach the store at {uri}")
    assert file_digest(tmp_path) == before

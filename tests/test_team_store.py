"""The team store: every command against an MLflow tracking server backed by PostgreSQL, with
MLflow's basic-auth app on, as the README's "Team store" section starts it; a client without
valid credentials, and a server that is down, are one clean line each."""

import json

import pytest

from adapterhub_local.dashboards import server_log, start_server, stop_ui, wait_for_ui
from conftest import file_digest
from services import free_port, postgres_server
from test_cli import FAST_ARGS, ahl

ADMIN = ("admin", "admin-password-for-tests")  # MLflow refuses passwords under 12 characters
MEMBER = ("alice", "alice-password-for-tests")
REFUSED = ("refused access (HTTP 401): set MLFLOW_TRACKING_USERNAME and "
           "MLFLOW_TRACKING_PASSWORD\n")


def write_auth_config(folder) -> str:
    """The README's auth config, its user database in the test's folder."""
    path = folder / "basic_auth.ini"
    path.write_text("[mlflow]\ndefault_permission = EDIT\n"
                    f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
                    f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
                    "auth_cache_ttl_seconds = 60\n")
    return str(path)


def log_in(monkeypatch, username: str, password: str) -> None:
    """As a user does: MLflow's client reads these two itself; ahl needs nothing else."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


@pytest.fixture(scope="module")
def team_store(tmp_path_factory):
    """The server's URL; its admin has made the team member MEMBER."""
    from mlflow.server import get_app_client

    folder = tmp_path_factory.mktemp("team")
    with postgres_server() as database:
        port = free_port()
        server = start_server(database, port, ["--artifacts-destination", str(folder / "files")],
                              ["--app-name", "basic-auth"],
                              {"MLFLOW_AUTH_CONFIG_PATH": write_auth_config(folder),
                               "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-secret-for-tests"})
        url = f"http://127.0.0.1:{port}"
        try:
            # The auth app migrates its own database too: it takes longer to start.
            assert wait_for_ui(url, server, timeout=180), server_log(server)[-2000:]
            with pytest.MonkeyPatch.context() as monkeypatch:  # the admin, for this call only
                log_in(monkeypatch, *ADMIN)
                get_app_client("basic-auth", tracking_uri=url).create_user(*MEMBER)
            yield url
        finally:
            stop_ui(server)


def test_every_command_works_against_a_postgresql_backed_server(team_store, tiny_data, tiny_base,
                                                                tmp_path, monkeypatch):
    log_in(monkeypatch, *MEMBER)
    store = ["--store", team_store]
    for task in ("colors", "animals", "colors"):
        added = ahl("add-task", task, "--train", tiny_data[task]["train"], "--test",
                    tiny_data[task]["test"], "--base", tiny_base, *FAST_ARGS, "--json", *store)
        assert json.loads(added.stdout)["task"] == task  # one JSON document, nothing else
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
    for args in (["tasks"], ["add-task", "colors", "--train", tiny_data["colors"]["train"]]):
        result = ahl(*args, "--store", uri, ok=False)
        assert result.exit_code == 1 and result.stderr.count("\n") == 1
        assert result.stderr.startswith(f"error: cannot reach the store at {uri}")
    assert file_digest(tmp_path) == before


def test_a_client_without_valid_credentials_is_one_line(team_store, tiny_data, tmp_path,
                                                        monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials either
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    for password in (None, "not-alices-password"):
        if password:
            log_in(monkeypatch, MEMBER[0], password)
        for args in (["tasks"], ["add-task", "colors", "--train", tiny_data["colors"]["train"]]):
            result = ahl(*args, "--store", team_store, ok=False)
            assert result.exit_code == 1
            assert result.stderr == f"error: the store at {team_store} {REFUSED}"

"""A store's lifecycle: lineage trees, removing a version, and the forgetting gate."""

import json

import pytest

from adapterhub_local import AhlError, Hub
from conftest import FAST, file_digest, tiny_rows, write_csv
from test_cli import ahl


def add(hub, task, tiny_data, tiny_base, **extra):
    return hub.add_task(task, tiny_data[task]["train"], tiny_data[task]["test"], base=tiny_base,
                        **FAST, **extra)


def routed_tasks(hub, task):
    return {a["task"] for a in hub.predict([t for t, _ in tiny_rows(task, 5, seed=7)])}


def test_lineage_is_a_tree_of_versions_with_what_each_came_from(store_dir, tiny_data, tiny_base):
    hub = Hub(store_dir)
    for task in ("colors", "animals", "colors"):
        add(hub, task, tiny_data, tiny_base)
    tree = json.loads(ahl("store", "lineage", "colors", "--json", "--store", store_dir).stdout)
    first, second = tree["versions"]
    assert (first["version"], first["parent"], first["children"]) == (1, None, [2])
    assert (second["version"], second["parent"], second["children"]) == (2, 1, [])
    assert second["after"] == [{"task": "animals", "version": 1}] and first["after"] == []
    assert first["data_digest"] == second["data_digest"] and first["method"] == "lora"
    assert second["serving"] and not first["serving"] and 0 <= second["accuracy"] <= 1
    printed = ahl("store", "lineage", "colors", "--store", store_dir).stdout
    assert "v1" in printed and "v2" in printed and "serving" in printed


def test_rm_hides_a_version_from_queries_and_routing_but_keeps_its_history(
        store_dir, tiny_data, tiny_base):
    hub = Hub(store_dir)
    add(hub, "colors", tiny_data, tiny_base)
    add(hub, "animals", tiny_data, tiny_base)
    assert "animals" in routed_tasks(hub, "animals")
    run_id = hub.show("animals@1")["run_id"]

    ahl("store", "rm", "animals@1", "--store", store_dir)
    hub = Hub(store_dir)  # a fresh process's view
    assert [t["task"] for t in hub.tasks()] == ["colors"]
    assert routed_tasks(hub, "animals") <= {"colors", None}
    result = ahl("store", "versions", "animals", "--store", store_dir, ok=False)
    assert result.exit_code == 1 and "no task 'animals'" in result.stderr
    lineage = hub.lineage("animals")["versions"]
    assert [(v["version"], v["status"]) for v in lineage] == [(1, "removed")]
    assert hub.store.client.get_run(run_id).info.status == "FINISHED"  # the run is still there
    assert hub.verify() == []  # and its files too

    before = file_digest(store_dir)
    for ref, message in [("colors", "say which version"), ("colors@5", "has no version 5"),
                         ("animals@1", "no task 'animals'")]:
        result = ahl("store", "rm", ref, "--store", store_dir, ok=False)
        assert result.exit_code == 1 and message in result.stderr, result.stderr
    assert file_digest(store_dir) == before

    # The next step's table shows the removed task's column without values, as the matrices do
    printed = ahl("add-task", "colors", "--train", tiny_data["colors"]["train"], "--test",
                  tiny_data["colors"]["test"], "--base", tiny_base, "--epochs", "1",
                  "--store", store_dir).stdout
    cells = next([c.strip() for c in line.split("│")[1:-1]] for line in printed.splitlines()
                 if "animals" in line)
    assert cells[0] == "animals" and cells[1] == cells[3] == "-", printed  # now, change
    assert float(cells[2]) >= 0  # when it was learned


def test_a_task_added_again_is_routed_again_after_its_old_version_was_removed(
        store_dir, tiny_data, tiny_base):
    hub = Hub(store_dir)
    add(hub, "colors", tiny_data, tiny_base)
    add(hub, "animals", tiny_data, tiny_base)
    hub.remove("animals@1")
    step = add(hub, "animals", tiny_data, tiny_base)
    assert step["version"] == 2 and step["parent"] is None
    assert "animals" in routed_tasks(hub, "animals")


def test_the_gate_holds_back_a_version_that_makes_an_earlier_task_forget(
        store_dir, tiny_data, tiny_base, tmp_path):
    hub = Hub(store_dir)
    first = add(hub, "colors", tiny_data, tiny_base, gate=0.02)
    assert first["gate"]["passed"] and hub.show("colors@production")["version"] == 1
    assert hub.store.gate() is None  # --gate applies to one add-task; `store gate` sets a default

    # colors' red texts again under a second name, where red is nearly every row: the router
    # now sends red texts to the copycat, and colors' routed accuracy drops by about half.
    rows = tiny_rows("colors", 40, seed=1)
    copycat = write_csv(tmp_path / "copycat.csv", [r for r in rows if r[1] == "red"]
                        + [r for r in rows if r[1] == "blue"][:3])
    ahl("store", "gate", "0.02", "--store", store_dir)
    before = {t["task"]: t["version"] for t in hub.tasks()}
    result = ahl("add-task", "copycat", "--train", copycat, "--test", tiny_data["colors"]["test"],
                 "--base", tiny_base, "--epochs", "1", "--store", store_dir, ok=False)
    assert result.exit_code == 3, result.stderr
    assert "colors" in result.stderr and "kept as a candidate" in result.stderr
    assert result.stderr.count("\n") == 1

    hub = Hub(store_dir)
    held = hub.show("copycat@1")
    assert held["status"] == "held" and held["held"]["regressions"][0]["task"] == "colors"
    table = ahl("store", "show", "copycat@1", "--store", store_dir).stdout  # as the README says
    assert "held" in table and "held by gate" in table and "colors" in table
    assert {t["task"]: t["version"] for t in hub.tasks()} == {**before, "copycat": None}
    assert routed_tasks(hub, "colors") == {"colors"}  # routing still serves production only
    # The held candidate answers when named with its version, before a person promotes it.
    texts = [t for t, _ in tiny_rows("colors", 4, seed=7)]
    tried = hub.predict(texts, task="copycat@1")
    assert [(a["task"], a["adapters"]) for a in tried] == [
        ("copycat", [{"task": "copycat", "version": 1, "weight": 1.0}])] * len(texts)
    assert {a["label"] for a in tried} <= {"red", "blue"}
    with pytest.raises(AhlError, match="'copycat' has no serving version .* --task copycat@1"):
        hub.predict(texts, task="copycat")  # unnamed, only what serves

    hub.promote("copycat", 1, "production")  # a person overrides the gate
    assert "copycat" in routed_tasks(Hub(store_dir), "colors")


def test_aliases_never_name_a_removed_version(store_dir, tiny_data, tiny_base):
    hub = Hub(store_dir)
    add(hub, "colors", tiny_data, tiny_base)
    add(hub, "colors", tiny_data, tiny_base)
    hub.remove("colors@2")
    assert hub.show("colors@latest")["version"] == 1  # MLflow's own "latest" still says 2
    # rm drops a version's aliases; one set again by hand (the MLflow UI) is not followed
    hub.store.client.set_registered_model_alias(hub.store.model_name("colors"), "candidate", "2")
    with pytest.raises(AhlError, match="colors@candidate points at version 2, removed"):
        hub.show("colors@candidate")
    for alias in ("latest", "v3"):  # names MLflow keeps for itself: its error was a traceback
        with pytest.raises(AhlError, match="is reserved by MLflow"):
            hub.promote("colors", 1, alias)


def test_a_gate_outside_zero_to_one_is_refused(store_dir, tiny_data, tiny_base):
    result = ahl("store", "gate", "2", "--store", store_dir, ok=False)
    assert result.exit_code == 1 and "between 0 and 1" in result.stderr
    result = ahl("store", "gate", "0.05", "--off", "--store", store_dir, ok=False)
    assert result.exit_code == 1 and "contradict each other" in result.stderr


def test_a_failure_after_the_commit_point_is_finished_by_the_next_writer(store_dir, tiny_data,
                                                                       tiny_base, monkeypatch):
    import adapterhub_local.commit as commit_module

    hub = Hub(store_dir)
    add(hub, "colors", tiny_data, tiny_base, gate=0.02)
    sync, calls = commit_module.sync_router, []

    def fail_in_finalize(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("registry went away")
        return sync(*args)

    monkeypatch.setattr(commit_module, "sync_router", fail_in_finalize)
    with pytest.raises(OSError):
        add(hub, "colors", tiny_data, tiny_base, gate=0.02)
    monkeypatch.undo()
    # The step was committed, so its version counts; the router's alias was left behind, and
    # the next writer (here: the doctor) finishes the commit.
    hub = Hub(store_dir)
    assert len(hub.metrics()["modes"]["oracle"]["matrix"]) == 2
    assert [t["version"] for t in hub.tasks()] == [2]
    assert sorted(line.split(":")[0] for line in hub.doctor()["repaired"]) == ["_router@2", "colors@2"]
    assert hub.show("colors@production")["version"] == 2 and not hub.store.pending_versions()
    answers = hub.predict([t for t, _ in tiny_rows("colors", 3, seed=7)])
    assert {a["version"] for answer in answers for a in answer["adapters"]} == {2}


def test_removing_the_last_serving_version_serves_nothing_until_a_new_one(store_dir, tiny_data,
                                                                           tiny_base):
    hub = Hub(store_dir)
    add(hub, "colors", tiny_data, tiny_base)
    hub.remove("colors@1")
    hub = Hub(store_dir)
    assert hub.tasks() == []
    result = ahl("predict", "red crimson", "--store", store_dir, ok=False)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    added = add(hub, "animals", tiny_data, tiny_base)  # the removed version stays removed
    assert added["tasks"] == ["colors", "animals"] and added["row"][0] is None
    assert [t["task"] for t in Hub(store_dir).tasks()] == ["animals"]
    assert routed_tasks(Hub(store_dir), "colors") <= {"animals", None}


def test_a_promote_killed_before_its_router_refit_is_finished_by_the_next_writer(
        store_dir, tiny_data, tiny_base, monkeypatch):
    import adapterhub_local.commit as commit_module

    hub = Hub(store_dir)
    add(hub, "colors", tiny_data, tiny_base)
    add(hub, "colors", tiny_data, tiny_base)
    monkeypatch.setattr(commit_module, "sync_router", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        hub.promote("colors", 1, "production")
    monkeypatch.undo()
    hub = Hub(store_dir)
    assert hub.doctor()["repaired"][-1].startswith("colors: the router refit")
    answers = hub.predict([t for t, _ in tiny_rows("colors", 3, seed=7)])
    assert {a["version"] for answer in answers for a in answer["adapters"]} == {1}
    assert hub.doctor()["repaired"] == []

"""Two bundled tasks through the CLI with the real all-MiniLM-L6-v2 base (about a minute)."""

import json
from pathlib import Path

import pytest

from test_cli import ahl

TASKS = Path(__file__).resolve().parent.parent / "tasks"
pytestmark = pytest.mark.integration


def test_two_bundled_tasks_on_the_real_base(store_dir):
    for task in ("chat_language", "wordnet_actions"):
        result = json.loads(ahl("add-task", "--spec", TASKS / f"{task}.toml", "--epochs", "1",
                                "--store", store_dir, "--json").stdout)
        assert result["task"] == task
    shown = json.loads(ahl("store", "show", "wordnet_actions", "--json", "--store",
                           store_dir).stdout)
    assert shown["base"]["name"] == "all-MiniLM-L6-v2"
    assert shown["after"] == [{"task": "chat_language", "version": 1}]
    oracle = json.loads(ahl("metrics", "--json", "--store", store_dir).stdout)["modes"]["oracle"]
    # One epoch on the real base already learns both (chance: 33% and 20%).
    assert oracle["matrix"][1][0] > 0.9 and oracle["matrix"][1][1] > 0.6
    assert oracle["matrix"][0][0] == oracle["matrix"][1][0] and oracle["bwt"] == 0

    # The router, with no task given: mixed test texts of both tasks from a file.
    import csv

    mixed, truth = store_dir.parent / "mixed.txt", []
    lines = []
    for task in ("chat_language", "wordnet_actions"):
        with open(TASKS / "data" / task / "test.csv", encoding="utf-8") as f:
            rows = [r["text"] for r in csv.DictReader(f)][:100]
        lines += rows
        truth += [task] * len(rows)
    mixed.write_text("\n".join(lines), encoding="utf-8")
    answers = json.loads(ahl("predict", "--file", mixed, "--json", "--store", store_dir).stdout)
    assert len(answers) == len(truth)
    routed_right = sum(a["task"] == t for a, t in zip(answers, truth)) / len(truth)
    assert routed_right >= 0.95, routed_right
    composed = json.loads(ahl("predict", "--file", mixed, "--mode", "composed", "--json",
                              "--store", store_dir).stdout)
    assert all(abs(sum(x["weight"] for x in a["adapters"]) - 1) < 1e-6 for a in composed if a["task"])

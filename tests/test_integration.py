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

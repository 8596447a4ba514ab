"""ahl store import: adapters trained by a plain peft script (here, without ahl) become versions
of tasks, answer exactly as the script's model does, and are routed, gated and measured for
forgetting like adapters ahl trains; bad folders are one line and change nothing."""

import json
import shutil

import pytest
import torch

from adapterhub_local import Hub
from adapterhub_local.base import load_base
from adapterhub_local.inference import adapter_name, bank_for
from conftest import file_digest, plain_greedy, tiny_rows, write_csv
from test_cli import ahl


def peft_script_classifier(base: str, train_csv, folder, epochs: int = 30) -> list[str]:
    """What a user's notebook does: LoRA on AutoModel, a linear head over mean-pooled states,
    AdamW, save_pretrained, the head saved beside it. Its labels, in the head's order."""
    import csv

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(1)
    rows = list(csv.DictReader(open(train_csv, encoding="utf-8")))
    labels = sorted({r["label"] for r in rows}, reverse=True)  # not ahl's (sorted) order
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModel.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    head = torch.nn.Linear(model.config.hidden_size, len(labels))
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    target = torch.tensor([labels.index(r["label"]) for r in rows])
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(head(pooled(model, batch)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    save_file(head.state_dict(), folder / "head.safetensors")
    (folder / "labels.json").write_text(json.dumps(labels))
    return labels


def pooled(model, batch):
    mask = batch["attention_mask"].unsqueeze(-1)
    return (model(**batch).last_hidden_state * mask).sum(1) / mask.sum(1)


@pytest.fixture(scope="module")
def imported_store(tmp_path_factory, two_task_store, tiny_data, tiny_base):
    """colors and animals (trained by ahl), then moods imported from a plain peft script's
    folder with its head, under a forgetting gate."""
    folder = tmp_path_factory.mktemp("imported")
    shutil.copytree(two_task_store, folder / "store")
    peft_folder = folder / "moods_peft"
    peft_script_classifier(tiny_base, tiny_data["moods"]["train"], peft_folder)
    result = json.loads(ahl("store", "import", "moods", peft_folder, "--train",
                            tiny_data["moods"]["train"], "--test", tiny_data["moods"]["test"],
                            "--gate", "0.5", "--json", "--store", folder / "store").stdout)
    return folder / "store", peft_folder, result


def test_an_adapter_from_a_peft_script_is_routed_gated_and_answers_as_the_script(
        imported_store, tiny_base, tiny_data):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    store, peft_folder, result = imported_store
    assert result["task"] == "moods" and result["version"] == 1 and result["method"] == "lora"
    assert result["step"] == 3 and result["gate"]["passed"] and result["serving"]
    assert result["origin"]["folder"] == "moods_peft" and result["origin"]["peft_type"] == "LORA"
    assert result["accuracy"] >= 0.9  # the script's adapter learned moods; ahl measured it
    assert not staged_left()  # the version serves from its stored files

    shown = json.loads(ahl("store", "show", "moods", "--json", "--store", store).stdout)
    assert shown["origin"] == result["origin"] and shown["labels"] == ["sad", "happy"]
    table = ahl("store", "show", "moods", "--store", store).stdout  # the table says so too
    assert "imported from" in table and "moods_peft (LORA)" in table and "live" in table
    assert [a["task"] for a in shown["after"]] == ["colors", "animals"]
    metrics = Hub(store).metrics()
    assert metrics["tasks"] == ["colors", "animals", "moods"]
    assert len(metrics["modes"]["routed"]["matrix"]) == 3  # a step like any add-task's

    # Routed without a task: each text reaches its task, moods through the imported adapter.
    texts = [t for t, _ in tiny_rows("moods", 3, seed=7)] + [t for t, _ in tiny_rows("colors", 1, seed=7)]
    answers = Hub(store).predict(texts)
    assert [a["task"] for a in answers] == ["moods"] * 6 + ["colors"] * 2
    # The imported version answers exactly as the script's own model with its head.
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_base), peft_folder).eval()
    head = torch.nn.Linear(32, 2)
    head.load_state_dict(load_file(peft_folder / "head.safetensors"))
    with torch.no_grad():
        script = head(pooled(model, tokenizer(texts[:6], padding=True, return_tensors="pt")))
    hub = Hub(store)
    name = adapter_name("moods", hub.store.resolve("moods").run_id)
    ahl_probs = torch.stack(bank_for(load_base(tiny_base)).probabilities(texts[:6], [name] * 6))
    torch.testing.assert_close(ahl_probs, script.softmax(-1), rtol=1e-4, atol=1e-5)


def test_a_headless_adapter_gets_a_head_fitted_from_the_rows(imported_store, tiny_data, tmp_path):
    store, peft_folder, _ = imported_store
    store_copy = tmp_path / "store"
    shutil.copytree(store, store_copy)
    bare = tmp_path / "bare"
    shutil.copytree(peft_folder, bare, ignore=shutil.ignore_patterns("head.safetensors",
                                                                    "labels.json"))
    result = json.loads(ahl("store", "import", "moods", bare, "--train",
                            tiny_data["moods"]["train"], "--test", tiny_data["moods"]["test"],
                            "--json", "--store", store_copy).stdout)
    assert result["version"] == 2 and result["parent"] == 1
    assert result["accuracy"] >= 0.9 and result["val_accuracy"] >= 0.75  # a head that works


def test_a_causal_lm_adapter_imports_as_a_generate_task_and_decodes_as_peft(
        store_dir, tiny_llama, tmp_path):
    """A LoRA saved from AutoModelForCausalLM (weights named under `model.`) decodes in ahl as
    the same adapter does in plain peft, greedy, token by token."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                      task_type="CAUSAL_LM"))
    with torch.no_grad():  # an adapter that changes what the base says
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.5 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "gen")
    rows = [(t, label) for t, label in tiny_rows("animals", 4, seed=3)]
    train = write_csv(tmp_path / "gen.csv", rows, ("prompt", "completion"))
    result = json.loads(ahl("store", "import", "animal_words", tmp_path / "gen", "--kind",
                            "generate", "--train", train, "--json", "--store", store_dir).stdout)
    assert result["kind"] == "generate" and result["version"] == 1

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = [t for t, _ in rows[:3]]
    budget = json.loads(ahl("store", "show", "animal_words", "--json", "--store",
                            store_dir).stdout)["generate"]["max_new_tokens"]
    model.eval()
    answers = Hub(store_dir).predict(prompts, task="animal_words")
    assert [a["completion"] for a in answers] == plain_greedy(model, tokenizer, prompts, budget)
    assert len({a["completion"] for a in Hub(store_dir).predict(prompts, task="animal_words")}) > 1


def staged_left() -> list[str]:
    """Adapters an import staged in this process's banks and left behind."""
    from adapterhub_local.inference import _banks

    return [name for bank in _banks.values() for model in bank.groups.values()
            for name in model.peft_config if name.startswith("import-")]


def bad_folders(tmp_path, good):
    """name -> a broken copy of the good import folder."""
    def copy(name, drop=(), config=None, head=None):
        folder = tmp_path / name
        shutil.copytree(good, folder, ignore=shutil.ignore_patterns(*drop))
        if config:
            data = json.loads((folder / "adapter_config.json").read_text())
            (folder / "adapter_config.json").write_text(json.dumps({**data, **config}))
        if head:
            from safetensors.torch import save_file
            save_file({"weight": torch.zeros(3, 32), "bias": torch.zeros(3)},
                      folder / "head.safetensors")
        return folder
    return copy


@pytest.mark.parametrize("case, message", [
    ("no_config", "no adapter_config.json"),
    ("unknown_type", "peft type 'VERA'"),
    ("pickle", "adapter_model.bin (pickle)"),
    ("head_size", "labels over base"),
    ("other_base", "made for base"),
    ("other_shapes", "does not load on base"),
    ("corrupt_weights", "not a readable safetensors file"),
    ("labels_not_a_list", "not a JSON list"),
])
def test_bad_import_folders_are_one_line_and_change_nothing(case, message, imported_store,
                                                           tiny_data, tiny_llama, tmp_path):
    store, good, _ = imported_store
    copy = bad_folders(tmp_path, good)
    folder = {"no_config": lambda: copy("a", drop=["adapter_config.json"]),
              "unknown_type": lambda: copy("b", config={"peft_type": "VERA"}),
              "pickle": lambda: copy("c", drop=["adapter_model.safetensors"]),
              "head_size": lambda: copy("d", head=True),
              "other_base": lambda: copy("e", config={"base_model_name_or_path": tiny_llama}),
              # a folder that names no base, with weights for another's shapes
              "corrupt_weights": lambda: copy("g"), "labels_not_a_list": lambda: copy("h"),
              "other_shapes": lambda: copy("f", config={"base_model_name_or_path": None,
                                                        "target_modules": ["query", "value"]}),
              }[case]()
    if case == "pickle":
        (folder / "adapter_model.bin").write_bytes(b"not to be unpickled")
    if case == "corrupt_weights":
        (folder / "adapter_model.safetensors").write_bytes(b"abc")
    if case == "labels_not_a_list":
        (folder / "labels.json").write_text('{"0": "sad", "1": "happy"}')
    if case == "other_shapes":
        from safetensors.torch import load_file, save_file
        weights = load_file(folder / "adapter_model.safetensors")
        save_file({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in weights.items()},
                  folder / "adapter_model.safetensors")
    before = file_digest(store)
    result = ahl("store", "import", "moods", folder, "--train", tiny_data["moods"]["train"],
                 "--store", store, ok=False)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert file_digest(store) == before
    assert not staged_left()


def test_an_imported_version_exports_with_a_card_that_says_where_it_came_from(imported_store,
                                                                              tmp_path):
    store, _, result = imported_store
    ahl("store", "export", "moods", tmp_path / "out", "--store", store)
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "imported from `moods_peft` (peft type LORA" in card
    assert result["origin"]["weights_sha256"] in card and "before it: colors@1, animals@1" in card

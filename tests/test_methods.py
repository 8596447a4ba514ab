"""The whole adapter family: every method trains through add-task, reloads from the store in a
fresh process and answers; mixed batches over methods equal one adapter at a time; the traps
(AdaLoRA's budget, LoftQ's start, QLoRA's 4-bit base, prefix tuning on BERT) are handled."""

import contextlib
import json
import shutil
import subprocess
import sys

import pytest
import torch

from adapterhub_local import AhlError, Hub
from adapterhub_local.base import load_base
from adapterhub_local.inference import adapter_name, bank_for, mean_pool
from adapterhub_local.methods import METHODS, get_method
from conftest import FAST, file_digest, perturbed_adapter, run_export_cards, tiny_rows
from test_cli import ahl
from test_inference import TEXTS

ENCODER_METHODS = [m for m in METHODS if "bert" in METHODS[m].architectures]
DECODER_ONLY = [m for m in METHODS if "bert" not in METHODS[m].architectures]

# In a fresh process: every task's adapter reloads from the store, and the CLI answers for it.
# The weights loaded must have the digest that the version's stored test scores recorded of the
# weights saved (later steps reuse those scores without loading the adapter: serving.Loader).
PREDICT_EACH = """
import json, sys
from typer.testing import CliRunner
from adapterhub_local import Hub
from adapterhub_local.base import load_base
from adapterhub_local.cli import app
from adapterhub_local.inference import adapter_name, bank_for
from adapterhub_local.serving import TEST_ARTIFACT
store, tasks, text = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
hub = Hub(store)
for task in tasks:
    result = CliRunner().invoke(app, ["predict", text, "--task", task, "--json", "--store", store])
    assert result.exit_code == 0, (result.output, repr(result.exception))
    version = hub.store.resolve(task)
    bank = bank_for(load_base(hub.store.base_binding()[0]))
    recorded = hub.store.read_json_artifact(version.run_id, TEST_ARTIFACT)["scores"]
    loaded = bank.digest(adapter_name(task, version.run_id))
    print(json.dumps({"task": task, "answer": json.loads(result.stdout)[0],
                      "digest_kept": loaded == recorded["adapter_digest"]}))
"""


def predict_in_fresh_process(store, tasks: list[str], text: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PREDICT_EACH, str(store), ",".join(tasks), text],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    for row in rows:  # the methods' own word on it, both ways
        assert row["digest_kept"] == get_method(row["task"].replace("_", "-")).reloads_exactly
    return {row["task"]: row["answer"] for row in rows}


def test_methods_json_lists_all_eleven_with_their_options():
    rows = json.loads(ahl("methods", "--json").stdout)
    assert [r["name"] for r in rows] == ["prompt-tuning", "prefix-tuning", "adaption-prompt",
                                         "lora", "qlora", "adalora", "loftq", "loha", "lokr",
                                         "bottleneck", "ia3"]
    by_name = {r["name"]: r for r in rows}
    assert {r["family"] for r in rows} == {"soft-prompt", "lora", "adapter"}
    assert by_name["adaption-prompt"]["architectures"] == ["llama"]
    assert [m for m, r in by_name.items() if r["mixed_batch"]] == ["lora", "qlora", "loftq",
                                                                   "bottleneck"]
    r_option = next(o for o in by_name["lora"]["options"] if o["name"] == "r")
    assert r_option["default"] == 16 and r_option["help"]


@pytest.fixture(scope="module")
def method_stores(tmp_path_factory, store_template, tiny_data, tiny_base, tiny_llama) -> list:
    """Every method trained on animals through add-task, each as a task named after it: the
    encoder methods on the tiny BERT, the decoder-only ones (and LoRA) on the tiny Llama.
    [(store, base, methods)]."""
    folder = tmp_path_factory.mktemp("methods")
    stores = [(folder / "bert", tiny_base, ENCODER_METHODS),
              (folder / "llama", tiny_llama, DECODER_ONLY + ["lora"])]
    for store, base, methods in stores:
        shutil.copytree(store_template, store)
        for method in methods:
            result = Hub(store).add_task(method.replace("-", "_"), tiny_data["animals"]["train"],
                                         tiny_data["animals"]["test"], base=base, method=method,
                                         **FAST)
            assert result["method"] == method and Hub(store).show(result["task"])["method"] == method
    return stores


def test_every_method_trains_stores_reloads_and_answers(method_stores):
    labels = {"cat", "dog", "bird"}
    for store, _, methods in method_stores:
        assert json.loads(ahl("store", "verify", "--json", "--store", store).stdout)["ok"]
        tasks = [m.replace("-", "_") for m in methods]
        answers = predict_in_fresh_process(store, tasks, "the kitten near the nest")
        assert set(answers) == set(tasks)
        assert all(a["label"] in labels and a["task"] == t for t, a in answers.items())


def test_every_method_exports_a_folder_that_loads_without_ahl(method_stores, tmp_path):
    """The card's code, run where ahl cannot be imported, answers as ahl does from the store:
    peft's methods through PeftModel.from_pretrained (QLoRA and LoftQ on a base that
    transformers quantizes to NF4), bottleneck adapters through the card's loader."""
    texts = [t for t, _ in tiny_rows("animals", 2, seed=5)]
    jobs, wanted, bare = [], [], []
    for store, base, methods in method_stores:
        hub = Hub(store)
        bank = bank_for(load_base(base))
        for method in methods:
            task = method.replace("-", "_")
            folder = tmp_path / f"{store.name}_{task}"
            files = hub.export(task, folder)["files"]
            assert ("bottleneck.safetensors" in files) == (method == "bottleneck")
            assert ("adapter_model.safetensors" in files) == (method != "bottleneck")
            version = hub.store.resolve(task)
            name = adapter_name(task, version.run_id)
            bank.remove_adapter(name)  # ahl's answers from the stored files, as exported
            hub.loader.load_version(bank, task, version)
            wanted.append(torch.stack(bank.probabilities(texts, [name] * len(texts))))
            bare.append(bare_probabilities(bank, name, texts))
            jobs.append({"folder": str(folder), "base": base, "texts": texts})
    for job, got, want, plain in zip(jobs, run_export_cards(jobs), wanted, bare):
        torch.testing.assert_close(torch.tensor(got), want, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{job['folder']}: {m}")
        # The adapter moves the answers by more than that tolerance (adaption prompts, gated
        # from zero, least): an export whose weights did not load could not pass.
        assert (want - plain).abs().max() > 1e-4, job["folder"]


def bare_probabilities(bank, name: str, texts: list[str]) -> torch.Tensor:
    """The label probabilities of an adapter's head over its group's base with adapters off
    (4-bit for QLoRA and LoftQ): what an export whose adapter weights did not load answers."""
    batch = bank.base.pad(bank.base.tokenize(texts, 128))
    model = bank.model(name)
    if model.peft_config[name].is_prompt_learning:  # peft's disable_adapter fails on these
        bare, off = model.get_base_model(), contextlib.nullcontext()
    else:
        bare, off = model, model.disable_adapter()
    with torch.no_grad(), off:
        return bank.heads[name](mean_pool(bare(**batch).last_hidden_state, batch)).softmax(-1)


def test_a_mixed_batch_over_methods_equals_one_adapter_at_a_time(tiny_base):
    bank = bank_for(load_base(tiny_base))
    made = []
    for seed, method in enumerate(["lora", "bottleneck", "ia3", "loha", "prompt-tuning",
                                   "prefix-tuning", "lokr", "qlora"]):
        made.append(perturbed_adapter(bank, f"mix-{method}", method,
                                      ["x", "y", "z"][: 2 + seed % 2], seed, 0.3))
    try:
        adapters = [made[i % len(made)] for i in range(2 * len(made))]
        texts = [TEXTS[i % len(TEXTS)] for i in range(len(adapters))]
        mixed = bank.probabilities(texts, adapters)
        alone = [bank.probabilities([t], [a])[0] for t, a in zip(texts, adapters)]
        for got, want in zip(mixed, alone):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # The adapters really differ from each other and from the bare base.
        firsts = [bank.probabilities(TEXTS[:1], [name])[0][:2] for name in made]
        assert len({tuple(round(float(v), 4) for v in p) for p in firsts}) == len(made)
    finally:
        for name in made:
            bank.remove_adapter(name)


def test_adalora_moves_its_rank_budget(store_dir, tiny_data, tiny_base):
    hub = Hub(store_dir)
    hub.add_task("budget", tiny_data["animals"]["train"], base=tiny_base, method="adalora", **FAST)
    config = json.loads((hub.store.adapter_folder(hub.store.resolve("budget"))
                         / "adapter_config.json").read_text())
    kept = [sum(mask) for mask in config["rank_pattern"].values()]
    assert config["total_step"] > 1 and max(kept) > min(kept)  # ranks were reallocated


def test_loftq_starts_closer_to_the_full_precision_base_than_qlora(tiny_base):
    from adapterhub_local.quantize import dequantized, quantize_nf4, size_bytes

    bank = bank_for(load_base(tiny_base))
    for method in ("qlora", "loftq"):
        torch.manual_seed(0)
        config = get_method(method).build(get_method(method).options(r=4), bank.base)
        bank.add_adapter(f"start-{method}", config, ["x", "y"], get_method(method))
    model = bank.model("start-loftq")  # one 4-bit group holds both (same peft type and base)
    assert model is bank.model("start-qlora")
    original = dict(bank.base.model.named_modules())
    errors = {"qlora": 0.0, "loftq": 0.0}
    for name, module in model.get_base_model().named_modules():
        if "start-loftq" in getattr(module, "lora_A", {}):
            W, Q = original[name].weight, dequantized(module.get_base_layer())
            for method in errors:
                a = f"start-{method}"
                delta = module.lora_B[a].weight @ module.lora_A[a].weight * module.scaling[a]
                errors[method] += float((W - Q - delta).norm())
    try:
        assert errors["loftq"] < 0.9 * errors["qlora"]
        four_bit = quantize_nf4(bank.bare_copy(), bank.base.layers_name)
        assert size_bytes(four_bit) < 0.6 * size_bytes(bank.bare_copy())
    finally:
        for method in errors:
            bank.remove_adapter(f"start-{method}")


def test_prefix_tuning_on_bert_trains_its_prefix(tiny_base):
    bank = bank_for(load_base(tiny_base))
    config = get_method("prefix-tuning").build(get_method("prefix-tuning").options(), bank.base)
    bank.add_adapter("prefix-grad", config, ["x", "y"], get_method("prefix-tuning"))
    try:
        batch = bank.base.pad(bank.base.tokenize(TEXTS, 32))
        bank.model("prefix-grad").train()
        bank.logits("prefix-grad", batch).logsumexp(-1).sum().backward()
        prefix = [p for n, p in bank.model("prefix-grad").named_parameters() if p.requires_grad]
        assert prefix and all(p.grad is not None and p.grad.abs().sum() > 1e-4 for p in prefix)
    finally:
        bank.remove_adapter("prefix-grad")


def test_target_modules_from_the_command_line_are_a_list_peft_takes(tiny_base):
    from adapterhub_local.methods import get_method, method_options

    options = method_options("lora", {"target_modules": "query,value"})
    assert options.target_modules == ["query", "value"]  # was the string "query,value"
    config = get_method("lora").build(options, load_base(tiny_base))
    assert set(config.target_modules) == {"query", "value"} and config.layers_to_transform == [1]
    with pytest.raises(AhlError, match="target_modules=5 is not of type list"):
        method_options("lora", {"target_modules": 5})  # a spec's typed value


@pytest.mark.parametrize("args, message", [
    (["--method", "dora"], "unknown method 'dora': use one of"),
    (["--method", "lora", "--method-arg", "rank=4"], "has no option rank: its options are r,"),
    (["--method", "lora", "--method-arg", "r=four"], "is not of type int"),
    (["--method", "adaption-prompt"], "does not work on 'bert' bases (it supports llama)"),
    (["--method", "bottleneck", "--method-arg", "variant=middle"], "houlsby or pfeiffer"),
    # peft would fail only once training started (a failed run left behind)
    (["--method", "lora", "--method-arg", "target_modules=nosuch"],
     "'nosuch' match no module of the base: name some of its linear layers, e.g."),
    (["--method", "ia3", "--method-arg", "target_modules=nosuch"], "match no module of the base"),
    (["--method", "lora", "--method-arg", "alpha=0"], "alpha must be positive, got 0"),
])
def test_bad_method_input_is_one_line_and_changes_nothing(store_dir, tiny_data, tiny_base, args,
                                                          message):
    before = file_digest(store_dir)
    result = ahl("add-task", "animals", "--train", tiny_data["animals"]["train"], "--base",
                 tiny_base, "--store", store_dir, *args, ok=False)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr, result.stderr
    assert file_digest(store_dir) == before


def test_saving_an_adapter_never_looks_its_base_up_on_the_hub(tiny_base, tmp_path, monkeypatch):
    """An imported folder names its base by its public id; peft's save looked that up on the
    Hub (a network call, two warnings offline) to decide whether to save embeddings."""
    import peft.utils.save_and_load as save_and_load

    from adapterhub_local.methods import get_method, method_options

    def no_network(*args, **kwargs):
        raise AssertionError("save_pretrained looked the base up on the Hub")

    monkeypatch.setattr(save_and_load, "check_file_exists_on_hf_hub", no_network)
    bank = bank_for(load_base(tiny_base))
    lora = get_method("lora")
    bank.add_adapter("hubless", lora.build(method_options("lora", {}), bank.base), ["x", "y"], lora)
    try:
        bank.model("hubless").peft_config["hubless"].base_model_name_or_path = "someone/not-here"
        bank.save_adapter("hubless", tmp_path / "out")
    finally:
        bank.remove_adapter("hubless")
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()

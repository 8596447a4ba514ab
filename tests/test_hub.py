"""add_task end to end on a tiny random base: frozen base, isolated adapters, lineage, atomicity."""

import hashlib

import pytest
import torch

from adapterhub_local import Hub
from adapterhub_local.base import load_base
from adapterhub_local.errors import AhlError
from conftest import FAST, file_digest


def add(hub, task, tiny_data, tiny_base, **kwargs):
    return hub.add_task(task, tiny_data[task]["train"], tiny_data[task]["test"], base=tiny_base,
                        **{**FAST, **kwargs})


def tensor_digest(tensors: dict) -> str:
    sha = hashlib.sha256()
    for name in sorted(tensors):
        sha.update(name.encode())
        sha.update(tensors[name].detach().contiguous().numpy().tobytes())
    return sha.hexdigest()


def adapter_weights(hub, task, version) -> str:
    from safetensors.torch import load_file

    folder = hub.store.adapter_folder(hub.store.resolve(f"{task}@{version}"))
    return tensor_digest(load_file(folder / "adapter_model.safetensors"))


def base_weights(base) -> str:
    """Digest of the base's own parameters, whether or not peft has wrapped its layers."""
    return tensor_digest({n.replace("base_layer.", ""): p for n, p in base.model.named_parameters()
                          if "lora_" not in n})


def test_three_tasks_learn_and_nothing_is_forgotten(store_dir, tiny_data, tiny_base):
    hub = Hub(store_dir)
    base = load_base(tiny_base)
    base_before = base_weights(base)
    first = add(hub, "colors", tiny_data, tiny_base)
    weights_before = adapter_weights(hub, "colors", 1)
    add(hub, "animals", tiny_data, tiny_base)
    last = add(hub, "moods", tiny_data, tiny_base)

    assert first["accuracy"] >= 0.9  # the tiny tasks are learnable: the adapter really trains
    assert last["tasks"] == ["colors", "animals", "moods"]
    metrics = hub.metrics()["modes"]["oracle"]
    column = [row[0] for row in metrics["matrix"]]
    assert column == [first["accuracy"]] * 3  # the first task's accuracy never moves
    assert metrics["bwt"] == 0.0 and metrics["forgetting"] == 0.0
    assert metrics["matrix"][0][1:] == [None, None]
    assert adapter_weights(hub, "colors", 1) == weights_before
    # The frozen base is unchanged by three trainings (LoRA layers aside).
    assert base_weights(base) == base_before
    # The store is bound to the features its router reads; stores bound before that read "middle".
    from adapterhub_local.inference import ROUTER_FEATURES

    assert hub.store.router_features("unbound") == ROUTER_FEATURES
    assert hub.loader.open_router(tiny_base)[1].features_ == ROUTER_FEATURES
    hub.store.client.delete_experiment_tag(hub.store.experiment_id(), "ahl.router.features")
    assert hub.store.router_features("unbound") == "middle"


def test_a_store_keeps_reading_the_features_it_was_bound_to(store_dir, tiny_data, tiny_base,
                                                             monkeypatch):
    """A store first committed when the router read the middle block goes on reading it after
    the default changes: later tasks' statistics and routers match the earlier ones."""
    import adapterhub_local.plan as plan

    hub = Hub(store_dir)
    monkeypatch.setattr(plan, "ROUTER_FEATURES", "middle")  # the default when it was made
    add(hub, "colors", tiny_data, tiny_base)
    monkeypatch.undo()
    add(hub, "animals", tiny_data, tiny_base)
    assert hub.store.router_features("unbound") == "middle"
    versions = {t: hub.store.current_version(t) for t in ("colors", "animals")}
    assert {hub.loader.task_stats(v).features for v in versions.values()} == {"middle"}
    assert hub.loader.open_router(tiny_base)[1].features_ == "middle"
    import csv

    texts = {t: [row["text"] for row in csv.DictReader(open(tiny_data[t]["test"], encoding="utf-8"))]
             for t in ("colors", "animals")}
    for task, rows in texts.items():  # routed on the middle block's features, as when bound
        assert sum(a["task"] == task for a in hub.predict(rows)) >= 0.9 * len(rows)


def test_same_seed_same_adapter(tmp_path, store_template, tiny_data, tiny_base):
    import shutil

    digests = []
    for name in ("a", "b"):
        shutil.copytree(store_template, tmp_path / name)
        hub = Hub(tmp_path / name)
        add(hub, "colors", tiny_data, tiny_base, seed=7)
        digests.append(adapter_weights(hub, "colors", 1))
    assert digests[0] == digests[1]


def test_second_version_records_its_lineage(store_dir, tiny_data, tiny_base):
    hub = Hub(store_dir)
    add(hub, "colors", tiny_data, tiny_base)
    add(hub, "animals", tiny_data, tiny_base)
    second = add(hub, "colors", tiny_data, tiny_base, epochs=2)
    assert second["version"] == 2 and second["parent"] == 1
    info = hub.show("colors@2")
    assert info["parent"] == 1
    assert info["after"] == [{"task": "animals", "version": 1}]
    assert info["base"]["sha256"] == load_base(tiny_base).sha256
    assert info["data"]["digest"] == hub.show("colors@1")["data"]["digest"]
    assert info["train"]["epochs"] == 2
    assert set(info["files"]) >= {"adapter_config.json", "adapter_model.safetensors",
                                  "head.safetensors", "labels.json"}
    assert hub.show("colors@1")["after"] == []
    assert [t["version"] for t in hub.tasks()] == [2, 1]
    assert len(hub.metrics()["modes"]["oracle"]["matrix"]) == 3


def visible_state(hub) -> dict:
    """What users see of a store: tasks, versions, and the accuracy matrices."""
    return {"tasks": hub.tasks(), "versions": {t: [int(v.version) for v in hub.store.versions(t)]
                                               for t in hub.store.task_names()},
            "metrics": hub.metrics() if hub.store.task_names() else None}


def test_failure_during_registration_leaves_no_version(store_dir, tiny_data, tiny_base, monkeypatch):
    hub = Hub(store_dir)
    add(hub, "colors", tiny_data, tiny_base)
    before = visible_state(hub)

    def broken(*args, **kwargs):
        raise RuntimeError("registry went away")

    monkeypatch.setattr(type(hub.store.client), "create_model_version", broken)
    with pytest.raises(RuntimeError, match="registry went away"):
        add(hub, "animals", tiny_data, tiny_base)
    monkeypatch.undo()
    assert visible_state(hub) == before
    assert "animals" not in hub.store.task_names()
    # The failed run is kept, marked FAILED, for the record; and the store still works.
    runs = hub.store.client.search_runs([hub.store.experiment_id()], "attributes.status = 'FAILED'")
    assert [r.info.run_name for r in runs] == ["animals"]
    assert add(hub, "animals", tiny_data, tiny_base)["version"] == 1


def test_failure_after_registration_rolls_the_version_back(store_dir, tiny_data, tiny_base,
                                                            monkeypatch):
    import adapterhub_local.commit as commit_module

    hub = Hub(store_dir)
    add(hub, "colors", tiny_data, tiny_base)
    before = visible_state(hub)
    # The last thing before the commit point: the step's record is written, then this fails.
    monkeypatch.setattr(commit_module, "commit_step", lambda *a, **k: (_ for _ in ()).throw(
        OSError("disk full")))
    with pytest.raises(OSError):
        add(hub, "colors", tiny_data, tiny_base)
    monkeypatch.undo()
    assert visible_state(hub) == before
    assert hub.store.pending_versions() == []  # rolled back, not merely hidden
    assert add(hub, "colors", tiny_data, tiny_base)["step"] == 2  # steps stay contiguous


def test_ctrl_c_during_training_leaves_the_store_unchanged(store_dir, tiny_data, tiny_base):
    hub = Hub(store_dir)
    add(hub, "colors", tiny_data, tiny_base)
    before = visible_state(hub)

    def interrupt(step, total):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        add(hub, "animals", tiny_data, tiny_base, progress=interrupt)
    assert visible_state(hub) == before
    runs = hub.store.client.search_runs([hub.store.experiment_id()], "attributes.status = 'KILLED'")
    assert len(runs) == 1


def test_another_base_is_refused_and_changes_nothing(store_dir, tiny_data, tiny_base, tmp_path):
    from transformers import BertConfig, BertModel

    hub = Hub(store_dir)
    add(hub, "colors", tiny_data, tiny_base)
    other = tmp_path / "other_base"
    load_base(tiny_base).tokenizer.save_pretrained(other)
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(other)
    before = file_digest(store_dir)
    with pytest.raises(AhlError, match="is bound to base"):
        hub.add_task("animals", tiny_data["animals"]["train"], base=str(other))
    assert file_digest(store_dir) == before


def test_the_gguf_cache_keeps_whole_folders_only_and_never_fails_a_load(tiny_llama, tmp_path,
                                                                        monkeypatch):
    """keep_converted on a tiny causal Llama (as a GGUF load gives one): one whole folder that
    from_pretrained reads to the same weights, written once however often it is called; a
    folder missing a file it lists is not read, and is replaced; a write that fails leaves
    nothing and raises nothing; a killed conversion's old temporary folder is swept. (The
    conversion of a real GGUF file and the load from the folder: test_integration.)"""
    import os
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterhub_local import gguf_cache

    monkeypatch.setenv("AHL_CACHE", "off")
    assert gguf_cache.cache_root() is None and gguf_cache.converted("ab12") is None
    monkeypatch.delenv("AHL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache.cache_root() == tmp_path / "xdg" / "adapterhub-local"

    monkeypatch.setenv("AHL_CACHE", str(tmp_path / "cache"))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    stale = tmp_path / "cache" / "gguf" / ".ab12-1-dead"
    stale.mkdir(parents=True)
    os.utime(stale, (time.time() - 2 * gguf_cache.STALE_S,) * 2)
    gguf_cache.keep_converted("ab12", tmp_path / "x.gguf", model, tokenizer)
    gguf_cache.keep_converted("ab12", tmp_path / "x.gguf", model, tokenizer)  # the same folder
    folder = gguf_cache.converted("ab12")
    assert folder == tmp_path / "cache" / "gguf" / "ab12"
    assert [p.name for p in folder.parent.iterdir()] == ["ab12"]  # the stale one swept too
    again = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))

    (folder / "tokenizer_config.json").unlink()  # deleted by hand: the folder is not read
    assert gguf_cache.converted("ab12") is None
    gguf_cache.keep_converted("ab12", tmp_path / "x.gguf", model, tokenizer)  # and is replaced
    assert gguf_cache.converted("ab12") == folder and (folder / "tokenizer_config.json").is_file()

    def full_disk(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error")  # as safetensors says it

    monkeypatch.setattr("safetensors.torch.save_model", full_disk)
    gguf_cache.keep_converted("cd34", tmp_path / "y.gguf", model, tokenizer)
    assert gguf_cache.converted("cd34") is None
    assert sorted(p.name for p in folder.parent.iterdir()) == ["ab12"]  # no temporary left
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("AHL_CACHE", str(tmp_path / "a_file"))  # unwritable: nothing raised
    gguf_cache.keep_converted("ab12", tmp_path / "x.gguf", model, tokenizer)
    assert gguf_cache.converted("ab12") is None


def test_bad_inputs_leave_the_store_exactly_as_it_was(store_dir, tiny_data, tiny_base):
    hub = Hub(store_dir)
    add(hub, "colors", tiny_data, tiny_base)
    before = file_digest(store_dir)
    bad = [dict(name="animals", train="missing.csv"),
           dict(name="../x", train=tiny_data["animals"]["train"]),
           dict(name="animals", train=tiny_data["animals"]["train"], method="nope"),
           dict(name="animals", train=tiny_data["animals"]["train"], method_args={"r": "x"}),
           dict(name="animals", train=tiny_data["animals"]["train"], epochs=0)]
    for kwargs in bad:
        with pytest.raises(AhlError):
            hub.add_task(**kwargs, base=tiny_base)
    assert file_digest(store_dir) == before


def test_queries_on_an_empty_store_name_add_task(tmp_path):
    hub = Hub(tmp_path / "nothing")
    assert hub.tasks() == []
    with pytest.raises(AhlError, match="ahl add-task"):
        hub.metrics()
    with pytest.raises(AhlError, match="no task 'x'"):
        hub.show("x@1")
    assert not (tmp_path / "nothing").exists()  # reads create nothing


def test_importing_and_using_the_library_leaves_the_process_as_it_was(store_dir, tiny_data,
                                                                      tiny_base):
    """A notebook's environment, warning filters and logging are its own: nothing of ours is
    set on import, nor by an add-task and a prediction."""
    import subprocess
    import sys

    script = f"""
import logging, os, warnings
# Their own imports add filters of theirs (torch, numpy): the baseline is after them.
import datasets, mlflow, mlflow.artifacts, numpy, peft, safetensors, sklearn, torch, transformers
def state():
    return (dict(os.environ), list(warnings.filters),
            {{n: logging.getLogger(n).level for n in ("mlflow", "alembic", "bitsandbytes", "")}})
before = state()
from adapterhub_local import Hub
assert state() == before, "import"
hub = Hub({str(store_dir)!r})
hub.add_task("colors", {str(tiny_data["colors"]["train"])!r}, base={tiny_base!r}, epochs=1)
hub.predict(["red crimson"])
assert state() == before, "use"
print("unchanged")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "unchanged", done.stderr[-2000:]


def test_a_notebooks_first_base_prints_no_warnings_of_an_optional_kernel(tiny_base):
    """peft imports bitsandbytes, which on CPUs with AVX512-BF16 looks for an optional kernel
    and warns where it is missing: ahl's first import of peft, when a base loads (before any
    adapter trains or answers), keeps that off a notebook's output (elsewhere there is nothing
    to warn about and this passes as it is)."""
    import subprocess
    import sys

    script = f"""
import sys
from adapterhub_local.base import load_base
load_base({tiny_base!r})
print("peft" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]
    assert "publisher trust check" not in done.stderr and "gemm_4bit" not in done.stderr


def test_epochs_not_given_are_chosen_for_the_tasks_size(store_dir, tiny_data, tiny_base):
    """No epochs on the command line or in the spec: a small classify task trains the most that
    trainer.auto_epochs gives (a spec's or the command line's epochs are kept: test_cli, above)."""
    hub = Hub(store_dir)
    hub.add_task("colors", tiny_data["colors"]["train"], tiny_data["colors"]["test"],
                 base=tiny_base, lr=5e-3, batch_size=16)
    assert hub.show("colors@1")["train"]["epochs"] == 5

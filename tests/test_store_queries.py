"""Store queries: aliases, PEFT export, checksum verification."""

import json

import pytest
import torch

from adapterhub_local import Hub
from adapterhub_local.base import load_base
from adapterhub_local.errors import AhlError
from adapterhub_local.inference import adapter_name, bank_for, mean_pool
from conftest import FAST, file_digest, tiny_rows
from test_cli import ahl


@pytest.fixture
def store_with_versions(store_dir, tiny_data, tiny_base):
    hub = Hub(store_dir)
    for task in ("colors", "animals", "colors"):
        hub.add_task(task, tiny_data[task]["train"], tiny_data[task]["test"], base=tiny_base, **FAST)
    return store_dir


def test_versions_promote_and_resolve_an_alias(store_with_versions):
    store = store_with_versions
    versions = json.loads(ahl("store", "versions", "colors", "--json", "--store", store).stdout)
    assert [v["version"] for v in versions] == [1, 2]
    ahl("store", "promote", "colors", "1", "--alias", "production", "--store", store)
    shown = json.loads(ahl("store", "show", "colors@production", "--json", "--store", store).stdout)
    assert shown["version"] == 1 and shown["aliases"] == ["production"]
    before = file_digest(store)
    for args, message in [(["colors", "7", "--alias", "production"], "has no version 7"),
                          (["colors", "1", "--alias", "prod uction"], "not a plain name"),
                          (["ghost", "1", "--alias", "production"], "no task 'ghost'")]:
        result = ahl("store", "promote", *args, "--store", store, ok=False)
        assert result.exit_code == 1 and message in result.stderr and result.stderr.count("\n") == 1
    assert file_digest(store) == before


def test_export_loads_with_peft_and_gives_the_same_outputs(store_with_versions, tiny_base, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    hub = Hub(store_with_versions)
    out = tmp_path / "export"
    info = json.loads(ahl("store", "export", "colors@2", out, "--json", "--store",
                          store_with_versions).stdout)
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors",
            "labels.json"} <= set(info["files"])

    model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_base), out).eval()
    head = torch.nn.Linear(32, 2)
    head.load_state_dict(load_file(out / "head.safetensors"))
    texts = [t for t, _ in tiny_rows("colors", 4, seed=11)]
    bank = bank_for(load_base(tiny_base))
    batch = bank.base.pad(bank.base.tokenize(texts, 128))
    with torch.no_grad():
        exported = head(mean_pool(model(**batch).last_hidden_state, batch)).softmax(-1)
    version = hub.store.resolve("colors@2")
    stored = torch.stack(bank.probabilities(texts, [adapter_name("colors", version.run_id)] * len(texts)))
    torch.testing.assert_close(exported, stored, rtol=1e-5, atol=1e-6)
    assert json.loads((out / "labels.json").read_text()) == ["blue", "red"]


def test_export_carries_a_model_card_filled_from_the_store(store_with_versions, tmp_path):
    import yaml

    store = store_with_versions
    out = tmp_path / "card"
    ahl("store", "export", "colors@2", out, "--store", store)
    card = (out / "README.md").read_text(encoding="utf-8")
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    meta = yaml.safe_load(front)  # valid YAML front matter, as a model hub reads it
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-classification"
    assert {"adapterhub-local", "lora", "classify"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local folder base has no public id to name
    shown = json.loads(ahl("store", "show", "colors@2", "--json", "--store", store).stdout)
    for fact in ("# colors, version 2: a lora adapter", "blue, red", shown["base"]["sha256"],
                 shown["data"]["digest"], "colors_train.csv + colors_test.csv",
                 f"test accuracy: {100 * shown['metrics']['test_accuracy']:.1f}%",
                 "at step 3 of the store's sequence", "| animals |", "parent version: 1",
                 "before it: animals@1", "PeftModel.from_pretrained", "licence: not recorded",
                 "[More Information"):
        assert (fact in body) == (fact != "[More Information"), fact  # not peft's empty template
    assert str(tmp_path.parent) not in card and "/tmp/" not in card  # no local paths


def test_a_cards_licence_comes_from_the_task_spec(store_dir, tiny_data, tiny_base, tmp_path):
    spec = tmp_path / "colors.toml"
    spec.write_text(f'name = "colors"\ntrain = "{tiny_data["colors"]["train"].as_posix()}"\n'
                    'license = "CC-BY-4.0 (the colour survey)"\nepochs = 1\n')
    Hub(store_dir).add_task(spec=spec, base=tiny_base)
    assert Hub(store_dir).show("colors")["data"]["license"] == "CC-BY-4.0 (the colour survey)"
    ahl("store", "export", "colors", tmp_path / "out", "--store", store_dir)
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "- licence: CC-BY-4.0 (the colour survey)" in card


def test_export_refuses_a_non_empty_folder_unless_forced(store_with_versions, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "bottleneck_config.json").write_text("{}")  # an earlier export of another method's
    result = ahl("store", "export", "colors", out, "--store", store_with_versions, ok=False)
    assert result.exit_code == 1 and "not an empty folder" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["bottleneck_config.json", "keep.txt"]
    ahl("store", "export", "colors", out, "--force", "--store", store_with_versions)
    assert (out / "adapter_model.safetensors").is_file() and (out / "keep.txt").is_file()
    assert not (out / "bottleneck_config.json").exists()  # stale: it would mislead a loader


def test_verify_reports_altered_and_missing_files(store_with_versions):
    hub = Hub(store_with_versions)
    assert hub.verify() == []
    assert "matches" in ahl("store", "verify", "--store", store_with_versions).stdout
    folder = hub.store.adapter_folder(hub.store.resolve("colors@1"))
    (folder / "head.safetensors").write_bytes(b"tampered")
    (hub.store.adapter_folder(hub.store.resolve("animals@1")) / "labels.json").unlink()
    result = ahl("store", "verify", "--json", "--store", store_with_versions, ok=False)
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and not report["ok"]
    assert any("colors@1: head.safetensors altered" in p for p in report["problems"])
    assert any("animals@1: labels.json missing" in p for p in report["problems"])
    with pytest.raises(AhlError, match="run ahl store verify"):
        hub.export("colors@1", store_with_versions.parent / "out")

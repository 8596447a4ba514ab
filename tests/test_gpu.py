"""The CUDA path: training, the 4-bit methods and routed prediction on a GPU. Skipped where there
is no CUDA device, a failure there when AHL_REQUIRE_GPU=1 (a GPU runner that lost its GPU)."""

import os

import pytest
import torch

from adapterhub_local import Hub
from conftest import FAST, refuse, tiny_rows

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("AHL_REQUIRE_GPU") != "1",
    reason="no CUDA device (AHL_REQUIRE_GPU=1 makes this a failure)")


def test_cuda_trains_and_predicts_like_the_cpu(store_template, tmp_path, tiny_data, tiny_base):
    import shutil

    texts = [t for t, _ in tiny_rows("colors", 10, seed=21) + tiny_rows("animals", 10, seed=22)]
    answers = {}
    for device in ("cpu", "cuda"):
        shutil.copytree(store_template, tmp_path / device)
        hub = Hub(tmp_path / device, device=device)
        for task in ("colors", "animals"):
            result = hub.add_task(task, tiny_data[task]["train"], tiny_data[task]["test"],
                                  base=tiny_base, **FAST)
            assert hub.store.client.get_run(result["run_id"]).data.params["device"] == device
        hub.drawing.join()
        answers[device] = hub.predict(texts)
    agree = sum(a["label"] == b["label"] and a["task"] == b["task"]
                for a, b in zip(answers["cpu"], answers["cuda"]))
    assert agree >= 0.9 * len(texts)  # bf16 autocast on the GPU: near, not bit-equal


@pytest.mark.parametrize("method", ["qlora", "loftq"])
def test_4bit_methods_train_on_cuda(method, store_dir, tiny_data, tiny_base):
    hub = Hub(store_dir, device="cuda")
    result = hub.add_task("colors", tiny_data["colors"]["train"], tiny_data["colors"]["test"],
                          base=tiny_base, method=method, **FAST)
    hub.drawing.join()
    assert result["accuracy"] > 0.5
    params = hub.store.client.get_run(result["run_id"]).data.params
    assert (params["device"], params["method"]) == ("cuda", method)


def test_mixed_batches_on_cuda_match_pefts_loop(tiny_base, monkeypatch):
    """On the GPU a batch over more than DEVICE_MAX_RUNS adapters gathers its rows' weights (the
    CPU would take a product pair per run), and one adapter alone uses its own weights: both
    equal peft's own loop there, each adapter scaled by its own alpha. The probabilities of a
    mixed call (one copy off the GPU a batch) equal those of one adapter at a time."""
    from peft import LoraConfig

    from adapterhub_local import lora_batch
    from adapterhub_local.base import load_base
    from adapterhub_local.inference import bank_for
    from adapterhub_local.methods import get_method

    bank = bank_for(load_base(tiny_base, device="cuda"))
    adapters = ["gpu_a", "gpu_b", "gpu_c"]
    texts = [t for t, _ in tiny_rows("animals", 4, seed=5)]  # 12 texts
    mixed = sorted((["__base__"] + adapters) * 3)  # ordered, as probabilities orders rows
    assert len(lora_batch.adapter_runs(mixed)) > lora_batch.DEVICE_MAX_RUNS
    try:
        for seed, name in enumerate(adapters):
            torch.manual_seed(seed)
            bank.add_adapter(name, LoraConfig(r=4, lora_alpha=8 + 4 * seed, init_lora_weights=False,
                                              target_modules=["query", "value", "output.dense"]),
                             ["x", "y"], get_method("lora"))
        model = bank.evaluating("gpu_a")
        batch = bank.base.pad(bank.base.tokenize(texts, 32))
        outputs = {}
        with torch.inference_mode():
            with monkeypatch.context() as patched:
                patched.setattr(lora_batch, "add_product_", refuse)  # no product pair per run
                with lora_batch.frozen(adapters), lora_batch.rows(model, mixed):
                    outputs["mixed"] = model(**batch).last_hidden_state
            with lora_batch.frozen(adapters), lora_batch.rows(model, ["gpu_b"] * len(texts)):
                outputs["one"] = model(**batch).last_hidden_state
            with lora_batch.uninstalled(model):  # peft's own loop
                for kind, names in (("mixed", mixed), ("one", ["gpu_b"] * len(texts))):
                    looped = model(**batch, adapter_names=names).last_hidden_state
                    assert outputs[kind].is_cuda
                    torch.testing.assert_close(outputs[kind], looped, rtol=1e-4, atol=1e-4)
        given = [adapters[i % 3] for i in range(len(texts))]
        together = bank.probabilities(texts, given)
        for name in adapters:
            rows = [i for i, g in enumerate(given) if g == name]
            alone = bank.probabilities([texts[i] for i in rows], [name] * len(rows))
            for i, p in zip(rows, alone):
                assert not together[i].is_cuda
                torch.testing.assert_close(together[i], p, rtol=1e-4, atol=1e-5)
    finally:
        for name in adapters:
            bank.remove_adapter(name)

"""The CUDA path: training, the 4-bit methods and routed prediction on a GPU. Skipped where there
is no CUDA device, a failure there when AHL_REQUIRE_GPU=1 (a GPU runner that lost its GPU)."""

import os

import pytest
import torch

from adapterhub_local import Hub
from conftest import FAST, tiny_rows

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

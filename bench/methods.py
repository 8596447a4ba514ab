"""Every adapter method on one bundled task with the real MiniLM base, plus full fine-tuning.

Each row runs in its own process (so peak memory is that method's): train on the task's
training rows with the defaults (3 epochs, lr 2e-3, batch 32, seed 0; full fine-tuning at lr 5e-5,
the usual rate for a whole BERT), then score its test split. Columns: test accuracy, trainable
parameters, adapter size on disk (the PEFT files and the head, as stored), train seconds, peak
resident memory of the process. Also the base's size in fp32 and in NF4 (QLoRA, LoftQ).

    .venv/bin/python bench/methods.py [--task wordnet_things] [--methods lora,ia3,...]
"""

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TASKS = Path(__file__).resolve().parent.parent / "tasks"
FULL = "full fine-tuning"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_method(method: str, task: str) -> dict:
    from adapterhub_local import Hub

    with tempfile.TemporaryDirectory() as tmp:
        hub = Hub(Path(tmp) / "store")
        result = hub.add_task(spec=TASKS / f"{task}.toml", method=method)
        folder = hub.store.adapter_folder(hub.store.resolve(task))
        size = sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")
    return {"method": method, "accuracy": result["accuracy"],
            "trainable_params": result["trainable_params"], "size_kb": size / 1024,
            "train_seconds": result["train_seconds"], "peak_mb": peak_mb()}


def run_full(task: str) -> dict:
    """The reference the PEFT literature measures against: every weight of the base trains."""
    import random

    import torch

    from adapterhub_local.base import load_base
    from adapterhub_local.data import load_spec, load_task_data
    from adapterhub_local.inference import length_batches, mean_pool
    from adapterhub_local.trainer import TrainOptions, length_grouped_batches, split_validation

    spec = load_spec(TASKS / f"{task}.toml")
    data = load_task_data(task, spec.train, spec.test)
    options = TrainOptions(lr=5e-5)
    base = load_base()
    torch.manual_seed(options.seed)
    model = copy.deepcopy(base.model).requires_grad_(True)
    head = torch.nn.Linear(base.hidden_size, len(data.labels))
    rows, _ = split_validation(data.train_labels, options.seed)
    ids = base.tokenize([data.train_texts[i] for i in rows], options.max_length)
    labels = torch.tensor([data.train_labels[i] for i in rows])
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    rng, started = random.Random(options.seed), time.perf_counter()
    model.train()
    for _ in range(options.epochs):
        for batch_rows in length_grouped_batches([len(x) for x in ids], options.batch_size, rng):
            batch = base.pad([ids[i] for i in batch_rows])
            loss = torch.nn.functional.cross_entropy(
                head(mean_pool(model(**batch).last_hidden_state, batch)), labels[batch_rows])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    model.eval()
    test_ids = base.tokenize(data.test_texts, options.max_length)
    right = 0
    with torch.inference_mode():
        for batch_rows in length_batches(test_ids, range(len(test_ids)), 64):
            batch = base.pad([test_ids[i] for i in batch_rows])
            predicted = head(mean_pool(model(**batch).last_hidden_state, batch)).argmax(-1)
            right += sum(int(p) == data.test_labels[i] for p, i in zip(predicted, batch_rows))
    size = sum(p.numel() * p.element_size() for p in params)
    return {"method": FULL, "accuracy": right / len(test_ids),
            "trainable_params": sum(p.numel() for p in params), "size_kb": size / 1024,
            "train_seconds": round(seconds, 2), "peak_mb": peak_mb()}


def base_sizes() -> dict:
    from adapterhub_local.base import load_base
    from adapterhub_local.quantize import quantize_nf4, size_bytes

    base = load_base()
    four_bit = quantize_nf4(copy.deepcopy(base.model), base.layers_name)
    return {"fp32_mb": size_bytes(base.model) / 2**20, "nf4_mb": size_bytes(four_bit) / 2**20}


def main() -> None:
    from adapterhub_local.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="wordnet_things")
    parser.add_argument("--methods", default=",".join(
        [m for m, spec in METHODS.items() if "bert" in spec.architectures] + [FULL]))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        row = run_full(args.task) if args.one == FULL else run_method(args.one, args.task)
        print(json.dumps(row))
        return
    sizes = base_sizes()
    print(f"MiniLM base: {sizes['fp32_mb']:.1f} MB in fp32, {sizes['nf4_mb']:.1f} MB with NF4 "
          f"blocks ({sizes['nf4_mb'] / sizes['fp32_mb']:.2f}x); task {args.task}", flush=True)
    print("| method | test accuracy % | trainable params | adapter on disk | train s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        done = subprocess.run([sys.executable, __file__, "--task", args.task, "--one", method],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"| {method} | failed: {done.stderr.strip().splitlines()[-1][:120]} |||||")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {r['method']} | {100 * r['accuracy']:.1f} | {r['trainable_params']:,} | "
              f"{r['size_kb']:,.0f} KB | {r['train_seconds']:.0f} | {r['peak_mb']:,.0f} |",
              flush=True)


if __name__ == "__main__":
    main()

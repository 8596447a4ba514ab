"""Every adapter method on one bundled task with the real MiniLM base, plus full fine-tuning.

Each row runs in its own process (so peak memory is that method's): train on the task's
training rows with the defaults (3 epochs, lr 2e-3, batch 32, seed 0; full fine-tuning at lr 5e-5,
the usual rate for a whole BERT), then score its test split. Columns: test accuracy, trainable
parameters, adapter size on disk (the PEFT files and the head, as stored), train seconds, peak
resident memory of the process. Also the base's size in fp32 and in NF4 (QLoRA, LoftQ).

    .venv/bin/python bench/methods.py [--task wordnet_things] [--methods lora,ia3,...]
    .venv/bin/python bench/methods.py --base smollm2-135m --methods adaption-prompt,lora --epochs 1
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

import torch  # noqa: E402

TASKS = Path(__file__).resolve().parent.parent / "tasks"
FULL = "full fine-tuning"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_method(method: str, task: str, base: str | None, epochs: int | None) -> dict:
    from adapterhub_local import Hub

    with tempfile.TemporaryDirectory() as tmp:
        hub = Hub(Path(tmp) / "store")
        result = hub.add_task(spec=TASKS / f"{task}.toml", method=method, base=base, epochs=epochs)
        folder = hub.store.adapter_folder(hub.store.resolve(task))
        size = sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")
    return {"method": method, "accuracy": result["accuracy"],
            "trainable_params": result["trainable_params"], "size_kb": size / 1024,
            "train_seconds": result["train_seconds"], "peak_mb": peak_mb()}


def run_full(task: str) -> dict:
    """The reference the PEFT literature measures against: every weight of the base trains."""
    from forgetting_baselines import accuracy_of, train_on

    from adapterhub_local.base import load_base
    from adapterhub_local.data import load_spec, load_task_data
    from adapterhub_local.trainer import TrainOptions

    spec = load_spec(TASKS / f"{task}.toml")
    data = load_task_data(task, spec.train, spec.test)
    options = TrainOptions(lr=5e-5)
    base = load_base()
    model = copy.deepcopy(base.model).requires_grad_(True)
    torch.manual_seed(options.seed)
    head = torch.nn.Linear(base.hidden_size, len(data.labels))
    started = time.perf_counter()
    train_on(base, model, head, data, options)
    seconds = time.perf_counter() - started
    params = list(model.parameters()) + list(head.parameters())
    return {"method": FULL, "accuracy": accuracy_of(base, model, head, data.test_texts,
                                                     data.test_labels, options.max_length),
            "trainable_params": sum(p.numel() for p in params),
            "size_kb": sum(p.numel() * p.element_size() for p in params) / 1024,
            "train_seconds": round(seconds, 2), "peak_mb": peak_mb()}


def base_sizes(name: str | None) -> dict:
    from adapterhub_local.base import load_base
    from adapterhub_local.quantize import quantize_nf4, size_bytes

    base = load_base(name)
    four_bit = quantize_nf4(copy.deepcopy(base.model), base.layers_name)
    return {"fp32_mb": size_bytes(base.model) / 2**20, "nf4_mb": size_bytes(four_bit) / 2**20}


def main() -> None:
    from adapterhub_local.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="wordnet_things")
    parser.add_argument("--methods", default=",".join(
        [m for m, spec in METHODS.items() if "bert" in spec.architectures] + [FULL]))
    parser.add_argument("--base", help="a base name or folder [default: all-MiniLM-L6-v2]; "
                                       "full fine-tuning always uses the default")
    parser.add_argument("--epochs", type=int, help="override the task's epochs (default 3)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        row = (run_full(args.task) if args.one == FULL
               else run_method(args.one, args.task, args.base, args.epochs))
        print(json.dumps(row))
        return
    sizes = base_sizes(args.base)
    print(f"base {args.base or 'all-MiniLM-L6-v2'}: {sizes['fp32_mb']:.1f} MB in fp32, "
          f"{sizes['nf4_mb']:.1f} MB with NF4 blocks ({sizes['nf4_mb'] / sizes['fp32_mb']:.2f}x); "
          f"task {args.task}", flush=True)
    extra = [*(["--base", args.base] if args.base else []),
             *(["--epochs", str(args.epochs)] if args.epochs else [])]
    print("| method | test accuracy % | trainable params | adapter on disk | train s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        done = subprocess.run([sys.executable, __file__, "--task", args.task, "--one", method,
                               *extra],
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

"""The PEFT-on-a-frozen-base claim, measured: does learning task after task forget?

The bundled sequence three ways, each task keeping its own head, the same epochs, batches and
seed, scored on the same test splits after every step (the oracle setting: the task is given):
  - ahl: a new, isolated LoRA adapter per task on the frozen base (`Hub.add_task`);
  - one shared LoRA adapter (ahl's default config) trained on each task in turn;
  - full fine-tuning of one model, every weight trained on each task in turn (lr 5e-5).
Prints the three accuracy matrices (rows: after step i; columns: tasks) with average accuracy,
backward transfer (BWT, below 0 is forgetting) and forgetting.

    .venv/bin/python bench/forgetting_baselines.py [--epochs 3]
"""

import argparse
import math
import os
import random
import tempfile
import time
import tomllib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from adapterhub_local.base import load_base  # noqa: E402
from adapterhub_local.data import load_spec, load_task_data  # noqa: E402
from adapterhub_local.forgetting import summarize  # noqa: E402
from adapterhub_local.inference import bank_for, length_batches, mean_pool  # noqa: E402
from adapterhub_local.trainer import (TrainOptions, length_grouped_batches,  # noqa: E402
                                      split_validation, warmup_then_linear_decay)

TASKS = Path(__file__).resolve().parent.parent / "tasks"


def train_on(base, model, head, data, options: TrainOptions) -> None:
    """The trainer's loop over a plain model and a head (train_loop): every parameter of either
    that requires grad trains."""
    torch.manual_seed(options.seed)
    rows, _ = split_validation(data.train_labels, options.seed)
    ids = base.tokenize([data.train_texts[i] for i in rows], options.max_length)
    labels = torch.tensor([data.train_labels[i] for i in rows])
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]

    def loss_of(batch_rows):
        batch = base.pad([ids[i] for i in batch_rows])
        logits = head(mean_pool(model(**batch).last_hidden_state, batch))
        return torch.nn.functional.cross_entropy(logits, labels[batch_rows])

    train_loop(model, params, [len(x) for x in ids], options, loss_of)


def train_loop(model, params, lengths: list[int], options: TrainOptions, loss_of) -> None:
    """ahl's trainer loop for a baseline (also bench/generate_forgetting.py's): seeded
    length-grouped batches of rows with these token lengths, AdamW with warm-up and linear
    decay, clipping; loss_of(rows) is a batch's loss."""
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    schedule = warmup_then_linear_decay(
        optimizer, options.epochs * math.ceil(len(lengths) / options.batch_size), options.warmup)
    rng = random.Random(options.seed)
    model.train()
    for _ in range(options.epochs):
        for batch_rows in length_grouped_batches(lengths, options.batch_size, rng):
            loss_of(batch_rows).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()


@torch.inference_mode()
def accuracy_of(base, model, head, texts: list[str], labels: list[int], max_length: int) -> float:
    ids = base.tokenize(texts, max_length)
    right = 0
    for rows in length_batches(ids, range(len(ids)), 64):
        batch = base.pad([ids[i] for i in rows])
        predicted = head(mean_pool(model(**batch).last_hidden_state, batch)).argmax(-1)
        right += sum(int(p) == labels[i] for p, i in zip(predicted, rows))
    return right / len(ids)


def sequential(base, model, tasks: list, options: TrainOptions) -> list[list[float | None]]:
    """Train one model on each task in turn (a new head each), re-scoring every task so far."""
    heads, R = [], []
    for step, data in enumerate(tasks):
        torch.manual_seed(options.seed + step)
        heads.append(torch.nn.Linear(base.hidden_size, len(data.labels)))
        train_on(base, model, heads[-1], data, options)
        heads[-1].requires_grad_(False)  # an old task's head stays as it was learned
        R.append([accuracy_of(base, model, heads[j], tasks[j].test_texts, tasks[j].test_labels,
                              options.max_length) if j <= step else None
                  for j in range(len(tasks))])
        print(f"  step {step + 1}: {' '.join('-' if v is None else f'{100 * v:.1f}' for v in R[-1])}",
              flush=True)
    return R


def shared_lora(base, tasks, options):
    from peft import get_peft_model

    from adapterhub_local.methods import get_method, method_options

    config = get_method("lora").build(method_options("lora"), base)
    return sequential(base, get_peft_model(bank_for(base).bare_copy(), config), tasks, options)


def full_fine_tuning(base, tasks, options):
    model = bank_for(base).bare_copy().requires_grad_(True)  # ahl's run wrapped the base
    return sequential(base, model, tasks, TrainOptions(**{**options.as_dict(), "lr": 5e-5}))


def isolated_adapters(names: list[str], options: TrainOptions):
    from adapterhub_local import Hub

    with tempfile.TemporaryDirectory() as tmp:
        hub = Hub(Path(tmp) / "store")
        for name in names:
            hub.add_task(spec=TASKS / f"{name}.toml", **options.as_dict())
        return hub.metrics()["modes"]["oracle"]["matrix"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    names = tomllib.loads((TASKS / "sequence.toml").read_text())["tasks"]
    specs = [load_spec(TASKS / f"{n}.toml") for n in names]
    tasks = [load_task_data(n, s.train, s.test) for n, s in zip(names, specs)]
    options = TrainOptions(epochs=args.epochs)
    base = load_base()
    results = {}
    for label, run in (("ahl: an isolated LoRA adapter per task", lambda: isolated_adapters(names, options)),
                       ("one shared LoRA adapter, task after task", lambda: shared_lora(base, tasks, options)),
                       ("full fine-tuning, task after task", lambda: full_fine_tuning(base, tasks, options))):
        print(f"{label}", flush=True)
        started = time.perf_counter()
        results[label] = (summarize(run()), time.perf_counter() - started)
    print(f"\ntasks: {', '.join(names)}")
    for label, (summary, seconds) in results.items():
        print(f"\n{label} ({seconds:.0f} s): accuracy % after each step")
        for i, row in enumerate(summary["matrix"]):
            print(f"  step {i + 1}: " + " ".join("    -" if v is None else f"{100 * v:5.1f}" for v in row))
    print("\n| | average accuracy % | BWT (points) | forgetting (points) |\n|---|---:|---:|---:|")
    for label, (s, _) in results.items():
        print(f"| {label} | {100 * s['average_accuracy']:.1f} | {100 * s['bwt']:+.1f} | "
              f"{100 * s['forgetting']:.1f} |")


if __name__ == "__main__":
    main()

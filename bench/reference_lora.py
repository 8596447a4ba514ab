"""ahl's default add-task beside the hand-written PEFT LoRA script a user would write, per task.

The script (what a careful user writes by hand, bench/train_speed.py's peer with its own LoRA):
Hugging Face Trainer + peft, LoRA r=8, alpha 16, dropout 0.1 on query and value of every block,
a mean-pool head, DataCollatorWithPadding, length-grouped batches, all the training rows, 5
epochs (and a 3-epoch row), with ahl's learning rate, batch size, warm-up share, weight decay and
seed. ahl: its trainer with its defaults (LoRA r=16, alpha 16, on every linear layer of the top half of the
blocks, 3 epochs or up to 5 for a small task (trainer.auto_epochs), a tenth of the rows held out
for the router's statistics), and any variants
given with --ahl (LoRA options and training options, e.g. --ahl layers=all --ahl epochs=5,r=8).
Everything is scored on each task's test split; per task the order of the runs alternates. Each
row prints its training seconds too: the script adapts the bottom half, so it cannot share the
router's pass at prediction time, and its training cannot reuse the bottom half's states.

    .venv/bin/python bench/reference_lora.py [--tasks-dir tasks/confusable]
        [--tasks wordnet_things,chat_language] [--ahl layers=all] [--no-default] [--seeds 0,1]
        [--script-epochs 5]

With several seeds, every run is repeated per seed (the script's too) and the tables show means
over the seeds; the per-seed lines are printed as they finish.
"""

import argparse
import dataclasses
import platform
import tomllib
from datetime import date
from pathlib import Path

from train_speed import TASKS, run_ahl, run_peer, warm_up

from adapterhub_local.data import load_spec, load_task_data
from adapterhub_local.trainer import TrainOptions, auto_epochs

TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainOptions)}


def script_config():
    """The hand-written script's LoRA: r=8 on query and value of every block."""
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])


def ahl_variant(text: str) -> tuple[str, dict, dict]:
    """(label, training options, LoRA options) from "k=v,k=v"."""
    pairs = dict(item.split("=", 1) for item in text.split(",") if item)
    train = {k: cast(getattr(TrainOptions, k), v) for k, v in pairs.items() if k in TRAIN_FIELDS}
    return f"ahl, {text}", train, {k: v for k, v in pairs.items() if k not in TRAIN_FIELDS}


def cast(default, value: str):
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes")
    return type(default)(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks-dir", type=Path, default=TASKS, help="a sequence's folder [default: the bundled tasks/]")
    parser.add_argument("--tasks", help="comma-separated task names [default: the folder's sequence.toml]")
    parser.add_argument("--ahl", action="append", default=[], help="an ahl variant: k=v,k=v")
    parser.add_argument("--no-default", action="store_true", help="leave out ahl's default row (its accuracy is deterministic per seed on one machine: compare with an earlier run)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, each a full set of runs [default: 0]")
    parser.add_argument("--script-epochs", default="5,3", help="the script's rows [default: 5,3]; 5 is the reference; 'none' runs ahl alone")
    args = parser.parse_args()
    options = TrainOptions()
    seeds = [int(s) for s in args.seeds.split(",")]
    script_epochs = [] if args.script_epochs == "none" else [int(e) for e in args.script_epochs.split(",")]
    variants = [] if args.no_default else [("ahl default", {}, {})]
    variants += [ahl_variant(v) for v in args.ahl]
    warm_up(options)
    results: dict = {}  # label -> task -> [(seconds, accuracy) per seed], then their means
    sequence = tomllib.loads((args.tasks_dir / "sequence.toml").read_text(encoding="utf-8"))["tasks"]
    tasks = args.tasks.split(",") if args.tasks else sequence
    for n, task in enumerate(tasks):
        spec = load_spec(args.tasks_dir / f"{task}.toml")
        data = load_task_data(spec.name, spec.train, spec.test)
        every_row = list(range(len(data.train_texts)))
        for seed in seeds:
            seeded = dataclasses.replace(options, seed=seed)
            # ahl's default epochs for this task's size (add-task's, when none are given)
            seeded = dataclasses.replace(seeded, epochs=auto_epochs(data.strata(), seeded))
            runs = [(label, lambda t=train, lo=lora: run_ahl(data, dataclasses.replace(seeded, **t), lo))
                    for label, train, lora in variants]
            runs += [(f"script, {e} epochs", lambda e=e: run_peer(
                data, dataclasses.replace(seeded, epochs=e), every_row,
                config=script_config())) for e in script_epochs]
            for label, run in (runs if (n + seed) % 2 == 0 else runs[::-1]):
                seconds, accuracy = run()
                results.setdefault(label, {}).setdefault(task, []).append((seconds, accuracy))
                print(f"  {task:18}{label:30}seed {seed} {seconds:7.1f} s {100 * accuracy:6.1f} %", flush=True)
    results = {label: {task: tuple(sum(x) / len(x) for x in zip(*runs)) for task, runs in by_task.items()}
               for label, by_task in results.items()}

    reference = results.get("script, 5 epochs")
    print(f"\n{date.today()}, {platform.machine()}, seeds {args.seeds}: mean test accuracy % (training seconds); "
          "last column: mean and worst difference from the 5-epoch script, in points")
    print("| run | " + " | ".join(tasks) + " | mean | vs script (mean / worst) |")
    print("|---|" + "---:|" * (len(tasks) + 2))
    for label, by_task in results.items():
        cells = [f"{100 * by_task[t][1]:.1f} ({by_task[t][0]:.0f} s)" for t in tasks]
        mean = 100 * sum(by_task[t][1] for t in tasks) / len(tasks)
        gaps = [100 * (by_task[t][1] - reference[t][1]) for t in tasks] if reference else []
        versus = f"{sum(gaps) / len(gaps):+.1f} / {min(gaps):+.1f}" if gaps else "-"
        print(f"| {label} | " + " | ".join(cells) + f" | {mean:.1f} | {versus} |")


if __name__ == "__main__":
    main()

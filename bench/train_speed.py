"""Training speed: ahl's trainer vs a careful Hugging Face Trainer + peft script, lever by lever.

The peer is what a careful user writes: AutoModel + peft with the very same LoRA config (ahl's
default: rank, alpha, target modules, top-half blocks), a mean-pool head like ahl's,
`DataCollatorWithPadding` and length-grouped sampling, with the same rows, epochs, learning rate,
warm-up share, batch size, weight decay, gradient clipping and seed. Both are scored on the same
test split. ahl runs with all its levers, without any, and with each one alone, so every lever is
measured on its own; per task, ahl and the peer alternate which goes first. All in one process on
the real MiniLM base.

What the peer lacks, on purpose: ahl's levers themselves (reusing the frozen bottom half's states,
bf16 autocast, dropout masks from random bytes). `--peer-bf16` adds a row for the peer with TrainingArguments(bf16=True), the one
flag of ahl's levers a user could set.

    .venv/bin/python bench/train_speed.py [--tasks wordnet_things,chat_language] [--epochs 3]
                                          [--peer-bf16] [--default-only] [--device cuda]
"""

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from adapterhub_local.base import load_base  # noqa: E402
from adapterhub_local.data import load_spec, load_task_data  # noqa: E402
from adapterhub_local.device import resolve_device  # noqa: E402
from adapterhub_local.errors import AhlError  # noqa: E402
from adapterhub_local.inference import AdapterBank, mean_pool  # noqa: E402
from adapterhub_local.methods import get_method, method_options  # noqa: E402
from adapterhub_local.trainer import TrainOptions, native_bf16, split_validation, train_adapter  # noqa: E402

TASKS = Path(__file__).resolve().parent.parent / "tasks"
DEFAULT_TASKS = "wordnet_things,fortune_topic,chat_language,wordnet_actions"
# ahl's rows: (label, options changed from the defaults). The defaults have every lever on.
NONE = {"reuse_states": False, "precision": "fp32", "byte_dropout": False}
AHL_ROWS = [("ahl, all levers", {}),
            ("ahl, no levers", NONE),
            ("ahl, reuse states only", {**NONE, "reuse_states": True}),
            ("ahl, bf16 only", {**NONE, "precision": "bf16"}),
            ("ahl, byte dropout only", {**NONE, "byte_dropout": True})]


def finished(device: str) -> float:
    """The clock once the device's queued work is done (CUDA runs behind the Python that asks)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def device_option(parser: argparse.ArgumentParser, name: str) -> str:
    """A bench's --device resolved as ahl resolves it, or the parser's one-line error."""
    try:
        return resolve_device(name)
    except AhlError as error:
        parser.error(str(error))


def machine(device: str) -> str:
    """What the figures were measured on, for a bench's summary line."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, native bf16: {native_bf16()}"


def run_ahl(data, options: TrainOptions, lora_args: dict | None = None,
            device: str = "cpu") -> tuple[float, float]:
    """(training seconds, test accuracy) of ahl's trainer; lora_args change LoRA's options."""
    base = load_base(device=device)
    bank = AdapterBank(base)
    config = get_method("lora").build(method_options("lora", lora_args or {}), base)
    started = finished(device)
    train_adapter(bank, "bench", config, data, options, get_method("lora"))
    seconds = finished(device) - started
    accuracy = bank.accuracy("bench", data.test_texts, data.test_labels, options.max_length)
    bank.remove_adapter("bench")
    return seconds, accuracy


class MeanPoolClassifier(torch.nn.Module):
    """The careful script's model: the peft-wrapped encoder, the mean of the text's own token
    states, a linear head."""

    def __init__(self, encoder, hidden_size: int, num_labels: int):
        super().__init__()
        self.encoder, self.head = encoder, torch.nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids, attention_mask, labels=None):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        logits = self.head(mean_pool(self.encoder(**batch).last_hidden_state, batch))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits.float(), labels)
        return {"loss": loss, "logits": logits}


def run_peer(data, options: TrainOptions, rows: list[int], bf16: bool = False,
             config=None, device: str = "cpu") -> tuple[float, float]:
    """The careful user's script: Trainer + peft, dynamic padding, length-grouped batches; by
    default with the very same LoRA config as ahl's, else with `config` (a peft config). On
    CUDA the Trainer takes the GPU itself (its first; one GPU is what the bench compares)."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import (AutoModel, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    path = load_base().path
    tokenizer = AutoTokenizer.from_pretrained(path)
    set_seed(options.seed)
    config = config or get_method("lora").build(method_options("lora"), load_base())
    encoder = get_peft_model(AutoModel.from_pretrained(path), config)
    model = MeanPoolClassifier(encoder, encoder.config.hidden_size, len(data.labels))

    def encode(texts, labels):
        enc = tokenizer(texts, truncation=True, max_length=options.max_length)
        return Dataset.from_dict({**enc, "labels": labels})

    train = encode([data.train_texts[i] for i in rows], [data.train_labels[i] for i in rows])
    test = encode(data.test_texts, data.test_labels)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, num_train_epochs=options.epochs, learning_rate=options.lr,
                                 per_device_train_batch_size=options.batch_size,
                                 per_device_eval_batch_size=64, warmup_steps=options.warmup,
                                 weight_decay=options.weight_decay, max_grad_norm=1.0,
                                 seed=options.seed, train_sampling_strategy="group_by_length",
                                 bf16=bf16, save_strategy="no", report_to=[],
                                 logging_strategy="no", disable_tqdm=True, use_cpu=device == "cpu",
                                 label_names=["labels"])
        trainer = Trainer(model=model, args=args, train_dataset=train,
                          data_collator=DataCollatorWithPadding(tokenizer))
        started = finished(device)
        trainer.train()
        seconds = finished(device) - started
        # Compared with the label ids predict returns: its sampler may reorder the rows.
        predicted = trainer.predict(test)
    accuracy = float((predicted.predictions.argmax(-1) == predicted.label_ids).mean())
    return seconds, accuracy


def warm_up(options: TrainOptions, device: str = "cpu") -> None:
    """One short untimed run of each kind first: loading the base and the first passes of each
    arithmetic would otherwise be charged to whichever run comes first."""
    spec = load_spec(TASKS / "chat_language.toml")
    data = load_task_data(spec.name, spec.train, spec.test)
    data.train_texts, data.train_labels = data.train_texts[:64], data.train_labels[:64]
    short = dataclasses.replace(options, epochs=1)
    for _, changes in AHL_ROWS:
        run_ahl(data, dataclasses.replace(short, **changes), device=device)
    run_peer(data, short, list(range(64)), device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--epochs", type=int, default=TrainOptions.epochs)
    parser.add_argument("--peer-bf16", action="store_true")
    parser.add_argument("--default-only", action="store_true",
                        help="ahl's default (every lever) against the peer, without the lever rows")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto; both sides train there")
    args = parser.parse_args()
    device = device_option(parser, args.device)
    options = TrainOptions(epochs=args.epochs)
    peers = [("careful HF Trainer", False)] + ([("careful HF Trainer, bf16", True)] if args.peer_bf16 else [])
    results: dict[str, list[tuple[float, float]]] = {}
    warm_up(options, device)
    for n, task in enumerate(args.tasks.split(",")):
        spec = load_spec(TASKS / f"{task}.toml")
        data = load_task_data(spec.name, spec.train, spec.test)
        train_rows, _ = split_validation(data.train_labels, options.seed)  # the rows ahl trains on
        runs = [(label, lambda c=changes: run_ahl(data, dataclasses.replace(options, **c), device=device))
                for label, changes in AHL_ROWS[: 1 if args.default_only else None]]
        runs += [(label, lambda b=bf16: run_peer(data, options, train_rows, b, device=device))
                 for label, bf16 in peers]
        for label, run in (runs if n % 2 == 0 else runs[::-1]):  # alternate who goes first
            results.setdefault(label, []).append(run())
            print(f"  {task:18}{label:28}{results[label][-1][0]:7.1f} s "
                  f"{100 * results[label][-1][1]:6.1f} %", flush=True)

    peer = results["careful HF Trainer"]
    print(f"\n{date.today()}, {machine(device)}, {torch.get_num_threads()} torch threads; "
          f"tasks {args.tasks}; {args.epochs} epochs")
    print("| run | seconds (sum) | time / careful peer | mean test acc % |\n|---|---:|---:|---:|")
    for label, rows in results.items():
        seconds = sum(s for s, _ in rows)
        ratio = sum(s / p for (s, _), (p, _) in zip(rows, peer)) / len(rows)
        print(f"| {label} | {seconds:.1f} | {ratio:.2f}x | {100 * sum(a for _, a in rows) / len(rows):.1f} |")


if __name__ == "__main__":
    main()

"""Training speed: ahl's trainer vs a plain Hugging Face Trainer + peft LoRA script.

Both train the same LoRA (ahl's default config: rank, alpha, target modules and blocks; same
learning rate, epochs, batch size, seed) on the same rows of one bundled task with the real MiniLM base, in this one process, and
are scored on the same test split. The baseline pads every text to 64 tokens, as the usual
script does; ahl pads each length-grouped batch to its own longest text.

    .venv/bin/python bench/train_speed.py [--task wordnet_things] [--epochs 3]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from adapterhub_local.base import load_base  # noqa: E402
from adapterhub_local.data import load_spec, load_task_data  # noqa: E402
from adapterhub_local.inference import AdapterBank  # noqa: E402
from adapterhub_local.methods import get_method, method_options  # noqa: E402
from adapterhub_local.trainer import TrainOptions, split_validation, train_adapter  # noqa: E402

TASKS = Path(__file__).resolve().parent.parent / "tasks"


def run_ahl(data, options: TrainOptions) -> tuple[float, float]:
    base = load_base()
    bank = AdapterBank(base)
    config = get_method("lora").build(method_options("lora"), base)
    started = time.perf_counter()
    train_adapter(bank, "bench", config, data, options, get_method("lora"))
    seconds = time.perf_counter() - started
    accuracy = bank.accuracy("bench", data.test_texts, data.test_labels, options.max_length)
    bank.remove_adapter("bench")
    return seconds, accuracy


def run_hf_trainer(data, options: TrainOptions, rows: list[int]) -> tuple[float, float]:
    """The script most people write: AutoModelForSequenceClassification + peft + Trainer."""
    from datasets import Dataset
    from peft import TaskType, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, Trainer,
                              TrainingArguments)

    path = load_base().path
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(options.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(data.labels))
    config = get_method("lora").build(method_options("lora"), load_base())  # the very same LoRA
    config.task_type = TaskType.SEQ_CLS  # ...plus a trainable classifier, as the usual script has
    model = get_peft_model(model, config)

    def encode(texts, labels):
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=64)
        return Dataset.from_dict({**enc, "labels": labels})

    train = encode([data.train_texts[i] for i in rows], [data.train_labels[i] for i in rows])
    test = encode(data.test_texts, data.test_labels)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, num_train_epochs=options.epochs, learning_rate=options.lr,
                                 per_device_train_batch_size=options.batch_size,
                                 per_device_eval_batch_size=64, warmup_steps=options.warmup,
                                 weight_decay=options.weight_decay, seed=options.seed,
                                 save_strategy="no", report_to=[], logging_strategy="no",
                                 disable_tqdm=True, use_cpu=True)
        trainer = Trainer(model=model, args=args, train_dataset=train)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        logits = trainer.predict(test).predictions
    accuracy = float((logits.argmax(-1) == torch.tensor(data.test_labels).numpy()).mean())
    return seconds, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="wordnet_things")
    parser.add_argument("--epochs", type=int, default=TrainOptions.epochs)
    args = parser.parse_args()
    spec = load_spec(TASKS / f"{args.task}.toml")
    data = load_task_data(spec.name, spec.train, spec.test)
    options = TrainOptions(epochs=args.epochs)
    train_rows, _ = split_validation(data.train_labels, options.seed)  # the rows ahl trains on

    ahl_seconds, ahl_accuracy = run_ahl(data, options)
    hf_seconds, hf_accuracy = run_hf_trainer(data, options, train_rows)
    print(f"task {args.task}: {len(train_rows)} training rows, {len(data.test_texts)} test rows, "
          f"{args.epochs} epochs, torch threads {torch.get_num_threads()}")
    print(f"{'':24}{'seconds':>10}{'test acc %':>12}")
    print(f"{'HF Trainer, pad to 64':24}{hf_seconds:>10.1f}{100 * hf_accuracy:>12.1f}")
    print(f"{'ahl trainer':24}{ahl_seconds:>10.1f}{100 * ahl_accuracy:>12.1f}")
    print(f"time ratio ahl / baseline: {ahl_seconds / hf_seconds:.2f}x; "
          f"accuracy difference: {100 * (ahl_accuracy - hf_accuracy):+.1f} points")


if __name__ == "__main__":
    main()

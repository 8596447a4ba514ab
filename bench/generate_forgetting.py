"""Forgetting in generation, measured: the bundled generate sequence on SmolLM2-135M three ways.

Each way learns the tasks in order with the specs' epochs, lr, batch and seed, the same prompts
(the base's chat template), the same completion-only loss and bf16 autocast, and is scored
after every step on every task so far by exact match (chrF beside it), greedy decoding with the
same token budget:
  - ahl: a new, isolated LoRA adapter per task on the frozen base (`Hub.add_task`); scored with
    the task given (oracle) and routed (the router picks the adapter from the prompt alone);
  - one shared LoRA adapter (ahl's default config) trained on each task in turn: what a user
    of peft gets from `get_peft_model` and a training loop over the tasks as they come;
  - full fine-tuning of the whole model on each task in turn (lr 5e-5).
The peers are plain transformers + peft, as a careful user writes them: AutoModelForCausalLM
from the GGUF file, the labels' loss of the model itself, `model.generate` (greedy, left-padded
batches) to answer. What they lack that a careful user might add: replay of earlier tasks'
rows, or a regulariser (EWC, LwF); those trade memory or compute for less forgetting, and are
not what a user adding tasks one at a time usually has.

    .venv/bin/python bench/generate_forgetting.py
"""

import os
import tempfile
import time
import tomllib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from adapterhub_local.base import load_base, resolve_base  # noqa: E402
from adapterhub_local.dashboards import wait_for_drawings  # noqa: E402
from adapterhub_local.data import load_generate_data, load_spec  # noqa: E402
from adapterhub_local.forgetting import summarize  # noqa: E402
from adapterhub_local.generation import completion_ids, lm_batch, prompt_ids  # noqa: E402
from adapterhub_local.gguf_cache import quiet_gguf  # noqa: E402
from adapterhub_local.scoring import SOFT_METRIC, exact_match, row_scores  # noqa: E402
from adapterhub_local.sequence import read_steps  # noqa: E402
from adapterhub_local.trainer import TrainOptions, split_validation, uses_bf16  # noqa: E402
from forgetting_baselines import train_loop  # noqa: E402

TASKS = Path(__file__).resolve().parent.parent / "tasks" / "generate"
EVAL_BATCH = 32


def load_causal_lm():
    from transformers import AutoModelForCausalLM

    _, path = resolve_base("smollm2")
    with quiet_gguf():
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)


def train_on(base, model, data, options: TrainOptions) -> None:
    """ahl's loop (forgetting_baselines.train_loop; bf16 autocast where native) over a plain
    causal LM: every parameter that requires grad trains, on the completion tokens' loss."""
    torch.manual_seed(options.seed)
    rows, _ = split_validation(data.strata(), options.seed)
    prompts = prompt_ids(base, [data.train_texts[i] for i in rows])
    completions = completion_ids(base, [data.train_targets[i] for i in rows])
    params = [p for p in model.parameters() if p.requires_grad]
    bf16 = uses_bf16(options.precision)

    def loss_of(batch_rows):
        batch, labels = lm_batch(base, [prompts[i] for i in batch_rows],
                                 [completions[i] for i in batch_rows])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(**batch, labels=labels).loss

    train_loop(model, params, [len(p) + len(c) for p, c in zip(prompts, completions)], options,
               loss_of)


@torch.inference_mode()
def completions_of(base, model, prompts: list[str], max_new_tokens: int) -> list[str]:
    tokenizer = base.tokenizer
    tokenizer.padding_side = "left"
    ids = prompt_ids(base, prompts)
    out = []
    for start in range(0, len(ids), EVAL_BATCH):
        chunk = ids[start: start + EVAL_BATCH]
        batch = tokenizer.pad({"input_ids": chunk}, return_tensors="pt")
        made = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
        out += [tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
                for row in made]
    tokenizer.padding_side = "right"
    return out


def sequential(base, model, tasks: list, options: list[TrainOptions], budgets: list[int]):
    """Train one model on each task in turn, re-scoring every task so far: (exact match
    matrix, soft metric matrix)."""
    R, soft = [], []
    for step, data in enumerate(tasks):
        train_on(base, model, data, options[step])
        row, soft_row = [], []
        for j in range(len(tasks)):
            if j > step:
                row.append(None)
                soft_row.append(None)
                continue
            made = completions_of(base, model, tasks[j].test_texts, budgets[j])
            row.append(sum(exact_match(m, t) for m, t in zip(made, tasks[j].test_targets)) / len(made))
            soft_row.append(sum(row_scores(SOFT_METRIC, made, tasks[j].test_targets)) / len(made))
        R.append(row)
        soft.append(soft_row)
        print(f"  step {step + 1}: {' '.join('-' if v is None else f'{100 * v:.1f}' for v in row)}",
              flush=True)
    return R, soft


def shared_lora(base, tasks, options, budgets):
    from peft import get_peft_model

    from adapterhub_local.methods import get_method, method_options

    config = get_method("lora").build(method_options("lora"), base)
    config.task_type = "CAUSAL_LM"
    return sequential(base, get_peft_model(load_causal_lm(), config), tasks, options, budgets)


def full_fine_tuning(base, tasks, options, budgets):
    lr = [TrainOptions(**{**o.as_dict(), "lr": 5e-5}) for o in options]
    return sequential(base, load_causal_lm().requires_grad_(True), tasks, lr, budgets)


def isolated_adapters(names: list[str]):
    from adapterhub_local import Hub

    with tempfile.TemporaryDirectory() as tmp:
        hub = Hub(Path(tmp) / "store")
        for name in names:
            hub.add_task(spec=TASKS / f"{name}.toml")
        metrics = hub.metrics()
        rows = [r["soft"] for r in read_steps(hub.store)]
        wait_for_drawings()  # the heatmaps write into the store until they are done
        soft = [[(row.get(t) or {}).get("oracle") if j <= i else None
                 for j, t in enumerate(names)] for i, row in enumerate(rows)]
        return metrics["modes"]["oracle"]["matrix"], soft, metrics["modes"]["routed"]["matrix"]


def main() -> None:
    names = tomllib.loads((TASKS / "sequence.toml").read_text())["tasks"]
    specs = [load_spec(TASKS / f"{n}.toml") for n in names]
    tasks = [load_generate_data(n, s.train, s.test) for n, s in zip(names, specs)]
    known = set(TrainOptions.__dataclass_fields__)
    options = [TrainOptions(**{k: v for k, v in s.defaults.items() if k in known}) for s in specs]
    base = load_base("smollm2")
    longest = [max(len(c) for c in completion_ids(base, t.train_targets)) for t in tasks]
    budgets = [n + (n + 3) // 4 for n in longest]  # what ahl's plan gives each task
    results = {}
    runs = (("ahl: an isolated LoRA adapter per task (oracle)", lambda: isolated_adapters(names)),
            ("one shared LoRA adapter, task after task", lambda: shared_lora(base, tasks, options, budgets)),
            ("full fine-tuning, task after task", lambda: full_fine_tuning(base, tasks, options, budgets)))
    for label, run in runs:
        print(label, flush=True)
        started = time.perf_counter()
        found = run()
        results[label] = (summarize(found[0]), summarize(found[1]), time.perf_counter() - started)
        if len(found) > 2:
            results["ahl, routed (no task given)"] = (summarize(found[2]), None, None)
    print(f"\ntasks: {', '.join(names)}")
    for label, (summary, _, seconds) in results.items():
        took = f" ({seconds:.0f} s)" if seconds else ""
        print(f"\n{label}{took}: exact match % after each step")
        for i, row in enumerate(summary["matrix"]):
            print(f"  step {i + 1}: " + " ".join("    -" if v is None else f"{100 * v:5.1f}" for v in row))
    print("\n| | average exact match % | BWT (points) | forgetting (points) | average chrF % |\n"
          "|---|---:|---:|---:|---:|")
    for label, (s, soft, _) in results.items():
        chrf = f"{100 * soft['average_accuracy']:.1f}" if soft else "-"
        print(f"| {label} | {100 * s['average_accuracy']:.1f} | {100 * s['bwt']:+.1f} | "
              f"{100 * s['forgetting']:.1f} | {chrf} |")


if __name__ == "__main__":
    main()

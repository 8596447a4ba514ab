"""Inference throughput as adapters pile up: routed prediction vs a bare forward and peft's own
ways of serving many adapters, with 1, 6, 30 and 100 LoRA adapters loaded.

On the real MiniLM base, in one process: N LoRA adapters of ahl's default config (random,
non-zero weights, so every adapter does real work) with their heads in one bank, and a router
fit from each adapter's task statistics, word counts included (adapter i stands for bundled task
i mod 6). The texts
are the bundled tasks' test texts, mixed; adapter i mod N is each text's "given" task.
  floor     the bare base, full passes batched by length: no routing, no adapter
  packed    the bare base through ahl's packed blocks (packing.py: no products on the pads),
            the same batches: how much of routed / floor is packing, and what routing and the
            adapters cost beyond it (routed / packed)
  mixed     peft's own mixed-batch forward (`adapter_names`: a loop over the batch's adapters in
            every layer) over full passes, the task given
  grouped   per-adapter batches, the task given: set_adapter, then the adapter's texts
  routed    what Hub.predict computes once its store is open (inference.route_texts and
            answer_routes): route every text, then mixed-adapter passes that go on from the
            router's states, each layer's LoRA updates in two gathered products (lora_batch)
  one text per call: routed and floor again, a call per text (a server's requests), over the
            first --singles texts: what fixed costs per call (stacking the adapters, walking the
            model's modules) add to one answer
Each row is the mean of --rounds rounds (two), the order reversed every other round. The peers are told the
task; ahl works it out. Memory per extra adapter: its tensors' bytes, and the process's RSS
growth per adapter from the first to the last count.

    .venv/bin/python bench/inference.py [--counts 1,6,30,100] [--per-task 100] [--lora r=8] [--rounds 2]
                                        [--singles 60] [--device cuda]
"""

import argparse
import os
import random
import resource
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from adapterhub_local import lexical, lora_batch, packing  # noqa: E402
from adapterhub_local.base import load_base  # noqa: E402
from adapterhub_local.cli import parse_method_args  # noqa: E402
from adapterhub_local.data import load_spec, load_task_data  # noqa: E402
from adapterhub_local.inference import (answer_routes, bank_for, length_batches, mean_pool,  # noqa: E402
                                        route_texts)
from adapterhub_local.methods import get_method, method_options  # noqa: E402
from adapterhub_local.router import GaussianRouter, task_stats  # noqa: E402
from train_speed import device_option, finished, machine  # noqa: E402

TASKS = Path(__file__).resolve().parent.parent / "tasks"
BUNDLED = ["wordnet_things", "fortune_topic", "chat_language", "wordnet_actions",
           "fortune_language", "wordnet_concepts"]
BATCH = 64


def add_adapters(bank, data: list, start: int, stop: int, lora_args: dict) -> dict:
    """Adapters start..stop-1 with random LoRA weights and heads; {name: its task's stats}."""
    lora = get_method("lora")
    stats = {}
    for i in range(start, stop):
        task = data[i % len(data)]
        name = f"ahl-bench{i}"
        torch.manual_seed(i)
        bank.add_adapter(name, lora.build(method_options("lora", lora_args), bank.base), task.labels, lora)
        for key, p in bank.model(name).named_parameters():
            if f".{name}." in f"{key}." and "lora_B" in key:
                p.data.normal_(0, 0.02)  # peft starts B at zero: an identity adapter
        bank.model(name).requires_grad_(False)
        bank.model(name).eval()  # as a stored adapter is loaded: peft mixes batches in eval mode only
        rows = random.Random(i).sample(range(len(task.train_texts)), 200)
        features = bank.features([task.train_texts[r] for r in rows])
        grams = lexical.grams(bank.base, [task.train_texts[r] for r in rows])
        stats[name] = task_stats(features[:160], [task.train_labels[r] for r in rows[:160]],
                                 task.labels, features[160:], grams=grams[:160],
                                 calibration_grams=grams[160:], gram_space=lexical.gram_space(bank.base))
    return stats


def adapter_bytes(bank, name: str) -> int:
    tensors = [p for k, p in bank.model(name).named_parameters() if f".{name}." in f"{k}."]
    return sum(t.numel() * t.element_size() for t in tensors + list(bank.heads[name].parameters()))


@torch.inference_mode()
def floor(bank, texts: list[str]) -> None:
    ids = bank.base.tokenize(texts, 128)
    with bank.bare():
        for rows in length_batches(ids, range(len(ids)), BATCH):
            bank.base.model(**bank.base.pad([ids[i] for i in rows]))


@torch.inference_mode()
def packed(bank, texts: list[str]) -> None:
    ids = bank.base.tokenize(texts, 128)
    with bank.bare():
        for rows in length_batches(ids, range(len(ids)), BATCH):
            batch = [ids[i] for i in rows]
            packing.last_states(bank.base.model, bank.base.layers, batch,
                                packing.Packing.of(batch, bank.base.device))


@torch.inference_mode()
def mixed(bank, texts: list[str], given: list[str]) -> None:
    """peft's own mixed batch: ahl's gathered forward (lora_batch) is taken off for it."""
    ids = bank.base.tokenize(texts, 128)
    model = bank.model(given[0])
    with lora_batch.uninstalled(model):
        for rows in length_batches(ids, range(len(ids)), BATCH):
            batch = bank.base.pad([ids[i] for i in rows])
            names = [given[i] for i in rows]
            pooled = mean_pool(model(**batch, adapter_names=names).last_hidden_state, batch)
            for k, name in enumerate(names):
                bank.heads[name](pooled[k]).softmax(-1)


@torch.inference_mode()
def grouped(bank, texts: list[str], given: list[str]) -> None:
    ids = bank.base.tokenize(texts, 128)
    for name in dict.fromkeys(given):
        bank.activate(name)
        mine = [i for i, g in enumerate(given) if g == name]
        for rows in length_batches(ids, mine, BATCH):
            batch = bank.base.pad([ids[i] for i in rows])
            hidden = bank.model(name)(**batch).last_hidden_state
            bank.heads[name](mean_pool(hidden, batch)).softmax(-1)


def routed(bank, router, texts: list[str], adapters: dict) -> None:
    routes, states = route_texts(bank, router, texts, top_k=1)
    answer_routes(bank, texts, routes, states, adapters, dict.fromkeys(adapters, 1), {})


def memory_mib(device: str) -> float:
    """What the adapters take: the GPU's allocated memory on CUDA, else the process's peak RSS."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,6,30,100")
    parser.add_argument("--per-task", type=int, default=100)
    parser.add_argument("--lora", default="", help="LoRA options other than the default, e.g. r=8")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, the order reversed every other one")
    parser.add_argument("--singles", type=int, default=60, help="texts answered one per call")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    args = parser.parse_args()
    device = device_option(parser, args.device)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.singles < 1:
        parser.error("--singles must be at least 1")
    lora_args = parse_method_args([item for item in args.lora.split(",") if item])
    data = [load_task_data(s.name, s.train, s.test)
            for s in (load_spec(TASKS / f"{t}.toml") for t in BUNDLED)]
    texts = [t for task in data for t in task.test_texts[: args.per_task]]
    random.Random(0).shuffle(texts)
    bank = bank_for(load_base(device=device))
    stats, rows, memory = {}, [], []
    for count in [int(c) for c in args.counts.split(",")]:
        stats.update(add_adapters(bank, data, len(stats), count, lora_args))
        memory.append((count, memory_mib(device)))
        router = GaussianRouter().fit(stats)
        print(f"  {count:4d} adapters: the router reads words: {router.reads_words} "
              f"(weight {router.words_weight_})", flush=True)
        adapters = {name: name for name in stats}  # the router's tasks are the adapters' names
        names = list(stats)
        given = [names[i % len(names)] for i in range(len(texts))]
        runs = {"floor": lambda: floor(bank, texts),
                "packed": lambda: packed(bank, texts),
                "mixed": lambda: mixed(bank, texts, given),
                "grouped": lambda: grouped(bank, texts, given),
                "routed": lambda: routed(bank, router, texts, adapters),
                "floor_one": lambda: [floor(bank, [t]) for t in texts[: args.singles]],
                "routed_one": lambda: [routed(bank, router, [t], adapters)
                                       for t in texts[: args.singles]]}
        floor(bank, texts[:BATCH])  # warm up: one-time costs of each kind of pass
        mixed(bank, texts[:BATCH], given[:BATCH])
        routed(bank, router, texts[:BATCH], adapters)
        seconds = dict.fromkeys(runs, 0.0)
        for timed in range(args.rounds):
            for name in list(runs)[:: 1 if timed % 2 == 0 else -1]:
                started = finished(device)
                runs[name]()
                seconds[name] += (finished(device) - started) / args.rounds
        rows.append((count, {name: (args.singles if name.endswith("_one") else len(texts)) / s
                             for name, s in seconds.items()}))
        print(f"  {count:4d} adapters: " + ", ".join(f"{k} {v:.0f}/s" for k, v in rows[-1][1].items()),
              flush=True)

    print(f"\n{date.today()}, {machine(device)}, {torch.get_num_threads()} torch threads; "
          f"{len(texts)} mixed texts; LoRA {args.lora or 'default'}; {args.rounds} rounds; "
          "texts/s, and routed / floor")
    print("| adapters | bare forward (floor) | bare, packed | peft mixed batch, task given | "
          "per-adapter batches, task given | ahl routed | routed / floor | routed / packed | "
          "one text per call: floor ms, routed ms, floor / routed |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for count, tput in rows:
        print(f"| {count} | {tput['floor']:.0f} | {tput['packed']:.0f} | {tput['mixed']:.0f} | "
              f"{tput['grouped']:.0f} | {tput['routed']:.0f} | {tput['routed'] / tput['floor']:.2f}x | "
              f"{tput['routed'] / tput['packed']:.2f}x | "
              f"{1000 / tput['floor_one']:.1f}, {1000 / tput['routed_one']:.1f}, "
              f"{tput['routed_one'] / tput['floor_one']:.2f}x |")
    first, last = memory[0], memory[-1]
    per_rss = (last[1] - first[1]) / max(1, last[0] - first[0])
    print(f"memory per extra LoRA adapter: {adapter_bytes(bank, names[0]) / 1024:.0f} KiB of "
          f"tensors; {'CUDA allocated memory' if device.startswith('cuda') else 'peak RSS'} grew "
          f"{per_rss:.2f} MiB per adapter from {first[0]} to {last[0]}")


if __name__ == "__main__":
    main()

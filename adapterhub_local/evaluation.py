"""Evaluate one task's test split in every mode, for one row of each accuracy matrix.

- oracle:   the task is given; its own adapter answers.
- routed:   the router picks one task; a wrong pick is a wrong answer.
- composed: the router's top-k tasks answer together (see inference.answer).
- routing:  the share of the task's inputs that the router sends to it (top-1).
"""

from dataclasses import dataclass
from typing import Callable

import torch

from adapterhub_local.inference import answer

COMPOSE_TOP_K = 2
ROUNDING = 1e-5  # settled() leaves closer calls than this to answer() itself


@dataclass
class TaskEval:
    oracle: float
    routed: float
    composed: float
    routing: float
    confusion: list[int]
    """How many inputs were routed to each task of the router, then how many abstained."""


def evaluate_task(bank, router, task: str, adapters: dict[str, str], labels: list[int],
                  oracle_probs: list[torch.Tensor], features: torch.Tensor,
                  other_probs: Callable[[list[tuple[int, str]]], list[torch.Tensor]]) -> TaskEval:
    """All modes for one task. oracle_probs are its own adapter's outputs on its test split,
    features the bare base's, other_probs([(row, adapter)]) other adapters' outputs on its rows
    (serving.Loader gives all three, reusing what it can)."""
    n = len(labels)
    oracle_right = [int(p.argmax()) == y for p, y in zip(oracle_probs, labels)]
    routes = router.route(features, top_k=COMPOSE_TOP_K)
    first = [r.tasks[0] if r.tasks else None for r in routes]
    label_sets = {t: bank.labels[name] for t, name in adapters.items()}
    # Composing needs the other routed tasks' adapters on these inputs, except where the own
    # adapter's answer settles it (most inputs: the router is rarely unsure).
    open_rows = [row for row, r in enumerate(routes)
                 if not settled(r, task, oracle_probs[row], label_sets)]
    pairs = [(row, t) for row in open_rows for t in routes[row].tasks if t != task]
    other = other_probs([(row, adapters[t]) for row, t in pairs])
    probs = [{task: oracle_probs[row]} for row in range(n)]
    for (row, t), p in zip(pairs, other):
        probs[row][t] = p
    # A settled input is right when its task was routed and its own adapter is right.
    composed_right = [task in r.tasks and ok for r, ok in zip(routes, oracle_right)]
    for row in open_rows:
        result = answer(routes[row], probs[row], label_sets)
        composed_right[row] = (result["label"] == label_sets[task][labels[row]]
                               and task in result["tasks"])
    confusion = [sum(f == t for f in first) for t in router.tasks_] + [first.count(None)]
    return TaskEval(
        oracle=sum(oracle_right) / n,
        routed=sum(f == task and ok for f, ok in zip(first, oracle_right)) / n,
        composed=sum(composed_right) / n,
        routing=first.count(task) / n,
        confusion=confusion,
    )


def settled(route, task: str, own: torch.Tensor, label_sets: dict[str, list[str]]) -> bool:
    """Whether the composed answer to an input of `task` is known from its own adapter's
    probabilities alone (see inference.answer), so the other routed adapters need not run:
    - `task` was not routed: the answer cannot count;
    - else its label group (the routed tasks with its label set) answers its best label k when
      no other member's weight can move the mix off k (weight x the gap between its best two
      probabilities exceeds their weights), and no other label group can beat the group's mixed
      probability of k (at least weight x its best probability; a group's never exceeds its
      weight). Then the answer is right exactly when its own best label is."""
    if task not in route.tasks:
        return True
    mine = tuple(label_sets[task])
    weight = dict(zip(route.tasks, route.weights))
    best = own.topk(min(2, len(own))).values.tolist() + [0.0]
    same, others = 0.0, {}
    for t, w in weight.items():
        if t != task and tuple(label_sets[t]) == mine:
            same += w
        elif t != task:
            others[tuple(label_sets[t])] = others.get(tuple(label_sets[t]), 0.0) + w
    # answer() mixes in float32: a margin keeps a near tie on the side of computing it.
    return (weight[task] * (best[0] - best[1]) > same + ROUNDING
            and all(w < weight[task] * best[0] - ROUNDING for w in others.values()))


def evaluate_step(bank, router, loader, versions: dict, adapters: dict[str, str]) -> dict[str, TaskEval]:
    """Every task's given version ({task: model version}, adapters loaded as {task: name}) in
    every mode, each scored from the weights in memory (loader.scores, loader.other_probs)."""
    results = {}
    for task, version in versions.items():
        split = loader.test_split(version)
        features, probs = loader.scores(bank, adapters[task], version)
        results[task] = evaluate_task(
            bank, router, task, adapters, split["labels"], probs, features,
            lambda pairs, v=version: loader.other_probs(bank, v, pairs))
    return results

"""Evaluate one task's test split in every mode, for one row of each accuracy matrix.

- oracle:   the task is given; its own adapter answers.
- routed:   the router picks one task; a wrong pick is a wrong answer.
- composed: the router's top-k tasks answer together (see inference.answer).
- routing:  the share of the task's inputs that the router sends to it (top-1).
"""

from dataclasses import dataclass

import torch

from adapterhub_local.inference import answer

COMPOSE_TOP_K = 2


@dataclass
class TaskEval:
    oracle: float
    routed: float
    composed: float
    routing: float
    confusion: list[int]
    """How many inputs were routed to each task of the router, then how many abstained."""


def evaluate_task(bank, router, task: str, adapters: dict[str, str], texts: list[str],
                  labels: list[int], oracle_probs: list[torch.Tensor], features: torch.Tensor,
                  max_length: int = 128) -> TaskEval:
    """All modes for one task. oracle_probs are its own adapter's outputs, features the bare
    base's (the caller may reuse both: see serving.Loader.oracle_probs)."""
    n = len(texts)
    oracle_right = [int(p.argmax()) == y for p, y in zip(oracle_probs, labels)]
    routes = router.route(features, top_k=COMPOSE_TOP_K)
    first = [r.tasks[0] if r.tasks else None for r in routes]
    # Composing needs the other routed tasks' adapters on these inputs; the own task's is known.
    pairs = [(row, t) for row, r in enumerate(routes) for t in r.tasks if t != task]
    other = bank.probabilities([texts[row] for row, _ in pairs], [adapters[t] for _, t in pairs],
                               max_length)
    probs = [{task: oracle_probs[row]} for row in range(n)]
    for (row, t), p in zip(pairs, other):
        probs[row][t] = p
    label_sets = {t: bank.labels[name] for t, name in adapters.items()}
    composed_right = 0
    for row, route in enumerate(routes):
        result = answer(route, probs[row], label_sets)
        composed_right += (result["label"] == label_sets[task][labels[row]] and task in result["tasks"])
    confusion = [sum(f == t for f in first) for t in router.tasks_] + [first.count(None)]
    return TaskEval(
        oracle=sum(oracle_right) / n,
        routed=sum(f == task and ok for f, ok in zip(first, oracle_right)) / n,
        composed=composed_right / n,
        routing=first.count(task) / n,
        confusion=confusion,
    )



def evaluate_step(bank, router, loader, versions: dict, adapters: dict[str, str]) -> dict[str, TaskEval]:
    """Every task's given version ({task: model version}, adapters loaded as {task: name}) in
    every mode, each scored from the weights in memory (loader.oracle_probs)."""
    from adapterhub_local.serving import max_length_of

    results = {}
    for task, version in versions.items():
        split = loader.test_split(version)
        results[task] = evaluate_task(bank, router, task, adapters, split["texts"], split["labels"],
                                      loader.oracle_probs(bank, adapters[task], version),
                                      loader.features(bank, version), max_length_of(version))
    return results

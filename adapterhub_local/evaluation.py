"""Evaluate every task's test split in every mode: one row of each score matrix.

- oracle:   the task is given; its own adapter answers.
- routed:   the router picks one task; a wrong pick is a wrong answer.
- composed: the router's top-k tasks answer together (inference.answer for classify tasks,
            their mixed next-token distributions for generate tasks).
- routing:  the share of the task's inputs that the router sends to it (top-1).
A classify task's score is accuracy; a generate task's is its metric (scoring.METRICS), with
the soft metric beside it.
"""

from dataclasses import dataclass

import torch

from adapterhub_local.inference import answer, generation_mixture
from adapterhub_local.scoring import SOFT_METRIC, mean_score
from adapterhub_local.serving import kind_of, metric_of
from adapterhub_local.store import TAG

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
    soft: dict | None = None
    """A generate task's soft metric in each mode ({"metric", "oracle", "routed", "composed"})."""


def route_task(router, task: str, oracle_probs: list[torch.Tensor], features: torch.Tensor,
               label_sets: dict[str, list[str]], grams: list[list[int]] | None = None
               ) -> tuple[list, list[int]]:
    """(routes, open rows) of one task's test split: each input's top routes, and the inputs
    whose composed answer needs the other routed tasks' adapters, those that the own adapter's
    answer does not settle (most inputs: the router is rarely unsure)."""
    routes = router.route(features, COMPOSE_TOP_K, grams)
    return routes, [row for row, r in enumerate(routes)
                    if not settled(r, task, oracle_probs[row], label_sets)]


def score_task(router_tasks: list[str], task: str, labels: list[int], routes: list,
               oracle_probs: list[torch.Tensor], label_sets: dict[str, list[str]],
               open_rows: list[int], other: dict[tuple[int, str], torch.Tensor]) -> TaskEval:
    """All modes for one task: oracle_probs are its own adapter's outputs on its test split,
    other the other routed adapters' on its open rows ({(row, task): probabilities})."""
    n = len(labels)
    oracle_right = [int(p.argmax()) == y for p, y in zip(oracle_probs, labels)]
    first, routing = routing_of(router_tasks, task, routes)
    # A settled input is right when its task was routed, a classify task answers (the first
    # routed task is one) and its own adapter is right.
    composed_right = [task in r.tasks and bool(label_sets[r.tasks[0]]) and ok
                      for r, ok in zip(routes, oracle_right)]
    for row in open_rows:
        probs = {t: other[(row, t)] for t in routes[row].tasks if t != task and label_sets[t]}
        result = answer(routes[row], {task: oracle_probs[row], **probs}, label_sets)
        composed_right[row] = (result["label"] == label_sets[task][labels[row]]
                               and task in result["tasks"])
    return TaskEval(
        oracle=sum(oracle_right) / n,
        routed=sum(f == task and ok for f, ok in zip(first, oracle_right)) / n,
        composed=sum(composed_right) / n,
        **routing,
    )


def routing_of(router_tasks: list[str], task: str, routes: list) -> tuple[list, dict]:
    """(each input's first routed task, {"routing", "confusion"}) of one task's test split."""
    first = [r.tasks[0] if r.tasks else None for r in routes]
    return first, {"routing": first.count(task) / len(first),
                   "confusion": [first.count(t) for t in router_tasks] + [first.count(None)]}


def settled(route, task: str, own: torch.Tensor, label_sets: dict[str, list[str]]) -> bool:
    """Whether the composed answer to an input of `task` is known from its own adapter's
    probabilities alone (see inference.answer), so the other routed adapters need not run:
    - `task` was not routed, or a generate task was routed first (it answers with text): the
      answer cannot count;
    - else its label group (the routed tasks with its label set) answers its best label k when
      no other member's weight can move the mix off k (weight x the gap between its best two
      probabilities exceeds their weights), and no other label group can beat the group's mixed
      probability of k (at least weight x its best probability; a group's never exceeds its
      weight). Then the answer is right exactly when its own best label is."""
    if task not in route.tasks or not label_sets[route.tasks[0]]:
        return True
    mine = tuple(label_sets[task])
    weight = dict(zip(route.tasks, route.weights))
    best = own.topk(min(2, len(own))).values.tolist() + [0.0]
    same, others = 0.0, {}
    for t, w in weight.items():
        if not label_sets[t]:  # a generate task: no part in a label's answer
            continue
        if t != task and tuple(label_sets[t]) == mine:
            same += w
        elif t != task:
            others[tuple(label_sets[t])] = others.get(tuple(label_sets[t]), 0.0) + w
    # answer() mixes in float32: a margin keeps a near tie on the side of computing it.
    return (weight[task] * (best[0] - best[1]) > same + ROUNDING
            and all(w < weight[task] * best[0] - ROUNDING for w in others.values()))


def evaluate_step(bank, router, loader, versions: dict) -> dict[str, TaskEval]:
    """Every task's given version ({task: model version}) in every mode, each scored from its
    adapter's weights as they are now (serving.Loader reuses a score only for the very weights
    that produced it). Every task is routed first, so that the other adapters' outputs that
    composed mode needs, across all tasks, run in shared batches."""
    label_sets = {t: loader.labels(bank, t, v) for t, v in versions.items()}
    routed, wanted, generated = {}, [], {}
    for task, version in versions.items():
        features, outputs = loader.scores(bank, task, version)
        grams = loader.grams(bank, version) if router.reads_words else None
        if kind_of(version) == "generate":
            generated[task] = router.route(features, COMPOSE_TOP_K, grams), outputs
            continue
        routes, open_rows = route_task(router, task, outputs, features, label_sets, grams)
        routed[task] = routes, outputs, open_rows
        wanted += [(task, row, t) for row in open_rows for t in routes[row].tasks
                   if t != task and label_sets[t]]
    other: dict[str, dict] = {task: {} for task in versions}
    for (task, row, t), p in zip(wanted, loader.other_probs(bank, versions, wanted)):
        other[task][(row, t)] = p
    results = {task: score_task(router.tasks_, task, loader.test_split(versions[task])["labels"],
                                routes, probs, label_sets, open_rows, other[task])
               for task, (routes, probs, open_rows) in routed.items()}
    results.update(score_generated(bank, router.tasks_, loader, versions, generated, label_sets))
    return {task: results[task] for task in versions}


def score_generated(bank, router_tasks: list[str], loader, versions: dict, generated: dict,
                    label_sets: dict) -> dict[str, TaskEval]:
    """All modes for each generate task ({task: (routes, its oracle completions)}). A composed
    row decodes again only where the other routed generate adapters could change its output:
    unless its own adapter's weight times its smallest margin (generation.Generated) exceeds
    theirs, and its own output ended within a budget no other member extends, the mixture
    decodes (generation.complete, as predict does); all such rows in shared batches."""
    from adapterhub_local.generation import complete, prompt_ids

    budgets = {t: int(v.tags.get(f"{TAG}max_new_tokens", 0)) for t, v in versions.items()}
    answers, reopen = {}, []  # (task, row) -> the composed completion (None: a wrong answer)
    for task, (routes, outputs) in generated.items():
        for row, route in enumerate(routes):
            mixture = dict(generation_mixture(route, label_sets))
            others = sum(w for t, w in mixture.items() if t != task)
            ended = (len(outputs[row].tokens) < budgets[task]
                     or all(budgets[t] <= budgets[task] for t in mixture))
            if task not in mixture:
                answers[(task, row)] = None
            elif ended and mixture[task] * outputs[row].margin > others + ROUNDING:
                answers[(task, row)] = outputs[row].text
            else:
                reopen.append((task, row, list(mixture.items())))
    names = {t: loader.load_version(bank, t, versions[t]) for *_, mixture in reopen
             for t, _ in mixture}
    prompts = prompt_ids(bank.base, [loader.test_split(versions[task])["texts"][row]
                                     for task, row, _ in reopen])
    mixtures = [[(names[t], w) for t, w in mixture] for *_, mixture in reopen]
    for (task, row, _), out in zip(reopen, complete(bank, prompts, mixtures)):
        answers[(task, row)] = out.text
    results = {}
    for task, (routes, outputs) in generated.items():
        targets = loader.test_split(versions[task])["targets"]
        first, routing = routing_of(router_tasks, task, routes)
        modes = {"oracle": [o.text for o in outputs],
                 "routed": [o.text if f == task else None for o, f in zip(outputs, first)],
                 "composed": [answers[(task, row)] for row in range(len(outputs))]}
        scored = {metric: {mode: mean_score(metric, texts, targets) for mode, texts in modes.items()}
                  for metric in (metric_of(versions[task]), SOFT_METRIC)}
        main = scored[metric_of(versions[task])]
        results[task] = TaskEval(oracle=main["oracle"], routed=main["routed"],
                                 composed=main["composed"], **routing,
                                 soft={"metric": SOFT_METRIC, **scored[SOFT_METRIC]})
    return results



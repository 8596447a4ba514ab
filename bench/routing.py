"""Routing quality on the bundled sequence: oracle vs routed vs composed, ours vs a reference.

Reads a store that ran the bundled sequence (`make demo`) and, on the same test splits:
  - the store's own matrices: average accuracy per step in each mode, routing accuracy per task;
  - the reference router the literature starts from: logistic regression on the mean-pooled
    last layer of the frozen base, trained on the tasks' training texts, with task ids as labels;
  - our Gaussian router on the last layer (to show what routing from the middle layer gives).
A routed answer is right when the input goes to its own task and that adapter labels it right.

    .venv/bin/python bench/routing.py [--store store]
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from adapterhub_local import Hub  # noqa: E402
from adapterhub_local.data import load_spec, load_task_data  # noqa: E402
from adapterhub_local.serving import TEST_ARTIFACT  # noqa: E402
from adapterhub_local.inference import length_batches, mean_pool  # noqa: E402
from adapterhub_local.router import GaussianRouter, task_stats  # noqa: E402
from adapterhub_local.trainer import split_validation  # noqa: E402

TASKS = Path(__file__).resolve().parent.parent / "tasks"


@torch.inference_mode()
def last_layer_features(bank, texts: list[str]) -> torch.Tensor:
    """Mean-pooled last layer of the bare base: the features routers usually start from."""
    ids = bank.base.tokenize(texts, 128)
    out = torch.zeros(len(texts), bank.base.hidden_size)
    with bank.bare():
        for rows in length_batches(ids, range(len(ids)), 64):
            batch = bank.base.pad([ids[i] for i in rows])
            pooled = mean_pool(bank.base.model(**batch).last_hidden_state, batch)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1)
    return out


def routed_accuracy(picks: list[int], task: int, oracle_right: list[bool]) -> float:
    return sum(p == task and ok for p, ok in zip(picks, oracle_right)) / len(picks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="store")
    args = parser.parse_args()
    hub = Hub(args.store)
    metrics = hub.metrics(confusion=True)
    tasks = metrics["tasks"]

    print("average accuracy % after each step (the store's own evaluation)")
    print(f"{'step':>4} {'task added':<20}{'oracle':>8}{'routed':>8}{'composed':>10}")
    modes = metrics["modes"]
    for i in range(len(modes["oracle"]["matrix"])):
        averages = []
        for mode in ("oracle", "routed", "composed"):
            row = [v for v in modes[mode]["matrix"][i] if v is not None]
            averages.append(100 * sum(row) / len(row))
        print(f"{i + 1:>4} {tasks[len(row) - 1]:<20}" + "".join(
            f"{a:>8.1f}" if k < 2 else f"{a:>10.1f}" for k, a in enumerate(averages)))

    # The reference and the ablation, refit on the same tasks' training texts.
    bank, _, adapters, *_ = hub.loader.open_router(hub.store.base_binding()[0])
    train, test, stats_last, oracle_right = {}, {}, {}, {}
    for j, task in enumerate(tasks):
        spec = load_spec(TASKS / f"{task}.toml")
        data = load_task_data(task, spec.train, spec.test)
        fit_rows, held_rows = split_validation(data.train_labels, 0)
        features = last_layer_features(bank, data.train_texts)
        train[task] = features[fit_rows]
        stats_last[task] = task_stats(features[fit_rows], [data.train_labels[i] for i in fit_rows],
                                      data.labels, features[held_rows])
        version = hub.store.current_version(task)
        split = hub.store.read_json_artifact(version.run_id, TEST_ARTIFACT)
        test[task] = last_layer_features(bank, split["texts"])
        probs = bank.probabilities(split["texts"], [adapters[task]] * len(split["texts"]))
        oracle_right[task] = [int(p.argmax()) == y for p, y in zip(probs, split["labels"])]

    from sklearn.linear_model import LogisticRegression

    for prefix in sorted({4, len(tasks)}):
        names = tasks[:prefix]
        x = torch.cat([train[t] for t in names]).numpy()
        y = [j for j, t in enumerate(names) for _ in range(len(train[t]))]
        reference = LogisticRegression(max_iter=3000).fit(x, y)
        last_only = GaussianRouter().fit({t: stats_last[t] for t in names})
        print(f"\nfirst {prefix} tasks: routing accuracy % (routed accuracy %) per task")
        print(f"{'task':<20}{'reference LR':>16}{'ours, last layer':>20}")
        totals = [[], []]
        for j, task in enumerate(names):
            ref = reference.predict(test[task].numpy()).tolist()
            ours = [names.index(r.tasks[0]) if r.tasks else -1 for r in last_only.route(test[task])]
            cells = []
            for k, picks in enumerate((ref, ours)):
                share = sum(p == j for p in picks) / len(picks)
                routed = routed_accuracy(picks, j, oracle_right[task])
                totals[k].append((share, routed))
                cells.append(f"{100 * share:.1f} ({100 * routed:.1f})")
            print(f"{task:<20}{cells[0]:>16}{cells[1]:>20}")
        print(f"{'mean':<20}" + "".join(
            f"{100 * sum(s for s, _ in t) / len(t):.1f} ({100 * sum(r for _, r in t) / len(t):.1f})".rjust(w)
            for t, w in zip(totals, (16, 20))))
        step = modes["routed"]["matrix"][prefix - 1]
        print(f"ours as shipped (middle layer, the store's figures): routing "
              f"{100 * sum(metrics['routing_accuracy'][prefix - 1][:prefix]) / prefix:.1f}, routed "
              f"{100 * sum(step[:prefix]) / prefix:.1f}, oracle "
              f"{100 * sum(modes['oracle']['matrix'][prefix - 1][:prefix]) / prefix:.1f}")


if __name__ == "__main__":
    main()

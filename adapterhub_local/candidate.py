"""A candidate: a freshly trained adapter, measured and stored as its run's artifacts, waiting
for its commit (commit.py). Everything here needs no lock, so writers do it in parallel."""

import tempfile
from dataclasses import dataclass
from pathlib import Path

from adapterhub_local.scoring import SOFT_METRIC, mean_score
from adapterhub_local.serving import (ADAPTER_ARTIFACT, SCORES_ARTIFACT, STATS_ARTIFACT,
                                      TEST_ARTIFACT, compute_scores, scores_tensors)
from adapterhub_local.store import sha256_file


@dataclass
class Candidate:
    """A trained adapter waiting for its commit: its run (artifacts logged), what it was
    planned and measured as, and the router statistics of its task."""

    plan: object
    base: object
    bank: object
    run_id: str
    adapter: str
    files: dict
    accuracy: float
    stats: object


def measure_candidate(store, loader, plan, loaded, bank, run_id: str, adapter: str, report,
                      train_seconds: float) -> Candidate:
    """Test accuracy and router statistics of a freshly trained adapter, and its files as run
    artifacts (the adapter with their checksums, the statistics, the test split)."""
    from adapterhub_local import lexical
    from adapterhub_local.router import task_stats
    from adapterhub_local.trainer import split_validation

    from safetensors.torch import save_file

    data = plan.data
    test_features, outputs = compute_scores(bank, adapter, data.test_texts, plan.train.max_length,
                                            plan.features)
    if data.kind == "generate":
        # A generate task's score is its metric's (candidate.accuracy, the accuracy tag).
        texts = [o.text for o in outputs]
        accuracy = mean_score(data.metric, texts, data.test_targets)
        measured = {f"test_{SOFT_METRIC}": mean_score(SOFT_METRIC, texts, data.test_targets)}
    else:
        accuracy = sum(int(p.argmax()) == y for p, y in zip(outputs, data.test_labels)) / len(outputs)
        measured = {}
    measured[f"test_{data.metric}"] = accuracy  # test_accuracy for a classify task
    store.log_metrics(run_id, {**measured, "train_seconds": train_seconds,
                               "trainable_params": report.trainable_params}, report.steps)
    fit_rows, held_rows = split_validation(data.strata(), plan.train.seed)
    features = report.features  # training ran the bottom half already, where it could
    if features is None:
        features = bank.features(data.train_texts, plan.train.max_length, plan.features)
    # A generate task is one class of the router: its prompts.
    classes = data.labels or ["prompt"]
    grams = lexical.grams(bank.base, data.train_texts, plan.train.max_length)
    stats = task_stats(features[fit_rows], [data.strata()[i] for i in fit_rows], classes,
                       features[held_rows], plan.features, [grams[i] for i in fit_rows],
                       [grams[i] for i in held_rows], lexical.gram_space(bank.base))
    digest = bank.digest(adapter)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / ADAPTER_ARTIFACT
        bank.save_adapter(adapter, folder)
        files = {f.name: sha256_file(f) for f in sorted(folder.iterdir())}
        store.log_artifacts(run_id, folder, ADAPTER_ARTIFACT)
        stats.save(Path(tmp) / STATS_ARTIFACT)
        store.log_artifacts(run_id, Path(tmp) / STATS_ARTIFACT, STATS_ARTIFACT)
        # Later steps reuse these scores while the weights they load have this digest.
        scores = Path(tmp) / SCORES_ARTIFACT
        scores.parent.mkdir()
        save_file(scores_tensors(test_features, outputs), scores)
        store.log_artifacts(run_id, scores.parent, scores.parent.name)
        # The test texts' grams, for routers that read words: they were just tokenized.
        split = {"texts": data.test_texts, "labels": data.test_labels,
                 "grams": lexical.grams(bank.base, data.test_texts, plan.train.max_length),
                 **({"targets": data.test_targets} if data.kind == "generate" else {}),
                 "scores": {"sha256": sha256_file(scores), "adapter_digest": digest}}
    store.log_json(run_id, TEST_ARTIFACT, split)
    # The commit scores every task again; these are the very weights it will find in memory.
    loader.cache[(run_id, "test")] = split
    loader.cache[(run_id, "scores", digest)] = (test_features, outputs)
    return Candidate(plan, loaded, bank, run_id, adapter, files, accuracy, stats)

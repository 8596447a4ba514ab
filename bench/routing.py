"""Routing quality on both task sequences: ahl's router and its variants beside two references.

For each sequence (the bundled tasks/ and the confusable tasks/confusable/), on a store that ran
it with ahl's defaults (made with `ahl demo` under --work when missing), after its first 4 tasks
and after all of them:
  - the store's own average accuracy per step, in each mode;
  - reference, frozen features: logistic regression on the mean-pooled last layer of the frozen
    base, trained on the tasks' training texts with task ids as labels (where routing in the
    literature starts);
  - reference, joint training (the upper bound continual methods aim to rival): one LoRA with
    ahl's defaults trained on all the tasks' training rows at once, over the union of their
    classes ("task:label"); its routing is the task of the label it answers;
  - router variants, each fit from per-task statistics of the tasks' training features, the way
    add-task fits the shipped one, and scored on the same test splits with the store's adapters;
    among them the shipped word evidence (lexical.py) with unigrams only and other smoothings;
  - four second stages over the store's own router: its top two re-weighed by the candidate
    adapters' sureness (their answers' entropy), by their energy (their logits' logsumexp) or by
    the input's density among each adapter's own training rows (its adapted features), and
    "auto", composing only unsure inputs.
Routing accuracy: share of a task's test inputs sent to it. Routed accuracy: share sent to it and
labelled right by its adapter. Composed: the top 2 tasks answer together (inference.answer).

    .venv/bin/python bench/routing.py [--work bench-out/routing] [--sequence tasks/confusable]
                                      [--only density --only "own router"]
"""

import argparse
import bisect
import contextlib
import csv
import functools
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from adapterhub_local import Hub, lexical  # noqa: E402
from adapterhub_local.data import load_spec, load_task_data  # noqa: E402
from adapterhub_local.evaluation import COMPOSE_TOP_K, score_task  # noqa: E402
from adapterhub_local.inference import length_batches, mean_pool  # noqa: E402
from adapterhub_local.router import (FEATURES, GaussianRouter, Route, calibration_share,  # noqa: E402
                                     task_stats, within_class)
from adapterhub_local.serving import TEST_ARTIFACT  # noqa: E402
from adapterhub_local.trainer import split_validation  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEQUENCES = [ROOT / "tasks", ROOT / "tasks" / "confusable"]
RANPAC_DIM = 2048
AUTO_SURE = 0.9
DENSITY_SHRINKAGE = 0.1  # of each adapter's own feature covariance (0.01 and 0.3 within 0.5 points)


@torch.inference_mode()
def layer_features(bank, texts: list[str]) -> torch.Tensor:
    """Mean-pooled states of every layer of the bare base, each of unit length, [n, layers, D];
    the last layer's are the features routers usually start from."""
    ids = bank.base.tokenize(texts, 128)
    out = torch.zeros(len(texts), bank.base.model.config.num_hidden_layers + 1, bank.base.hidden_size)
    with bank.bare():
        for rows in length_batches(ids, range(len(ids)), 64):
            batch = bank.base.pad([ids[i] for i in rows])
            hidden = bank.base.model(**batch, output_hidden_states=True).hidden_states
            pooled = torch.stack([mean_pool(h, batch) for h in hidden], 1)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1)
    return out


def ranpac(features: torch.Tensor) -> torch.Tensor:
    """RanPAC's frozen random projection with a ReLU (McDonnell et al. 2023): class means drawn
    apart in a wider space before the shared-covariance Gaussian."""
    weight = torch.randn(features.shape[1], RANPAC_DIM, generator=torch.Generator().manual_seed(0))
    return torch.relu(features @ weight)


def store_for(sequence: Path, work: Path) -> Path:
    """A store that ran the sequence with ahl's defaults (made once, then reused)."""
    store = work / f"store-{sequence.name}"
    if not (store / "mlflow.db").exists():
        subprocess.run([Path(sys.executable).parent / "ahl", "demo", "--tasks-dir",
                        str(sequence), "--store", str(store), "--fresh"], check=True,
                       stdout=subprocess.DEVNULL)
    return store


class Sequence:
    """One sequence's store, adapters, splits and features, computed once for every variant."""

    def __init__(self, folder: Path, work: Path):
        self.folder, self.work = folder, work
        self.hub = Hub(store_for(folder, work))
        self.tasks = tomllib.loads((folder / "sequence.toml").read_text(encoding="utf-8"))["tasks"]
        self.bank, self.router, self.adapters, self.versions, _ = self.hub.loader.open_router(
            self.hub.store.base_binding()[0])
        self.label_sets = {t: self.bank.labels[a] for t, a in self.adapters.items()}
        self.data, self.test, self.labels = {}, {}, {}
        for task in self.tasks:
            spec = load_spec(folder / f"{task}.toml")
            self.data[task] = load_task_data(task, spec.train, spec.test)
            split = self.hub.store.read_json_artifact(
                self.hub.store.current_version(task).run_id, TEST_ARTIFACT)
            self.test[task], self.labels[task] = split["texts"], split["labels"]
        self.fit_rows = {t: split_validation(self.data[t].train_labels, 0) for t in self.tasks}
        self.fit_labels = {t: [self.data[t].train_labels[i] for i in self.fit_rows[t][0]]
                           for t in self.tasks}
        cache = work / f"features-{folder.name}.safetensors"  # with logits (cache-*: probabilities)
        if not cache.exists():
            save_file(self.compute(), cache)
        tensors = load_file(cache)
        # {"layers": {task: (fit, held, test)}}: every layer's features [n, layers, D];
        # logits[adapter task, task]: that adapter's head logits on the task's test split.
        self.features = {"layers": {t: tuple(tensors[f"layers/{t}/{part}"] for part in ("fit", "held", "test"))
                                    for t in self.tasks}}
        self.logits = {(a, t): tensors[f"logits/{a}/{t}"] for a in self.tasks for t in self.tasks}
        self.probs = {key: list(logits.softmax(-1)) for key, logits in self.logits.items()}

    def compute(self) -> dict[str, torch.Tensor]:
        """Features of every task's rows and every adapter's outputs on every test split."""
        out = {}
        for task in self.tasks:
            fit, held = self.fit_rows[task]
            train = layer_features(self.bank, self.data[task].train_texts)
            out[f"layers/{task}/fit"], out[f"layers/{task}/held"] = train[fit], train[held]
            out[f"layers/{task}/test"] = layer_features(self.bank, self.test[task])
            for adapter_task, adapter in self.adapters.items():
                head = self.bank.heads[adapter]
                with torch.inference_mode():
                    out[f"logits/{adapter_task}/{task}"] = head(self.bank.pooled(
                        adapter, self.test[task]).to(head.weight.device)).cpu()
        return {k: v.contiguous() for k, v in out.items()}

    def score(self, names: list[str], routes: dict[str, list]) -> dict[str, tuple]:
        """(routing, routed, composed) per task for routes ({task: top-2 routes per input})."""
        scores = {}
        for task in names:
            n = len(routes[task])
            other = {(row, t): self.probs[t, task][row] for row in range(n) for t in names}
            result = score_task(names, task, self.labels[task], routes[task],
                                self.probs[task, task], self.label_sets, list(range(n)), other)
            scores[task] = (result.routing, result.routed, result.composed)
        return scores

    def gaussian(self, names: list[str], transform, kind=GaussianRouter, words=None) -> dict[str, tuple]:
        """A Gaussian router (`kind`: its class) fit from per-task statistics of the features
        that `transform` makes of every layer's [n, layers, D]; with word evidence where
        `words` picks the grams it reads (e.g. all_grams)."""
        stats = {}
        for t in names:
            fit, held, _ = self.features["layers"][t]
            grams = {} if words is None else {"grams": words(self, self.grams[t][0]),
                                              "calibration_grams": words(self, self.grams[t][1]),
                                              "gram_space": lexical.gram_space(self.bank.base)}
            stats[t] = task_stats(transform(fit), self.fit_labels[t], self.data[t].labels,
                                  transform(held), **grams)
        router = kind().fit(stats)
        return self.score(names, {t: router.route(transform(self.features["layers"][t][2]), COMPOSE_TOP_K,
                                                  words(self, self.grams[t][2]) if words else None)
                                  for t in names})

    @functools.cached_property
    def grams(self) -> dict[str, tuple]:
        """{task: (fit rows' grams, held-out rows', test split's)} (lexical.grams)."""
        out = {}
        for t in self.tasks:
            train = lexical.grams(self.bank.base, self.data[t].train_texts)
            fit, held = self.fit_rows[t]
            out[t] = ([train[i] for i in fit], [train[i] for i in held],
                      lexical.grams(self.bank.base, self.test[t]))
        return out

    def blocks(self, kind: str):
        """The transform that picks what the router reads (router.FEATURES) from "layers"."""
        return lambda x: x[:, [b + 1 for b in FEATURES[kind](self.bank.base.middle)]].flatten(1)

    def stored_routes(self, names: list[str]) -> dict[str, list[Route]]:
        """The top-2 routes of the router add-task fit, from the store's own statistics."""
        router = GaussianRouter().fit({t: self.hub.loader.task_stats(
            self.hub.store.get_version(t, self.versions[t])) for t in names})
        test = self.blocks(router.features_)
        return {t: router.route(test(self.features["layers"][t][2]), COMPOSE_TOP_K,
                                self.grams[t][2] if router.reads_words else None) for t in names}

    def stored(self, names: list[str]) -> dict[str, tuple]:
        return self.score(names, self.stored_routes(names))

    def second_stage(self, names: list[str]) -> dict[str, tuple]:
        """The store's router, then its top two re-weighed by how sure each candidate adapter
        is of its answer: weight x exp(-normalised entropy of its label probabilities)."""
        return self.reweighed(names, lambda t, task, row: math.exp(-entropy(self.probs[t, task][row])))

    def energy_stage(self, names: list[str]) -> dict[str, tuple]:
        """The store's router, then its top two re-weighed by each candidate adapter's energy
        (Liu et al. 2020: an input like its training data gets larger logits): weight x
        exp(logsumexp of its logits - log of its labels), a uniform head's logsumexp at zero."""
        return self.reweighed(names, lambda t, task, row: math.exp(
            self.logits[t, task][row].logsumexp(-1).item() - math.log(len(self.label_sets[t]))))

    def reweighed(self, names: list[str], sureness) -> dict[str, tuple]:
        """The store's top-two routes, each weight times sureness(candidate task, input's task,
        row), normalised and sorted again."""
        routes = {}
        for task, rows in self.stored_routes(names).items():
            routes[task] = []
            for row, route in enumerate(rows):
                sure = [sureness(t, task, row) for t in route.tasks]
                mass = [w * s for w, s in zip(route.weights, sure)]
                order = sorted(range(len(mass)), key=lambda i: -mass[i])
                weights = [mass[i] / sum(mass) for i in order] if mass else []
                routes[task].append(Route([route.tasks[i] for i in order], weights,
                                          weights[0] if weights else 0.0))
        return self.score(names, routes)

    def density_stage(self, names: list[str]) -> dict[str, tuple]:
        """The store's router, then its top two re-weighed by how typical the input is of each
        candidate adapter's own training rows: weight x the share of the adapter's held-out rows
        whose features (mean-pooled through it) lie farther from its class means (Mahalanobis,
        its own shrunk covariance) than the input's. A p-value puts every adapter on one scale,
        which the heads' energy lacked."""
        p_values = self.adapted_p_values()
        return self.reweighed(names, lambda t, task, row: p_values[t, task][row])

    def adapted_p_values(self) -> dict[tuple[str, str], list[float]]:
        """{(adapter's task, test split's task): p-value per row} (density_stage)."""
        cache = self.work / f"adapted-{self.folder.name}.safetensors"
        if not cache.exists():
            save_file({k: v.contiguous() for k, v in self.adapted_features().items()}, cache)
        pooled, p_values = load_file(cache), {}
        for t in self.tasks:
            # The router's own Gaussian over one task's classes, in that adapter's features
            fit, held = self.fit_rows[t]
            rows = pooled[f"train/{t}"]
            stats = task_stats(rows[fit], self.fit_labels[t], self.data[t].labels, rows[held])
            own = GaussianRouter(shrinkages=(DENSITY_SHRINKAGE,)).fit({t: stats})
            held_out = sorted(own.distances(stats.calibration).tolist())
            for task in self.tasks:
                p_values[t, task] = [1 - bisect.bisect_left(held_out, v) / len(held_out)
                                     + 1 / (len(held_out) + 1)
                                     for v in own.distances(pooled[f"test/{t}/{task}"]).tolist()]
        return p_values

    def adapted_features(self) -> dict[str, torch.Tensor]:
        """Each adapter's pooled features of its own training rows and of every test split."""
        out = {}
        for t, adapter in self.adapters.items():
            out[f"train/{t}"] = self.bank.pooled(adapter, self.data[t].train_texts)
            for task in self.tasks:
                out[f"test/{t}/{task}"] = self.bank.pooled(adapter, self.test[task])
        return out

    def auto(self, names: list[str]) -> dict[str, tuple]:
        """The store's router, composing only where it is unsure (top weight < AUTO_SURE)."""
        routes = {t: [Route(r.tasks[:1], [1.0], r.confidence) if r.confidence >= AUTO_SURE else r
                      for r in rows] for t, rows in self.stored_routes(names).items()}
        return self.score(names, routes)

    def logistic(self, names: list[str]) -> dict[str, tuple]:
        """Reference: logistic regression on the last layer, task ids as labels (a top-1 pick)."""
        from sklearn.linear_model import LogisticRegression

        x = torch.cat([torch.cat(self.features["layers"][t][:2])[:, -1] for t in names]).numpy()
        y = [j for j, t in enumerate(names) for _ in range(len(self.data[t].train_texts))]
        model = LogisticRegression(max_iter=3000).fit(x, y)
        routes = {}
        for t in names:
            probs = model.predict_proba(self.features["layers"][t][2][:, -1].numpy())
            routes[t] = [Route([names[int(p.argmax())]], [1.0], float(p.max())) for p in probs]
        return self.score(names, routes)

    def joint(self, names: list[str]) -> dict[str, tuple]:
        """Reference: one adapter over the union of classes, all tasks' rows at once."""
        home = self.work / f"joint-{self.folder.name}-{len(names)}"
        home.mkdir(parents=True, exist_ok=True)
        hub = Hub(home / "store")
        if "joint" not in [t["task"] for t in hub.tasks()]:
            files = {}
            for split in ("train", "test"):
                files[split] = home / f"{split}.csv"
                with open(files[split], "w", newline="", encoding="utf-8") as f:
                    writer = csv.writer(f)
                    writer.writerow(["text", "label"])
                    for t in names:
                        texts, labels = ((self.data[t].train_texts, self.data[t].train_labels)
                                         if split == "train" else (self.test[t], self.labels[t]))
                        writer.writerows((x, f"{t}:{self.data[t].labels[y]}") for x, y in zip(texts, labels))
            hub.add_task("joint", files["train"], files["test"])
        scores = {}
        for t in names:
            answers = [a["label"] for a in hub.predict(self.test[t], task="joint")]
            truth = [f"{t}:{self.data[t].labels[y]}" for y in self.labels[t]]
            routing = sum(a.split(":")[0] == t for a in answers) / len(answers)
            right = sum(a == y for a, y in zip(answers, truth)) / len(answers)
            scores[t] = (routing, right, right)
        return scores


class BiasCalibrated(GaussianRouter):
    """The shipped router, then one log-prior offset per task fit on the calibration rows by
    cross-entropy (the bias correction of BiC, Wu et al. 2019): for tasks that draw others'
    inputs, or lose theirs, more than their Gaussians say."""

    def fit(self, stats):
        super().fit(stats)
        x, task = self._calibration_rows(stats)
        offset = torch.zeros(len(self.tasks_), requires_grad=True)
        optimizer = torch.optim.LBFGS([offset], max_iter=200)

        def loss():
            optimizer.zero_grad()
            value = torch.nn.functional.nll_loss(self._task_log_probs(
                x.float(), self.coef_, self.intercept_ + offset[self.class_task_]), task)
            value = value + 1e-3 * offset.square().sum()
            value.backward()
            return value

        optimizer.step(loss)
        self.intercept_ = self.intercept_ + offset.detach()[self.class_task_]
        return self


class ScaledCovariance(GaussianRouter):
    """The shared covariance scaled per task by how spread that task's own rows are under it
    (trace(P S_t) / D, from the task's fitted rows): a one-parameter-per-task step from LDA
    towards QDA, whose full per-task covariances would cost T D x D matrices at prediction.
    Scored as log N(x; mean_k, s_t Sigma) with the classes of a task equally likely, over the
    temperature fit for the unscaled router; the abstain threshold stays the unscaled one."""

    def fit(self, stats):
        super().fit(stats)
        precision, dim = self.precision_.double(), self.precision_.shape[0]
        scales = []
        for s in stats.values():
            _, within = within_class(s.counts, s.sums, s.scatter)
            scales.append((precision * within).sum().item() / dim)
        self.scale_ = torch.tensor(scales)[self.class_task_].float()
        return self

    def task_probabilities(self, x):
        classes_of_task = torch.bincount(self.class_task_).float()[self.class_task_]
        scores = (-0.5 * self.class_distances(x) / self.scale_
                  - 0.5 * len(self.precision_) * self.scale_.log() - classes_of_task.log())
        return self.per_task((scores / self.temperature_).log_softmax(1)).exp()


class BlendedCovariance(GaussianRouter):
    """Regularized discriminant analysis (Friedman 1989) from the kept statistics: each task's
    classes share a covariance between the pooled one S and the task's own within-class one
    S_t, (1 - b) S + b S_t (both shrunk as the router shrinks). In S's whitened space (W =
    S^-1/2) that is I + b (W S_t W - I); its eigen-directions v give the task's precision as
    the shared one plus a correction along u = W v, of which the `rank` largest are kept (None:
    all, exact RDA; the rest read as the shared covariance). b (0 is the shipped router) and a
    temperature are chosen by the held-out rows' mean log-probability of their own task.
    Costs an eigendecomposition per task at every fit and a [D, rank] matrix per task."""

    blends = (0.0, 0.05, 0.1, 0.2, 0.4, 0.7)
    temperatures = tuple(2.0 ** k for k in range(-2, 9))
    rank: int | None = None

    def fit(self, stats):
        super().fit(stats)
        counts = torch.cat([s.counts for s in stats.values()])
        means, pooled = within_class(counts, torch.cat([s.sums for s in stats.values()]),
                                     sum(s.scatter.double() for s in stats.values()))
        eye = torch.eye(len(pooled), dtype=pooled.dtype)

        def shrink(cov):
            return (1 - self.shrinkage_) * cov + self.shrinkage_ * eye * cov.trace() / len(cov)

        values, vectors = torch.linalg.eigh(shrink(pooled))
        whiten = vectors @ torch.diag(values.rsqrt()) @ vectors.T
        excess = []  # per task: eigenvalues of W S_t W - I, and u = W v
        for s in stats.values():
            own = shrink(within_class(s.counts, s.sums, s.scatter)[1])
            lam, v = torch.linalg.eigh(whiten @ own @ whiten - eye)
            excess.append((lam, whiten @ v))
        totals = torch.stack([s.counts.sum() for s in stats.values()])
        self.log_prior_ = (counts / totals[self.class_task_] / len(stats)).clamp(min=1e-12).log()
        self.means64_ = means
        held_x, held_task = self._calibration_rows(stats)
        shared = self.class_distances(held_x).double()
        evidence = 0
        if self.words_ is not None:
            per_task = calibration_share(len(stats))
            evidence = self.words_weight_ * self.words_.scores(
                [g for s in stats.values() for g in s.calibration_grams[:per_task]])
        best = None
        for blend in self.blends:
            parts = []
            for lam, u in excess:
                c = 1 / (1 + blend * lam) - 1  # the correction to the whitened precision
                keep = c.abs().topk(min(self.rank or len(c), len(c))).indices
                parts.append((u[:, keep], c[keep], torch.log1p(blend * lam[keep]).sum()))
            raw = self._scores(held_x.double(), shared, parts)
            for T in self.temperatures:
                log_probs = self.per_task((raw / T + evidence).log_softmax(1))
                score = log_probs[torch.arange(len(held_task)), held_task].mean().item()
                if best is None or score > best[0]:
                    best = (score, T, parts)
        _, self.blend_temperature_, self.parts_ = best
        return self

    def _scores(self, x, shared, parts):
        """Class log-likelihoods plus priors, [n, classes]: the shared distances corrected."""
        scores = torch.empty(len(x), len(self.class_task_), dtype=torch.float64)
        for t, (u, c, logdet) in enumerate(parts):
            cols = (self.class_task_ == t).nonzero().flatten()
            proj = (x @ u).unsqueeze(1) - (self.means64_[cols] @ u).unsqueeze(0)  # [n, k, rank]
            scores[:, cols] = (-0.5 * (shared[:, cols] + (proj.square() * c).sum(-1))
                               - 0.5 * logdet + self.log_prior_[cols])
        return scores

    def task_probabilities(self, x, grams=None):
        x = x.double()
        scores = self._scores(x, self.class_distances(x).double(), self.parts_) / self.blend_temperature_
        if self.words_ is not None and grams is not None:
            scores = scores + self.words_weight_ * self.words_.scores(grams)
        return self.per_task(scores.log_softmax(1)).exp().float()


def blended(rank: int | None):
    kind = type("BlendedCovariance", (BlendedCovariance,), {"rank": rank})
    return lambda s, names: s.gaussian(names, s.blocks("bottom_half"), kind, words=all_grams)


def entropy(probs: torch.Tensor) -> float:
    """Entropy of label probabilities over log(labels): 0 sure, 1 uniform."""
    return -(probs * probs.clamp(min=1e-12).log()).sum().item() / math.log(len(probs))


def all_grams(s: Sequence, bags: list[list[int]]) -> list[list[int]]:
    return bags


def unigrams(s: Sequence, bags: list[list[int]]) -> list[list[int]]:
    vocabulary = len(s.bank.base.tokenizer)
    return [[g for g in bag if g < vocabulary] for bag in bags]


@contextlib.contextmanager
def smoothing(value: float):
    kept, lexical.SMOOTHING = lexical.SMOOTHING, value
    try:
        yield
    finally:
        lexical.SMOOTHING = kept


def smoothed(value: float):
    def variant(s: Sequence, names: list[str]) -> dict[str, tuple]:
        with smoothing(value):
            return s.gaussian(names, s.blocks("bottom_half"), words=all_grams)
    return variant


def bottom(s: Sequence):
    """Blocks 0..middle side by side: all the bottom half, which routed prediction runs anyway."""
    return lambda x: x[:, 1: s.bank.base.middle + 2]


VARIANTS = {
    "reference: logistic regression, last layer": Sequence.logistic,
    "reference: joint training (upper bound)": Sequence.joint,
    "Gaussian, last layer": lambda s, names: s.gaussian(names, lambda x: x[:, -1]),
    "Gaussian, middle block (ahl before)": lambda s, names: s.gaussian(names, s.blocks("middle")),
    f"Gaussian, middle block, RanPAC to {RANPAC_DIM}": lambda s, names: s.gaussian(
        names, lambda x: ranpac(s.blocks("middle")(x))),
    "Gaussian, bottom-half blocks averaged": lambda s, names: s.gaussian(
        names, lambda x: torch.nn.functional.normalize(bottom(s)(x).mean(1), dim=-1)),
    "Gaussian, bottom-half blocks, RanPAC": lambda s, names: s.gaussian(
        names, lambda x: ranpac(bottom(s)(x).flatten(1))),
    "Gaussian, embeddings + bottom-half blocks": lambda s, names: s.gaussian(
        names, lambda x: x[:, : s.bank.base.middle + 2].flatten(1)),
    "Gaussian, middle + last layer (+ a bare top half)": lambda s, names: s.gaussian(
        names, lambda x: x[:, [s.bank.base.middle + 1, -1]].flatten(1)),
    "Gaussian, all blocks (+ a bare top half)": lambda s, names: s.gaussian(
        names, lambda x: x[:, 1:].flatten(1)),
    "Gaussian, bottom-half blocks (ahl before words)": lambda s, names: s.gaussian(
        names, s.blocks("bottom_half")),
    "... + word evidence, word-piece unigrams and bigrams (ahl now)": lambda s, names: s.gaussian(
        names, s.blocks("bottom_half"), words=all_grams),
    "... + word evidence, unigrams only": lambda s, names: s.gaussian(
        names, s.blocks("bottom_half"), words=unigrams),
    "... + word evidence, smoothing 0.01": smoothed(0.01),
    "... + word evidence, smoothing 0.1": smoothed(0.1),
    "Gaussian, bottom-half blocks, per-task bias calibration": lambda s, names: s.gaussian(
        names, s.blocks("bottom_half"), BiasCalibrated),
    "Gaussian, bottom-half blocks, covariance scaled per task": lambda s, names: s.gaussian(
        names, s.blocks("bottom_half"), ScaledCovariance),
    "... + word evidence, each task's covariance blended in (RDA)": blended(None),
    "... + word evidence, RDA, each task's correction of rank 64": blended(64),
    "the store's own router, as add-task fit it": Sequence.stored,
    "... then the top two re-weighed by adapter sureness": Sequence.second_stage,
    "... then the top two re-weighed by adapter energy": Sequence.energy_stage,
    "... then the top two re-weighed by adapted-feature density": Sequence.density_stage,
    f"... composing only below {AUTO_SURE} confidence (auto)": Sequence.auto,
}


def report(seq: Sequence, only: list[str]) -> None:
    metrics = seq.hub.metrics()
    modes = metrics["modes"]
    print(f"\n## {seq.folder.relative_to(ROOT)}: average accuracy % after each step (the store's own)")
    print(f"{'step':>4} {'task added':<18}{'oracle':>8}{'routed':>8}{'composed':>10}")
    for i, task in enumerate(metrics["tasks"]):
        rows = [[v for v in modes[m]["matrix"][i] if v is not None] for m in ("oracle", "routed", "composed")]
        cells = [100 * sum(row) / len(row) for row in rows]
        print(f"{i + 1:>4} {task:<18}" + "".join(f"{c:>8.1f}" for c in cells[:2]) + f"{cells[2]:>10.1f}")
    for prefix in sorted({4, len(seq.tasks)}):
        names = seq.tasks[:prefix]
        oracle = sum(sum(p.argmax().item() == y for p, y in zip(seq.probs[t, t], seq.labels[t]))
                     / len(seq.labels[t]) for t in names) / prefix
        print(f"\nfirst {prefix} tasks (oracle {100 * oracle:.1f}): mean % over tasks")
        print(f"{'router':<58}{'routing':>9}{'routed':>8}{'composed':>10}")
        for name, variant in VARIANTS.items():
            if only and not any(part in name for part in only):
                continue
            scores = variant(seq, names)
            means = [100 * sum(s[k] for s in scores.values()) / prefix for k in range(3)]
            print(f"{name:<58}{means[0]:>9.1f}{means[1]:>8.1f}{means[2]:>10.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "routing")
    parser.add_argument("--sequence", type=Path, action="append",
                        help="a folder with sequence.toml [default: both bundled sequences]")
    parser.add_argument("--only", action="append", default=[],
                        help="run only the variants whose names contain this [default: all]")
    args = parser.parse_args()
    for folder in args.sequence or SEQUENCES:
        report(Sequence(folder.resolve(), args.work.resolve()), args.only)


if __name__ == "__main__":
    main()

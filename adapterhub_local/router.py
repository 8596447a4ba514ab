"""Routers: decide per input which task adapter(s) to apply, without being told the task.

GaussianRouter models every (task, class) pair as a Gaussian over the frozen base's sentence
features, with one shared covariance: linear discriminant analysis on a frozen pretrained encoder,
the recipe of SLDA (Hayes & Kanan 2020) and of the prototype classifiers of SimpleCIL and RanPAC.
A task's score is the posterior mass of its classes, so tasks whose classes are far apart are
told apart even when their texts look alike. Where the statistics carry them, each class's
word-piece counts add a naive Bayes over the input's words (lexical.py) to the class scores,
weighted as the held-out rows ask: the words that tell two tasks of one domain apart are what
mean-pooled features average away. It is fit from per-task sufficient statistics (counts, class
sums, scatter matrix, gram counts) that the store keeps, never from raw texts, so adding a task
costs the same however many came before.

Scikit-learn's shape: fit(stats) -> self; learned state ends in "_".
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATS_FILE, STATS_META = "stats.safetensors", "stats.json"
ROUTER_FILE, ROUTER_META = "router.safetensors", "router.json"
SHRINKAGES = (0.003, 0.01, 0.03, 0.1, 0.3)
TEMPERATURES = tuple(2.0 ** k for k in range(11))
CALIBRATION_MAX = 200  # held-out feature rows kept per task to calibrate shrinkage and abstention
# What the router reads: each text's mean-pooled states (of unit length) after these blocks of
# the bare base, side by side. "bottom_half" (the first, middle and last blocks of the bottom
# half: three, however deep the base, as the router's statistics grow with the square of the
# width) is the default: on both task sequences it routes better than the middle block alone
# (bench/routing.py) at no extra cost, the bottom half running anyway. "middle" is what stores
# made before it read, and keep reading. Each list ends with the middle block, whose states
# prediction goes on from.
FEATURES = {"middle": lambda middle: [middle],
            "bottom_half": lambda middle: sorted({0, middle // 2, middle})}
ROUTER_FEATURES = "bottom_half"
CALIBRATION_TOTAL = 4000  # at most this many in one fit: past 20 tasks, fewer rows per task, so
# that a fit costs time linear in the number of tasks (rows x classes would grow as its square)


@dataclass
class TaskStats:
    """Sufficient statistics of one task's frozen-base features, plus a few held-out rows."""

    labels: list[str]
    counts: torch.Tensor
    """Rows per class, [C]."""
    sums: torch.Tensor
    """Feature sums per class, [C, D] (float64)."""
    scatter: torch.Tensor
    """Sum of x x^T over the task's rows, [D, D]: float32, half the bytes of a matrix that
    grows with the square of the feature width (fit sums and inverts in float64)."""
    calibration: torch.Tensor
    """Held-out features (not in the sums), [m, D]: they calibrate, they are not fitted."""
    features: str = ROUTER_FEATURES
    """Which features (FEATURES); statistics saved without the name read "middle"."""
    grams: torch.Tensor | None = None
    """Word evidence (lexical.class_counts, [3, n]): how many of each class's rows hold each
    gram. None in statistics saved before it: their router reads features only."""
    calibration_grams: list[list[int]] | None = None
    """The calibration rows' grams (sets, no order): they fit the word evidence's weight."""
    gram_space: int = 0
    """lexical.gram_space of the base the grams come from."""

    def save(self, folder: Path) -> None:
        from adapterhub_local import lexical

        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"counts": self.counts, "sums": self.sums, "scatter": self.scatter.float(),
                   "calibration": self.calibration}
        if self.grams is not None:
            packed = lexical.pack(self.calibration_grams)
            # 32 bits: half the bytes (grams and counts stay far below 2**31)
            tensors.update(grams=self.grams.int(), calibration_offsets=packed["offsets"].int(),
                           calibration_grams=packed["grams"].int())
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / STATS_FILE)
        (folder / STATS_META).write_text(json.dumps({"labels": self.labels, "features": self.features,
                                                     "gram_space": self.gram_space}),
                                         encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "TaskStats":
        from adapterhub_local import lexical

        tensors = load_file(Path(folder) / STATS_FILE)
        meta = json.loads((Path(folder) / STATS_META).read_text(encoding="utf-8"))
        words = {}
        if "grams" in tensors:
            words = {"grams": tensors.pop("grams").long(), "gram_space": meta["gram_space"],
                     "calibration_grams": lexical.unpack(tensors.pop("calibration_offsets"),
                                                         tensors.pop("calibration_grams"))}
        return cls(labels=meta["labels"], features=meta.get("features", "middle"), **words,
                   **{**tensors, "scatter": tensors["scatter"].float()})


def task_stats(features: torch.Tensor, labels: list[int], label_names: list[str],
               calibration: torch.Tensor, kind: str = ROUTER_FEATURES,
               grams: list[list[int]] | None = None, calibration_grams: list[list[int]] | None = None,
               gram_space: int = 0) -> TaskStats:
    """Statistics of one task's `kind` features (FEATURES names them) and, given the rows'
    grams (lexical.grams, in the same order as the features), their word evidence."""
    from adapterhub_local import lexical

    x = features.double()
    y = torch.tensor(labels)
    one_hot = torch.nn.functional.one_hot(y, len(label_names)).double()
    words = {}
    if grams is not None:
        words = {"grams": lexical.class_counts(grams, labels), "gram_space": gram_space,
                 "calibration_grams": calibration_grams[:CALIBRATION_MAX]}
    return TaskStats(labels=list(label_names), counts=one_hot.sum(0), sums=one_hot.T @ x,
                     scatter=(x.T @ x).float(),
                     calibration=calibration[:CALIBRATION_MAX].float(), features=kind, **words)


@dataclass
class Route:
    """Where one input goes: tasks best first with weights summing to 1, or none (abstain)."""

    tasks: list[str]
    weights: list[float]
    confidence: float
    """The router's probability for its first task (0 when it abstains)."""
    reason: str | None = None
    """Why it abstained."""


@dataclass
class GaussianRouter:
    abstain_rate: float = 0.002
    """Share of held-out in-distribution inputs allowed to abstain; sets the distance threshold."""
    shrinkages: tuple = SHRINKAGES
    """Candidate covariance shrinkages; fit keeps the one that routes held-out rows best."""
    tasks_: list[str] = field(default_factory=list)
    class_task_: torch.Tensor | None = None
    coef_: torch.Tensor | None = None
    intercept_: torch.Tensor | None = None
    means_: torch.Tensor | None = None
    precision_: torch.Tensor | None = None
    threshold_: float = float("inf")
    shrinkage_: float = 0.0
    temperature_: float = 1.0
    features_: str = ROUTER_FEATURES
    """Which features it reads (FEATURES): those of the statistics it was fit from."""
    words_: object | None = None
    """The word evidence (lexical.NaiveBayes) where the statistics have grams and the held-out
    rows route better with it; None reads features only."""
    words_weight_: float = 0.0
    """Its weight beside the tempered Gaussian scores (one of lexical.WEIGHTS)."""

    def fit(self, stats: dict[str, TaskStats]) -> "GaussianRouter":
        kinds = {s.features for s in stats.values()}
        if len(kinds) > 1:  # a store reads one kind for good (store.router_features)
            raise ValueError(f"statistics of different features cannot be routed together: {kinds}")
        self.tasks_, self.features_ = list(stats), next(iter(kinds), self.features_)
        counts = torch.cat([s.counts for s in stats.values()])
        sums = torch.cat([s.sums for s in stats.values()])
        self.class_task_ = torch.cat([torch.full((len(s.counts),), t)
                                      for t, s in enumerate(stats.values())])
        scatter = torch.zeros(sums.shape[1], sums.shape[1], dtype=torch.float64)
        for s in stats.values():
            scatter += s.scatter  # in place: one D x D matrix in float64, not one per task
        means, within = within_class(counts, sums, scatter)
        # Each task gets equal prior mass, shared among its classes by their frequency.
        task_totals = torch.stack([s.counts.sum() for s in stats.values()])
        log_prior = (counts / task_totals[self.class_task_] / len(stats)).clamp(min=1e-12).log()
        held_x, held_task = self._calibration_rows(stats)
        best = None
        for alpha in self.shrinkages:
            precision = shrunk_precision(within, alpha)
            coef, intercept = discriminant(means, precision, log_prior)
            accuracy = (self._task_log_probs(held_x, coef, intercept).argmax(1) == held_task)
            score = accuracy.double().mean().item() if len(held_task) else 0.0
            if best is None or score > best[0]:
                best = (score, alpha, precision, coef, intercept)
        _, self.shrinkage_, precision, coef, intercept = best
        # Discriminants in hundreds of dimensions are overconfident (posteriors of 1e-30): a
        # temperature fitted on the held-out rows makes the weights that compose mixes honest.
        if len(held_task):
            self.temperature_ = min(TEMPERATURES, key=lambda T: -self._task_log_probs(
                held_x, coef / T, intercept / T)[torch.arange(len(held_task)), held_task].mean())
        self.means_, self.precision_ = means.float(), precision.float()
        self.coef_ = (coef / self.temperature_).float()
        self.intercept_ = (intercept / self.temperature_).float()
        if len(held_task) > 1:
            self.threshold_ = chi2_threshold(self.distances(held_x), self.abstain_rate)
        self.words_, self.words_weight_ = None, 0.0
        spaces = {s.gram_space if s.grams is not None else None for s in stats.values()}
        if len(held_task) and len(spaces) == 1 and None not in spaces:
            self._fit_words(stats, held_x, held_task, spaces.pop())
        return self

    def _fit_words(self, stats: dict[str, TaskStats], held_x: torch.Tensor,
                   held_task: torch.Tensor, space: int) -> None:
        """Add the word evidence with the weight (lexical.WEIGHTS) under which the held-out
        rows' own tasks are likeliest (their mean log-probability: smoother than their
        accuracy on a few hundred rows, and it keeps composition weights honest); none if that
        weight is 0."""
        from adapterhub_local import lexical

        words = lexical.NaiveBayes.fit([(s.grams, len(s.counts)) for s in stats.values()], space)
        per_task = calibration_share(len(stats))  # the rows held_x holds
        evidence = words.scores([g for s in stats.values() for g in s.calibration_grams[:per_task]])

        def likelihood(weight: float) -> float:
            log_probs = self._task_log_probs(held_x, self.coef_, self.intercept_, weight * evidence)
            return log_probs[torch.arange(len(held_task)), held_task].mean().item()

        weight = max(lexical.WEIGHTS, key=likelihood)
        if weight > 0:
            self.words_, self.words_weight_ = words, weight

    @staticmethod
    def _calibration_rows(stats: dict[str, TaskStats]) -> tuple[torch.Tensor, torch.Tensor]:
        per_task = calibration_share(len(stats))
        rows = [s.calibration[:per_task].double() for s in stats.values()]
        tasks = [torch.full((len(r),), t) for t, r in enumerate(rows)]
        return torch.cat(rows), torch.cat(tasks)

    def _task_log_probs(self, x, coef, intercept, evidence=None) -> torch.Tensor:
        """log P(task | x), [n, T], with `evidence` ([n, classes]) added to the class scores."""
        scores = x.to(coef.dtype) @ coef + intercept
        return self.per_task((scores if evidence is None else scores + evidence).log_softmax(1))

    def per_task(self, class_log_probs: torch.Tensor) -> torch.Tensor:
        """log P(task | x) from log P(class | x), [n, T]: a logsumexp over each task's classes,
        all tasks at once."""
        n, index = len(class_log_probs), self.class_task_.expand(len(class_log_probs), -1)
        top = torch.full((n, len(self.tasks_)), -torch.inf, dtype=class_log_probs.dtype)
        top = top.scatter_reduce(1, index, class_log_probs, reduce="amax")
        shifted = (class_log_probs - top.gather(1, index)).exp()
        sums = torch.zeros_like(top).index_add_(1, self.class_task_, shifted)
        return sums.log() + top

    @property
    def reads_words(self) -> bool:
        """Whether route() wants the inputs' grams (lexical.grams) beside their features."""
        return self.words_ is not None

    def task_probabilities(self, x: torch.Tensor, grams: list[list[int]] | None = None) -> torch.Tensor:
        """P(task | features, and the grams where the router reads words), [n, T]."""
        evidence = None
        if self.words_ is not None and grams is not None:
            evidence = self.words_weight_ * self.words_.scores(grams)
        return self._task_log_probs(x, self.coef_, self.intercept_, evidence).exp()

    def class_distances(self, x: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance to every class mean, [n, classes]."""
        x = x.to(self.precision_.dtype)
        xp = x @ self.precision_
        return (xp * x).sum(1, keepdim=True) - 2 * xp @ self.means_.T + self._mean_terms()

    def _mean_terms(self) -> torch.Tensor:
        """Each class mean's own term of the distances, mean @ precision @ mean, kept: with
        hundreds of classes it costs more than the rest of routing one text."""
        kept = self.__dict__.get("_kept_mean_terms")
        if kept is None or kept[0] is not self.means_ or kept[1] is not self.precision_:
            terms = ((self.means_ @ self.precision_) * self.means_).sum(1)
            kept = self.__dict__["_kept_mean_terms"] = (self.means_, self.precision_, terms)
        return kept[2]

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance to the nearest class mean: large means no task fits."""
        return self.class_distances(x).min(1).values

    def route(self, x: torch.Tensor, top_k: int = 1, grams: list[list[int]] | None = None) -> list[Route]:
        """The top_k tasks per input with weights summing to 1; abstains far from every task
        (by the features alone). Without the inputs' grams a router that reads words routes by
        the features alone."""
        probs = self.task_probabilities(x, grams)
        far = self.distances(x) > self.threshold_
        k = min(top_k, len(self.tasks_))
        top = probs.topk(k, dim=1)
        # Whole-batch tensors to lists once: a tensor op per row cost more than routing itself.
        weights = (top.values / top.values.sum(1, keepdim=True)).tolist()
        confidence, indices = top.values[:, 0].tolist(), top.indices.tolist()
        routes = []
        for row, is_far in enumerate(far.tolist()):
            if is_far:
                routes.append(Route([], [], 0.0, "fits no known task (far from every task's data)"))
                continue
            routes.append(Route([self.tasks_[i] for i in indices[row]], weights[row],
                                confidence[row]))
        return routes

    def save(self, folder: Path, versions: dict[str, int]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"class_task": self.class_task_, "coef": self.coef_, "intercept": self.intercept_,
                   "means": self.means_, "precision": self.precision_}
        if self.words_ is not None:
            tensors.update({f"words.{k}": v for k, v in self.words_.tensors().items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / ROUTER_FILE)
        meta = {"tasks": self.tasks_, "versions": versions, "threshold": self.threshold_,
                "shrinkage": self.shrinkage_, "temperature": self.temperature_,
                "abstain_rate": self.abstain_rate, "features": self.features_,
                "words_weight": self.words_weight_,
                "gram_space": self.words_.space if self.words_ is not None else 0}
        (folder / ROUTER_META).write_text(json.dumps(meta), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "GaussianRouter":
        from adapterhub_local.lexical import NaiveBayes

        tensors = load_file(Path(folder) / ROUTER_FILE)
        meta = json.loads((Path(folder) / ROUTER_META).read_text(encoding="utf-8"))
        words = {k[len("words."):]: v for k, v in tensors.items() if k.startswith("words.")}
        return cls(words_=NaiveBayes.load(words, meta["gram_space"]) if words else None,
                   words_weight_=meta.get("words_weight", 0.0),abstain_rate=meta["abstain_rate"], tasks_=meta["tasks"],
                   class_task_=tensors["class_task"], coef_=tensors["coef"],
                   intercept_=tensors["intercept"], means_=tensors["means"],
                   precision_=tensors["precision"], threshold_=meta["threshold"],
                   shrinkage_=meta["shrinkage"], temperature_=meta["temperature"],
                   features_=meta.get("features", "middle"))


def calibration_share(tasks: int) -> int:
    """Each task's first calibration rows that a fit uses: CALIBRATION_TOTAL in all."""
    return max(2, CALIBRATION_TOTAL // tasks)


def chi2_threshold(distances: torch.Tensor, rate: float) -> float:
    """The distance that a share `rate` of in-distribution inputs exceeds. Squared Mahalanobis
    distances are close to a scaled chi-square; matching its mean and variance on the held-out
    rows gives a tail estimate that a few hundred rows could not give by counting. The
    chi-square quantile is 2 x the inverse regularized incomplete gamma at dof / 2, as
    scipy.stats.chi2.ppf computes it (importing scipy.stats costs every add-task process about
    half a second)."""
    from scipy.special import gammaincinv

    mean, var = distances.double().mean().item(), distances.double().var().item()
    scale, dof = var / (2 * mean), 2 * mean**2 / var
    return float(scale * 2 * gammaincinv(dof / 2, 1 - rate))


def within_class(counts, sums, scatter) -> tuple[torch.Tensor, torch.Tensor]:
    """(class means [C, D], the pooled within-class covariance [D, D]) from class counts, class
    sums and the scatter (sum of x x^T) of the rows."""
    means = sums / counts.clamp(min=1).unsqueeze(1)
    within = (scatter.double() - (means * counts.unsqueeze(1)).T @ means) / max(
        1.0, counts.sum() - len(counts))
    return means, within


def shrunk_precision(covariance: torch.Tensor, alpha: float) -> torch.Tensor:
    """Inverse of the covariance shrunk towards a scaled identity (it is rank-deficient when a
    task has fewer rows than features)."""
    dim = covariance.shape[0]
    target = torch.eye(dim, dtype=covariance.dtype) * covariance.trace() / dim
    return torch.linalg.inv((1 - alpha) * covariance + alpha * target)


def discriminant(means, precision, log_prior) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear discriminant: log p(x | k) + log p(k) = x P mu_k - mu_k P mu_k / 2 + prior + const."""
    coef = precision @ means.T
    intercept = -0.5 * (means @ precision * means).sum(1) + log_prior
    return coef, intercept

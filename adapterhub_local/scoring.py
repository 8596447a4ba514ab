"""METRICS: how a generate task's completions are scored against their references, per row.

A task's metric fills its columns of the score matrices (forgetting is read from them as from
accuracies); SOFT_METRIC is logged beside it, as partial credit for near misses. Each is a pure
function (completion, reference) -> a score in [0, 1]; a task's score is their mean.
"""

import functools
import re
import unicodedata
from typing import Callable

from adapterhub_local.errors import AhlError

DEFAULT_METRIC, SOFT_METRIC = "exact_match", "chrf"


def normalize(text: str) -> str:
    """Compatibility-normalised, case-folded, whitespace collapsed, one trailing full stop
    dropped: formatting noise that no reader counts as a different answer. Punctuation inside
    stays (it carries meaning in structured output)."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return re.sub(r"\.$", "", text).strip()


def exact_match(completion: str, reference: str) -> float:
    return float(normalize(completion) == normalize(reference))


@functools.cache
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def chrf(completion: str, reference: str) -> float:
    """Character n-gram F-score (Popović 2015) as sacrebleu computes it, scaled to [0, 1]."""
    return _chrf().sentence_score(completion, [reference]).score / 100


METRICS: dict[str, Callable[[str, str], float]] = {"exact_match": exact_match, "chrf": chrf}


def check_metric(name) -> str:
    if not isinstance(name, str) or name not in METRICS:
        raise AhlError(f"unknown metric {name!r} for a generate task: use one of "
                       f"{', '.join(METRICS)}")
    return name


def row_scores(metric: str, completions: list[str], references: list[str]) -> list[float]:
    score = METRICS[metric]
    return [score(c, r) for c, r in zip(completions, references)]


def mean_score(metric: str, completions: list, references: list[str]) -> float:
    """The mean of the rows' scores; a row answered by another task (None) scores 0."""
    scores = row_scores(metric, [c or "" for c in completions], references)
    return sum(0.0 if c is None else s for c, s in zip(completions, scores)) / max(len(scores), 1)

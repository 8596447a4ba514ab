"""Word evidence for the router: which of a text's word pieces and word-piece pairs each
(task, class) has seen, as a multinomial naive Bayes over the text's set of grams.

The Gaussian router reads mean-pooled states, where texts of two tasks from one broad domain
(man pages of two kinds, docstrings and library docs) lie close; the words that tell them apart
(a section's vocabulary, a pair like "return value") are averaged away. This model keeps them:
per class, how many of the task's rows hold each gram (the base tokenizer's unigrams, and its
bigrams hashed into BIGRAM_BUCKETS), smoothed additively. Its log-likelihoods are added to the
Gaussian's class scores with a weight that the router fits on held-out rows (0 where words do
not help), as a product of the two experts. Counts add up like the Gaussian's statistics, so a
refit never needs old rows.

A text's grams are a set (each counted once), the "binarized" naive Bayes that suits short
texts; bench/routing.py measures it against unigrams alone and other smoothings. The held-out
rows' gram sets are kept to fit the weight: their words can be read from them, not their order.
"""

from dataclasses import dataclass

import torch

BIGRAM_BUCKETS = 2**18
SMOOTHING = 0.03
WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
"""Candidate weights of the word evidence beside the tempered Gaussian scores; fit picks one."""


def gram_space(base) -> int:
    """How many grams a base's texts can have: its vocabulary, then the bigram buckets."""
    return len(base.tokenizer) + BIGRAM_BUCKETS


def text_grams(ids: list[int], vocabulary: int, special: set[int]) -> list[int]:
    """One text's distinct grams, sorted: its token ids, then each adjacent pair hashed past
    the vocabulary. Special tokens ([CLS], [SEP], BOS) say nothing of the text: left out."""
    words = [i for i in ids if i not in special]
    pairs = {vocabulary + (a * 1_000_003 + b) % BIGRAM_BUCKETS for a, b in zip(words, words[1:])}
    return sorted(set(words) | pairs)


def grams(base, texts: list[str], max_length: int = 128) -> list[list[int]]:
    """Each text's grams (text_grams), over the same tokens the model reads."""
    special = set(base.tokenizer.all_special_ids)
    return [text_grams(ids, len(base.tokenizer), special) for ids in base.tokenize(texts, max_length)]


def class_counts(bags: list[list[int]], labels: list[int]) -> torch.Tensor:
    """[3, n]: (class, gram, rows of the class holding the gram) for every pair that occurs."""
    classes = torch.tensor([y for y, bag in zip(labels, bags) for _ in bag], dtype=torch.long)
    flat = torch.tensor([g for bag in bags for g in bag], dtype=torch.long)
    if not len(flat):
        return torch.zeros(3, 0, dtype=torch.long)
    span = int(flat.max()) + 1
    pairs, counts = torch.unique(classes * span + flat, return_counts=True)
    return torch.stack([pairs // span, pairs % span, counts])


def pack(bags: list[list[int]]) -> dict[str, torch.Tensor]:
    """Bags as two tensors for a safetensors file: offsets [n + 1] and the grams, flat."""
    sizes = torch.tensor([0] + [len(b) for b in bags], dtype=torch.long)
    return {"offsets": sizes.cumsum(0), "grams": torch.tensor([g for b in bags for g in b], dtype=torch.long)}


def unpack(offsets: torch.Tensor, flat: torch.Tensor) -> list[list[int]]:
    bounds, values = offsets.tolist(), flat.tolist()
    return [values[a:b] for a, b in zip(bounds, bounds[1:])]


@dataclass
class NaiveBayes:
    """log P(text's grams | class) up to a constant, for every class at once. The weights are
    kept by gram (a compressed row per gram: the classes that saw it), so scoring a text reads
    only its own grams' rows."""

    offsets: torch.Tensor
    """[grams + 1]: where each gram's classes start in `classes` and `weights`."""
    classes: torch.Tensor
    weights: torch.Tensor
    """log(1 + rows / SMOOTHING): what a seen gram adds over an unseen one."""
    unseen: torch.Tensor
    """[classes]: log P(an unseen gram | class), for each of a text's grams."""

    @classmethod
    def fit(cls, counts: list[tuple[torch.Tensor, int]], space: int) -> "NaiveBayes":
        """From each task's (class_counts, number of classes), its classes numbered after the
        earlier tasks' (the router's order)."""
        shifted, first = [], 0
        for task, classes in counts:
            shifted.append(torch.stack([task[0] + first, task[1], task[2]]))
            first += classes
        every = torch.cat(shifted, dim=1)
        order = torch.argsort(every[1] * first + every[0])  # by gram, then class
        klass, gram, seen = every[0][order], every[1][order], every[2][order].double()
        totals = torch.zeros(first, dtype=torch.float64).index_add_(0, klass, seen)
        offsets = torch.zeros(space + 1, dtype=torch.long)
        offsets[1:] = torch.bincount(gram, minlength=space).cumsum(0)
        return cls(offsets=offsets, classes=klass, weights=(seen / SMOOTHING).log1p().float(),
                   unseen=(SMOOTHING / (totals + SMOOTHING * space)).log().float())

    def scores(self, bags: list[list[int]]) -> torch.Tensor:
        """[texts, classes]: each text's grams' log-likelihood under every class."""
        sizes = torch.tensor([len(b) for b in bags], dtype=torch.float32).unsqueeze(1)
        out = self.unseen.expand(len(bags), -1) * sizes
        known = len(self.offsets) - 1  # a gram past the space (another base's) is no evidence
        flat = torch.tensor([g for b in bags for g in b if g < known], dtype=torch.long)
        text = torch.tensor([i for i, b in enumerate(bags) for g in b if g < known], dtype=torch.long)
        start, stop = self.offsets[flat], self.offsets[flat + 1]
        reach = stop - start  # how many classes saw each of the texts' grams
        at = torch.repeat_interleave(start - (reach.cumsum(0) - reach), reach) + torch.arange(int(reach.sum()))
        return out.index_put((torch.repeat_interleave(text, reach), self.classes[at]),
                             self.weights[at], accumulate=True)

    @property
    def space(self) -> int:
        return len(self.offsets) - 1

    def tensors(self) -> dict[str, torch.Tensor]:
        """For a safetensors file: each entry's gram instead of the offsets (which take 8 bytes
        for every possible gram), in 32 bits."""
        grams = torch.repeat_interleave(torch.arange(self.space), self.offsets.diff())
        return {"grams": grams.int(), "classes": self.classes.int(), "weights": self.weights,
                "unseen": self.unseen}

    @classmethod
    def load(cls, tensors: dict[str, torch.Tensor], space: int) -> "NaiveBayes":
        offsets = torch.zeros(space + 1, dtype=torch.long)
        offsets[1:] = torch.bincount(tensors["grams"].long(), minlength=space).cumsum(0)
        return cls(offsets=offsets, classes=tensors["classes"].long(), weights=tensors["weights"],
                   unseen=tensors["unseen"])

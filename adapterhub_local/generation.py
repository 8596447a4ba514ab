"""Generate tasks on a causal-LM base: prompts as the base was tuned to read them, the
completion-only loss, and greedy decoding in which every row may mix several adapters.

- A prompt goes through the base's chat template when it has one (one user turn and the
  assistant's opening), else it is its own tokens after the BOS; a completion is its tokens and
  the end-of-sequence token.
- Training's loss is the cross-entropy of the completion's tokens (the prompt's are masked), on
  the output layer of the frozen base.
- Decoding is greedy with a KV cache. A row's `mixture` is [(adapter, weight), ...]: one
  adapter (routed), or several whose next-token distributions are mixed by their route weights
  at every step (composed); each (row, adapter) is a lane, and lanes of adapters that share a
  forward pass decode in one batch. Prompts are right-padded, and each new token gets the
  position its row would have alone, so a mixed batch decodes as one row at a time does.
"""

import hashlib
import math
from dataclasses import dataclass

import torch

from adapterhub_local.errors import AhlError
from adapterhub_local.inference import quiet_forward

IGNORE = -100  # label of a position the loss skips
DECODE_ROWS = 64  # rows decoded together: their KV caches are held at once


@dataclass
class Generated:
    text: str
    tokens: list[int]
    score: float
    """The geometric mean of the chosen tokens' (mixed) probabilities."""
    margin: float
    """The smallest gap, over the steps, between the best and the second-best token's mixed
    probability: a mixture whose other members weigh less cannot change this output."""


def template_of(base) -> str | None:
    """The base's chat template (what a version records, by digest), or None."""
    return getattr(base.tokenizer, "chat_template", None) or None


def template_digest(base) -> str:
    template = template_of(base)
    return hashlib.sha256(template.encode()).hexdigest() if template else "none"


def end_token(base) -> int:
    tokenizer = base.tokenizer
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None:
        raise AhlError(f"base {base.name!r} has a tokenizer without an end-of-sequence token: "
                       "generate tasks need one; use a base whose tokenizer sets eos_token")
    return end


def prompt_ids(base, prompts: list[str]) -> list[list[int]]:
    """Token ids of prompts as the model reads them before its answer."""
    tokenizer = base.tokenizer
    if template_of(base):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    return [start + x for x in ids]


def completion_ids(base, completions: list[str]) -> list[list[int]]:
    end = end_token(base)
    ids = base.tokenizer(completions, add_special_tokens=False)["input_ids"] if completions else []
    return [x + [end] for x in ids]


def decode(base, tokens: list[int]) -> str:
    return base.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def lm_batch(base, prompts: list[list[int]], completions: list[list[int]]):
    """(padded batch, labels): each row its prompt then its completion; labels are the
    completion's tokens where they are predicted, IGNORE elsewhere."""
    rows = [p + c for p, c in zip(prompts, completions)]
    batch = base.pad(rows)
    labels = torch.full_like(batch["input_ids"], IGNORE)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        labels[i, len(p): len(p) + len(c)] = torch.tensor(c)
    return batch, labels


def completion_logits(model, base, batch: dict, labels: torch.Tensor):
    """(logits, targets) at the positions that predict a completion token: the output layer
    runs on those alone (its width is the vocabulary)."""
    hidden = model(**batch).last_hidden_state
    hidden = hidden[:, -batch["input_ids"].shape[1]:]  # prompt tuning's virtual tokens left out
    predicts = labels[:, 1:] != IGNORE
    return base.lm_head(hidden[:, :-1][predicts]), labels[:, 1:][predicts]


def complete(bank, prompts: list[list[int]], mixtures: list[list[tuple[str, float]]]
             ) -> list[Generated]:
    """greedy() with each row's budget the largest of its adapters' max_new_tokens (rows of
    one budget decode together) and its weights scaled to sum to 1."""
    by_budget: dict[int, list[int]] = {}
    for row, mixture in enumerate(mixtures):
        by_budget.setdefault(budget_of(bank, mixture), []).append(row)
    out: list[Generated | None] = [None] * len(prompts)
    for budget, rows in by_budget.items():
        scaled = [[(a, w / sum(x for _, x in mixtures[row])) for a, w in mixtures[row]]
                  for row in rows]
        for row, made in zip(rows, greedy(bank, [prompts[row] for row in rows], scaled, budget)):
            out[row] = made
    return out


def budget_of(bank, mixture: list[tuple[str, float]]) -> int:
    return max(bank.generate[adapter]["max_new_tokens"] for adapter, _ in mixture)


@torch.inference_mode()
def greedy(bank, prompts: list[list[int]], mixtures: list[list[tuple[str, float]]],
           max_new_tokens: int) -> list[Generated]:
    """Each prompt's greedy completion under its mixture of adapters (see the module's doc)."""
    out = []
    for start in range(0, len(prompts), DECODE_ROWS):
        out += _decode(bank, prompts[start: start + DECODE_ROWS],
                       mixtures[start: start + DECODE_ROWS], max_new_tokens)
    return out


def _decode(bank, prompts, mixtures, max_new_tokens: int) -> list[Generated]:
    base, end = bank.base, end_token(bank.base)
    lanes: dict = {}  # the bank's batch key -> [(row, adapter, weight), ...]
    for row, mixture in enumerate(mixtures):
        for adapter, weight in mixture:
            lanes.setdefault(bank.batch_key(adapter), []).append((row, adapter, weight))
    groups = [_Lanes(bank, members, prompts) for members in lanes.values()]
    tokens: list[list[int]] = [[] for _ in prompts]
    logp, margin = [0.0] * len(prompts), [1.0] * len(prompts)
    done = [False] * len(prompts)
    probs = [group.prefill() for group in groups]
    for step in range(max_new_tokens):
        mixed = torch.zeros(len(prompts), base.lm_head.out_features)
        for group, p in zip(groups, probs):
            mixed.index_add_(0, group.rows, p * group.weights[:, None])
        top = mixed.topk(2, dim=1)
        chosen = top.indices[:, 0]
        for row in range(len(prompts)):
            if done[row]:
                continue
            margin[row] = min(margin[row], float(top.values[row, 0] - top.values[row, 1]))
            logp[row] += float(top.values[row, 0].clamp(min=1e-12).log())
            if int(chosen[row]) == end:
                done[row] = True
            else:
                tokens[row].append(int(chosen[row]))
        if all(done) or step == max_new_tokens - 1:
            break
        probs = [group.step(chosen) for group in groups]
    # The end token, where chosen, counts among the tokens scored.
    return [Generated(decode(base, t), t, math.exp(lp / (len(t) + d)) if t or d else 0.0, m)
            for t, lp, m, d in zip(tokens, logp, margin, done)]


class _Lanes:
    """The lanes that decode in one batch: their KV cache and where each row's tokens go."""

    def __init__(self, bank, members: list[tuple[int, str, float]], prompts: list[list[int]]):
        self.bank, self.base = bank, bank.base
        self.rows = torch.tensor([row for row, _, _ in members])
        self.names = [adapter for _, adapter, _ in members]
        self.weights = torch.tensor([weight for *_, weight in members], dtype=torch.float32)
        self.ids = [prompts[row] for row, _, _ in members]
        self.model = bank.model(self.names[0])
        self.prompt_learning = self.model.peft_config[self.names[0]].is_prompt_learning
        self.cache = self.mask = self.next_position = None

    def _forward(self, model, **inputs):
        context, extra = self.bank.batch_routing(self.model, self.names)
        with context, quiet_forward():
            return model(**inputs, **extra, use_cache=True)

    def prefill(self) -> torch.Tensor:
        """Next-token probabilities after each lane's prompt."""
        batch = self.base.pad(self.ids)
        self.bank.evaluating(self.names[0])
        out = self._forward(self.model, **batch)
        self.cache = out.cache
        width = batch["input_ids"].shape[1]
        # Positions the cache holds before the prompt (prefix tuning's) or that the hidden
        # states hold before it (prompt tuning's virtual tokens): both shift every position.
        offset = self.cache.get_seq_length() - width
        hidden_offset = out.last_hidden_state.shape[1] - width
        last = torch.tensor([len(x) - 1 for x in self.ids], device=self.base.device)
        hidden = out.last_hidden_state[torch.arange(len(self.ids)), hidden_offset + last]
        ones = torch.ones(len(self.ids), offset, dtype=batch["attention_mask"].dtype,
                          device=self.base.device)
        self.mask = torch.cat([ones, batch["attention_mask"]], dim=1)
        self.next_position = offset + last + 1
        return self._probabilities(hidden)

    def step(self, chosen: torch.Tensor) -> torch.Tensor:
        """Feed each lane its row's chosen token; the next-token probabilities."""
        token = chosen[self.rows].to(self.base.device)[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        # Soft prompts are in the cache already: the decoding steps run the model under them.
        model = self.model.get_base_model() if self.prompt_learning else self.model
        out = self._forward(model, input_ids=token, attention_mask=self.mask,
                            position_ids=self.next_position[:, None], cache=self.cache)
        self.cache, self.next_position = out.cache, self.next_position + 1
        return self._probabilities(out.last_hidden_state[:, -1])

    def _probabilities(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base.lm_head(hidden).float().softmax(-1).cpu()


class GenerateObjective:
    """A generate task's training rows (trainer.train_adapter): the output layer's logits at
    the completion's positions against its tokens, and the share of validation completion
    tokens predicted right given the ones before (teacher forcing: no decoding)."""

    features = None  # the router's features come from the prompts alone, measured after

    def __init__(self, bank, name: str, data, options, train_idx: list[int], val_idx: list[int]):
        self.bank, self.name, self.options = bank, name, options
        prompts = prompt_ids(bank.base, data.train_texts)
        completions = completion_ids(bank.base, data.train_targets)
        self.rows = [(prompts[i], completions[i]) for i in train_idx]
        self.val_rows = [(prompts[i], completions[i]) for i in val_idx]
        self.lengths = [len(p) + len(c) for p, c in self.rows]

    def logits(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch, labels = lm_batch(self.bank.base, [self.rows[i][0] for i in rows],
                                 [self.rows[i][1] for i in rows])
        with quiet_forward():
            return completion_logits(self.bank.model(self.name), self.bank.base, batch, labels)

    @torch.inference_mode()
    def validate(self) -> float:
        right = total = 0
        for start in range(0, len(self.val_rows), self.options.batch_size):
            chunk = self.val_rows[start: start + self.options.batch_size]
            batch, labels = lm_batch(self.bank.base, [p for p, _ in chunk], [c for _, c in chunk])
            with quiet_forward():
                logits, targets = completion_logits(self.bank.model(self.name), self.bank.base,
                                                    batch, labels)
            right += int((logits.argmax(-1) == targets).sum())
            total += len(targets)
        return right / max(total, 1)


def to_tensors(outputs: list[Generated]) -> dict[str, torch.Tensor]:
    """Completions as tensors for a safetensors file (token ids padded with -1)."""
    width = max([len(o.tokens) for o in outputs] + [1])
    tokens = torch.full((len(outputs), width), -1, dtype=torch.long)
    for i, o in enumerate(outputs):
        tokens[i, : len(o.tokens)] = torch.tensor(o.tokens, dtype=torch.long)
    return {"tokens": tokens, "scores": torch.tensor([o.score for o in outputs]),
            "margins": torch.tensor([o.margin for o in outputs])}


def from_tensors(base, tensors: dict[str, torch.Tensor]) -> list[Generated]:
    out = []
    for row, score, margin in zip(tensors["tokens"].tolist(), tensors["scores"].tolist(),
                                  tensors["margins"].tolist()):
        tokens = [t for t in row if t >= 0]
        out.append(Generated(decode(base, tokens), tokens, score, margin))
    return out

"""Batched inference over one base with many named adapters and their task heads.

The base is wrapped by peft once per process; every task version becomes a named adapter on it,
so switching tasks never reloads the base. Each adapter has a small head (mean pooling + linear)
and a label map, saved beside the PEFT files as safetensors and JSON.
"""

import contextlib
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HEAD_FILE = "head.safetensors"
LABELS_FILE = "labels.json"
EVAL_BATCH_SIZE = 64


@contextlib.contextmanager
def quiet_peft_wrap():
    """peft 0.21 reads transformers 5's deprecated is_gradient_checkpointing when wrapping."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        yield


def adapter_name(task: str, run_id: str) -> str:
    """The adapter's name in the bank: one per add-task run, so stores sharing a process never
    collide; the prefix keeps it from being a substring of peft's parameter prefixes ("lora_")."""
    return f"ahl_{task}_{run_id}"


class AdapterBank:
    """One frozen base, many named adapters and heads, loaded once and switched by name."""

    def __init__(self, base):
        self.base = base
        self.peft_model = None
        self.heads: dict[str, torch.nn.Linear] = {}
        self.labels: dict[str, list[str]] = {}
        self.mixed_batch: dict[str, bool] = {}
        """Whether the adapter's method honours peft's per-row adapter_names."""

    def __contains__(self, name: str) -> bool:
        return name in self.heads

    def add_adapter(self, name: str, peft_config, labels: list[str], mixed_batch: bool) -> None:
        """A new trainable adapter and a freshly initialised head (seed the caller's RNG first)."""
        from peft import get_peft_model

        if self.peft_model is None:
            with quiet_peft_wrap():
                self.peft_model = get_peft_model(self.base.model, peft_config, adapter_name=name)
        else:
            self.peft_model.add_adapter(name, peft_config)
        self.heads[name] = torch.nn.Linear(self.base.hidden_size, len(labels))
        self.labels[name] = list(labels)
        self.mixed_batch[name] = mixed_batch
        self.activate(name)

    def load_adapter(self, name: str, folder: Path, mixed_batch: bool) -> None:
        """Load a saved adapter folder (PEFT files + head + label map), frozen."""
        from peft import PeftModel

        if name in self:
            return
        if self.peft_model is None:
            with quiet_peft_wrap():
                self.peft_model = PeftModel.from_pretrained(self.base.model, folder,
                                                            adapter_name=name)
        else:
            self.peft_model.load_adapter(folder, adapter_name=name)
        weights = load_file(Path(folder) / HEAD_FILE)
        labels = json.loads((Path(folder) / LABELS_FILE).read_text(encoding="utf-8"))
        head = torch.nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
        head.load_state_dict(weights)
        head.requires_grad_(False)
        self.heads[name], self.labels[name] = head, labels
        self.mixed_batch[name] = mixed_batch

    def remove_adapter(self, name: str) -> None:
        if self.peft_model is not None and name in self.peft_model.peft_config:
            if len(self.peft_model.peft_config) == 1:
                # peft cannot delete its last adapter: take the injected layers out instead.
                self.base.model = self.peft_model.unload()
                self.peft_model = None
            else:
                with warnings.catch_warnings():  # "was active, now deleted": that is the point
                    warnings.simplefilter("ignore", UserWarning)
                    self.peft_model.delete_adapter(name)
                # peft leaves the deleted name active; its next forward would look it up.
                self.peft_model.set_adapter(next(iter(self.peft_model.peft_config)))
        for table in (self.heads, self.labels, self.mixed_batch):
            table.pop(name, None)

    def save_adapter(self, name: str, folder: Path) -> None:
        """Write the PEFT folder (adapter_config.json, adapter_model.safetensors), head and labels."""
        folder = Path(folder)
        self.peft_model.save_pretrained(folder, selected_adapters=[name])
        # save_pretrained nests non-default adapters in a subfolder; flatten to a plain PEFT folder.
        nested = folder / name
        if nested.is_dir():
            for file in nested.iterdir():
                file.replace(folder / file.name)
            nested.rmdir()
        save_file({k: v.contiguous() for k, v in self.heads[name].state_dict().items()},
                  folder / HEAD_FILE)
        (folder / LABELS_FILE).write_text(json.dumps(self.labels[name], ensure_ascii=False),
                                          encoding="utf-8")

    def activate(self, name: str) -> None:
        self.peft_model.set_adapter(name)

    def trainable_parameters(self, name: str) -> list[torch.nn.Parameter]:
        adapter = [p for p in self.peft_model.parameters() if p.requires_grad]
        return adapter + list(self.heads[name].parameters())

    def logits(self, name: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Head logits for a padded batch through the named adapter (must be active)."""
        return self.heads[name](mean_pool(self.peft_model(**batch).last_hidden_state, batch))

    def resumes(self, name: str) -> bool:
        """Whether the adapter leaves the bottom half bare, so that its rows can go on from the
        states the router's pass already computed instead of starting over."""
        layers = getattr(self.peft_model.peft_config[name], "layers_to_transform", None)
        if layers is None:
            return False
        return min([layers] if isinstance(layers, int) else layers) > self.base.middle

    @torch.inference_mode()
    def encode(self, texts: list[str], max_length: int = 128, batch_size: int = EVAL_BATCH_SIZE,
               keep_states: bool = True) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Run the bare base's bottom half (it stops after the middle block). Returns what the
        router sees, each text's mean-pooled states of unit length [n, D], and, to go on from
        in `probabilities`, each text's states ([tokens, D] each). On the bundled sequence these
        features route better than the last layer's, and as well as middle and last together
        (bench/routing.py), at half the cost."""
        features = torch.zeros(len(texts), self.base.hidden_size)
        states: list[torch.Tensor | None] = [None] * len(texts)
        ids = self.base.tokenize(texts, max_length)
        bare = self.peft_model.disable_adapter() if self.peft_model else contextlib.nullcontext()
        with bare:
            for rows in length_batches(ids, range(len(ids)), batch_size):
                batch = self.base.pad([ids[i] for i in rows])
                hidden = self.base.states_after(self.base.middle, batch)
                features[rows] = torch.nn.functional.normalize(mean_pool(hidden, batch), dim=-1)
                if keep_states:
                    for k, row in enumerate(rows):
                        states[row] = hidden[k, : len(ids[row])]
        return features, states if keep_states else None

    def features(self, texts: list[str], max_length: int = 128) -> torch.Tensor:
        return self.encode(texts, max_length, keep_states=False)[0]

    @torch.inference_mode()
    def probabilities(self, texts: list[str], adapters: list[str], max_length: int = 128,
                      batch_size: int = EVAL_BATCH_SIZE,
                      states: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Label probabilities of texts[i] through adapters[i]. Rows for different adapters share
        one forward pass (peft's adapter_names) where the method honours it; rows of methods that
        would silently ignore it run grouped, one adapter at a time. Given `states` (from
        encode), rows of adapters that leave the bottom half bare go on from them."""
        if not texts:
            return []
        self.peft_model.eval()
        ids = self.base.tokenize(texts, max_length)
        out: list[torch.Tensor | None] = [None] * len(texts)
        resume = {a: states is not None and self.resumes(a) for a in set(adapters)}
        groups = [[i for i, a in enumerate(adapters) if self.mixed_batch[a] and resume[a] == r]
                  for r in (True, False)]
        for adapter in dict.fromkeys(a for a in adapters if not self.mixed_batch[a]):
            groups.append([i for i, a in enumerate(adapters) if a == adapter])
        for group in filter(None, groups):
            for rows in length_batches(ids, group, batch_size):
                batch = self.base.pad([ids[i] for i in rows])
                names = [adapters[i] for i in rows]
                mixed = {"adapter_names": names} if self.mixed_batch[names[0]] else {}
                if not mixed:
                    self.activate(names[0])
                if resume[names[0]]:
                    hidden = torch.nn.utils.rnn.pad_sequence([states[i] for i in rows], batch_first=True)
                    with self.base.resumed_after(self.base.middle, hidden):
                        hidden = self.peft_model(**batch, **mixed).last_hidden_state
                else:
                    hidden = self.peft_model(**batch, **mixed).last_hidden_state
                pooled = mean_pool(hidden, batch)
                for name in dict.fromkeys(names):
                    at = [k for k, n in enumerate(names) if n == name]
                    for row, p in zip([rows[k] for k in at], self.heads[name](pooled[at]).softmax(-1)):
                        out[row] = p
        return out

    def predict(self, name: str, texts: list[str], max_length: int = 128) -> tuple[list[int], list[float]]:
        """(label ids, probabilities of those labels) for texts through one adapter."""
        probs = self.probabilities(texts, [name] * len(texts), max_length)
        return [int(p.argmax()) for p in probs], [float(p.max()) for p in probs]

    def accuracy(self, name: str, texts: list[str], labels: list[int], max_length: int = 128) -> float:
        preds, _ = self.predict(name, texts, max_length)
        return sum(p == y for p, y in zip(preds, labels)) / max(len(labels), 1)


def answer(route, probs: dict[str, torch.Tensor], labels: dict[str, list[str]]) -> dict:
    """One input's answer from its route and the routed adapters' label probabilities.

    Routed tasks that share a label set answer together: their probabilities are mixed by the
    route's weights. Tasks with different label sets cannot be mixed; the group whose best label
    has the highest weighted probability answers. With one routed task this is that task's label.
    score = the router's confidence times the (mixed) probability of the label.
    """
    if not route.tasks:
        return {"task": None, "label": None, "score": 0.0, "tasks": []}
    groups: dict[tuple, list[tuple[str, float]]] = {}
    for task, weight in zip(route.tasks, route.weights):
        groups.setdefault(tuple(labels[task]), []).append((task, weight))
    best = None
    for label_set, members in groups.items():
        mixture = sum(weight * probs[task] for task, weight in members)
        k = int(mixture.argmax())
        if best is None or mixture[k] > best[0]:
            best = (float(mixture[k]), sum(w for _, w in members), label_set[k], members)
    weighted, group_weight, label, members = best
    return {"task": members[0][0], "label": label,
            "score": route.confidence * weighted / group_weight,
            "tasks": [task for task, _ in members]}


def mean_pool(hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def length_batches(ids: list[list[int]], rows, batch_size: int):
    """Rows sorted by token length, in batches: similar lengths pad little."""
    order = sorted(rows, key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


_banks: dict[str, AdapterBank] = {}


def bank_for(base) -> AdapterBank:
    """The process's one bank per base: peft wraps a base model once, so banks are never copied."""
    if str(base.path) not in _banks:
        _banks[str(base.path)] = AdapterBank(base)
    return _banks[str(base.path)]

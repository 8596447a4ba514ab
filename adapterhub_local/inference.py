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

    def __contains__(self, name: str) -> bool:
        return name in self.heads

    def add_adapter(self, name: str, peft_config, labels: list[str]) -> None:
        """A new trainable adapter and a freshly initialised head (seed the caller's RNG first)."""
        from peft import get_peft_model

        if self.peft_model is None:
            with quiet_peft_wrap():
                self.peft_model = get_peft_model(self.base.model, peft_config, adapter_name=name)
        else:
            self.peft_model.add_adapter(name, peft_config)
        self.heads[name] = torch.nn.Linear(self.base.hidden_size, len(labels))
        self.labels[name] = list(labels)
        self.activate(name)

    def load_adapter(self, name: str, folder: Path) -> None:
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
        self.heads.pop(name, None)
        self.labels.pop(name, None)

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
        hidden = self.peft_model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.heads[name](pooled)

    @torch.inference_mode()
    def predict(self, name: str, texts: list[str], max_length: int = 128,
                batch_size: int = EVAL_BATCH_SIZE) -> tuple[list[int], list[float]]:
        """(label ids, probabilities of those labels) for texts, batched by length."""
        self.activate(name)
        self.peft_model.eval()
        ids = self.base.tokenize(texts, max_length)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        preds, scores = [0] * len(ids), [0.0] * len(ids)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            probs = self.logits(name, self.base.pad([ids[i] for i in rows])).softmax(-1)
            best = probs.max(-1)
            for row, label, score in zip(rows, best.indices.tolist(), best.values.tolist()):
                preds[row], scores[row] = label, score
        return preds, scores

    def accuracy(self, name: str, texts: list[str], labels: list[int], max_length: int = 128) -> float:
        preds, _ = self.predict(name, texts, max_length)
        return sum(p == y for p, y in zip(preds, labels)) / max(len(labels), 1)


_banks: dict[str, AdapterBank] = {}


def bank_for(base) -> AdapterBank:
    """The process's one bank per base: peft wraps a base model once, so banks are never copied."""
    if str(base.path) not in _banks:
        _banks[str(base.path)] = AdapterBank(base)
    return _banks[str(base.path)]

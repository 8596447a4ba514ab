"""Train one adapter and its head on the frozen base, top to bottom: setup, train, cleanup.

Seeded and reproducible. What saves work (bench/train_speed.py measures each lever on its own,
against a careful Hugging Face Trainer script, at the same accuracy):
- texts are tokenised once without padding; batches are grouped by length and padded to their
  own longest row (real texts are short: fixed padding wastes most compute);
- when the adapter leaves the base's bottom half bare (the default, layers=top-half), that half
  runs once per text, without dropout, and every epoch goes on from its states;
- on hardware with native bf16 arithmetic, matrix products run in bf16 (autocast); the adapter's
  weights and optimizer state stay fp32;
- dropout draws its masks from random bytes (torch's CPU dropout draws a float per element and
  costs as much as the matrix products of a LoRA block).
"""

import contextlib
import math
import random
import sys
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch

from adapterhub_local.errors import AhlError, has_type_of
from adapterhub_local.router import ROUTER_FEATURES

LOG_EVERY = 10  # steps between train-loss logs
LENGTH_GROUP = 50  # batches per length-sorted group: long enough to sort, short enough to shuffle
VAL_FRACTION, VAL_MAX = 0.1, 200
MIN_STEPS, MAX_AUTO_EPOCHS = 100, 5  # auto_epochs
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainOptions:
    epochs: int = 3
    """Passes over the training rows (add-task gives a small classify task more when neither
    the command line nor its spec names them: auto_epochs)."""
    lr: float = 2e-3
    """Peak learning rate of AdamW (linear warm-up, then linear decay)."""
    batch_size: int = 32
    """Rows per step."""
    max_length: int = 128
    """Tokens per text; longer texts are truncated."""
    seed: int = 0
    """Seeds the adapter's initialisation, the head, dropout and the batch order."""
    warmup: float = 0.06
    """Share of the steps spent warming up the learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    precision: str = "auto"
    """Arithmetic of the training passes: bf16 (autocast; the weights stay fp32), fp32, or auto:
    bf16 where the hardware has it natively (CPUs with AVX512-BF16 or AMX), else fp32."""
    reuse_states: bool = True
    """Run the frozen bottom half once per text and go on from its states in every epoch, when
    the adapter leaves that half bare (layers=top-half). Off, it runs at every step, with
    dropout, as a plain training loop does."""
    byte_dropout: bool = True
    """Draw dropout masks from random bytes on a CPU (the same masks' distribution, about 4x
    cheaper than torch's dropout); off, torch's."""
    validate: bool = True
    """Hold a tenth of the rows (at most 200) out of training to measure the adapter's
    validation accuracy after each epoch; off, the adapter trains on every row. The router
    keeps those rows out of its statistics either way, to calibrate itself on them."""

    def __post_init__(self):
        # A spec's TOML can set any of these: "three" or "false" in quotes must not reach the
        # comparisons below (a traceback) or read as true.
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            if not has_type_of(value, f.default):
                wanted = {bool: "true or false", int: "a whole number", float: "a number"}.get(kind, "text")
                example = "false" if kind is bool else repr(f.default)
                raise AhlError(f"{f.name} must be {wanted}, got {value!r}: write {f.name} = "
                               f"{example} (no quotes) in the spec")
        checks = [(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
                  (0 < self.lr < math.inf, f"--lr must be a positive number, got {self.lr}: try --lr 2e-3"),
                  (0 <= self.seed < 2**32, f"--seed must be 0..{2**32 - 1}, got {self.seed}: try --seed 0"),
                  (0 <= self.weight_decay < math.inf,
                   f"weight_decay must be a number >= 0, got {self.weight_decay}: try weight_decay = 0.01"),
                  (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
                  (8 <= self.max_length <= 4096, f"--max-length must be 8..4096, got {self.max_length}"),
                  (0 <= self.warmup < 1, f"warmup must be in [0, 1), got {self.warmup}"),
                  (self.precision in PRECISIONS,
                   f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")]
        for ok, message in checks:
            if not ok:
                raise AhlError(message)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainReport:
    steps: int
    final_loss: float
    val_accuracy: float
    trainable_params: int
    train_rows: int
    val_rows: int
    precision: str = "fp32"
    """The arithmetic the training passes ran in (what --precision auto chose)."""
    features: torch.Tensor | None = None
    """The bare base's features of every training row (in data order), when training ran the
    bottom half once for them: the router's statistics reuse them."""


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, sort each group of LENGTH_GROUP batches by length, cut batches, shuffle batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = batch_size * LENGTH_GROUP
    batches = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start : start + group], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def training_rows(strata: list[int], options: TrainOptions) -> tuple[list[int], list[int]]:
    """(train, validation) indices of a task's rows under `options`: a held-out slice when
    it validates (split_validation), else every row for training."""
    if options.validate:
        return split_validation(strata, options.seed)
    return list(range(len(strata))), []


def auto_epochs(strata: list[int], options: TrainOptions) -> int:
    """A classify task's epochs when none are given: 3, or for a small task as many more (at
    most MAX_AUTO_EPOCHS) as bring its training to MIN_STEPS steps. With 3 epochs a task of 700
    rows trains 60 steps, too few for the learning-rate schedule to settle: on the smallest
    bundled task 5 epochs gained 1.9 points (four seeds) and closed the gap to a 5-epoch script,
    while the other small tasks moved within 1 point (README, reference_lora)."""
    steps = math.ceil(len(training_rows(strata, options)[0]) / options.batch_size)
    return min(MAX_AUTO_EPOCHS, max(TrainOptions.epochs, math.ceil(MIN_STEPS / max(steps, 1))))


def warmup_then_linear_decay(optimizer, total_steps: int, warmup_share: float):
    """The learning rate rises linearly over the first warmup_share of the steps, then falls
    linearly to 0 at the last one."""
    warmup = max(1, int(total_steps * warmup_share))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup))))


def split_validation(labels: list[int], seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices: a seeded slice of each label for validation, none if too small."""
    rng = random.Random(seed)
    n_val = min(VAL_MAX, int(len(labels) * VAL_FRACTION))
    if n_val < len(set(labels)):
        return list(range(len(labels))), []
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    val = []
    for rows in by_label.values():
        rng.shuffle(rows)
        val += rows[: max(1, round(len(rows) * n_val / len(labels)))]
    held = set(val)
    return [i for i in range(len(labels)) if i not in held], sorted(val)


class ByteDropout(torch.nn.Module):
    """Dropout whose mask compares random 16-bit words with a threshold: the same Bernoulli mask
    (p rounded to 1/32768) as torch.nn.Dropout, drawn about 4x faster on a CPU, and applied as
    one product whose backward is one product too."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        # random_() fills an int64 with 63 random bits: of its four int16 words, three are
        # uniform over the int16 range and the most significant one over [0, 32767].
        low, high = round(p * 65536) - 32768, round(p * 32768)  # words below them are dropped
        self.thresholds = torch.tensor([low, low, low, high] if sys.byteorder == "little"
                                       else [high, low, low, low], dtype=torch.int16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_()
        keep = draws.view(torch.int16).view(-1, 4) >= self.thresholds.to(x.device)
        # The mask in x's dtype, scaled (in bf16 the scale 1 / (1 - p) rounds, within 0.2%).
        mask = keep.view(-1)[: x.numel()].view(x.shape).to(x.dtype).mul_(1 / (1 - self.p))
        return x * mask


@contextlib.contextmanager
def byte_dropout(model: torch.nn.Module, enabled: bool = True):
    """Inside this context every torch.nn.Dropout of a model on the CPU (the base's and the
    adapter's) is a ByteDropout."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    swapped = [] if not (enabled and on_cpu) else [
               (parent, name, child) for parent in model.modules()
               for name, child in parent.named_children()
               if type(child) is torch.nn.Dropout and child.p > 0]
    for parent, name, child in swapped:
        setattr(parent, name, ByteDropout(child.p))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


@contextlib.contextmanager
def bf16_weights(model: torch.nn.Module, enabled: bool = True):
    """While training autocasts to bf16: the frozen weights of the model's linear layers are
    held in bf16 (autocast caches its casts of trainable weights only, so it would cast every
    frozen one again at each use: a copy of the model per step), and peft's layers take their
    bf16 inputs as they come (peft casts an input to its weights' fp32, and autocast casts it
    straight back). Outside, the fp32 weights are back, for evaluation in fp32."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapters = tuple(f".{name}" for name in getattr(model, "peft_config", {}))
    # An LM head tied to the embeddings stays: the embeddings' output would turn bf16 with it.
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    frozen, layers = [], []  # (weight, its fp32 tensor), (peft layer, its input-cast switch)
    for name, module in model.named_modules() if enabled else ():
        if (type(module) is torch.nn.Linear and not name.endswith(adapters)
                and id(module.weight) not in tied and not module.weight.requires_grad
                and module.weight.dtype == torch.float32):
            frozen.append((module.weight, module.weight.data))
        elif isinstance(module, BaseTunerLayer):
            # peft's own switch for this (helpers.disable_input_dtype_casting) fails on the
            # layers that lack the attribute (IA3's).
            layers.append((module, getattr(module, "cast_input_dtype_enabled", True)))
    for weight, fp32 in frozen:
        weight.data = fp32.to(torch.bfloat16)
    for layer, _ in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for weight, fp32 in frozen:
            weight.data = fp32
        for layer, cast in layers:
            layer.cast_input_dtype_enabled = cast


def native_bf16() -> bool:
    """Whether this CPU multiplies in bf16 natively (AVX512-BF16 or AMX): there autocast to bf16
    halves a forward pass of MiniLM; elsewhere bf16 is emulated, and slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu, since 2.1
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def uses_bf16(precision: str, device: str = "cpu") -> bool:
    """Whether training autocasts to bf16: asked for, or auto on a CPU or CUDA GPU that has it
    natively (elsewhere fp32: fp16 training would need loss scaling)."""
    from adapterhub_local.device import gpu_bf16

    if precision != "auto":
        return precision == "bf16"
    return native_bf16() if device == "cpu" else gpu_bf16(device)


def train_adapter(bank, name: str, peft_config, data, options: TrainOptions, method,
                  log: Callable[[dict, int], None] | None = None,
                  progress: Callable[[int, int], None] | None = None,
                  router_features: str = ROUTER_FEATURES, generate: dict | None = None) -> TrainReport:
    """Add adapter `name` (of `method`, a methods.Method) to the bank and train it on `data`
    (a TaskData): with its head for a classify task, for the completion-only loss of a generate
    task (`generate`: its decoding settings, kept with the adapter). Where it runs the bottom
    half once for every epoch, it also keeps the `router_features` (router.FEATURES) of the
    rows, in the report."""
    # Setup: everything random is drawn from the seed, in a fixed order.
    torch.manual_seed(options.seed)
    rng = random.Random(options.seed)
    train_idx, val_idx = training_rows(data.strata(), options)
    total = options.epochs * math.ceil(len(train_idx) / options.batch_size)
    if method.schedule is not None:  # AdaLoRA plans its rank budget over the run
        method.schedule(peft_config, total)
    bank.add_adapter(name, peft_config, data.labels, method, generate)
    model = bank.model(name)
    if data.kind == "generate":
        from adapterhub_local.generation import GenerateObjective

        task = GenerateObjective(bank, name, data, options, train_idx, val_idx)
    else:
        task = ClassifyObjective(bank, name, data, options, train_idx, val_idx, router_features)
    params = bank.trainable_parameters(name)
    # fused: one kernel for every parameter's update instead of a loop of small ops per tensor.
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay,
                                  fused=all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                            for p in params))
    # AdaLoRA moves its rank budget between backward and zero_grad; without the call it never
    # prunes, silently.
    allocate = getattr(model.base_model, "update_and_allocate", None)
    schedule = warmup_then_linear_decay(optimizer, total, options.warmup)
    device = bank.base.device.split(":")[0]
    bf16 = uses_bf16(options.precision, bank.base.device)

    # Train.
    step, loss_sum, loss_count, val_accuracy = 0, 0.0, 0, float("nan")
    for epoch in range(options.epochs):
        model.train()
        # Swapped in for the training steps only: the validation after them runs in fp32.
        with byte_dropout(model, options.byte_dropout), bf16_weights(model, bf16):
            for rows in length_grouped_batches(task.lengths, options.batch_size, rng):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                    logits, targets = task.logits(rows)
                loss = torch.nn.functional.cross_entropy(logits.float(), targets)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                if allocate is not None:
                    allocate(step)
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
                if log and step % LOG_EVERY == 0:
                    log({"train_loss": loss_sum / loss_count}, step)
                    loss_sum, loss_count = 0.0, 0
                if progress:
                    progress(step, total)
        if val_idx:
            model.eval()
            val_accuracy = task.validate()
            if log:
                log({"val_accuracy": val_accuracy, "epoch": epoch + 1}, step)

    # Cleanup: the adapter is frozen from here on, like every stored adapter.
    model.eval()
    for p in params:
        p.requires_grad_(False)
    model.peft_config[name].inference_mode = True  # AdaLoRA allows one trainable adapter
    return TrainReport(steps=step, final_loss=loss.item(), val_accuracy=val_accuracy,
                       trainable_params=sum(p.numel() for p in params),
                       train_rows=len(train_idx), val_rows=len(val_idx),
                       precision="bf16" if bf16 else "fp32", features=task.features)


class ClassifyObjective:
    """A classify task's training rows: its head's logits against the labels, and the share of
    validation rows labelled right. Where the adapter leaves the bottom half bare, that half
    runs once per text (reuse_states) and every epoch goes on from its states."""

    def __init__(self, bank, name: str, data, options: TrainOptions, train_idx: list[int],
                 val_idx: list[int], router_features: str):
        self.bank, self.name, self.options = bank, name, options
        self.val_texts = [data.train_texts[i] for i in val_idx]
        self.val_labels = [data.train_labels[i] for i in val_idx]
        self.ids = bank.base.tokenize([data.train_texts[i] for i in train_idx], options.max_length)
        self.labels = torch.tensor([data.train_labels[i] for i in train_idx],
                                   device=bank.base.device)
        self.lengths = [len(x) for x in self.ids]
        self.features = self.states = self.val_states = None
        if options.reuse_states and bank.resumes(name):
            # One bottom-half pass per text serves every epoch, the validation and the router.
            self.features, every = bank.encode(data.train_texts, options.max_length,
                                               features=router_features)
            # encode computes in inference mode; a clone is an ordinary tensor autograd can
            # use, and frees the padded batch it viewed once all are cloned.
            self.states = [every[i].clone() for i in train_idx]
            self.val_states = [every[i].clone() for i in val_idx]
            del every

    def logits(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the head's logits, the labels) of a batch of training rows."""
        bank, name = self.bank, self.name
        batch = bank.base.pad([self.ids[i] for i in rows])
        if self.states is None:
            logits = bank.logits(name, batch)
        else:
            hidden = torch.nn.utils.rnn.pad_sequence([self.states[i] for i in rows],
                                                     batch_first=True)
            with bank.base.resumed_after(bank.base.middle, hidden,
                                         bank.model(name).get_base_model()):
                logits = bank.logits(name, batch)
        return logits, self.labels[rows]

    def validate(self) -> float:
        probs = self.bank.probabilities(self.val_texts, [self.name] * len(self.val_texts),
                                        self.options.max_length, states=self.val_states)
        return sum(int(p.argmax()) == y for p, y in zip(probs, self.val_labels)) / len(probs)

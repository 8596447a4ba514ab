"""METHODS: the registry of adaptation methods, name -> a small builder of a PEFT config.

Each method has an options dataclass (a docstring per field, checks in __post_init__ whose
messages say how to fix the input) and a builder that turns options plus the base into a peft
config. Core code never sees the options: it gets the built config.
"""

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from adapterhub_local.errors import AhlError

METHOD_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
# Linear layers to adapt per architecture (config.model_type). The pooler is left out on purpose:
# tasks pool the last hidden states themselves, so a pooler adapter would never train.
LINEAR_TARGETS = {
    "bert": ["query", "key", "value", "intermediate.dense", "output.dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass
class Method:
    """One adaptation method: how to build it and what it can do."""

    name: str
    family: str
    """soft-prompt, lora or adapter."""
    options: type
    """The dataclass of this method's options, with their defaults."""
    build: Callable[[Any, Any], Any]
    """build(options, base) -> a peft config."""
    mixed_batch: bool
    """Whether rows for different adapters of this method can share one forward pass."""
    description: str = ""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if not METHOD_NAME.match(method.name):
        raise ValueError(f"method name {method.name!r} must be lower-case letters, digits and '-'")
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise AhlError(f"unknown method {name!r}: use one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_options(name: str, values: dict | None = None):
    """The method's options dataclass filled from user values (strings from the CLI are cast)."""
    method = get_method(name)
    fields = {f.name: f for f in dataclasses.fields(method.options)}
    unknown = sorted(set(values or {}) - set(fields))
    if unknown:
        raise AhlError(f"method {name!r} has no option {', '.join(unknown)}: its options are "
                       f"{', '.join(fields) or 'none'}")
    cast = {key: cast_option(name, fields[key], value) for key, value in (values or {}).items()}
    try:
        return method.options(**cast)
    except ValueError as e:
        raise AhlError(f"method {name!r}: {e}") from None


def cast_option(method: str, f: dataclasses.Field, value):
    if not isinstance(value, str):
        return value
    kind = type(f.default) if f.default is not dataclasses.MISSING else str
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if kind is list:
            return [v for v in value.split(",") if v]
        return kind(value)
    except ValueError:
        raise AhlError(f"method {method!r} option {f.name}={value!r} is not of type "
                       f"{kind.__name__}: give e.g. {f.name}={f.default!r}") from None


def linear_targets(base) -> list[str]:
    model_type = base.model.config.model_type
    if model_type not in LINEAR_TARGETS:
        raise AhlError(f"no default target modules for {model_type!r} bases: pass "
                       "--method-arg target_modules=NAME,NAME")
    return LINEAR_TARGETS[model_type]


@dataclass
class LoraOptions:
    r: int = 8
    """Rank of the low-rank update."""
    alpha: int = 16
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter's input during training."""
    target_modules: list = field(default_factory=list)
    """Module names to adapt; empty means every linear layer of the blocks."""
    layers: str = "top-half"
    """Blocks to adapt: top-half (the bottom half stays the bare base, so routing and prediction
    share one pass through it; as accurate on the bundled tasks) or all."""

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"r must be a positive rank, got {self.r}: try r=8")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}: try dropout=0.05")
        if self.layers not in LAYER_CHOICES:
            raise ValueError(f"layers must be one of {', '.join(LAYER_CHOICES)}, got "
                             f"{self.layers!r}: try layers=top-half")


LAYER_CHOICES = ("top-half", "all")


def layer_selection(layers: str, base) -> dict:
    """peft's layers_to_transform / layers_pattern for a choice of LAYER_CHOICES."""
    if layers == "all":
        return {}
    count = base.model.config.num_hidden_layers
    return {"layers_to_transform": list(range(base.middle + 1, count)),
            "layers_pattern": base.layers_name.rsplit(".", 1)[-1]}


def build_lora(options: LoraOptions, base):
    from peft import LoraConfig

    return LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                      target_modules=options.target_modules or linear_targets(base),
                      **layer_selection(options.layers, base))


register(Method("lora", "lora", LoraOptions, build_lora, mixed_batch=True,
                description="Low-rank updates of the linear layers (Hu et al., 2021)."))

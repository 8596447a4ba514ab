"""METHODS: the registry of adaptation methods, name -> a small builder of a PEFT config.

Each method has an options dataclass (a docstring per field, checks in __post_init__ whose
messages say how to fix the input) and a builder that turns options plus the base into a peft
config. Core code never sees the options: it gets the built config.
"""

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from adapterhub_local.errors import AhlError, has_type_of

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
    """Whether rows for different adapters of this method can share one forward pass (peft's
    adapter_names): LoRA, QLoRA, LoftQ and bottleneck adapters honour it; AdaLoRA raises, and
    the soft prompts, LoHa, LoKr and IA3 silently ignore it, so their rows run grouped."""
    description: str = ""
    architectures: tuple = ("bert", "llama")
    """The base architectures (config.model_type) the method works on."""
    quantized: bool = False
    """Whether the adapters sit on a 4-bit NF4 copy of the base (QLoRA, LoftQ)."""
    initialise: Callable | None = None
    """initialise(peft_model, adapter, original_base) after a new adapter is made (LoftQ)."""
    schedule: Callable | None = None
    """schedule(peft_config, total_steps) before training, for methods that plan over the run."""
    peft_module: str = ""
    """A module that registers the method with peft: imported before its adapters are built or
    loaded (a fresh process loading a stored bottleneck adapter has not built one)."""
    reloads_exactly: bool = True
    """Whether its saved files load back to the very weights saved (AdaLoRA's do not: saving
    prunes each layer to the ranks its budget kept). Then a version's stored test scores hold
    for its files without loading them (serving.Loader.digest)."""

    def register_with_peft(self) -> None:
        if self.peft_module:
            importlib.import_module(self.peft_module)

    def check_base(self, base) -> None:
        model_type = base.model.config.model_type
        if model_type not in self.architectures:
            raise AhlError(f"method {self.name!r} does not work on {model_type!r} bases (it "
                           f"supports {', '.join(self.architectures)}): pick another --method "
                           "(see ahl methods) or another base")


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


def virtual_tokens(peft_config) -> int:
    """Positions a prompt-learning adapter's virtual tokens take before the text's (prompt,
    prefix and p-tuning all shift the text's positions by them); 0 for every other method."""
    return peft_config.num_virtual_tokens if peft_config.is_prompt_learning else 0


def describe_methods() -> list[dict]:
    """Every method with its family, options (default and meaning), whether its adapters share
    mixed batches, and the base architectures it works on: what `ahl methods` prints."""
    import inspect

    rows = []
    for method in METHODS.values():
        docs = option_docs(method.options)
        options = [{"name": f.name, "type": type(default).__name__, "default": default,
                    "help": docs.get(f.name, "")}
                   for f in dataclasses.fields(method.options) for default in [option_default(f)]]
        rows.append({"name": method.name, "family": method.family, "options": options,
                     "mixed_batch": method.mixed_batch, "quantized": method.quantized,
                     "architectures": list(method.architectures),
                     "description": method.description or inspect.getdoc(method.build) or ""})
    return rows


def option_docs(options: type) -> dict[str, str]:
    """The docstring under each field of an options dataclass (read from its source)."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(options))).body[0].body
    return {a.target.id: " ".join(b.value.value.split())
            for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)}


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


def option_default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def cast_option(method: str, f: dataclasses.Field, value):
    """A string from the command line cast to the option's type; a spec's typed TOML value
    checked against it (a number where a list belongs would reach peft as a traceback)."""
    default = option_default(f)
    kind = type(default)
    if not isinstance(value, str):
        if not has_type_of(value, default):
            raise AhlError(f"method {method!r} option {f.name}={value!r} is not of type "
                           f"{kind.__name__}: give e.g. {f.name}={default!r}")
        return value
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
    r: int = 16
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
        check_rank(self.r, 8)
        if getattr(self, "alpha", 1) <= 0:  # (LoftQ's options share these checks, alpha fixed)
            raise ValueError(f"alpha must be positive, got {self.alpha}: try alpha={self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}: try dropout=0.05")
        check_layers(self.layers)


def check_rank(r: int, example: int) -> None:
    if r < 1:
        raise ValueError(f"r must be a positive rank, got {r}: try r={example}")


def check_layers(layers: str) -> None:
    if layers not in LAYER_CHOICES:
        raise ValueError(f"layers must be one of {', '.join(LAYER_CHOICES)}, got {layers!r}: "
                         "try layers=top-half")


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
                      target_modules=targets_or_default(options.target_modules, base),
                      **layer_selection(options.layers, base))


def targets_or_default(targets: list[str], base) -> list[str]:
    """The given target modules, checked against the base, else its linear layers' defaults."""
    return check_targets(targets, base) or linear_targets(base)


def check_targets(targets: list[str], base) -> list[str]:
    """The given target modules, each of which names modules of the base as peft matches them
    (a module's name, or its last dotted parts); peft would fail only once training starts."""
    import torch

    modules = dict(base.model.named_modules())
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in modules)]
    if unmatched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items()
                         if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"target_modules {', '.join(map(repr, unmatched))} match no module of "
                         f"the base: name some of its linear layers, e.g. "
                         f"target_modules={','.join(linear[:3])}")
    return targets


@dataclass
class LoftqOptions:
    r: int = 8
    """Rank of the low-rank update (its scaling is fixed at 1: LoftQ's correction needs it)."""
    dropout: float = 0.05
    """Dropout on the adapter's input during training."""
    target_modules: list = field(default_factory=list)
    """Module names to adapt; empty means every linear layer of the blocks."""
    layers: str = "top-half"
    """Blocks to adapt: top-half or all."""

    def __post_init__(self):
        LoraOptions.__post_init__(self)


def build_loftq(options: LoftqOptions, base):
    return build_lora(LoraOptions(r=options.r, alpha=options.r, dropout=options.dropout,
                                  target_modules=options.target_modules, layers=options.layers),
                      base)


def loftq_initialise(peft_model, adapter: str, original) -> None:
    from adapterhub_local.quantize import loftq_initialise as initialise

    initialise(peft_model, adapter, original)


@dataclass
class AdaloraOptions:
    init_r: int = 12
    """Rank each update starts with."""
    target_r: int = 8
    """Average rank the budget is pruned to by the end of training."""
    alpha: int = 16
    """Scaling numerator."""
    dropout: float = 0.05
    """Dropout on the adapter's input during training."""
    target_modules: list = field(default_factory=list)
    """Module names to adapt; empty means every linear layer of the blocks."""
    layers: str = "top-half"
    """Blocks to adapt: top-half or all."""

    def __post_init__(self):
        if not 1 <= self.target_r <= self.init_r:
            raise ValueError(f"need 1 <= target_r <= init_r, got target_r={self.target_r}, "
                             f"init_r={self.init_r}: try init_r=12 target_r=8")
        check_layers(self.layers)


def build_adalora(options: AdaloraOptions, base):
    from peft import AdaLoraConfig

    # total_step, tinit and tfinal are placeholders until the trainer knows the run's length.
    return AdaLoraConfig(init_r=options.init_r, target_r=options.target_r,
                         lora_alpha=options.alpha, lora_dropout=options.dropout,
                         target_modules=targets_or_default(options.target_modules, base),
                         total_step=10, tinit=0, tfinal=0, **layer_selection(options.layers, base))


def adalora_initialise(peft_model, adapter: str, original) -> None:
    """peft's AdaLoRA model keeps the rank allocator of its first adapter: a later adapter in
    the same model needs its own, or update_and_allocate reads the first one's (absent) grads."""
    from peft.tuners.adalora.layer import RankAllocator

    tuner = peft_model.base_model
    tuner.trainable_adapter_name = adapter
    tuner.rankallocator = RankAllocator(tuner.model, tuner.peft_config[adapter], adapter)


def schedule_adalora(config, total_steps: int) -> None:
    """Prune the rank budget between the first 10% and the last 20% of the steps."""
    config.total_step = total_steps
    config.tinit = total_steps // 10
    config.tfinal = total_steps // 5


@dataclass
class LycorisOptions:
    r: int = 8
    """Rank of the factors."""
    alpha: int = 8
    """Scaling numerator: the update is scaled by alpha / r."""
    target_modules: list = field(default_factory=list)
    """Module names to adapt; empty means every linear layer of the blocks."""
    layers: str = "top-half"
    """Blocks to adapt: top-half or all."""

    def __post_init__(self):
        check_rank(self.r, 8)
        check_layers(self.layers)


def build_lycoris(config_name: str) -> Callable:
    """The builder of LoHa or LoKr: the same options, peft's LoHaConfig or LoKrConfig."""
    def build(options: LycorisOptions, base):
        import peft

        return getattr(peft, config_name)(
            r=options.r, alpha=options.alpha,
            target_modules=targets_or_default(options.target_modules, base),
            **layer_selection(options.layers, base))
    return build


@dataclass
class Ia3Options:
    target_modules: list = field(default_factory=list)
    """Modules whose activations are rescaled; empty means peft's choice for the architecture
    (keys, values and the FFN output)."""
    feedforward_modules: list = field(default_factory=list)
    """Of those, the FFN ones (rescaled on their input); empty means peft's choice."""


def build_ia3(options: Ia3Options, base):
    from peft import IA3Config

    return IA3Config(target_modules=check_targets(options.target_modules, base) or None,
                     feedforward_modules=options.feedforward_modules or None)


@dataclass
class BottleneckOptions:
    r: int = 16
    """Bottleneck width (the down-projection's size)."""
    variant: str = "houlsby"
    """houlsby: after the attention output and the FFN output; pfeiffer: after the FFN only."""
    non_linearity: str = "relu"
    """relu, gelu, silu or tanh."""
    layers: str = "top-half"
    """Blocks to adapt: top-half or all."""

    def __post_init__(self):
        check_rank(self.r, 16)
        if self.variant not in BOTTLENECK_PLACES["bert"]:
            raise ValueError(f"variant must be houlsby or pfeiffer, got {self.variant!r}")
        if self.non_linearity not in ("relu", "gelu", "silu", "tanh"):
            raise ValueError(f"non_linearity must be relu, gelu, silu or tanh, got "
                             f"{self.non_linearity!r}: try non_linearity=relu")
        check_layers(self.layers)


# Where bottleneck adapters go, per architecture: the output projections of the attention and
# the FFN sublayers, named relative to a block.
BOTTLENECK_PLACES = {
    "bert": {"houlsby": ["attention.output.dense", "output.dense"], "pfeiffer": ["output.dense"]},
    "llama": {"houlsby": ["self_attn.o_proj", "mlp.down_proj"], "pfeiffer": ["mlp.down_proj"]},
}


def build_bottleneck(options: BottleneckOptions, base):
    from adapterhub_local.bottleneck import BottleneckConfig

    selection = layer_selection(options.layers, base)
    blocks = selection.get("layers_to_transform", range(base.model.config.num_hidden_layers))
    places = BOTTLENECK_PLACES[base.model.config.model_type][options.variant]
    # Full module names: "output.dense" alone would also match "attention.output.dense".
    targets = [f"{base.layers_name}.{i}.{place}" for i in blocks for place in places]
    return BottleneckConfig(r=options.r, non_linearity=options.non_linearity,
                            target_modules=targets, **selection)


@dataclass
class PromptTuningOptions:
    num_virtual_tokens: int = 20
    """Trainable embeddings prepended to every input."""

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise ValueError("num_virtual_tokens must be at least 1: try num_virtual_tokens=20")


def build_prompt_tuning(options: PromptTuningOptions, base):
    from peft import PromptTuningConfig

    return PromptTuningConfig(task_type="FEATURE_EXTRACTION",
                              num_virtual_tokens=options.num_virtual_tokens)


@dataclass
class PrefixTuningOptions:
    num_virtual_tokens: int = 10
    """Trainable key/value positions prepended in every block's attention."""
    projection: bool = False
    """Reparametrise the prefix through a small MLP (more stable, more parameters in training)."""

    def __post_init__(self):
        PromptTuningOptions.__post_init__(self)


def build_prefix_tuning(options: PrefixTuningOptions, base):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type="FEATURE_EXTRACTION",
                              num_virtual_tokens=options.num_virtual_tokens,
                              prefix_projection=options.projection)


@dataclass
class AdaptionPromptOptions:
    adapter_len: int = 10
    """Trainable prompt positions per adapted block."""
    adapter_layers: int = 0
    """Top blocks that get a gated prompt; 0 means the top half."""

    def __post_init__(self):
        if self.adapter_len < 1 or self.adapter_layers < 0:
            raise ValueError("adapter_len must be >= 1 and adapter_layers >= 0: try adapter_len=10")


def build_adaption_prompt(options: AdaptionPromptOptions, base):
    from peft import AdaptionPromptConfig

    count = base.model.config.num_hidden_layers
    layers = options.adapter_layers or count - base.middle - 1
    if layers > count:
        raise AhlError(f"adaption-prompt adapter_layers={layers} but the base has {count} blocks: "
                       f"use at most {count}")
    return AdaptionPromptConfig(task_type="FEATURE_EXTRACTION", adapter_len=options.adapter_len,
                                adapter_layers=layers)


register(Method("prompt-tuning", "soft-prompt", PromptTuningOptions, build_prompt_tuning,
                mixed_batch=False, description="Trainable input embeddings (Lester et al., 2021)."))
register(Method("prefix-tuning", "soft-prompt", PrefixTuningOptions, build_prefix_tuning,
                mixed_batch=False,
                description="Trainable keys and values in every block (Li & Liang, 2021)."))
register(Method("adaption-prompt", "soft-prompt", AdaptionPromptOptions, build_adaption_prompt,
                mixed_batch=False, architectures=("llama",),
                description="Zero-gated prompts in the top blocks (LLaMA-Adapter, Zhang et al., 2023)."))
register(Method("lora", "lora", LoraOptions, build_lora, mixed_batch=True,
                description="Low-rank updates of the linear layers (Hu et al., 2021)."))
register(Method("qlora", "lora", LoraOptions, build_lora, mixed_batch=True, quantized=True,
                description="LoRA over a 4-bit NF4 base (Dettmers et al., 2023)."))
register(Method("adalora", "lora", AdaloraOptions, build_adalora, mixed_batch=False,
                schedule=schedule_adalora, initialise=adalora_initialise, reloads_exactly=False,
                description="LoRA whose rank budget moves to where it matters (Zhang et al., 2023)."))
register(Method("loftq", "lora", LoftqOptions, build_loftq, mixed_batch=True, quantized=True,
                initialise=loftq_initialise,
                description="LoRA over an NF4 base, started from the quantization error (Li et al., 2023)."))
register(Method("loha", "lora", LycorisOptions, build_lycoris("LoHaConfig"), mixed_batch=False,
                description="Low-rank Hadamard product updates (Hyeon-Woo et al., 2022)."))
register(Method("lokr", "lora", LycorisOptions, build_lycoris("LoKrConfig"), mixed_batch=False,
                description="Low-rank Kronecker product updates (Edalati et al., 2022)."))
register(Method("bottleneck", "adapter", BottleneckOptions, build_bottleneck, mixed_batch=True,
                peft_module="adapterhub_local.bottleneck",
                description="Down-project, non-linearity, up-project, residual (Houlsby et al., "
                            "2019; Pfeiffer et al., 2021)."))
register(Method("ia3", "adapter", Ia3Options, build_ia3, mixed_batch=False,
                description="Learned rescaling of keys, values and FFN activations (Liu et al., 2022)."))

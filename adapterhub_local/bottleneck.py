"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021) as a peft method.

peft has no bottleneck adapters, so this is one, shaped like peft's small tuners (config, layer,
model): an adapter wraps a sublayer's output projection and adds
    h + up(act(down(h)))        h = the projection's output, `up` initialised to zero,
so a new adapter starts as the identity, and the block's own residual and LayerNorm follow it.
Houlsby places one after the attention output and one after the FFN output; Pfeiffer only after
the FFN output. It saves and loads as a normal PEFT folder (`peft_type: BOTTLENECK`) and takes
mixed batches (peft's `adapter_names`, one adapter per row).
"""

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType, register_peft_method

NAME = "bottleneck"
ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU,
               "tanh": torch.nn.Tanh}


def _add_peft_type(name: str) -> None:
    """peft's PeftType is a closed str Enum: add a member, as peft's own types are declared,
    so that configs saved with `"peft_type": "BOTTLENECK"` load back. The one place that touches
    peft internals; peft is pinned to 0.21.x in pyproject.toml for this reason."""
    key = name.upper()
    if key in PeftType.__members__:
        return
    member = str.__new__(PeftType, key)
    member._name_, member._value_ = key, key
    PeftType._member_map_[key] = member
    PeftType._value2member_map_[key] = member
    PeftType._member_names_.append(key)
    type.__setattr__(PeftType, key, member)


@dataclass
class BottleneckConfig(PeftConfig):
    r: int = field(default=16, metadata={"help": "Bottleneck width."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Output projections to follow with an adapter."})
    non_linearity: str = field(default="relu", metadata={"help": "relu, gelu, silu or tanh."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    layers_to_transform: list[int] | None = field(
        default=None, metadata={"help": "Blocks adapted (the targets name them already)."})
    layers_pattern: str | None = field(default=None, metadata={"help": "Name of the blocks."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.BOTTLENECK
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)


class BottleneckLayer(BaseTunerLayer):
    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_act", "bottleneck_dropout")

    def __init__(self, base_layer: torch.nn.Module, **kwargs):
        self.base_layer = base_layer
        self.bottleneck_down = torch.nn.ModuleDict()
        self.bottleneck_up = torch.nn.ModuleDict()
        self.bottleneck_act: dict[str, torch.nn.Module] = {}
        self.bottleneck_dropout = torch.nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self.cast_input_dtype_enabled = True  # peft's switch (helpers.disable_input_dtype_casting)

    def update_layer(self, adapter_name: str, config: BottleneckConfig) -> None:
        width = self.get_base_layer().out_features
        self.bottleneck_down[adapter_name] = torch.nn.Linear(width, config.r)
        self.bottleneck_up[adapter_name] = torch.nn.Linear(config.r, width)
        torch.nn.init.zeros_(self.bottleneck_up[adapter_name].weight)  # starts as the identity
        torch.nn.init.zeros_(self.bottleneck_up[adapter_name].bias)
        self.bottleneck_act[adapter_name] = ACTIVATIONS[config.non_linearity]()
        self.bottleneck_dropout[adapter_name] = torch.nn.Dropout(config.dropout)
        self.set_adapter(self.active_adapters)

    def adapt(self, name: str, h: torch.Tensor) -> torch.Tensor:
        down = self.bottleneck_down[name]
        x = self.bottleneck_dropout[name](self._cast_input_dtype(h, down.weight.dtype))
        return self.bottleneck_up[name](self.bottleneck_act[name](down(x))).to(h.dtype)


class BottleneckLinear(torch.nn.Module, BottleneckLayer):
    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, config: BottleneckConfig):
        super().__init__()
        BottleneckLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args, adapter_names: list[str] | None = None, **kwargs):
        h = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return h
        if adapter_names is not None:  # one adapter per row ("__base__": none)
            out = h.clone()
            for name in set(adapter_names) & set(self.bottleneck_down):
                rows = [i for i, n in enumerate(adapter_names) if n == name]
                out[rows] = h[rows] + self.adapt(name, h[rows])
            return out
        for name in self.active_adapters:
            if name in self.bottleneck_down:
                h = h + self.adapt(name, h)
        return h


def _pass_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class BottleneckModel(BaseTuner):
    prefix: str = "bottleneck_"
    tuner_layer_cls = BottleneckLayer
    target_module_mapping = {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key,
                            **kwargs) -> None:
        if isinstance(target, BottleneckLinear):
            target.update_layer(adapter_name, config)
            return
        if not isinstance(target, torch.nn.Linear):
            raise ValueError(f"bottleneck adapters follow linear layers, {current_key} is a "
                             f"{type(target).__name__}")
        self._replace_module(parent, target_name, BottleneckLinear(target, adapter_name, config),
                             target)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("adapter_names works in eval mode only")
        handles = [m.register_forward_pre_hook(partial(_pass_adapter_names,
                                                       adapter_names=adapter_names), with_kwargs=True)
                   for m in self.modules() if isinstance(m, BottleneckLinear)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


_add_peft_type(NAME)
if PeftType.BOTTLENECK not in __import__("peft.mapping", fromlist=["x"]).PEFT_TYPE_TO_CONFIG_MAPPING:
    register_peft_method(name=NAME, config_cls=BottleneckConfig, model_cls=BottleneckModel)

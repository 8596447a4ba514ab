"""Rows for many LoRA adapters in one batch, in two batched products per layer.

peft's mixed batch (`adapter_names`) loops over the distinct adapters of a batch in every
adapted layer: a gather, two rank-r products and a scatter each, so a batch over 30 adapters
costs 30 small steps a layer. Here each row's A and B are gathered from the batch's adapters,
stacked, and every row's update is two batched products however many adapters there are (the
BGMV of S-LoRA and Punica). A packed batch (packing.py, the CPU's) needs none of that: each
adapter's tokens are one slice and take a product pair with its own weights. Installed on the
LoRA layers of ahl's own models only, for plain LoRA in eval mode; anything else (training, DoRA
and other variants, LoRA biases, ranks that differ within a padded batch) goes through peft's
own loop.

A batch's rows are given either as peft's `adapter_names` or, cheaper, with `rows(names)`
around the forward: peft's `adapter_names` registers and removes a hook on every LoRA layer for
each forward, walking all of the model's modules, and those grow with the adapters loaded.
"""

import contextlib
import copy
import functools
import itertools
import threading
import types

import torch

_BATCH = threading.local()  # the adapter of each row of the forward running now (rows())


def gathered_mixed_forward(layer, x: torch.Tensor, *args, adapter_names: list[str],
                           lengths: list[int] | None = None, **kwargs):
    distinct = dict.fromkeys(adapter_names)
    names = [n for n in distinct if n in layer.lora_A]
    if len(distinct) == 1 and names and not layer.training and plain(layer, names):
        return one_adapter_forward(layer, x, names[0], *args, **kwargs)
    if lengths is not None:
        return packed_mixed_forward(layer, x, layout(adapter_names, lengths), names, *args,
                                    **kwargs)
    weights = None if layer.training or x.dim() != 3 else stacked(layer, names)
    if weights is None:
        return type(layer)._mixed_batch_forward(layer, x, *args, adapter_names=adapter_names,
                                                **kwargs)
    result = base_output(layer, x, *args, **kwargs)
    if not names:  # none of the batch's adapters adapts this layer
        return result
    index, a, b = weights
    batch = layout(adapter_names)
    if batch.slices is not None and len(batch.slices) <= max_runs(x) and can_accumulate(result, b):
        for name, start, stop in batch.slices:  # each adapter's rows a slice: nothing gathered
            if name in index:  # (the stack's B is scaled already)
                add_product_(result[start:stop], x[start:stop], a[index[name]].T,
                             b[index[name]].T, 1.0)
        return result
    rows = batch.rows(index, a.device)
    # index_select: aten::index's general gather cost about twice as much on these stacks
    update = torch.bmm(x.to(a.dtype), a.index_select(0, rows))
    b_rows = b.index_select(0, rows)
    if not can_accumulate(result, b):
        return result + torch.bmm(update, b_rows).to(result.dtype)
    return result.baddbmm_(update, b_rows)  # no second [rows, tokens, out] pass


def packed_mixed_forward(layer, x: torch.Tensor, batch: "Layout", names: list[str], *args,
                         **kwargs):
    """A packed batch (x: [tokens, in], each row's tokens in turn, rows ordered by adapter):
    each adapter's tokens are one slice and take one product pair with that adapter's own
    weights (own_weights), whatever its rank. Nothing is padded, gathered or stacked. LoRA
    variants and biases, training, and rows out of order go to peft's loop, each token a row of
    its text's adapter."""
    weights = None if layer.training or batch.token_slices is None else own_weights(layer, names)
    if weights is None:
        return type(layer)._mixed_batch_forward(layer, x, *args, adapter_names=batch.token_names,
                                                **kwargs)
    result = base_output(layer, x, *args, **kwargs)
    if not names:  # none of the batch's adapters adapts this layer
        return result
    a, b, _ = weights[names[0]]
    x, accumulate = x.to(a.dtype), can_accumulate(result, b)
    # Dozens of slices a layer at many adapters, each two products on a few dozen tokens: the
    # loop's own lookups and views count, so each adapter's are made once (own_weights).
    for name, start, stop in batch.token_slices:
        if name not in weights:  # base rows, or an adapter that leaves this layer alone
            continue
        a, b, scale = weights[name]
        update = torch.mm(x[start:stop], a)
        if accumulate:
            result[start:stop].addmm_(update, b, alpha=scale)
        else:
            result[start:stop] += (torch.mm(update, b) * scale).to(result.dtype)
    return result


def own_weights(layer, names: list[str]) -> dict[str, tuple] | None:
    """{adapter: (A [in, r], B [r, out], scale)} of the layer, views of each adapter's own
    weights as the slice loop reads them, or None where one of `names` is not plain LoRA (a
    variant or a bias: peft's loop takes it). Within frozen() each layer makes an adapter's
    views once for all of the scope's batches."""
    scope = getattr(_BATCH, "stacks", None)
    views = scope[2].setdefault(id(layer), {}) if scope is not None else {}
    for name in names:
        if name not in views:
            is_plain = name not in layer.lora_variant and layer.lora_B[name].bias is None
            # Transposed views: contiguous copies cost more than the products gain from them
            views[name] = (layer.lora_A[name].weight.T, layer.lora_B[name].weight.T,
                           layer.scaling[name]) if is_plain else None
    return None if any(views[n] is None for n in names) else views


def one_adapter_forward(layer, x: torch.Tensor, name: str, *args, **kwargs):
    """Every row through one plain adapter (one task's evaluation, a one-text request): its own
    weights, with nothing to stack or gather."""
    result = base_output(layer, x, *args, **kwargs)
    a, b, scale = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
    if can_accumulate(result, b):
        add_product_(result, x, a, b, scale)
        return result
    update = (x.to(a.dtype) @ a.T) @ b.T
    return result + update.to(result.dtype) * scale


def base_output(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The LoRA layer's base layer alone, without the arguments of LoRA variants (unused by
    plain LoRA, unknown to a plain Linear)."""
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    return layer.base_layer(x, *args, **{k: v for k, v in kwargs.items()
                                         if k not in VARIANT_KWARG_KEYS})


def can_accumulate(result: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a layer's LoRA update can go into its base output in place (add_product_,
    baddbmm_): a contiguous tensor of the adapter's dtype, not yet tracked by autograd (in place
    under autograd would be allowed; out of place is the conservative path there)."""
    return result.dtype == b.dtype and not result.requires_grad and result.is_contiguous()


def add_product_(result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 scale: float) -> None:
    """result += scale * (x @ a.T) @ b.T, the second product accumulated by addmm: no
    [rows, tokens, out] update tensor and no separate pass to scale and add it, which cost a
    top-half forward more than the rank-r products themselves."""
    update = x.to(a.dtype) @ a.T
    result.view(-1, result.shape[-1]).addmm_(update.reshape(-1, update.shape[-1]), b.T, alpha=scale)


class Layout:
    """What the layers of one forward need of its rows' adapters, worked out once (layout()):
    every layer of a forward sees the same names."""

    def __init__(self, adapter_names: list[str], lengths: list[int] | None = None):
        self.names = list(adapter_names)
        self.lengths = lengths
        self.slices = runs_of(self.names)
        self.token_slices = None
        """A packed batch's runs as (name, first token, end token)."""
        if lengths is not None and self.slices is not None:
            ends = list(itertools.accumulate(lengths))
            self.token_slices = [(name, ends[start] - lengths[start], ends[stop - 1])
                                 for name, start, stop in self.slices]
        self._rows: dict[tuple, torch.Tensor] = {}

    @functools.cached_property
    def token_names(self) -> list[str]:
        """A packed batch's adapter of each token."""
        return [name for name, n in zip(self.names, self.lengths) for _ in range(n)]

    def rows(self, index: dict, device) -> torch.Tensor:
        """Each row's place in a stack of `index`'s adapters (its last, the zero adapter, for
        "__base__" or an adapter the layer lacks). Layers that stack the same adapters in the
        same order share the tensor."""
        key = (tuple(index), device)
        if key not in self._rows:
            with torch.inference_mode(False):  # a normal tensor: good for autograd forwards too
                self._rows[key] = torch.tensor([index.get(n, len(index)) for n in self.names],
                                               device=device)
        return self._rows[key]


def layout(adapter_names: list[str], lengths: list[int] | None = None) -> Layout:
    """The running forward's Layout: the first layer makes it, the others find it."""
    kept = getattr(_BATCH, "layout", None)
    if kept is None or kept.names != adapter_names or kept.lengths != lengths:
        kept = _BATCH.layout = Layout(adapter_names, lengths)
    return kept


MAX_RUNS = 16  # CPU: beyond, the batched products' gathers cost less than a product pair per run
# A GPU is likely bound by kernel launches at these sizes: two a run, against four for the
# batched products whatever the runs (a count, not yet a measurement).
DEVICE_MAX_RUNS = 2


def max_runs(x: torch.Tensor) -> int:
    """How many runs a layer takes one product pair each for, before it gathers instead."""
    return MAX_RUNS if x.device.type == "cpu" else DEVICE_MAX_RUNS


def adapter_runs(adapter_names: list[str]) -> list[tuple[str, int, int]]:
    """Each stretch of consecutive rows with one adapter: (name, start, stop)."""
    runs, start = [], 0
    for name, group in itertools.groupby(adapter_names):
        stop = start + sum(1 for _ in group)
        runs.append((name, start, stop))
        start = stop
    return runs


def runs_of(adapter_names: list[str]) -> list[tuple[str, int, int]] | None:
    """The batch's runs, where its rows come ordered by adapter (AdapterBank.probabilities
    orders each batch so); else None. A layer slices them up to max_runs of them."""
    runs = adapter_runs(adapter_names)
    return runs if len({n for n, _, _ in runs}) == len(runs) else None


def plain(layer, names: list[str]) -> bool:
    """Whether these adapters of the layer are plain LoRA of one rank (no variant, no bias)."""
    return (not any(n in layer.lora_variant for n in names)
            and not any(layer.lora_B[n].bias is not None for n in names)
            and len({layer.lora_A[n].weight.shape for n in names}) <= 1)


def stacked(layer, names: list[str]) -> tuple[dict, torch.Tensor, torch.Tensor] | None:
    """({adapter: index}, A [adapters + 1, in, r], scaled B [adapters + 1, r, out]) with a zero
    adapter last, or None where these adapters are not plain (peft's loop takes them). Within
    frozen(adapters) a layer stacks the scope's adapters once for all of its batches; otherwise
    each batch stacks its own."""
    if not names:  # none of the batch's adapters adapts this layer: nothing to stack
        return {}, None, None
    stacks = getattr(_BATCH, "stacks", None)
    if stacks is not None and set(names) <= stacks[0]:
        if id(layer) not in stacks[1]:
            scope = [n for n in stacks[0] if n in layer.lora_A]
            stacks[1][id(layer)] = stack(layer, scope) if plain(layer, scope) else None
        if stacks[1][id(layer)] is not None:
            return stacks[1][id(layer)]
    return stack(layer, names) if plain(layer, names) else None


def stack(layer, names: list[str]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    # Stacked transposed, as the batched products read them ([in, r] and [r, out]): the
    # gathered rows go into bmm as they are (a fifth less time than strided ones, measured)
    a = [layer.lora_A[n].weight.T for n in names]
    b = [layer.lora_B[n].weight.T for n in names]
    # The zero adapter stacked with the rest (appending it after would copy every adapter again)
    a, b = torch.stack([*a, torch.zeros_like(a[0])]), torch.stack([*b, torch.zeros_like(b[0])])
    # fp32 scales, B's dtype kept by mul_: a bf16 B is rounded once, as peft's float scaling
    scales = torch.tensor([layer.scaling[n] for n in names] + [0.0], device=b.device)
    b.mul_(scales.view(-1, 1, 1))  # autograd takes it: stack's output, not a leaf
    return {n: i for i, n in enumerate(names)}, a, b


@contextlib.contextmanager
def frozen(adapters):
    """A scope in which no LoRA weight changes (one AdapterBank.probabilities call) and batches
    draw on `adapters`: each layer stacks those (or, packed, makes their views) once for all of
    the scope's batches instead of once a batch. Only the scope's adapters, not all that are loaded: one text's answer with a
    hundred adapters loaded would otherwise stack all hundred, in every layer."""
    outer, _BATCH.stacks = getattr(_BATCH, "stacks", None), (set(adapters), {}, {})
    try:
        yield
    finally:
        _BATCH.stacks = outer


BARE = "__bare__"  # rows(model, BARE): every row through the bare base


def routed_forward(layer, x: torch.Tensor, *args, **kwargs):
    """An installed layer's forward: the gathered mixed batch when the batch's rows name their
    adapters (adapter_names, or rows()), the base layer alone under rows(model, BARE), else
    peft's own forward."""
    names, lengths = kwargs.pop("adapter_names", None), None
    if names is None:
        names, lengths = getattr(_BATCH, "names", None), getattr(_BATCH, "lengths", None)
    if names is None or layer.disable_adapters or layer.merged:
        return type(layer).forward(layer, x, *args, **kwargs)
    if names is BARE:
        return base_output(layer, x, *args, **kwargs)
    return gathered_mixed_forward(layer, x, *args, adapter_names=names, lengths=lengths, **kwargs)


@contextlib.contextmanager
def rows(model: torch.nn.Module, adapter_names: list[str] | str, lengths: list[int] | None = None):
    """Within, row i of a forward of `model` goes through adapter_names[i] (every row through
    the bare base for BARE: cheaper than peft's disable_adapter, which checks and toggles every
    adapter's layers twice). With `lengths`, the forward is packed (packing.py): its layers see
    [tokens, in], row i's lengths[i] tokens after row i-1's. Only for a model whose every LoRA
    layer is installed (covers): another layer would not see the names."""
    if not covers(model):
        raise ValueError("rows() needs every LoRA layer of the model installed")
    outer = getattr(_BATCH, "names", None), getattr(_BATCH, "lengths", None)
    _BATCH.names, _BATCH.lengths = adapter_names, lengths
    try:
        yield
    finally:
        _BATCH.names, _BATCH.lengths = outer


def install(model: torch.nn.Module) -> None:
    """Give every plain LoRA layer of `model` (one of ahl's) the gathered mixed forward."""
    from peft.tuners.lora.layer import Linear, LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        if type(layer) is Linear and "forward" not in vars(layer):
            layer.forward = types.MethodType(routed_forward, layer)
    model._ahl_rows = bool(layers) and all(type(m) is Linear for m in layers)


@contextlib.contextmanager
def uninstalled(model: torch.nn.Module):
    """Within, every layer of `model` runs peft's own forward (the peer that benches and tests
    compare the gathered forward with); install() puts ours back after."""
    for layer in [m for m in model.modules() if "forward" in vars(m)]:
        del layer.forward
    try:
        yield
    finally:
        install(model)


def covers(model: torch.nn.Module) -> bool:
    """Whether rows() reaches every LoRA layer of `model` (set by install)."""
    return getattr(model, "_ahl_rows", False)


def load_frozen(model, name: str, config, file) -> bool:
    """Load saved plain LoRA weights (`file`: the adapter's safetensors) as adapter `name`
    of `model`, a PeftModel that has LoRA layers already at every module they adapt, frozen
    and in eval mode. Returns False, having changed nothing, where that is not the case: peft's
    load_adapter takes it then.

    peft's load_adapter walks every module of the model several times (injection, trainable
    flags, the state dict's remapping, eval, dtype casts), and the modules grow with the
    adapters loaded: loading the 29th adapter of a store cost several times the first, and
    loading them all grew with their square (29 adapters, 4.4 s profiled). Here each adapted
    layer is visited once, through peft's own update_layer."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear
    from safetensors.torch import load_file

    if (type(config) is not LoraConfig or config.use_dora or config.rank_pattern
            or config.alpha_pattern or config.lora_bias or config.modules_to_save
            or getattr(config, "trainable_token_indices", None)
            or getattr(config, "target_parameters", None)
            or config.init_lora_weights not in (True, False, "gaussian")):
        return False
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(file).items():
        path, _, part = key.rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            return False
        pairs.setdefault(path, {})[part[0]] = tensor
    layers = {}
    for path, pair in pairs.items():
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            return False
        if (type(layer) is not Linear or not layer.lora_A or name in layer.lora_A
                or set(pair) != {"A", "B"} or layer.resolve_lora_variant(config=config) is not None
                or pair["A"].shape != (config.r, layer.in_features)
                or pair["B"].shape != (layer.out_features, config.r)):
            return False
        layers[path] = layer
    config = copy.copy(config)
    config.inference_mode = True
    no_init = copy.copy(config)
    no_init.init_lora_weights = False  # the weights come from the file
    with torch.no_grad():
        for path, layer in layers.items():
            layer.update_layer(name, config.r, config.lora_alpha, no_init, target_name=path)
            for module, tensor in ((layer.lora_A[name], pairs[path]["A"]),
                                   (layer.lora_B[name], pairs[path]["B"])):
                module.weight.copy_(tensor)
                module.weight.requires_grad_(False)
            for module in (layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]):
                module.train(layer.training)
    model.peft_config[name] = config
    return True

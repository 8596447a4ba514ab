"""Rows for many LoRA adapters in one batch, in two batched products per layer.

peft's mixed batch (`adapter_names`) loops over the distinct adapters of a batch in every
adapted layer: a gather, two rank-r products and a scatter each, so a batch over 30 adapters
costs 30 small steps a layer. Here each row's A and B are gathered from the batch's adapters,
stacked, and every row's update is two batched products however many adapters there are (the
BGMV of S-LoRA and Punica). Installed on the LoRA layers of ahl's own models only, for plain
LoRA in eval mode; anything else (training, DoRA and other variants, LoRA biases, ranks that
differ within a batch) goes through peft's own loop.
"""

import types

import torch


def gathered_mixed_forward(layer, x: torch.Tensor, *args, adapter_names: list[str], **kwargs):
    names = [n for n in dict.fromkeys(adapter_names) if n in layer.lora_A]
    plain = (not layer.training and x.dim() == 3
             and not any(n in layer.lora_variant for n in names)
             and not any(layer.lora_B[n].bias is not None for n in names)
             and len({layer.lora_A[n].weight.shape for n in names}) <= 1)
    if not plain:
        return type(layer)._mixed_batch_forward(layer, x, *args, adapter_names=adapter_names,
                                                **kwargs)
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

    for key in VARIANT_KWARG_KEYS:  # arguments of LoRA variants, unused by plain LoRA
        kwargs.pop(key, None)
    result = layer.base_layer(x, *args, **kwargs)
    if not names:  # none of the batch's adapters adapts this layer
        return result
    a = torch.stack([layer.lora_A[n].weight for n in names])  # [adapters, r, in]
    b = torch.stack([layer.lora_B[n].weight * layer.scaling[n] for n in names])  # [adapters, out, r]
    # Rows of "__base__" (or of an adapter this layer lacks) get a zero update.
    a, b = torch.cat([a, a.new_zeros(1, *a.shape[1:])]), torch.cat([b, b.new_zeros(1, *b.shape[1:])])
    index = {n: i for i, n in enumerate(names)}
    rows = torch.tensor([index.get(n, len(names)) for n in adapter_names], device=x.device)
    update = torch.bmm(torch.bmm(x.to(a.dtype), a[rows].transpose(1, 2)), b[rows].transpose(1, 2))
    return result + update.to(result.dtype)


def install(model: torch.nn.Module) -> None:
    """Give every plain LoRA layer of `model` (one of ahl's) the gathered mixed forward."""
    from peft.tuners.lora.layer import Linear

    for module in model.modules():
        if type(module) is Linear:
            module._mixed_batch_forward = types.MethodType(gathered_mixed_forward, module)

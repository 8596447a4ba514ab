"""A 4-bit NF4 base, for QLoRA and LoftQ, on the device of the model it quantizes.

bitsandbytes (0.50+) runs NF4 `Linear4bit` layers on the CPU as on CUDA. peft's own LoftQ path assumes
CUDA, so LoftQ's initialisation is done here: with the base quantized once, Q = nf4(W), each new
LoRA adapter starts from the best rank-r approximation of what quantization lost, W - Q, so that
Q + B A = W as closely as rank r allows (Li et al., 2023, one alternating step). That only holds
with a LoRA scaling of 1, so LoftQ's builder sets lora_alpha = r.
"""

import torch

NF4 = "nf4"


def quantize_nf4(model: torch.nn.Module, layers_name: str) -> torch.nn.Module:
    """Replace every linear layer inside the transformer blocks with an NF4 4-bit one, in place.
    Embeddings, the pooler and anything outside the blocks stay as they are."""
    import bitsandbytes as bnb

    blocks = model.get_submodule(layers_name)
    for parent in list(blocks.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, child_name, nf4_linear(child, bnb))
    return model


def nf4_linear(linear: torch.nn.Linear, bnb) -> torch.nn.Module:
    quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features,
                                  bias=linear.bias is not None, compute_dtype=torch.float32,
                                  quant_type=NF4, quant_storage=torch.uint8)
    quantized.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                         quant_type=NF4).to(linear.weight.device)  # .to() quantizes
    if linear.bias is not None:
        quantized.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    # On CPUs with AVX512-BF16, the first eval forward repacks the weight in place into a CPU
    # layout, and later dequantization (merging, LoftQ) reads it wrong: keep the plain layout.
    quantized.support_avx512bf16_for_cpu = False
    return quantized


def dequantized(layer) -> torch.Tensor:
    """The float weights an NF4 layer computes with."""
    import bitsandbytes.functional as F

    return F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


@torch.no_grad()
def loftq_initialise(peft_model, adapter: str, original: torch.nn.Module) -> None:
    """Set a new LoRA adapter on an NF4 base to the rank-r SVD of each target's quantization
    error, W - nf4(W), read against the original full-precision base."""
    weights = dict(original.named_modules())
    for name, module in peft_model.get_base_model().named_modules():
        if adapter not in getattr(module, "lora_A", {}):
            continue
        W = weights[name].weight.float()
        U, S, Vh = torch.linalg.svd(W - dequantized(module.get_base_layer()), full_matrices=False)
        r = module.r[adapter]
        root = S[:r].sqrt()
        module.lora_B[adapter].weight.copy_(U[:, :r] * root)
        module.lora_A[adapter].weight.copy_(root[:, None] * Vh[:r])


def size_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers hold (4-bit weights count as stored)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)

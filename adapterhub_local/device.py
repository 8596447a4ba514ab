"""Which device computes: `--device auto|cpu|cuda|cuda:N|mps` (or `AHL_DEVICE`), checked where
the base loads, one line when the device is not there.

auto picks CUDA, then Apple's MPS, then the CPU. On CUDA, training autocasts to bf16 where the
GPU has it (Ampere and later; fp32 elsewhere: fp16 training would need loss scaling), and the
4-bit methods (QLoRA, LoftQ) quantize through bitsandbytes' CUDA kernels.
"""

import os

from adapterhub_local.errors import AhlError

KINDS = ("auto", "cpu", "cuda", "mps")
ENV = "AHL_DEVICE"


def check_device_name(name: str | None) -> str:
    """The requested device (argument, else $AHL_DEVICE, else auto), its spelling checked
    without importing torch."""
    name = (name or os.environ.get(ENV) or "auto").strip().lower()
    kind, colon, index = name.partition(":")
    if kind not in KINDS or (colon and not (kind == "cuda" and index.isdigit())):
        raise AhlError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return name


def resolve_device(name: str | None = None) -> str:
    """The device to compute on ("cpu", "cuda", "cuda:1", "mps"): auto resolved, and a device
    this machine lacks refused in one line."""
    import torch

    name = check_device_name(name)
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if name.startswith("cuda"):
        if not cuda:
            raise AhlError("no CUDA device here: use --device cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise AhlError(f"no CUDA device {index} here ({torch.cuda.device_count()} found): "
                           "use --device cuda:0")
    if name == "mps" and not mps:
        raise AhlError("no MPS device here: use --device cpu")
    return name


def gpu_bf16(device: str) -> bool:
    """Whether training on `device` autocasts to bf16: a CUDA GPU that has it natively."""
    import torch

    return device.startswith("cuda") and torch.cuda.is_bf16_supported()

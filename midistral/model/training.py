"""Training precision: `train.precision` = fp32, bf16 (autocast: bf16 products, fp32 master weights, optimizer
state and loss) or auto.

bf16 runs where the hardware has bf16 products: CUDA, or a CPU with AVX512-BF16 or AMX. Elsewhere autocast
would emulate them (slower than fp32), so it is refused with one line. auto: bf16 wherever it runs, else fp32:
on an AVX512-BF16 CPU the configs/music21.toml model's 200-step loss curve stayed within 0.76% of fp32's at
1.44x its speed (bench/precision_curve.py, bench/RESULTS.md).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from midistral.errors import ConfigError

TRAIN_PRECISIONS = ("auto", "fp32", "bf16")


def bf16_products(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 natively (CUDA; a CPU with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    flags = (getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False),
             getattr(torch.cpu, "_is_amx_tile_supported", lambda: False))
    return any(f() for f in flags)


def train_precision(precision: str, device: torch.device) -> str:
    """The precision training runs in ('fp32' or 'bf16'); ConfigError naming the key where bf16 cannot run."""
    if precision == "auto":
        return "bf16" if bf16_products(device) else "fp32"
    if precision == "bf16" and not bf16_products(device):
        raise ConfigError(f"train.precision='bf16' needs CUDA or a CPU with AVX512-BF16 or AMX "
                          f"({torch.backends.cpu.get_cpu_capability()} here): use 'fp32' or 'auto'")
    return precision


def autocast(precision: str, device: torch.device):
    """The context a training step's forward runs in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()

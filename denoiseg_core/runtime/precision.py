"""Which arithmetic a network runs in: float32, or bf16 autocast with float32 weights."""

from __future__ import annotations

import contextlib
import os

import torch

from denoiseg_core.errors import ConfigError
from denoiseg_core.runtime.device import cpu_bf16_capability


def resolve_precision(precision: str, device: torch.device, training_ndim: int | None = None) -> str:
    """``fp32``/``bf16`` stay; ``auto`` picks the fast safe choice for ``device``.

    ``auto`` is bf16 autocast (float32 weights, losses and outputs) on a CUDA GPU with
    bf16 support and on a CPU with native bf16 matrix instructions (AMX or AVX512-BF16,
    where bf16 convolutions measured 1.5-2x faster than float32); float32 elsewhere, and
    for training 3D networks on a CPU (``training_ndim=3``): there bf16 gave non-finite
    losses in about 1 of 8 short runs on an AVX512-BF16 CPU. Setting ``DENOISEG_CPU_BF16=0``
    (or ``1``) overrides the CPU choice.
    """
    if precision in ("fp32", "bf16"):
        return precision
    if precision != "auto":
        raise ConfigError(f"unknown precision {precision!r} (use fp32, bf16 or auto)")
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        forced = os.environ.get("DENOISEG_CPU_BF16")
        if forced is not None:
            return "bf16" if forced.strip() not in ("", "0", "false", "no") else "fp32"
        return "bf16" if cpu_bf16_capability() is not None and training_ndim != 3 else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``precision`` (``fp32``, ``bf16`` or ``auto``, see
    :func:`resolve_precision`) comes out as bf16; a context that changes nothing otherwise."""
    if resolve_precision(precision, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

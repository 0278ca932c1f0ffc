"""Where a network runs: the device, the memory layout, and what the CPU offers."""

from __future__ import annotations

import functools
import platform

import torch

from denoiseg_core.errors import ConfigError


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``"auto"`` -> CUDA if available else CPU; ``None`` stays ``None`` (keep the network where it is)."""
    if device is None or isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return resolved


def preferred_memory_format(ndim: int, device: torch.device) -> torch.memory_format:
    """Channels-last layout (NHWC / NDHWC): oneDNN and cuDNN convolutions are fastest in it
    (measured 1.2-2x for DenoiSeg U-Nets on CPU, 2D and 3D, fp32 and bf16)."""
    if ndim == 2:
        return torch.channels_last
    if ndim == 3:
        return torch.channels_last_3d
    return torch.contiguous_format


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The fields of the first processor in ``/proc/cpuinfo`` (Linux); empty elsewhere."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    break  # the first processor's block ends at a blank line
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model_name() -> str:
    """The CPU model (``model name`` in ``/proc/cpuinfo``), else what :mod:`platform` says."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_bf16_capability() -> str | None:
    """The CPU's native bfloat16 matrix instructions: ``"amx"``, ``"avx512_bf16"`` or ``None``.

    Read from ``/proc/cpuinfo`` (Linux); other systems report ``None``. Without these
    instructions oneDNN emulates bf16 and autocast is slower than float32.
    ``torch.backends.cpu.get_cpu_capability()`` only says ``AVX512`` for both kinds.
    """
    flags = set(_cpuinfo().get("flags", "").split())
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return None

"""Where and how networks run, for training and prediction alike.

* :mod:`~denoiseg_core.runtime.device`: the device (``auto`` -> CUDA else CPU), the
  channels-last memory layout, and what the CPU offers (model name, native bf16);
* :mod:`~denoiseg_core.runtime.precision`: ``fp32``/``bf16``/``auto`` and the autocast
  that applies it;
* :mod:`~denoiseg_core.runtime.batch_norm`: batch norms folded into convolutions for inference;
* :mod:`~denoiseg_core.runtime.distributed`: data-parallel training under ``torchrun``.
"""

from denoiseg_core.runtime.batch_norm import fold_batch_norm
from denoiseg_core.runtime.device import cpu_bf16_capability, cpu_model_name, preferred_memory_format, resolve_device
from denoiseg_core.runtime.precision import autocast, resolve_precision

__all__ = [
    "autocast",
    "cpu_bf16_capability",
    "cpu_model_name",
    "fold_batch_norm",
    "preferred_memory_format",
    "resolve_device",
    "resolve_precision",
]

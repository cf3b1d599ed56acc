"""The precision a model computes in, decided once: ``bfloat16_support`` is the one bfloat16
capability probe per device, and ``resolve_dtype`` the one resolver from a user's request
(None, ``"auto"``, a name of ``densenet.infer.precision.DTYPES`` or a ``torch.dtype``) to a compute dtype
on a device. The inference forms (``densenet.optimize``), the ``Runner`` and training's autocast
(``densenet.infer.runtime.amp_dtype``) all take their dtype from here."""

from __future__ import annotations

import torch

from densenet.choices import PRECISIONS
from densenet.infer import cpu

__all__ = ["DTYPES", "bfloat16_support", "compute_dtype", "dtype_name", "resolve_dtype"]

DTYPES = {name: getattr(torch, name) for name in PRECISIONS}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def bfloat16_support(device: str | torch.device) -> str | None:
    """How ``device`` computes bfloat16: ``"native"`` (in hardware: CUDA GPUs with bfloat16,
    CPUs with AVX-512 BF16 or AMX), ``"emulated"`` (oneDNN on other AVX-512 CPUs; slower than
    float32), or None (not at all: AVX2-only CPUs' oneDNN, GPUs before Ampere)."""
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "native" if native else None
    return cpu.cpu_bfloat16() if device.type == "cpu" else None


def resolve_dtype(request: torch.dtype | str | None, device: str | torch.device) -> torch.dtype:
    """The compute dtype that ``request`` means on ``device``: None, the inference forms' own
    default (float32 on the CPU, exact; bfloat16 on CUDA); ``"auto"``, bfloat16 where ``device``
    computes it natively (``bfloat16_support``), else float32; a name of
    ``densenet.infer.precision.DTYPES`` or a ``torch.dtype``, itself. ``ValueError`` for another name."""
    if isinstance(request, torch.dtype):
        return request
    if request is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if request == "auto":
        return cpu.default_dtype(device)
    if request not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {request!r}")
    return DTYPES[request]


def compute_dtype(name: str | None, device: torch.device) -> torch.dtype | None:
    """``resolve_dtype`` of ``--dtype name``, keeping None (the optimized model's own default)."""
    return None if name is None else resolve_dtype(name, device)

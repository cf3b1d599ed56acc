"""Precision names as flags, cards and exported files spell them."""

from __future__ import annotations

import torch

from .choices import PRECISIONS

__all__ = ["DTYPES", "dtype_name"]

DTYPES = {name: getattr(torch, name) for name in PRECISIONS}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")

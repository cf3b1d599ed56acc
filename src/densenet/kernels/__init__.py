"""Triton kernels for GPU inference (CUDA; on the CPU only under ``TRITON_INTERPRET=1``).

Importing this package imports triton; ``densenet`` itself never does, ``densenet.optimize``
imports it only for ``backend="triton"``.
"""

from .conv import conv3x3, pointwise_conv
from .network import TritonDenseNet

__all__ = ["TritonDenseNet", "conv3x3", "pointwise_conv"]

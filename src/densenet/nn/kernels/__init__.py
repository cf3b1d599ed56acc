"""Triton kernels (CUDA; on the CPU only under ``TRITON_INTERPRET=1``): ``conv`` for the
inference form (``densenet.infer.gpu``), ``training`` for the memory-efficient block. They import no
other module of the package, so any layer may use them.

Importing this package imports triton; ``densenet`` itself never does: ``densenet.optimize``
imports it only for ``backend="triton"``, the memory-efficient block only for
``memory_efficient="triton"``.
"""

from densenet.nn.kernels.conv import conv3x3, pointwise_conv

__all__ = ["conv3x3", "pointwise_conv"]

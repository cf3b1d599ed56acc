"""The GPU form of a DenseNet: ``TritonDenseNet``, an ``InferenceDenseNet`` run on the Triton
kernels of ``densenet.nn.kernels.conv`` (``densenet.optimize(model, backend="triton")``).

Per dense layer with a bottleneck, two kernels and no elementwise pass: the 1x1 convolution reads
the block buffer's prefix, clamps it while loading (the folded norm1 ReLU) and adds the folded
norm2 bias and ReLU in its epilogue; the 3x3 convolution writes the layer's ``growth_rate``
channels straight into its slice of the buffer. A transition is one kernel (clamp, 2x2 pool, 1x1
convolution) writing into the first channels of the next block's buffer. The stem is the
space-to-depth form of the 7x7 convolution on 16 channels (cuDNN), then one kernel for its ReLU
and 3x3 max-pool that writes into block 1's buffer; the head is a clamp, a global average pool
and the classifier.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet.infer.form import (
    InferenceBlock,
    InferenceDenseNet,
    InferenceLayer,
    InferenceOnly,
    InferenceTransition,
    PrefixClamp,
    SpaceToDepthConv,
)
from densenet.nn.kernels.conv import conv3x3, pointwise_conv
from densenet.nn.kernels.pool import pooled_size, relu_max_pool

__all__ = ["GROWTH_CONVS", "TritonDenseNet"]

GROWTH_CONVS = ("triton", "cudnn")


def _clamp_bounds(act: PrefixClamp) -> tuple[Tensor, Tensor]:
    """The clamp's (C,) lower and upper bounds; a missing upper bound is +inf."""
    low = act.low.flatten()
    high = act.high.flatten() if act.high is not None else torch.full_like(low, math.inf)
    return low, high


def _channels_last_empty(like: Tensor, channels: int, h: int, w: int) -> Tensor:
    """An uninitialised (N, channels, h, w) channels_last tensor, N, dtype and device of ``like``."""
    return torch.empty(
        (like.shape[0], channels, h, w),
        dtype=like.dtype,
        device=like.device,
        memory_format=torch.channels_last,
    )


class _Pointwise(nn.Module):
    """Clamp, optional 2x2 average pool, 1x1 convolution with bias, optional ReLU: one kernel.

    ``forward(x, out)``: x (N, K, H, W) channels_last view; out (N, C_out, H', W') view, written.
    """

    def __init__(self, act: PrefixClamp, conv: nn.Conv2d, *, pool: bool, relu: bool) -> None:
        super().__init__()
        low, high = _clamp_bounds(act)
        self.register_buffer("low", low.clone())
        self.register_buffer("high", high.clone())
        self.register_buffer("weight", conv.weight.detach()[:, :, 0, 0].t().contiguous())
        self.register_buffer("bias", conv.bias.detach().clone())
        self.pool, self.relu = pool, relu

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: Tensor, out: Tensor) -> Tensor:
        return pointwise_conv(
            x, self.weight, self.bias, self.low, self.high, out, pool=self.pool, relu=self.relu
        )


class _GrowthConv(nn.Module):
    """The 3x3 convolution (padding 1) writing a layer's new channels into the block buffer,
    optionally after a BN-ReLU (a layer without bottleneck): the Triton implicit GEMM, or cuDNN
    and a copy into the buffer (``impl="cudnn"``).

    ``forward(x, out)``: x (N, C, H, W) channels_last view; out (N, C_out, H, W) view, written.
    """

    def __init__(self, conv: nn.Conv2d, act: nn.Module | None, impl: str) -> None:
        super().__init__()
        if impl not in GROWTH_CONVS:
            raise ValueError(f"growth_conv must be one of {GROWTH_CONVS}, got {impl!r}")
        self.impl, self.act, self.out_channels = impl, act, conv.out_channels
        weight = conv.weight.detach()
        if impl == "triton":  # (9 * C, C_out), row (3a + b) * C + c holding weight[:, c, a, b]
            weight = weight.permute(2, 3, 1, 0).reshape(-1, conv.out_channels)
        self.register_buffer("weight", weight.contiguous())

    def forward(self, x: Tensor, out: Tensor) -> Tensor:
        if self.impl == "cudnn":
            x = x if self.act is None else self.act(x)
            return out.copy_(F.conv2d(x, self.weight, padding=1))
        if self.act is None:
            return conv3x3(x, self.weight, out)
        return conv3x3(x, self.weight, out, self.act.scale.flatten(), self.act.shift.flatten())


class _Layer(nn.Module):
    """A dense layer reading ``buffer[:, :in_channels]`` and writing its ``growth_rate`` channels
    into ``buffer[:, in_channels : in_channels + growth_rate]``."""

    def __init__(self, layer: InferenceLayer, growth_conv: str) -> None:
        super().__init__()
        self.in_channels = layer.in_channels
        if layer.conv2 is None:
            self.bottleneck = None
            self.grow = _GrowthConv(layer.conv1, layer.act, growth_conv)
        else:
            self.bottleneck = _Pointwise(layer.act, layer.conv1, pool=False, relu=True)
            self.grow = _GrowthConv(layer.conv2, None, growth_conv)

    def forward(self, buffer: Tensor) -> None:
        c = self.in_channels
        x = buffer[:, :c]
        if self.bottleneck is not None:
            n, _, h, w = buffer.shape
            mid = _channels_last_empty(buffer, self.bottleneck.out_channels, h, w)
            x = self.bottleneck(x, mid)
        self.grow(x, buffer[:, c : c + self.grow.out_channels])


class TritonDenseNet(InferenceOnly):
    """An ``InferenceDenseNet`` (folded weights, same device and dtype) run on Triton kernels.

    Args:
        fast: the source, built by ``densenet.optimize(..., backend="eager")``; channels_last.
        growth_conv: ``"cudnn"`` (cuDNN, then a copy into the buffer; the default until a GPU
            measures the Triton kernel at least as fast) or ``"triton"`` (implicit GEMM writing
            into the buffer) for the 3x3 convolutions.

    Input (N, in_channels, H, W) float; output (N, num_classes) logits, or (N, num_features)
    pooled features for a model without classifier, in the input's dtype.
    """

    def __init__(self, fast: InferenceDenseNet, growth_conv: str = "cudnn") -> None:
        super().__init__()
        self.dtype = fast.dtype
        conv0 = fast.stem[0]
        # the 7x7 stride-2 convolution on 16 space-to-depth channels (12 and 4 zeros for RGB):
        # aligned channels_last rows for the GEMM
        self.stem = (
            SpaceToDepthConv(conv0, channel_multiple=16) if conv0.kernel_size == (7, 7) else conv0
        )
        # the ImageNet stem's ReLU and 3x3 max-pool (its stride per axis), fused into the write
        # into block 1's buffer; None for the CIFAR stem (a convolution only)
        pool = fast.stem[-1] if len(fast.stem) > 1 else None
        stride = pool.stride if pool is not None else None
        self.pool_stride = (stride, stride) if isinstance(stride, int) else stride
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        self.widths: list[int] = []
        for stage in fast.stages:
            if isinstance(stage, InferenceBlock):
                self.blocks.append(nn.ModuleList(_Layer(lay, growth_conv) for lay in stage.layers))
                self.widths.append(stage.out_channels)
            elif isinstance(stage, InferenceTransition):
                self.transitions.append(_Pointwise(stage.act, stage.conv, pool=True, relu=False))
        self.head_act = fast.head_act
        self.classifier = fast.classifier
        self._finish(fast)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x.to(self.dtype, memory_format=torch.channels_last))
        if self.pool_stride is None:
            buffer = _channels_last_empty(x, self.widths[0], *x.shape[2:])
            buffer[:, : x.shape[1]].copy_(x)
        else:
            h, w = pooled_size(*x.shape[2:], self.pool_stride)
            buffer = _channels_last_empty(x, self.widths[0], h, w)
            relu_max_pool(x, buffer[:, : x.shape[1]], self.pool_stride)
        for index, layers in enumerate(self.blocks):
            for layer in layers:
                layer(buffer)
            if index < len(self.transitions):
                transition = self.transitions[index]
                h, w = buffer.shape[2] // 2, buffer.shape[3] // 2
                following = _channels_last_empty(buffer, self.widths[index + 1], h, w)
                transition(buffer, following[:, : transition.out_channels])
                buffer = following
        return self.head_act(buffer)

"""CPU inference on oneDNN, and the CPU's bfloat16 capability (``cpu_bfloat16``).

``OneDNNDenseNet`` runs the folded form of ``InferenceDenseNet`` on oneDNN's fused convolution
primitives directly (the ones inductor's CPU freezing passes call, without compiling):

- every convolution's weight is reordered into oneDNN's blocked layout once per input shape (an
  eager ``F.conv2d`` on a channels_last input reorders its weight on every call, and a 3x3
  weight is also copied to channels_last first);
- the ReLU after the stem and after each bottleneck convolution is the primitive's post-op, not a
  separate pass over memory;
- the bias is added in float32 inside the primitive, which accumulates in float32;
- the classifier runs in float32 on pooled features averaged in float32 (a bfloat16
  matrix-vector product has no fast path here, and the logits are not rounded to bfloat16).

Each rewrite leaves the function unchanged; float32 outputs match the eager model to a relative
error of about 1e-7, bfloat16 ones are slightly closer to it than ``InferenceDenseNet``'s.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet.infer.form import (
    InferenceBlock,
    InferenceDenseNet,
    InferenceOnly,
    InferenceTransition,
)

__all__ = ["OneDNNDenseNet", "cpu_bfloat16", "default_dtype", "native_bfloat16"]


@functools.cache
def cpu_bfloat16() -> str | None:
    """This CPU's bfloat16, asked of the hardware once: ``"native"`` (AVX-512 BF16 or AMX tiles:
    faster than float32), ``"emulated"`` (oneDNN on other AVX-512 CPUs, slower than float32) or
    None (oneDNN refuses it: AVX2-only CPUs, or no oneDNN)."""
    if not torch.backends.mkldnn.is_available():
        return None
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return "native"
    return "emulated" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (``cpu_bfloat16() == "native"``)."""
    return cpu_bfloat16() == "native"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """What ``"auto"`` means on ``device`` (``densenet.infer.precision.resolve_dtype``): bfloat16 on
    CUDA and on CPUs with native bfloat16, else float32."""
    device = torch.device(device)
    if device.type == "cuda" or (device.type == "cpu" and native_bfloat16()):
        return torch.bfloat16
    return torch.float32


class PackedConv(nn.Module):
    """A convolution with its weight reordered into oneDNN's blocked layout, its bias in float32
    and, optionally, the ReLU after it fused in as the primitive's post-op.

    The blocked layout oneDNN picks depends on the input's shape (its pixel count), so the weight
    is reordered for the shape of the latest input and kept until a call with another shape: a
    fixed input size pays it once, alternating sizes at most once per call (as ``F.conv2d``
    always does).

    Input (N, C_in, H, W) channels_last; output (N, C_out, H', W') channels_last.
    """

    def __init__(self, conv: nn.Conv2d, *, relu: bool = False) -> None:
        super().__init__()
        self.register_buffer("weight", conv.weight.detach().clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float())
        self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.attr = "relu" if relu else "none"
        self.out_channels = conv.out_channels
        self._packed: tuple[torch.Size, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        packed = self._packed
        if packed is None or packed[0] != x.shape:
            weight = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, *self.args, list(x.shape)
            )
            self._packed = packed = (x.shape, weight)
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed[1], self.bias, *self.args, self.attr, [], ""
        )


class OneDNNDenseNet(InferenceOnly):
    """An ``InferenceDenseNet`` (folded weights, on the CPU, channels_last) run on oneDNN's fused
    convolutions with prepacked weights.

    Args:
        fast: the source, built by ``densenet.optimize(..., backend="eager")`` on the CPU.

    Input (N, in_channels, H, W) float; output (N, num_classes) logits, or (N, num_features)
    pooled features for a model without classifier, in the input's dtype.
    """

    def __init__(self, fast: InferenceDenseNet) -> None:
        super().__init__()
        self.dtype = fast.dtype
        self.stem = PackedConv(fast.stem[0], relu=len(fast.stem) > 1)
        self.pool = fast.stem[-1] if len(fast.stem) > 1 else nn.Identity()
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        self.widths: list[int] = []
        for stage in fast.stages:
            if isinstance(stage, InferenceBlock):
                self.blocks.append(nn.ModuleList(_Layer(layer) for layer in stage.layers))
                self.widths.append(stage.out_channels)
            elif isinstance(stage, InferenceTransition):
                self.transitions.append(nn.ModuleList([stage.act, PackedConv(stage.conv)]))
        self.head_act = fast.head_act
        self.classifier = copy.deepcopy(fast.classifier).float()
        self._finish(fast)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.pool(self.stem(x.to(self.dtype, memory_format=torch.channels_last)))
        for index, layers in enumerate(self.blocks):
            n, c, h, w = x.shape
            buffer = torch.empty(
                (n, self.widths[index], h, w), dtype=x.dtype, memory_format=torch.channels_last
            )
            buffer[:, :c].copy_(x)
            for layer in layers:
                layer(buffer)
            if index < len(self.transitions):
                act, conv = self.transitions[index]
                x = conv(F.avg_pool2d(act(buffer), 2))
        return self.head_act(buffer)

    def forward(self, x: Tensor) -> Tensor:  # pooled and classified in float32
        pooled = self.forward_features(x).float().mean((2, 3))
        return self.classifier(pooled).to(x.dtype)


class _Layer(nn.Module):
    """A dense layer: clamps its prefix of the block buffer, runs its convolutions and copies its
    new channels into the next slice of the buffer."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.act = layer.act
        self.in_channels = layer.in_channels
        if layer.conv2 is None:
            self.conv1, self.conv2 = None, PackedConv(layer.conv1)
        else:
            self.conv1, self.conv2 = PackedConv(layer.conv1, relu=True), PackedConv(layer.conv2)

    def forward(self, buffer: Tensor) -> None:
        x = self.act(buffer[:, : self.in_channels])
        if self.conv1 is not None:
            x = self.conv1(x)
        buffer[:, self.in_channels : self.in_channels + self.conv2.out_channels].copy_(
            self.conv2(x)
        )

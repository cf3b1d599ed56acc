"""The fast inference form of a DenseNet: ``densenet.optimize(model)``.

``optimize`` rebuilds any eval-mode ``DenseNet`` (ImageNet or CIFAR stem, any ``bn_size`` and
compression, any input size) as an ``InferenceDenseNet`` computing the same function with fewer
passes over memory and fewer multiply-accumulates. Every rewrite is exact in real arithmetic:

- one preallocated buffer per dense block; each layer writes its ``growth_rate`` new channels into
  its slice, instead of re-concatenating all earlier feature maps for every layer;
- a BatchNorm that directly follows a convolution is folded into that convolution's weights and a
  bias (the stem's ``norm0``, the bottleneck's ``norm2``); the ReLU after it runs in place;
- a BN-ReLU whose output feeds a 1x1 convolution (a layer's prefix, a transition's input) or the
  classifier is a per-channel clamp, ``relu(s * x + t) == s * clamp(x, ...) + offset``, with the
  scale and offset folded into that convolution or classifier: one pass over the prefix;
- in a transition, the 2x2 average pooling moves before the 1x1 convolution (both are linear and
  per-pixel / per-channel respectively, so they commute), and the convolution runs on a quarter of
  the pixels;
- channels_last memory format, optionally reduced precision (bf16/fp16) and ``torch.compile``.

Float32 outputs match the eager model to a relative error of about 1e-6; bf16/fp16 to about 1e-2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import DenseNet

__all__ = ["InferenceDenseNet", "optimize"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
METADATA = ("arch", "config", "num_classes", "num_features")


def _bn_affine(norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """An eval-mode BatchNorm as ``x * scale + shift``: two float64 vectors of its channels."""
    var = norm.running_var.detach().double()
    scale = norm.weight.detach().double() / torch.sqrt(var + norm.eps)
    shift = norm.bias.detach().double() - norm.running_mean.detach().double() * scale
    return scale, shift


def _relu_bn_as_clamp(norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``relu(norm(x)) == scale * clamp(x, low, high) + offset`` per channel, exactly: where
    ``scale > 0`` the ReLU clips x from below at ``-shift / scale``, where ``scale < 0`` from above;
    a channel with ``scale == 0`` is the constant ``relu(shift)``. Four float64 vectors."""
    scale, shift = _bn_affine(norm)
    knee = -shift / torch.where(scale == 0, 1.0, scale)
    inf = torch.full_like(knee, math.inf)
    zero = torch.zeros_like(knee)
    low = torch.where(scale > 0, knee, torch.where(scale < 0, -inf, zero))
    high = torch.where(scale < 0, knee, torch.where(scale > 0, inf, zero))
    offset = torch.where(scale == 0, shift.clamp_min(0), shift)
    return low, high, scale, offset


def _conv(
    conv: nn.Conv2d, before: nn.BatchNorm2d | None = None, after: nn.BatchNorm2d | None = None
) -> nn.Conv2d:
    """A copy of ``conv`` with BatchNorms folded into its weight and a bias: ``before``, a BN-ReLU
    on its input that ``PrefixClamp(before)`` reduces to a clamp (1x1 convolutions only: the
    offset becomes a bias), and ``after``, a BatchNorm on its output."""
    weight = conv.weight.detach().double()
    bias = torch.zeros(conv.out_channels, dtype=torch.float64, device=weight.device)
    if before is not None:
        _, _, scale, offset = _relu_bn_as_clamp(before)
        bias = bias + weight.sum((2, 3)) @ offset
        weight = weight * scale.view(1, -1, 1, 1)
    if after is not None:
        scale, shift = _bn_affine(after)
        weight = weight * scale.view(-1, 1, 1, 1)
        bias = bias * scale + shift
    folded = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=before is not None or after is not None,
    )
    folded.weight.data = weight.to(conv.weight.dtype)
    if folded.bias is not None:
        folded.bias.data = bias.to(conv.weight.dtype)
    return folded


def _classifier(classifier: nn.Module, before: nn.BatchNorm2d) -> nn.Linear:
    """The classifier (``Linear``, or ``Identity`` as an identity matrix) with ``before``, the
    final BN-ReLU that ``PrefixClamp(before)`` reduces to a clamp, folded in."""
    channels = before.num_features
    if isinstance(classifier, nn.Linear):
        weight, bias = classifier.weight.detach().double(), classifier.bias.detach().double()
    elif isinstance(classifier, nn.Identity):
        weight = torch.eye(channels, dtype=torch.float64, device=before.weight.device)
        bias = torch.zeros(channels, dtype=torch.float64, device=before.weight.device)
    else:
        raise TypeError(
            f"optimize() supports a Linear or Identity classifier, got {type(classifier).__name__}"
        )
    _, _, scale, offset = _relu_bn_as_clamp(before)
    linear = nn.Linear(channels, weight.shape[0])
    linear.weight.data = (weight * scale).to(before.weight.dtype)
    linear.bias.data = (bias + weight @ offset).to(before.weight.dtype)
    return linear


class PrefixClamp(nn.Module):
    """A BN-ReLU whose per-channel scale and offset the next (1x1) linear map absorbs, leaving
    ``clamp(x, low, high)``: one pass over memory, ``maximum`` when every scale is positive.

    Input (N, C, H, W); output (N, C, H, W), a new tensor.
    """

    def __init__(self, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        low, high, _, _ = _relu_bn_as_clamp(norm)
        dtype = norm.weight.dtype
        self.register_buffer("low", low.to(dtype).view(1, -1, 1, 1))
        bounded = not torch.all(high == math.inf)
        self.register_buffer("high", high.to(dtype).view(1, -1, 1, 1) if bounded else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.high is None:
            return torch.maximum(x, self.low)
        return torch.clamp(x, self.low, self.high)


class BNReLU(nn.Module):
    """An eval-mode BatchNorm followed by ReLU, as one multiply-add and an in-place ReLU (for a
    3x3 convolution's input, whose zero padding keeps the offset from becoming a bias).

    Input (N, C, H, W); output (N, C, H, W), a new tensor.
    """

    def __init__(self, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        scale, shift = _bn_affine(norm)
        dtype = norm.weight.dtype
        self.register_buffer("scale", scale.to(dtype).view(1, -1, 1, 1))
        self.register_buffer("shift", shift.to(dtype).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.shift, x, self.scale).relu_()


class InferenceLayer(nn.Module):
    """A dense layer for inference: a clamp of the prefix, then Conv1x1 with both BatchNorms
    folded in, ReLU, Conv3x3 (without a bottleneck: BN-ReLU, then Conv3x3).

    Input (N, C_in, H, W); output (N, growth_rate, H, W).
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.in_channels = layer.norm1.num_features
        if layer.conv2 is None:
            self.act: nn.Module = BNReLU(layer.norm1)
            self.conv1 = _conv(layer.conv1)
            self.conv2 = None
        else:
            self.act = PrefixClamp(layer.norm1)
            self.conv1 = _conv(layer.conv1, before=layer.norm1, after=layer.norm2)
            self.conv2 = _conv(layer.conv2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.act(x))
        if self.conv2 is not None:
            out = self.conv2(out.relu_())
        return out


class InferenceBlock(nn.Module):
    """A dense block over one preallocated buffer: the block input fills the first channels and
    each layer writes its new channels into the next slice.

    Input (N, C, H, W); output (N, C + num_layers * growth_rate, H, W).
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(InferenceLayer(layer) for layer in block.values())
        last = self.layers[-1]
        self.out_channels = last.in_channels + _out_channels(last)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        buffer = torch.empty(
            (n, self.out_channels, h, w),
            dtype=x.dtype,
            device=x.device,
            memory_format=_memory_format(x),
        )
        buffer[:, :c].copy_(x)
        for layer in self.layers:
            end = layer.in_channels + _out_channels(layer)
            buffer[:, layer.in_channels : end].copy_(layer(buffer[:, : layer.in_channels]))
        return buffer


class InferenceTransition(nn.Module):
    """BN-ReLU (a clamp, its scale and offset folded into the convolution), 2x2 average pooling,
    then the 1x1 convolution: pooling first, the convolution runs on a quarter of the pixels.

    Input (N, C_in, H, W); output (N, C_out, H // 2, W // 2).
    """

    def __init__(self, transition: nn.Module) -> None:
        super().__init__()
        self.act = PrefixClamp(transition.norm)
        self.conv = _conv(transition.conv, before=transition.norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.avg_pool2d(self.act(x), 2))


class InferenceDenseNet(nn.Module):
    """A DenseNet in inference-only form, built from an eval-mode ``DenseNet`` (weights copied).

    Args:
        model: the source network, in eval mode.
        dtype: parameter and compute precision (float32, bfloat16 or float16); inputs are cast to
            it and the output is returned in the input's dtype.
        channels_last: compute in channels_last memory format.

    Input (N, in_channels, H, W) float; output (N, num_classes) logits, or (N, num_features)
    pooled features for a model without classifier.
    """

    def __init__(
        self, model: DenseNet, dtype: torch.dtype = torch.float32, channels_last: bool = True
    ) -> None:
        super().__init__()
        features = dict(model.features.named_children())
        self.stem = nn.Sequential(_conv(features["conv0"], after=features.get("norm0")))
        if "norm0" in features:
            self.stem.append(nn.ReLU(inplace=True))
            self.stem.append(features["pool0"])
        stages: list[nn.Module] = []
        for name, module in features.items():
            if name.startswith("denseblock"):
                stages.append(InferenceBlock(module))
            elif name.startswith("transition"):
                stages.append(InferenceTransition(module))
        self.stages = nn.Sequential(*stages)
        self.head_act = PrefixClamp(features["norm5"])
        self.classifier = _classifier(model.classifier, features["norm5"])
        for name in METADATA:
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))
        self.channels_last = channels_last
        self.requires_grad_(False)
        device = next(model.parameters()).device
        self.to(device=device, dtype=dtype)
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.stem[0].weight.dtype

    def train(self, mode: bool = True) -> InferenceDenseNet:
        if mode:
            raise RuntimeError(
                "InferenceDenseNet is inference-only; train the original DenseNet and call "
                "densenet.optimize() on it again"
            )
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = x.dtype
        x = x.to(self.dtype, memory_format=self._input_format())
        x = self.stages(self.stem(x))
        x = torch.flatten(F.adaptive_avg_pool2d(self.head_act(x), 1), 1)
        return self.classifier(x).to(out_dtype)

    def _input_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def _out_channels(layer: InferenceLayer) -> int:
    conv = layer.conv1 if layer.conv2 is None else layer.conv2
    return conv.out_channels


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def optimize(
    model: DenseNet,
    *,
    dtype: torch.dtype | None = None,
    channels_last: bool | None = None,
    compile: bool | str = False,
) -> nn.Module:
    """The inference-only form of ``model``, with the same outputs.

    Args:
        model: a ``densenet.DenseNet`` in eval mode (call ``model.eval()`` first); it is not
            modified. Its device is kept.
        dtype: compute precision; default float32 on CPU and bfloat16 on CUDA. Float32 matches the
            eager model to a relative error under 1e-5, bfloat16/float16 to about 1e-2.
        channels_last: compute in channels_last memory format; default True.
        compile: ``torch.compile`` the result: ``True`` for the default mode (with inductor's
            weight freezing), or a mode name such as ``"reduce-overhead"`` (CUDA graphs, best for
            small GPU batches). The first call with each input shape compiles (tens of seconds).

    Returns:
        an ``InferenceDenseNet`` (or its compiled wrapper) mapping (N, C, H, W) inputs of any
        float dtype to outputs of the same dtype; it keeps the model's ``arch`` and
        ``config``.
    """
    if not isinstance(model, DenseNet):
        raise TypeError(f"optimize() takes a densenet.DenseNet, got {type(model).__name__}")
    if model.training:
        raise RuntimeError(
            "optimize() needs a model in eval mode (its BatchNorm running statistics are folded "
            "into the weights); call model.eval() first"
        )
    device = next(model.parameters()).device
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    fast = InferenceDenseNet(model, dtype, True if channels_last is None else channels_last)
    if not compile:
        return fast
    mode = "default" if compile is True else compile
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be True, False or one of {COMPILE_MODES}, got {compile!r}")
    options = {**torch._inductor.list_mode_options(mode), "freezing": True}
    return torch.compile(fast, options=options)

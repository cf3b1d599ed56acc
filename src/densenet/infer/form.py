"""The fast inference form of a DenseNet, built by ``densenet.optimize(model)`` (``densenet.infer.optimize``).

``InferenceDenseNet`` rebuilds any eval-mode ``DenseNet`` (ImageNet or CIFAR stem, any ``bn_size`` and
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

Float32 outputs match the eager model to a relative error under 1e-5 (measured: about 1e-7 on
the CPU; on CUDA with TF32 off); bf16/fp16 to about 1e-2. The backends run the same folded form
on oneDNN's primitives (``densenet.infer.cpu``) or the fused Triton kernels of ``densenet.nn.kernels``
(``densenet.infer.gpu``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet.nn.model import DenseNet

__all__ = ["BucketedModel", "InferenceDenseNet", "InferenceOnly", "SpaceToDepthConv"]

METADATA = ("arch", "config", "num_classes", "num_features")
AVG_POOL = {3: F.avg_pool1d, 4: F.avg_pool2d, 5: F.avg_pool3d}  # by input dimensions
GLOBAL_AVG_POOL = {3: F.adaptive_avg_pool1d, 4: F.adaptive_avg_pool2d, 5: F.adaptive_avg_pool3d}


def _bn_affine(norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """An eval-mode BatchNorm as ``x * scale + shift``: two float64 vectors of its channels."""
    var = norm.running_var.detach().double()
    scale = norm.weight.detach().double() / torch.sqrt(var + norm.eps)
    shift = norm.bias.detach().double() - norm.running_mean.detach().double() * scale
    return scale, shift


def _spatial_dims(norm: nn.Module) -> int:
    """1, 2 or 3: the spatial axes of a BatchNorm1d, 2d or 3d's input."""
    return {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}[type(norm)]


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


def _per_channel(values: Tensor, spatial_dims: int) -> Tensor:
    """(C,) -> (1, C, 1, ...) with ``spatial_dims`` trailing ones, to broadcast over a batch."""
    return values.view(1, -1, *(1,) * spatial_dims)


def _conv(
    conv: nn.Conv2d, before: nn.BatchNorm2d | None = None, after: nn.BatchNorm2d | None = None
) -> nn.Conv2d:
    """A copy of ``conv`` (1D, 2D or 3D) with BatchNorms folded into its weight and a bias:
    ``before``, a BN-ReLU on its input that ``PrefixClamp(before)`` reduces to a clamp (1x1
    convolutions only: the offset becomes a bias), and ``after``, a BatchNorm on its output."""
    weight = conv.weight.detach().double()
    spatial_dims = weight.dim() - 2
    bias = torch.zeros(conv.out_channels, dtype=torch.float64, device=weight.device)
    if before is not None:
        _, _, scale, offset = _relu_bn_as_clamp(before)
        bias = bias + weight.flatten(2).sum(2) @ offset
        weight = weight * _per_channel(scale, spatial_dims)
    if after is not None:
        scale, shift = _bn_affine(after)
        weight = weight * scale.view(-1, 1, *(1,) * spatial_dims)
        bias = bias * scale + shift
    folded = type(conv)(
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

    Input (N, C, H, W) (1D: (N, C, L), 3D: (N, C, D, H, W)); output the same shape, a new tensor.
    """

    def __init__(self, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        low, high, _, _ = _relu_bn_as_clamp(norm)
        dtype, spatial_dims = norm.weight.dtype, _spatial_dims(norm)
        self.register_buffer("low", _per_channel(low.to(dtype), spatial_dims))
        bounded = not torch.all(high == math.inf)
        high = _per_channel(high.to(dtype), spatial_dims)
        self.register_buffer("high", high if bounded else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.high is None:
            return torch.maximum(x, self.low)
        return torch.clamp(x, self.low, self.high)


class BNReLU(nn.Module):
    """An eval-mode BatchNorm followed by ReLU, as one multiply-add and an in-place ReLU (for a
    3x3 convolution's input, whose zero padding keeps the offset from becoming a bias).

    Input (N, C, H, W) (1D: (N, C, L), 3D: (N, C, D, H, W)); output the same shape, a new tensor.
    """

    def __init__(self, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        scale, shift = _bn_affine(norm)
        dtype, spatial_dims = norm.weight.dtype, _spatial_dims(norm)
        self.register_buffer("scale", _per_channel(scale.to(dtype), spatial_dims))
        self.register_buffer("shift", _per_channel(shift.to(dtype), spatial_dims))

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
        n, c, *spatial = x.shape
        buffer = torch.empty(
            (n, self.out_channels, *spatial),
            dtype=x.dtype,
            device=x.device,
            memory_format=_memory_format(x),
        )
        buffer[:, :c].copy_(x)
        for layer in self.layers:
            end = layer.in_channels + _out_channels(layer)
            buffer[:, layer.in_channels : end].copy_(layer(buffer[:, : layer.in_channels]))
        return buffer


class ConcatBlock(nn.Module):
    """An ``InferenceBlock``'s layers written as concatenations, for graph runtimes (ONNX,
    OpenVINO): there the buffer's slice writes become scatter nodes, while a runtime plans a
    concatenation's memory itself. Input (N, C, H, W); output (N, C + L * k, H, W)."""

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


def concatenating(net: InferenceDenseNet) -> InferenceDenseNet:
    """``net`` with each dense block a ``ConcatBlock`` (the same function), rewritten in place."""
    for name, stage in net.stages.named_children():
        if isinstance(stage, InferenceBlock):
            setattr(net.stages, name, ConcatBlock(stage.layers))
    return net


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
        return self.conv(AVG_POOL[x.dim()](self.act(x), 2))


class SpaceToDepthConv(nn.Module):
    """A 7x7 stride-2 padding-3 convolution as a 4x4 stride-1 convolution on 4x the channels.

    With ``xp`` the input zero-padded by 3 (and by one more row/column at the bottom/right when H/W
    is odd, so that it splits into 2x2 cells) and the kernel zero-padded to 8x8,
    ``y[o, i, j] = sum_{c,u,v} w[o, c, u, v] xp[c, 2i + u, 2j + v]``; writing ``u = 2a + p`` and
    ``v = 2b + q`` (a, b in 0..3; p, q in 0..1) and ``s = pixel_unshuffle(xp, 2)``, whose channel
    ``4c + 2p + q`` at (I, J) is ``xp[c, 2I + p, 2J + q]``, gives
    ``y[o, i, j] = sum w8[o, c, 2a + p, 2b + q] s[4c + 2p + q, i + a, j + b]``: a 4x4 convolution
    of ``s``, exact, with the same output size ``floor((H - 1) / 2) + 1``. Dense 4C-channel input
    suits tensor cores better than the 3-channel original.

    Args:
        conv: the 7x7 convolution.
        channel_multiple: ``s`` gets zero channels (and the weight zero input channels) up to a
            multiple of this, e.g. 16 so that a GPU's channels_last GEMM reads aligned rows
            (12 channels for RGB become 16).

    Input (N, C, H, W); output (N, C_out, (H + 1) // 2, (W + 1) // 2).
    """

    def __init__(self, conv: nn.Conv2d, channel_multiple: int = 1) -> None:
        super().__init__()
        if conv.kernel_size != (7, 7) or conv.stride != (2, 2) or conv.padding != (3, 3):
            raise ValueError("SpaceToDepthConv rewrites a 7x7 stride-2 padding-3 convolution")
        o, c = conv.out_channels, conv.in_channels
        w8 = F.pad(conv.weight.detach(), (0, 1, 0, 1)).view(o, c, 4, 2, 4, 2)
        w4 = w8.permute(0, 1, 3, 5, 2, 4).reshape(o, 4 * c, 4, 4)
        padding = -4 * c % channel_multiple
        self.weight = nn.Parameter(F.pad(w4, (0, 0, 0, 0, 0, padding)))
        bias = conv.bias.detach() if conv.bias is not None else None
        self.bias = None if bias is None else nn.Parameter(bias.clone())

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        x = F.pad(x, (3, 3 + w % 2, 3, 3 + h % 2))
        cells = (n, c, x.shape[2] // 2, 2, x.shape[3] // 2, 2)  # (n, c, i, p, j, q)
        size = (n, self.weight.shape[1], cells[2], cells[4])
        layout = torch.channels_last if channels_last else torch.contiguous_format
        s = torch.empty(size, dtype=x.dtype, device=x.device, memory_format=layout)
        # one pass: channel 4c + 2p + q of s at (i, j) is x[c, 2i + p, 2j + q], then zeros
        s[:, : 4 * c].unflatten(1, (c, 2, 2)).copy_(x.view(cells).permute(0, 1, 3, 5, 2, 4))
        s[:, 4 * c :].zero_()
        return F.conv2d(s, self.weight, self.bias)


class InferenceOnly(nn.Module):
    """The common ground of the inference forms: no gradients, always in eval mode, the source
    model's ``METADATA`` (architecture, configuration, widths) carried over, and a ``forward``
    that pools ``forward_features`` (which each form defines) into its ``classifier``."""

    classifier: nn.Module

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) -> (N, num_features, h, w), the final feature map as the
        classifier reads it (the last BN-ReLU's clamp; its scale is folded into the classifier),
        in the compute dtype."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        features = self.forward_features(x)
        pooled = torch.flatten(GLOBAL_AVG_POOL[features.dim()](features, 1), 1)
        return self.classifier(pooled).to(x.dtype)

    def _finish(self, source: nn.Module) -> None:
        """Call last in ``__init__``: copy ``source``'s metadata, freeze, switch to eval."""
        for name in METADATA:
            if hasattr(source, name):
                setattr(self, name, getattr(source, name))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> InferenceOnly:
        if mode:
            raise RuntimeError(
                f"{type(self).__name__} is inference-only; train the original DenseNet and call "
                "densenet.optimize() on it again"
            )
        return super().train(False)


class InferenceDenseNet(InferenceOnly):
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
        self.channels_last = channels_last
        self.to(device=next(model.parameters()).device, dtype=dtype)
        self._finish(model)

    @property
    def dtype(self) -> torch.dtype:
        return self.stem[0].weight.dtype

    def forward_features(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype, memory_format=self._input_format(x.dim()))
        return self.head_act(self.stages(self.stem(x)))

    def _input_format(self, dims: int) -> torch.memory_format:
        """Channels last (4D and 5D inputs) if asked, else contiguous."""
        last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(dims)
        return last if self.channels_last and last is not None else torch.contiguous_format


def _out_channels(layer: InferenceLayer) -> int:
    conv = layer.conv1 if layer.conv2 is None else layer.conv2
    return conv.out_channels


def _memory_format(x: Tensor) -> torch.memory_format:
    last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if last is not None and x.is_contiguous(memory_format=last) and not x.is_contiguous():
        return last
    return torch.contiguous_format


class BucketedModel(nn.Module):
    """Runs ``model`` only at a fixed set of batch sizes, so a compiled or graph-captured model
    sees a few static shapes whatever batches arrive.

    A batch of n images is split into chunks of at most ``max_batch``; a chunk of m is padded with
    zero images up to the smallest bucket >= m (1, 2, 4, ... and ``max_batch``), run, and the
    padding rows dropped. The model must treat images independently (an eval-mode DenseNet does):
    then the output equals ``model(x)``.

    Args:
        model: maps (B, C, H, W) to (B, ...).
        max_batch: the largest bucket.
        cuda_graphs: capture one CUDA graph per bucket and input shape (CUDA inputs only) and
            replay it; the model's kernels must be capturable (no host synchronisation).

    Input (N, C, H, W); output ``model``'s, for all N rows.
    """

    def __init__(self, model: nn.Module, max_batch: int = 64, *, cuda_graphs: bool = False):
        super().__init__()
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch, self.cuda_graphs = model, max_batch, cuda_graphs
        powers = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
        self.buckets = (*powers, max_batch)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}

    def bucket(self, n: int) -> int:
        """The batch size a chunk of ``n <= max_batch`` images runs at."""
        return next(b for b in self.buckets if b >= n)

    def warm_up(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> None:
        """Run every bucket once on zero inputs of per-image ``shape`` (C, H, W), on the model's
        device: compilation, autotuning and graph capture happen here, not on the first
        requests."""
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for b in self.buckets:
                self._run(torch.zeros((b, *shape), dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        outputs = []
        for chunk in x.split(self.max_batch):
            m, bucket = chunk.shape[0], self.bucket(chunk.shape[0])
            if bucket > m:
                chunk = torch.cat([chunk, chunk.new_zeros((bucket - m, *chunk.shape[1:]))])
            outputs.append(self._run(chunk)[:m])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _run(self, x: Tensor) -> Tensor:
        if not (self.cuda_graphs and x.is_cuda):
            return self.model(x)
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._graphs:
            self._graphs[key] = self._capture(x)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, x: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        """Warm the model up on a side stream (autotuning, cuDNN plans), then capture it."""
        static_in = x.clone()
        stream = torch.cuda.Stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model(static_in)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.model(static_in)
        return graph, static_in, static_out

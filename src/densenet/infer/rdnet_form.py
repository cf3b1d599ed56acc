"""The inference form of an RDNet, built by ``densenet.optimize(model)`` (``densenet.infer.optimize``).

``InferenceRDNet`` computes an eval-mode ``RDNet``'s function on channels-last maps (N, H, W, C),
where a LayerNorm over channels is a layer norm over the last axis and a 1x1 convolution is a
matrix product. Every rewrite is exact in real arithmetic:

- one preallocated buffer per dense stage, (N, H, W, C + blocks * growth_rate): each block reads
  the channels written so far and writes its ``growth_rate`` new ones into the next slice,
  instead of concatenating every earlier map for every block and once more for the stage;
- a LayerNorm's affine part feeding a linear map is folded into that map (the block's 1x1
  expansion, the transition's convolution, the classifier):
  ``W (w * z + b) + c == (W diag(w)) z + (W b + c)`` with ``z`` the normalised input;
- the layer scale ``gamma`` is folded into the block's last 1x1 convolution,
  ``gamma * (W y + c) == (diag(gamma) W) y + gamma * c``, or with squeeze-excitation (whose
  pooled input must stay unscaled) into its per-image gate, ``(y * g) * gamma == y * (g * gamma)``;
- a patchify convolution (the stem's, a transition's: kernel = stride) is a matrix product on
  the map's non-overlapping patches (space to depth), a 1x1 transition a plain one;
- on the CPU with oneDNN (float32, bfloat16) the 1x1 expansion and its GELU are one oneDNN
  primitive, and every matrix product runs on a weight reordered once into oneDNN's layout;
  elsewhere ``F.linear`` then ``F.gelu``;
- the head's LayerNorm of the pooled vector uses that vector's mean ``m`` and variance ``v``, so
  the map ``(F - m) / sqrt(v + eps)`` (per image, affine in F) pools to the normalised vector,
  and the classifier is one Linear on the pooled map, as class activation maps read it;
- dropout and stochastic depth (identities in eval mode) are gone.

Float32 outputs match the eager model to a relative error under 1e-5 (about 1e-6 measured on the
CPU); bfloat16 and float16 ones to about 1e-2. ``graph=True`` builds the same form for a graph
runtime (OpenVINO): portable operators only, and the stages as concatenations, whose memory the
runtime plans itself.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet.infer.form import InferenceOnly
from densenet.nn.rdnet import RDNet

__all__ = ["InferenceRDNet", "onednn_linear"]


def onednn_linear(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused linear primitives run here: the CPU, float32, or bfloat16 where
    oneDNN computes it (not on AVX2-only CPUs)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


def _fold_norm(norm: nn.LayerNorm, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """A linear map reading ``norm``'s output, with its affine part folded in: (O, C, *kernel)
    weight and (O,) bias (None: zeros) -> float64 ``(W * w, bias + W b)`` over the input
    channels C (the kernel's positions summed for the bias)."""
    w, b = norm.weight.detach().double(), norm.bias.detach().double()
    weight = weight.detach().double()
    shape = (1, -1) + (1,) * (weight.dim() - 2)
    folded = weight.flatten(2).sum(2) @ b if weight.dim() > 2 else weight @ b
    bias = folded if bias is None else bias.detach().double() + folded
    return weight * w.view(shape), bias


class ChannelLinear(nn.Module):
    """A linear map over the last axis (a 1x1 convolution on channels-last maps), optionally
    followed by GELU (exact, erf): (..., C_in) -> (..., C_out).

    With ``onednn`` (on the CPU: ``onednn_linear``) it runs as oneDNN's linear primitive, the
    GELU its post-op, on the weight reordered into oneDNN's layout at the first call (again if
    the weight is replaced, as ``Module.to`` does).
    """

    def __init__(self, weight: Tensor, bias: Tensor, gelu: bool = False, onednn: bool = False):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.gelu, self.onednn = gelu, onednn
        self._packed: tuple[Tensor, Tensor] | None = None  # (the weight, it reordered)

    def __getstate__(self) -> dict[str, Any]:
        """Without the reordered weight (an opaque oneDNN tensor, which copies and pickles do
        not take): a copy reorders its own at its first call."""
        return {**self.__dict__, "_packed": None}

    def forward(self, x: Tensor) -> Tensor:
        if self.onednn and x.device.type == "cpu":
            if self._packed is None or self._packed[0] is not self.weight:
                packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, None)
                self._packed = (self.weight, packed)
            attr, algorithm = ("gelu", "none") if self.gelu else ("none", "")
            return torch.ops.mkldnn._linear_pointwise(
                x, self._packed[1], self.bias, attr, [], algorithm
            )
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y) if self.gelu else y


class Patchify(nn.Module):
    """A convolution whose kernel equals its stride (``patch`` pixels; 1: a 1x1 convolution) as a
    ``ChannelLinear`` on each patch's pixels laid side by side (space to depth), optionally with
    a LayerNorm (without affine; its affine folded into the weights) on its input first.

    Input (N, H, W, C) channels last; output (N, H // patch, W // patch, C_out), a new tensor.
    """

    def __init__(
        self, conv: nn.Conv2d, norm: nn.LayerNorm | None = None, onednn: bool = False
    ) -> None:
        super().__init__()
        self.patch = conv.stride[0]
        if conv.kernel_size != conv.stride or conv.stride[0] != conv.stride[1] or conv.padding[0]:
            raise ValueError(f"Patchify takes a square kernel = stride convolution, got {conv}")
        weight = conv.weight.detach().double()
        bias = weight.new_zeros(len(weight)) if conv.bias is None else conv.bias.detach().double()
        self.eps = None if norm is None else norm.eps
        if norm is not None:
            weight, bias = _fold_norm(norm, weight, bias)
        weight = weight.permute(0, 2, 3, 1).flatten(1)  # (O, kh, kw, C): a patch's layout
        dtype = conv.weight.dtype
        self.linear = ChannelLinear(weight.to(dtype), bias.to(dtype), onednn=onednn)

    def forward(self, x: Tensor) -> Tensor:
        if self.eps is not None:
            x = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        p = self.patch
        if p > 1:
            n, h, w, c = x.shape
            x = x[:, : h // p * p, : w // p * p]
            x = x.reshape(n, h // p, p, w // p, p, c).transpose(2, 3).reshape(n, h // p, w // p, -1)
        return self.linear(x)


class Block(nn.Module):
    """A dense block for inference: depthwise 7x7, LayerNorm (its affine folded into the
    expansion), the expansion with GELU, the projection with the layer scale folded in, and the
    squeeze-excitation gate (times the layer scale) if the block has one.

    Input (N, H, W, C_in) channels last (a view of the stage buffer); output (N, H, W,
    growth_rate), a new tensor.
    """

    def __init__(self, block: nn.Module, onednn: bool) -> None:
        super().__init__()
        depthwise, norm, expand, _, project, *se = block.layers.layers
        dtype = depthwise.weight.dtype
        self.depthwise = copy.deepcopy(depthwise)
        self.eps = norm.eps
        weight, bias = _fold_norm(norm, expand.weight.flatten(1), expand.bias)
        self.expand = ChannelLinear(weight.to(dtype), bias.to(dtype), gelu=True, onednn=onednn)
        gamma = block.gamma.detach().double()
        weight, bias = project.weight.detach().double().flatten(1), project.bias.detach().double()
        self.se: ChannelLinear | None = None
        if se:  # the gate's input must stay unscaled: gamma multiplies the gate
            fc = se[0].fc
            self.se = ChannelLinear(fc.weight.detach().flatten(1).clone(), fc.bias.detach().clone())
            self.register_buffer("gamma", gamma.to(dtype))
        else:
            weight, bias = weight * gamma[:, None], bias * gamma
        self.project = ChannelLinear(weight.to(dtype), bias.to(dtype), onednn=onednn)
        self.in_channels, self.growth_rate = depthwise.in_channels, project.out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.depthwise(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = self.project(self.expand(F.layer_norm(y, y.shape[-1:], eps=self.eps)))
        if self.se is None:
            return y
        gate = F.hardsigmoid(self.se(y.mean((1, 2), keepdim=True)))
        return y * (gate * self.gamma)


class Stage(nn.Module):
    """A transition (if the stage has one: a ``Patchify`` with its LayerNorm), then the dense
    blocks over one preallocated buffer, or, for a graph runtime (``graph``), as concatenations.

    Input (N, H, W, C) channels last; output (N, H', W', C' + blocks * growth_rate).
    """

    def __init__(self, stage: nn.Sequential, onednn: bool, graph: bool) -> None:
        super().__init__()
        *transition, dense = stage
        self.transition = Patchify(transition[1], transition[0], onednn) if transition else None
        self.blocks = nn.ModuleList(Block(block, onednn) for block in dense)
        last = self.blocks[-1]
        self.out_channels = last.in_channels + last.growth_rate
        self.graph = graph

    def forward(self, x: Tensor) -> Tensor:
        if self.transition is not None:
            x = self.transition(x)
        if self.graph:
            for block in self.blocks:
                x = torch.cat([x, block(x)], -1)
            return x
        buffer = x.new_empty((*x.shape[:-1], self.out_channels))
        buffer[..., : x.shape[-1]].copy_(x)
        for block in self.blocks:
            end = block.in_channels + block.growth_rate
            buffer[..., block.in_channels : end].copy_(block(buffer[..., : block.in_channels]))
        return buffer


class InferenceRDNet(InferenceOnly):
    """An RDNet in inference-only form, built from an eval-mode ``RDNet`` (weights copied).

    Args:
        model: the source network, in eval mode.
        dtype: parameter and compute precision (float32, bfloat16, float16, float64); inputs are
            cast to it, the head runs in float32 and the output is returned in the input's dtype.
        graph: the form for a graph runtime (``densenet.infer.openvino``): portable operators and
            concatenations (see the module's docstring).

    Input (N, in_channels, H, W) float; output (N, num_classes) logits, or (N, num_features)
    normalised pooled features for a model without classifier.
    """

    def __init__(
        self, model: RDNet, dtype: torch.dtype = torch.float32, graph: bool = False
    ) -> None:
        super().__init__()
        if model.training:
            raise RuntimeError("InferenceRDNet needs a model in eval mode; call model.eval()")
        device = next(model.parameters()).device
        onednn = not graph and onednn_linear(device, dtype)
        conv, norm = model.stem
        self.stem = Patchify(conv, onednn=onednn)
        self.stem_norm = nn.LayerNorm(norm.normalized_shape, norm.eps)  # on (N, H, W, C)
        self.stem_norm.load_state_dict(norm.state_dict())
        self.stages = nn.ModuleList(Stage(stage, onednn, graph) for stage in model.dense_stages)
        self.to(device=device, dtype=dtype)
        norm = model.head.norm
        self.eps = norm.eps
        fc = model.head.fc
        if isinstance(fc, nn.Linear):
            weight, bias = fc.weight, fc.bias
        else:  # no classifier: the head's LayerNorm alone, as an identity Linear
            weight = torch.eye(model.num_features, dtype=torch.float64, device=device)
            bias = torch.zeros(model.num_features, dtype=torch.float64, device=device)
        weight, bias = _fold_norm(norm, weight, bias)
        self.classifier = nn.Linear(*weight.shape[::-1], device=device)
        self.classifier.weight.data, self.classifier.bias.data = weight.float(), bias.float()
        self._finish(model)

    @property
    def dtype(self) -> torch.dtype:
        return self.stem.linear.weight.dtype

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) -> (N, num_features, h, w) float32 (channels_last memory): the
        last stage's map normalised with the statistics of its pooled vector, which the
        classifier reads pooled."""
        x = self.stem(x.to(self.dtype).permute(0, 2, 3, 1))
        x = self.stem_norm(x)
        for stage in self.stages:
            x = stage(x)
        x = x.float()
        pooled = x.mean((1, 2), keepdim=True)
        variance, mean = torch.var_mean(pooled, -1, correction=0, keepdim=True)
        return ((x - mean) * torch.rsqrt(variance + self.eps)).permute(0, 3, 1, 2)

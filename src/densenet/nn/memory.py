"""Memory-efficient training of a dense block: activation memory linear in depth, no convolution
recomputed, BatchNorm running statistics updated exactly once per forward.

A dense block of L layers feeds layer i the concatenation of the block input and the i earlier
outputs, and a plain autograd graph keeps, for every layer, that concatenation and its BN-ReLU
(memory quadratic in L). Here the whole block is one autograd function:

The block may be 1D, 2D or 3D (signals, images, volumes): every statement below holds per
spatial position, whatever the number of spatial axes.

- forward: one buffer (N, C0 + L k, H, W) holds the block's features; layer i writes its k
  channels into the next slice, so no concatenation is kept. Layer i reads its prefix
  ``buffer[:, :C_i]`` in place (a strided view): its BN-ReLU, the first pass over it, writes the
  contiguous input of the convolution, which lives only while the layer runs. Saved for
  backward: the buffer (which is also the block's output, saved anyway by the next layer), each
  bottleneck convolution's output, the dropout masks and per-channel statistics. The BN-ReLU
  outputs (of the prefix and of the bottleneck) are not kept.
- backward: each BN-ReLU is recomputed from the saved tensors and the statistics of the forward
  pass (an elementwise pass), never a convolution, and never touches running statistics.
- in training mode every layer normalises channel c of the buffer with the same batch statistics,
  so they are computed once, when the channel is written. The BatchNorm input gradient of a prefix,
  ``w s g - w s sum(g) / M - (x - mean) w s^2 sum(g xhat) / M`` (s = 1 / std, M = N H W), splits
  into an elementwise part accumulated over layers (one pass per layer) and two per-channel sums
  applied once per channel, when every layer reading it is done.

Each BatchNorm keeps its own mode: batch statistics when training (or without running
statistics), running statistics otherwise (frozen BN for fine-tuning); gradients are exact in both.
Running statistics (momentum, ``momentum=None`` cumulative averaging, unbiased variance,
``num_batches_tracked``) are updated as ``nn.BatchNorm2d`` would update them.

``densenet.nn.model.DenseBlock`` calls :func:`memory_efficient_block` with its layers when it is
memory-efficient and gradients are enabled (this module knows no model class);
``DenseNet(memory_efficient=True)`` or ``model.set_memory_efficient()`` switch it on (the
transitions' and the stem's BN-ReLUs are ``densenet.nn.bn_relu``'s, re-exported here).
``memory_efficient="triton"`` also runs each bottleneck's BN-ReLU-Conv1x1 (forward, input and
weight gradients) as the fused kernels of ``densenet.nn.kernels.training`` on channels_last CUDA
inputs: the BN-ReLU is applied as the GEMMs load the prefix, and its gradient is applied as the
input-gradient GEMM stores into the prefix's gradient.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from densenet.nn.bn_relu import (
    ConvSpec,
    aten,
    batch_mode,
    bn_backward,
    bn_relu,
    conv,
    conv_backward,
    conv_spec,
    memory_efficient_bn_relu,
    memory_format,
    norm_tensors,
    stats_dtype,
    update_running_stats,
    updates_running_stats,
    values_per_channel,
    var_mean,
)

__all__ = ["memory_efficient_block", "memory_efficient_bn_relu"]

# Tensors handed to the autograd function per layer, in this order (None where a part is absent).
_PER_LAYER = ("n1w", "n1b", "n1m", "n1v", "c1w", "c1b", "n2w", "n2b", "n2m", "n2v", "c2w", "c2b")
_N = len(_PER_LAYER)


class _Layer(NamedTuple):
    batch1: bool  # norm1 normalises with batch statistics (else with its running statistics)
    eps1: float
    conv1: ConvSpec
    batch2: bool
    eps2: float
    conv2: ConvSpec | None  # None: no bottleneck, conv1 is the layer's last convolution
    drop: float  # dropout probability after each convolution (0: none)
    fused: bool  # BN-ReLU-conv1 runs as the Triton kernels of densenet.nn.kernels.training


def memory_efficient_block(layers: Sequence[nn.Module], x: Tensor, triton: bool = False) -> Tensor:
    """Run a dense block's ``layers`` (each with ``norm1``, ``conv1``, ``norm2``, ``conv2``,
    ``drop_rate``; ``norm2``/``conv2`` None without bottleneck) on ``x`` (N, C0, H, W) as one
    memory-efficient autograd function.

    With ``triton``, on a channels_last CUDA input (or under ``TRITON_INTERPRET=1``), each
    bottleneck's BN-ReLU-Conv1x1 runs as the fused kernels of ``densenet.nn.kernels.training``
    (forward, input and weight gradients); elsewhere ``triton`` changes nothing.

    ``x`` may have 1, 2 or 3 spatial axes ((N, C0, L), (N, C0, H, W), (N, C0, D, H, W)) with
    layers of the same dimension; ``triton`` needs 2.

    Returns (N, C0 + L k, *spatial), equal to the plain block's output, with exact gradients for ``x``
    and every parameter; updates the BatchNorm running statistics of training-mode norms once.
    """
    layers = list(layers)
    if triton and x.dim() != 4:
        raise ValueError(
            f'memory_efficient="triton" runs 2D dense blocks only, got input of shape '
            f"{tuple(x.shape)}; use memory_efficient=True"
        )
    fused = triton and _triton_runs(x)
    specs = tuple(_layer_spec(layer, fused) for layer in layers)
    tensors: list[Tensor | None] = []
    for layer in layers:
        tensors += [*norm_tensors(layer.norm1), layer.conv1.weight, layer.conv1.bias]
        if layer.conv2 is not None:
            tensors += [*norm_tensors(layer.norm2), layer.conv2.weight, layer.conv2.bias]
        else:
            tensors += [None] * 6
    m = values_per_channel(x, any(s.batch1 or s.batch2 for s in specs))
    buffer, mean, var, mean2, var2 = _DenseBlockFunction.apply(specs, x, *tensors)
    with torch.no_grad():
        c_in = x.shape[1]
        for i, layer in enumerate(layers):
            if updates_running_stats(layer.norm1):
                update_running_stats(layer.norm1, mean[:c_in], var[:c_in], m)
            if layer.norm2 is not None and updates_running_stats(layer.norm2):
                update_running_stats(layer.norm2, mean2[i], var2[i], m)
            c_in += _growth(specs[i])
    return buffer


def _growth(spec: _Layer) -> int:
    """Channels a layer adds to the block."""
    return spec.conv2.out_channels if spec.conv2 is not None else spec.conv1.out_channels


def _per_channel(t: Tensor, dims: int) -> Tensor:
    """(C,) ``t`` viewed (C, 1, ...) to broadcast over ``dims`` spatial axes."""
    return t.view(-1, *(1,) * dims)


def _triton_runs(x: Tensor) -> bool:
    """Whether the Triton kernels run on ``x``: channels_last, on CUDA or under the interpreter."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return channels_last and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _layer_spec(layer: nn.Module, fused: bool) -> _Layer:
    """What the autograd function needs to know of a dense layer besides its tensors."""
    bottleneck = layer.conv2 is not None
    conv1 = conv_spec(layer.conv1)
    pointwise = conv1 == ConvSpec((1, 1), (0, 0), (1, 1), 1, conv1.out_channels)
    pointwise = pointwise and layer.conv1.kernel_size == (1, 1) and layer.conv1.bias is None
    eps2 = float(layer.norm2.eps) if bottleneck else 0.0
    drop = float(layer.drop_rate) if layer.training else 0.0
    return _Layer(
        batch1=batch_mode(layer.norm1),
        eps1=float(layer.norm1.eps),
        conv1=conv1,
        batch2=batch_mode(layer.norm2) if bottleneck else False,
        eps2=eps2,
        conv2=conv_spec(layer.conv2) if bottleneck else None,
        drop=drop,
        fused=fused and bottleneck and pointwise,
    )


def _bn_stats(mean: Tensor, var: Tensor, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(mean, 1 / sqrt(var + eps)) in ``dtype``."""
    return mean.to(dtype), torch.rsqrt(var.to(dtype) + eps)


def _fused() -> Any:
    """densenet.nn.kernels.training, imported on first use (it imports triton)."""
    from densenet.nn.kernels import training

    return training


def _gemm_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype a convolution of ``x`` by ``weight`` computes in: autocast's, else promoted."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(x.dtype, weight.dtype)


def _dropout_backward(grad: Tensor, mask: Tensor, p: float) -> Tensor:
    return aten.native_dropout_backward(grad, mask, 1.0 / (1.0 - p))


class _DenseBlockFunction(torch.autograd.Function):
    """(specs, x, *per-layer tensors) -> (buffer, mean, var, mean2, var2).

    ``mean``/``var`` (C0 + L k,): batch statistics of the buffer's channels (empty when no norm1
    uses batch statistics); ``mean2``/``var2`` (L, bottleneck width): those of each bottleneck
    (empty without bottleneck). The statistics are outputs so that the caller, not the autograd
    function, updates running statistics.
    """

    @staticmethod
    def forward(ctx: Any, specs: tuple[_Layer, ...], x: Tensor, *t: Tensor | None) -> Any:
        n, c0, *spatial = x.shape
        growth = [_growth(s) for s in specs]
        fmt = memory_format(x)
        shape = (n, c0 + sum(growth), *spatial)
        buffer = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        buffer[:, :c0].copy_(x)
        sdtype = stats_dtype(x.dtype)
        any_batch1 = any(s.batch1 for s in specs)
        mean, var, mean2, var2 = _new_stats(specs, x, shape[1] if any_batch1 else 0, sdtype)
        if any_batch1:
            var[:c0], mean[:c0] = var_mean(x, sdtype)
        saved: list[Tensor | None] = []
        c_in = c0
        for i, s in enumerate(specs):
            tl = _layer_tensors(t, i)
            n1m, n1v = (mean[:c_in], var[:c_in]) if s.batch1 else _running(tl, "n1")
            out, mask1 = _dropout(_bn_relu_conv1(s, tl, buffer[:, :c_in], n1m, n1v), s.drop)
            h = mask2 = None
            if s.conv2 is not None:
                h = out
                if s.batch2:
                    if not mean2.numel():
                        raise ValueError("bottleneck widths differ between layers of a block")
                    var2[i], mean2[i] = var_mean(h, sdtype)
                n2m, n2v = (mean2[i], var2[i]) if s.batch2 else _running(tl, "n2")
                out, mask2 = _dropout(_bn_relu_conv2(s, tl, h, n2m, n2v), s.drop)
            new = buffer[:, c_in : c_in + growth[i]]
            new.copy_(out)
            if any_batch1:
                var[c_in : c_in + growth[i]], mean[c_in : c_in + growth[i]] = var_mean(new, sdtype)
            saved += [h, mask1, mask2]
            c_in += growth[i]
        ctx.specs, ctx.growth, ctx.fmt = specs, growth, fmt
        ctx.conv_dtype, ctx.x_dtype = out.dtype, x.dtype
        ctx.mark_non_differentiable(mean, var, mean2, var2)
        ctx.save_for_backward(buffer, mean, var, mean2, var2, *saved, *t)
        return buffer, mean, var, mean2, var2

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_buffer: Tensor, *_: Any) -> Any:
        specs: tuple[_Layer, ...] = ctx.specs
        growth: list[int] = ctx.growth
        buffer, mean, var, mean2, var2, *rest = ctx.saved_tensors
        saved, t = rest[: 3 * len(specs)], rest[3 * len(specs) :]
        channels, dims = buffer.shape[1], buffer.dim() - 2
        m = values_per_channel(buffer, False)
        sdtype = stats_dtype(buffer.dtype)
        # grad accumulates, per channel, w s g over the layers that read it (plus the output's
        # gradient); shift and slope collect w s sum(g) / M and w s^2 sum(g xhat) / M, applied to a
        # channel once every layer reading it is done (see the module docstring).
        grad = grad_buffer.to(sdtype, memory_format=ctx.fmt, copy=True)
        shift = mean.new_zeros(channels) if mean.numel() else mean
        slope = torch.zeros_like(shift)
        grads: list[Tensor | None] = [None] * len(t)
        c_in = channels
        for i in range(len(specs) - 1, -1, -1):
            s, tl, gl = specs[i], _layer_tensors(t, i), {}
            c_in -= growth[i]
            h, mask1, mask2 = saved[3 * i : 3 * i + 3]
            g_out = _finish(grad, buffer, mean, shift, slope, c_in, c_in + growth[i])
            g_out = g_out.to(ctx.conv_dtype)
            if s.conv2 is not None:
                n2m, n2v = (mean2[i], var2[i]) if s.batch2 else _running(tl, "n2")
                g_out = _bottleneck_backward(s, tl, gl, g_out, h, mask2, n2m, n2v)
                g_out = g_out.to(ctx.conv_dtype)
            if mask1 is not None:
                g_out = _dropout_backward(g_out, mask1, s.drop)
            n1m, n1v = (mean[:c_in], var[:c_in]) if s.batch1 else _running(tl, "n1")
            mean1, inv = _bn_stats(n1m, n1v, s.eps1, sdtype)
            scale = tl["n1w"].to(sdtype) * inv
            needed = i > 0 or ctx.needs_input_grad[1]
            if s.fused:  # the kernel adds g_a * scale to the prefix's gradient
                gw, gb = _fused_conv1_backward(tl, gl, g_out, buffer[:, :c_in], mean1, inv, grad)
            else:
                g_a, gw, gb = _conv1_backward(s, tl, gl, g_out, buffer[:, :c_in], n1m, n1v)
                if needed:
                    grad[:, :c_in].addcmul_(g_a, _per_channel(scale, dims))
            if s.batch1 and needed:
                shift[:c_in] += scale * gb.to(sdtype) / m
                slope[:c_in] += scale * inv * gw.to(sdtype) / m
            grads[i * _N : (i + 1) * _N] = [gl.get(name) for name in _PER_LAYER]
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = _finish(grad, buffer, mean, shift, slope, 0, c_in).to(ctx.x_dtype)
            grad_x = grad_x.contiguous(memory_format=ctx.fmt)
        return None, grad_x, *grads


def _new_stats(
    specs: tuple[_Layer, ...], x: Tensor, channels: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-channel statistics to fill: ``mean``, ``var`` (``channels``,) uninitialised, and
    ``mean2``, ``var2`` (L, bottleneck width) zeros, empty unless the block's bottlenecks share
    one width."""
    mean = x.new_empty(channels, dtype=dtype)
    bottlenecks = [s.conv1.out_channels for s in specs if s.conv2 is not None]
    width2 = bottlenecks[0] if bottlenecks and len(set(bottlenecks)) == 1 else 0
    mean2 = x.new_zeros((len(specs), width2) if width2 else (0,), dtype=dtype)
    return mean, torch.empty_like(mean), mean2, torch.zeros_like(mean2)


def _layer_tensors(t: Sequence[Tensor | None], i: int) -> dict[str, Tensor | None]:
    """Layer ``i``'s tensors among the autograd function's, by their ``_PER_LAYER`` names."""
    return dict(zip(_PER_LAYER, t[i * _N : (i + 1) * _N]))


def _running(tl: dict[str, Tensor | None], norm: str) -> tuple[Tensor, Tensor]:
    """The running mean and variance of a layer's ``norm`` ("n1" or "n2")."""
    return tl[norm + "m"], tl[norm + "v"]


def _dropout(x: Tensor, p: float) -> tuple[Tensor, Tensor | None]:
    """Dropout of probability ``p`` (none when 0) and its mask."""
    return aten.native_dropout(x, p, True) if p else (x, None)


def _bn_relu_conv1(s: _Layer, tl: dict, prefix: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """conv1(relu(norm1(prefix))) with the statistics ``mean``, ``var``; fused, the BN-ReLU is
    applied as the GEMM loads the prefix, else its output lives only in this call."""
    if s.fused:
        c1w = tl["c1w"]
        weight = c1w[:, :, 0, 0].to(_gemm_dtype(prefix, c1w))
        stats = _bn_stats(mean, var, s.eps1, stats_dtype(prefix.dtype))
        return _fused().bn_relu_conv1x1(prefix, *stats, tl["n1w"], tl["n1b"], weight)
    a = bn_relu(prefix, mean, var, tl["n1w"], tl["n1b"], s.eps1)
    return conv(a, tl["c1w"], tl["c1b"], s.conv1)


def _bn_relu_conv2(s: _Layer, tl: dict, h: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """conv2(relu(norm2(h))) of the bottleneck output ``h``; the BN-ReLU output lives only in
    this call."""
    b = bn_relu(h, mean, var, tl["n2w"], tl["n2b"], s.eps2)
    return conv(b, tl["c2w"], tl["c2b"], s.conv2)


def _finish(
    grad: Tensor, buffer: Tensor, mean: Tensor, shift: Tensor, slope: Tensor, lo: int, hi: int
) -> Tensor:
    """Channels ``lo:hi`` of the buffer's gradient, once every layer reading them is done: the
    per-channel sums ``shift`` and ``slope`` applied (when norm1s use batch statistics)."""
    g = grad[:, lo:hi]
    if mean.numel():
        dims = buffer.dim() - 2
        g.addcmul_(buffer[:, lo:hi], _per_channel(slope[lo:hi], dims), value=-1)
        g.sub_(_per_channel(shift[lo:hi] - mean[lo:hi] * slope[lo:hi], dims))
    return g


def _bottleneck_backward(
    s: _Layer,
    tl: dict,
    gl: dict,
    g_out: Tensor,
    h: Tensor,
    mask: Tensor | None,
    mean: Tensor,
    var: Tensor,
) -> Tensor:
    """Back through the bottleneck's dropout (``mask``), conv2 and norm2 (statistics ``mean``,
    ``var``): the gradient of conv1's output ``h``; conv2's and norm2's gradients go to ``gl``."""
    if mask is not None:
        g_out = _dropout_backward(g_out, mask, s.drop)
    b = bn_relu(h, mean, var, tl["n2w"], tl["n2b"], s.eps2)
    g_b, gl["c2w"], gl["c2b"] = conv_backward(g_out, b, tl["c2w"], tl["c2b"], s.conv2)
    g_b = aten.threshold_backward(g_b.to(b.dtype), b, 0)
    del b
    g_h, gl["n2w"], gl["n2b"] = bn_backward(g_b, h, tl["n2w"], mean, var, s.eps2, s.batch2, True)
    return g_h


def _conv1_backward(
    s: _Layer, tl: dict, gl: dict, g_out: Tensor, prefix: Tensor, mean: Tensor, var: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Back through conv1 and the ReLU of norm1 on ``prefix``: conv1's gradients into ``gl``;
    returns the gradient g_a at norm1's output and norm1's weight and bias gradients."""
    a = bn_relu(prefix, mean, var, tl["n1w"], tl["n1b"], s.eps1)
    g_a, gl["c1w"], gl["c1b"] = conv_backward(g_out, a, tl["c1w"], tl["c1b"], s.conv1)
    g_a = aten.threshold_backward(g_a.to(a.dtype), a, 0)
    del a
    _, gw, gb = bn_backward(g_a, prefix, tl["n1w"], mean, var, s.eps1, s.batch1, False)
    gl["n1w"], gl["n1b"] = gw, gb
    return g_a, gw, gb


def _fused_conv1_backward(
    tl: dict, gl: dict, g_out: Tensor, prefix: Tensor, mean: Tensor, inv: Tensor, grad: Tensor
) -> tuple[Tensor, Tensor]:
    """``_conv1_backward`` as the fused kernels, which add g_a * scale to the prefix's channels
    of the buffer's gradient ``grad`` in place; returns norm1's weight and bias gradients."""
    n1w, n1b, c1w = tl["n1w"], tl["n1b"], tl["c1w"]
    g_out = g_out.contiguous(memory_format=torch.channels_last)
    kernels = _fused()
    gw1 = kernels.bn_relu_conv1x1_weight_grad(g_out, prefix, mean, inv, n1w, n1b)
    gl["c1w"] = gw1.view_as(c1w).to(c1w.dtype)
    weight = c1w[:, :, 0, 0].to(g_out.dtype)
    grad_prefix = grad[:, : prefix.shape[1]]
    gb, gw = kernels.bn_relu_conv1x1_input_grad(
        g_out, weight, prefix, mean, inv, n1w, n1b, grad_prefix
    )
    gl["n1w"], gl["n1b"] = gw.to(n1w.dtype), gb.to(n1b.dtype)
    return gw, gb

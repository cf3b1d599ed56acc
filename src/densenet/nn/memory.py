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
memory-efficient and gradients are enabled (this module knows no model class); ``DenseNet(memory_efficient=True)`` or ``model.set_memory_efficient()``
switch it on. ``memory_efficient="triton"`` also runs each bottleneck's BN-ReLU-Conv1x1 (forward,
input and weight gradients) as the fused kernels of ``densenet.nn.kernels.training`` on
channels_last CUDA inputs: the BN-ReLU is applied as the GEMMs load the prefix, and its gradient
is applied as the input-gradient GEMM stores into the prefix's gradient.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["memory_efficient_block", "memory_efficient_bn_relu"]

_aten = torch.ops.aten
# Tensors handed to the autograd function per layer, in this order (None where a part is absent).
_PER_LAYER = ("n1w", "n1b", "n1m", "n1v", "c1w", "c1b", "n2w", "n2b", "n2m", "n2v", "c2w", "c2b")
_N = len(_PER_LAYER)
_IX = {name: i for i, name in enumerate(_PER_LAYER)}


class _Conv(NamedTuple):
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    out_channels: int


class _Layer(NamedTuple):
    batch1: bool  # norm1 normalises with batch statistics (else with its running statistics)
    eps1: float
    conv1: _Conv
    batch2: bool
    eps2: float
    conv2: _Conv | None  # None: no bottleneck, conv1 is the layer's last convolution
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
        tensors += [*_norm_tensors(layer.norm1), layer.conv1.weight, layer.conv1.bias]
        if layer.conv2 is not None:
            tensors += [*_norm_tensors(layer.norm2), layer.conv2.weight, layer.conv2.bias]
        else:
            tensors += [None] * 6
    m = x.shape[0] * math.prod(x.shape[2:])
    if m == 1 and any(s.batch1 or s.batch2 for s in specs):
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )
    buffer, mean, var, mean2, var2 = _DenseBlockFunction.apply(specs, x, *tensors)
    with torch.no_grad():
        c_in = x.shape[1]
        for i, layer in enumerate(layers):
            if _updates_running_stats(layer.norm1):
                _update_running_stats(layer.norm1, mean[:c_in], var[:c_in], m)
            if layer.norm2 is not None and _updates_running_stats(layer.norm2):
                _update_running_stats(layer.norm2, mean2[i], var2[i], m)
            c_in += _growth(specs[i])
    return buffer


def memory_efficient_bn_relu(
    norm: nn.Module, x: Tensor, *, conv: nn.Module | None = None, pool: nn.Module | None = None
) -> Tensor:
    """``conv(relu(norm(x)))`` (a transition's convolution) or ``pool(relu(norm(x)))`` (the
    stem's max-pool) as one autograd function that keeps ``x`` and the batch statistics but not
    the BN-ReLU output: backward recomputes it (an elementwise pass) and re-runs the pool, never
    the convolution. Exact gradients; running statistics updated as ``norm`` would. ``x`` is
    (N, C, *spatial) with 1, 2 or 3 spatial axes."""
    if (conv is None) == (pool is None):
        raise ValueError("give one of conv and pool")
    weight, bias, running_mean, running_var = _norm_tensors(norm)
    batch = _batch_mode(norm)
    m = x.shape[0] * math.prod(x.shape[2:])
    if batch and m == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )
    spec = _conv_spec(conv) if conv is not None else None
    out, mean, var = _BNReLUFunction.apply(
        x, weight, bias, running_mean, running_var, None if conv is None else conv.weight,
        float(norm.eps), batch, spec, pool,
    )  # fmt: skip
    if _updates_running_stats(norm):
        with torch.no_grad():
            _update_running_stats(norm, mean, var, m)
    return out


class _BNReLUFunction(torch.autograd.Function):
    """(x, norm weight, bias, running mean, var (None in batch mode), conv weight or None, eps,
    batch, conv spec or None, pool or None) -> (conv or pool of relu(norm(x)), mean, var)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor, rm: Tensor | None, rv: Tensor | None,
                cw: Tensor | None, eps: float, batch: bool, spec: _Conv | None,
                pool: nn.Module | None) -> Any:  # fmt: skip
        if batch:
            var, mean = _var_mean(x, _stats_dtype(x.dtype))
        else:
            mean, var = rm, rv
        a = _bn_relu(x, mean, var, w, b, eps)
        indices = None
        if spec is not None:
            out = _conv(a, cw, None, spec)
        elif x.dim() in _MAX_POOL_BACKWARD:  # 2D, 3D: keep the argmax, not the pool's input
            out, indices = _max_pool_indices(pool, a)
        else:
            out = pool(a)
        ctx.save_for_backward(x, w, b, mean, var, cw, indices)
        ctx.eps, ctx.batch, ctx.spec, ctx.pool = eps, batch, spec, pool
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor, *_: Any) -> Any:
        x, w, b, mean, var, cw, indices = ctx.saved_tensors
        a = _bn_relu(x, mean, var, w, b, ctx.eps)  # recomputed: never saved
        grad_cw = None
        if ctx.spec is not None:
            grad_a, grad_cw, _ = _conv_backward(grad, a, cw, None, ctx.spec)
        elif indices is not None:
            p = ctx.pool
            grad_a = _MAX_POOL_BACKWARD[a.dim()](
                grad, a, _tuple(p.kernel_size, a), _tuple(p.stride, a), _tuple(p.padding, a),
                _tuple(p.dilation, a), p.ceil_mode, indices,
            )  # fmt: skip
        else:
            with torch.enable_grad():
                leaf = a.detach().requires_grad_()
                (grad_a,) = torch.autograd.grad(ctx.pool(leaf), leaf, grad)
        grad_a = grad_a.to(x.dtype).masked_fill_(a <= 0, 0)
        grad_x, grad_w, grad_b = _bn_backward(
            grad_a, x, w, mean, var, ctx.eps, ctx.batch, ctx.needs_input_grad[0]
        )
        return grad_x, grad_w, grad_b, None, None, grad_cw, None, None, None, None


_MAX_POOL_BACKWARD = {
    4: _aten.max_pool2d_with_indices_backward,
    5: _aten.max_pool3d_with_indices_backward,
}
_MAX_POOL_INDICES = {4: F.max_pool2d, 5: F.max_pool3d}


def _max_pool_indices(pool: nn.Module, a: Tensor) -> tuple[Tensor, Tensor]:
    """``pool(a)`` (a 2D or 3D max-pool module) and the argmax of each output."""
    return _MAX_POOL_INDICES[a.dim()](
        a, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode, True
    )


def _tuple(value: int | tuple[int, ...], a: Tensor) -> list[int]:
    """A pooling argument per spatial axis of ``a``."""
    return list(value) if isinstance(value, tuple) else [value] * (a.dim() - 2)


def _norm_tensors(norm: nn.Module | None) -> list[Tensor | None]:
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or not norm.affine:
        raise TypeError(
            f"memory-efficient dense blocks need affine BatchNorm norms, got {norm!r}; "
            "build the model with memory_efficient=False"
        )
    if _batch_mode(norm):
        if isinstance(norm, nn.SyncBatchNorm) and _synchronised(norm):
            raise NotImplementedError(
                "memory-efficient dense blocks compute BatchNorm statistics per process and "
                "cannot synchronise them (SyncBatchNorm); use either memory_efficient=True or "
                "SyncBatchNorm"
            )
        return [norm.weight, norm.bias, None, None]
    return [norm.weight, norm.bias, norm.running_mean, norm.running_var]


def _synchronised(norm: nn.SyncBatchNorm) -> bool:
    """Whether a training-mode SyncBatchNorm would reduce its statistics over processes."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(norm.process_group or dist.group.WORLD) > 1


def _batch_mode(norm: nn.BatchNorm2d) -> bool:
    return norm.training or norm.running_mean is None


def _growth(spec: _Layer) -> int:
    """Channels a layer adds to the block."""
    return spec.conv2.out_channels if spec.conv2 is not None else spec.conv1.out_channels


def _conv_spec(conv: nn.Module) -> _Conv:
    if (
        not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        or conv.padding_mode != "zeros"
        or conv.padding == "same"
    ):
        raise TypeError(
            f"memory-efficient dense blocks need convolutions with explicit zero padding, got {conv!r}"
        )
    return _Conv(
        tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups,
        conv.out_channels,
    )  # fmt: skip


def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last (channels_last_3d) for such a 4D (5D) ``x``, else contiguous."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if fmt is not None and x.is_contiguous(memory_format=fmt) and not x.is_contiguous():
        return fmt
    return torch.contiguous_format


def _per_channel(t: Tensor, dims: int) -> Tensor:
    """(C,) ``t`` viewed (C, 1, ...) to broadcast over ``dims`` spatial axes."""
    return t.view(-1, *(1,) * dims)


def _triton_runs(x: Tensor) -> bool:
    """Whether the Triton kernels run on ``x``: channels_last, on CUDA or under the interpreter."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return channels_last and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _layer_spec(layer: nn.Module, fused: bool) -> _Layer:
    bottleneck = layer.conv2 is not None
    conv1 = _conv_spec(layer.conv1)
    pointwise = conv1 == _Conv((1, 1), (0, 0), (1, 1), 1, conv1.out_channels)
    pointwise = pointwise and layer.conv1.kernel_size == (1, 1) and layer.conv1.bias is None
    eps2 = float(layer.norm2.eps) if bottleneck else 0.0
    drop = float(layer.drop_rate) if layer.training else 0.0
    return _Layer(
        batch1=_batch_mode(layer.norm1),
        eps1=float(layer.norm1.eps),
        conv1=conv1,
        batch2=_batch_mode(layer.norm2) if bottleneck else False,
        eps2=eps2,
        conv2=_conv_spec(layer.conv2) if bottleneck else None,
        drop=drop,
        fused=fused and bottleneck and pointwise,
    )


def _updates_running_stats(norm: nn.BatchNorm2d) -> bool:
    return norm.training and norm.running_mean is not None and norm.running_var is not None


def _update_running_stats(
    norm: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor, m: int
) -> None:
    """What ``nn.BatchNorm2d`` does to its buffers in a training forward on M = N H W values
    (N D H W in 3D, N L in 1D)."""
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
    factor: Tensor | float = 0.0 if norm.momentum is None else norm.momentum
    if norm.momentum is None and norm.num_batches_tracked is not None:
        factor = 1.0 / norm.num_batches_tracked.to(mean.dtype)
    mean = mean.to(norm.running_mean.dtype)
    unbiased = var.to(norm.running_var.dtype) * (m / max(m - 1, 1))
    norm.running_mean.mul_(1 - factor).add_(mean * factor)
    norm.running_var.mul_(1 - factor).add_(unbiased * factor)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _var_mean(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-channel biased variance and mean of (N, C, *spatial) ``x``, computed in ``dtype``."""
    mean, var = torch.batch_norm_update_stats(x.to(dtype), None, None, 0.0)
    return var, mean


def _bn_relu(x: Tensor, mean: Tensor, var: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    """relu(w (x - mean) / sqrt(var + eps) + b) per channel, a new tensor."""
    return F.batch_norm(x, mean, var, w, b, False, 0.0, eps).relu_()


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


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv(x: Tensor, w: Tensor, b: Tensor | None, spec: _Conv) -> Tensor:
    conv = _CONV[len(spec.stride)]
    return conv(x, w, b, spec.stride, spec.padding, spec.dilation, spec.groups)


def _conv_backward(
    grad: Tensor, x: Tensor, w: Tensor, b: Tensor | None, spec: _Conv
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of a convolution for its input, weight and bias (weight, bias in their dtypes)."""
    dtype = grad.dtype  # the dtype the forward convolution computed in (autocast or not)
    gx, gw, gb = _aten.convolution_backward(
        grad, x.to(dtype), w.to(dtype), None if b is None else [b.shape[0]],
        list(spec.stride), list(spec.padding), list(spec.dilation), False,
        [0] * len(spec.stride), spec.groups,
        [True, w.requires_grad, b is not None and b.requires_grad],
    )  # fmt: skip
    return gx, None if gw is None else gw.to(w.dtype), None if gb is None else gb.to(b.dtype)


def _dropout_backward(grad: Tensor, mask: Tensor, p: float) -> Tensor:
    return _aten.native_dropout_backward(grad, mask, 1.0 / (1.0 - p))


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
        fmt = _memory_format(x)
        buffer = torch.empty(
            (n, c0 + sum(growth), *spatial), dtype=x.dtype, device=x.device,
            memory_format=fmt,
        )  # fmt: skip
        buffer[:, :c0].copy_(x)
        sdtype = _stats_dtype(x.dtype)
        any_batch1 = any(s.batch1 for s in specs)
        mean = x.new_empty(buffer.shape[1] if any_batch1 else 0, dtype=sdtype)
        var = torch.empty_like(mean)
        if any_batch1:
            var[:c0], mean[:c0] = _var_mean(x, sdtype)
        bottlenecks = [s.conv1.out_channels for s in specs if s.conv2 is not None]
        width2 = bottlenecks[0] if bottlenecks and len(set(bottlenecks)) == 1 else 0
        mean2 = x.new_zeros((len(specs), width2) if width2 else (0,), dtype=sdtype)
        var2 = torch.zeros_like(mean2)
        saved: list[Tensor | None] = []
        c_in = c0
        for i, s in enumerate(specs):
            tl = t[i * _N : (i + 1) * _N]
            n1m, n1v = (mean[:c_in], var[:c_in]) if s.batch1 else (tl[_IX["n1m"]], tl[_IX["n1v"]])
            if s.fused:
                c1w = tl[_IX["c1w"]]
                out = _fused().bn_relu_conv1x1(
                    buffer[:, :c_in], *_bn_stats(n1m, n1v, s.eps1, sdtype),
                    tl[_IX["n1w"]], tl[_IX["n1b"]], c1w[:, :, 0, 0].to(_gemm_dtype(x, c1w)),
                )  # fmt: skip
            else:
                a = _bn_relu(buffer[:, :c_in], n1m, n1v, tl[_IX["n1w"]], tl[_IX["n1b"]], s.eps1)
                out = _conv(a, tl[_IX["c1w"]], tl[_IX["c1b"]], s.conv1)
                del a
            mask1 = mask2 = h = None
            if s.drop:
                out, mask1 = _aten.native_dropout(out, s.drop, True)
            if s.conv2 is not None:
                h = out
                if s.batch2:
                    if not width2:
                        raise ValueError("bottleneck widths differ between layers of a block")
                    var2[i], mean2[i] = _var_mean(h, sdtype)
                    n2m, n2v = mean2[i], var2[i]
                else:
                    n2m, n2v = tl[_IX["n2m"]], tl[_IX["n2v"]]
                b = _bn_relu(h, n2m, n2v, tl[_IX["n2w"]], tl[_IX["n2b"]], s.eps2)
                out = _conv(b, tl[_IX["c2w"]], tl[_IX["c2b"]], s.conv2)
                del b
                if s.drop:
                    out, mask2 = _aten.native_dropout(out, s.drop, True)
            new = buffer[:, c_in : c_in + growth[i]]
            new.copy_(out)
            if any_batch1:
                var[c_in : c_in + growth[i]], mean[c_in : c_in + growth[i]] = _var_mean(new, sdtype)
            saved += [h, mask1, mask2]
            c_in += growth[i]
        ctx.specs = specs
        ctx.growth = growth
        ctx.conv_dtype = out.dtype
        ctx.x_dtype = x.dtype
        ctx.fmt = fmt
        ctx.mark_non_differentiable(mean, var, mean2, var2)
        ctx.save_for_backward(buffer, mean, var, mean2, var2, *saved, *t)
        return buffer, mean, var, mean2, var2

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_buffer: Tensor, *_: Any) -> Any:
        specs: tuple[_Layer, ...] = ctx.specs
        growth: list[int] = ctx.growth
        num = len(specs)
        buffer, mean, var, mean2, var2, *rest = ctx.saved_tensors
        saved, t = rest[: 3 * num], rest[3 * num :]
        n, channels, *spatial = buffer.shape
        m = n * math.prod(spatial)
        dims = len(spatial)
        c0 = channels - sum(growth)
        sdtype = _stats_dtype(buffer.dtype)
        cdtype = ctx.conv_dtype
        # grad accumulates, per channel, w s g over the layers that read it (plus the output's
        # gradient); shift and slope collect w s sum(g) / M and w s^2 sum(g xhat) / M, applied to a
        # channel once every layer reading it is done (see the module docstring).
        grad = grad_buffer.to(sdtype, memory_format=ctx.fmt, copy=True)
        any_batch1 = mean.numel() > 0
        shift = mean.new_zeros(channels) if any_batch1 else mean
        slope = torch.zeros_like(shift)
        grads: list[Tensor | None] = [None] * len(t)

        def finish(lo: int, hi: int) -> Tensor:
            g = grad[:, lo:hi]
            if any_batch1:
                g.addcmul_(buffer[:, lo:hi], _per_channel(slope[lo:hi], dims), value=-1)
                g.sub_(_per_channel(shift[lo:hi] - mean[lo:hi] * slope[lo:hi], dims))
            return g

        c_in = channels
        for i in range(num - 1, -1, -1):
            s = specs[i]
            c_in -= growth[i]
            tl = t[i * _N : (i + 1) * _N]
            gl: list[Tensor | None] = [None] * _N
            h, mask1, mask2 = saved[3 * i : 3 * i + 3]
            g_out = finish(c_in, c_in + growth[i]).to(cdtype)
            if s.conv2 is not None:
                if mask2 is not None:
                    g_out = _dropout_backward(g_out, mask2, s.drop)
                n2w = tl[_IX["n2w"]]
                n2m, n2v = (mean2[i], var2[i]) if s.batch2 else (tl[_IX["n2m"]], tl[_IX["n2v"]])
                b = _bn_relu(h, n2m, n2v, n2w, tl[_IX["n2b"]], s.eps2)
                g_b, gl[_IX["c2w"]], gl[_IX["c2b"]] = _conv_backward(
                    g_out, b, tl[_IX["c2w"]], tl[_IX["c2b"]], s.conv2
                )
                g_b = _aten.threshold_backward(g_b.to(b.dtype), b, 0)
                del b
                g_h, gl[_IX["n2w"]], gl[_IX["n2b"]] = _bn_backward(
                    g_b, h, n2w, n2m, n2v, s.eps2, s.batch2, True
                )
                g_out = g_h.to(cdtype)
            if mask1 is not None:
                g_out = _dropout_backward(g_out, mask1, s.drop)
            prefix = buffer[:, :c_in]
            n1w, n1b, c1w = tl[_IX["n1w"]], tl[_IX["n1b"]], tl[_IX["c1w"]]
            n1m, n1v = (mean[:c_in], var[:c_in]) if s.batch1 else (tl[_IX["n1m"]], tl[_IX["n1v"]])
            mean1, inv = _bn_stats(n1m, n1v, s.eps1, sdtype)
            scale = n1w.to(sdtype) * inv
            if s.fused:  # the kernel adds g_a * scale to the prefix's gradient
                g_out = g_out.contiguous(memory_format=torch.channels_last)
                kernels = _fused()
                gw1 = kernels.bn_relu_conv1x1_weight_grad(g_out, prefix, mean1, inv, n1w, n1b)
                gl[_IX["c1w"]] = gw1.view_as(c1w).to(c1w.dtype)
                gb, gw = kernels.bn_relu_conv1x1_input_grad(
                    g_out, c1w[:, :, 0, 0].to(cdtype), prefix, mean1, inv, n1w, n1b, grad[:, :c_in]
                )
                gl[_IX["n1w"]], gl[_IX["n1b"]] = gw.to(n1w.dtype), gb.to(n1b.dtype)
            else:
                a = _bn_relu(prefix, n1m, n1v, n1w, n1b, s.eps1)
                g_a, gl[_IX["c1w"]], gl[_IX["c1b"]] = _conv_backward(
                    g_out, a, c1w, tl[_IX["c1b"]], s.conv1
                )
                g_a = _aten.threshold_backward(g_a.to(a.dtype), a, 0)
                del a
                _, gw, gb = _bn_backward(g_a, prefix, n1w, n1m, n1v, s.eps1, s.batch1, False)
                gl[_IX["n1w"]], gl[_IX["n1b"]] = gw, gb
                if i > 0 or ctx.needs_input_grad[1]:
                    grad[:, :c_in].addcmul_(g_a, _per_channel(scale, dims))
            if s.batch1 and (i > 0 or ctx.needs_input_grad[1]):
                shift[:c_in] += scale * gb.to(sdtype) / m
                slope[:c_in] += scale * inv * gw.to(sdtype) / m
            grads[i * _N : (i + 1) * _N] = gl
        grad_x = finish(0, c0).to(ctx.x_dtype) if ctx.needs_input_grad[1] else None
        if grad_x is not None:
            grad_x = grad_x.contiguous(memory_format=ctx.fmt)
        return None, grad_x, *grads


def _bn_backward(
    grad: Tensor,
    x: Tensor,
    w: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    batch: bool,
    need_input: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """BatchNorm gradients for input (if ``need_input``), weight and bias, given the statistics
    (batch or running) that normalised ``x``."""
    if batch:
        invstd = torch.rsqrt(var + eps)
        return _aten.native_batch_norm_backward(
            grad, x, w, None, None, mean, invstd, True, eps, [need_input, True, True]
        )
    return _aten.native_batch_norm_backward(
        grad, x, w, mean, var, None, None, False, eps, [need_input, True, True]
    )

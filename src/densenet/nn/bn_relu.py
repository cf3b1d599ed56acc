"""Memory-efficient BN-ReLU followed by a convolution or a pool (a transition, the stem), and the
BatchNorm and convolution steps that the memory-efficient dense block and RDNet stage
(``densenet.nn.memory``, ``densenet.nn.rdnet_memory``) share with it.

BatchNorm modes (batch or running statistics) and running-statistics updates are as the
memory-efficient dense block's (see ``densenet.nn.memory``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["memory_efficient_bn_relu"]

aten = torch.ops.aten


class ConvSpec(NamedTuple):
    """What a convolution needs besides its weight and bias."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    out_channels: int


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
    weight, bias, running_mean, running_var = norm_tensors(norm)
    batch = batch_mode(norm)
    m = values_per_channel(x, batch)
    spec = conv_spec(conv) if conv is not None else None
    conv_weight = None if conv is None else conv.weight
    out, mean, var = _BNReLUFunction.apply(
        x, weight, bias, running_mean, running_var, conv_weight, float(norm.eps), batch, spec, pool
    )
    if updates_running_stats(norm):
        with torch.no_grad():
            update_running_stats(norm, mean, var, m)
    return out


class _BNReLUFunction(torch.autograd.Function):
    """(x, norm weight, bias, running mean, var (None in batch mode), conv weight or None, eps,
    batch, conv spec or None, pool or None) -> (conv or pool of relu(norm(x)), mean, var)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w: Tensor,
        b: Tensor,
        rm: Tensor | None,
        rv: Tensor | None,
        cw: Tensor | None,
        eps: float,
        batch: bool,
        spec: ConvSpec | None,
        pool: nn.Module | None,
    ) -> Any:
        if batch:
            var, mean = var_mean(x, stats_dtype(x.dtype))
        else:
            mean, var = rm, rv
        a = bn_relu(x, mean, var, w, b, eps)
        indices = None
        if spec is not None:
            out = conv(a, cw, None, spec)
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
        a = bn_relu(x, mean, var, w, b, ctx.eps)  # recomputed: never saved
        grad_cw = None
        if ctx.spec is not None:
            grad_a, grad_cw, _ = conv_backward(grad, a, cw, None, ctx.spec)
        elif indices is not None:
            grad_a = _max_pool_backward(ctx.pool, grad, a, indices)
        else:
            with torch.enable_grad():
                leaf = a.detach().requires_grad_()
                (grad_a,) = torch.autograd.grad(ctx.pool(leaf), leaf, grad)
        grad_a = grad_a.to(x.dtype).masked_fill_(a <= 0, 0)
        grad_x, grad_w, grad_b = bn_backward(
            grad_a, x, w, mean, var, ctx.eps, ctx.batch, ctx.needs_input_grad[0]
        )
        return grad_x, grad_w, grad_b, None, None, grad_cw, None, None, None, None


_MAX_POOL_BACKWARD = {
    4: aten.max_pool2d_with_indices_backward,
    5: aten.max_pool3d_with_indices_backward,
}
_MAX_POOL_INDICES = {4: F.max_pool2d, 5: F.max_pool3d}


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last (channels_last_3d) for such a 4D (5D) ``x``, else contiguous."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if fmt is not None and x.is_contiguous(memory_format=fmt) and not x.is_contiguous():
        return fmt
    return torch.contiguous_format


def _max_pool_indices(pool: nn.Module, a: Tensor) -> tuple[Tensor, Tensor]:
    """``pool(a)`` (a 2D or 3D max-pool module) and the argmax of each output."""
    return _MAX_POOL_INDICES[a.dim()](
        a, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode, True
    )


def _max_pool_backward(pool: nn.Module, grad: Tensor, a: Tensor, indices: Tensor) -> Tensor:
    """The gradient of ``pool(a)`` for ``a``, from the argmax ``indices`` of its forward."""
    per_axis = [_tuple(v, a) for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation)]
    return _MAX_POOL_BACKWARD[a.dim()](grad, a, *per_axis, pool.ceil_mode, indices)


def _tuple(value: int | tuple[int, ...], a: Tensor) -> list[int]:
    """A pooling argument per spatial axis of ``a``."""
    return list(value) if isinstance(value, tuple) else [value] * (a.dim() - 2)


def values_per_channel(x: Tensor, batch: bool) -> int:
    """M = N H W (N D H W in 3D, N L in 1D), the values a BatchNorm of (N, C, *spatial) ``x``
    normalises per channel; batch statistics need more than one, as ``nn.BatchNorm2d`` says."""
    m = x.shape[0] * math.prod(x.shape[2:])
    if batch and m == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )
    return m


def norm_tensors(norm: nn.Module | None) -> list[Tensor | None]:
    """An affine BatchNorm's weight, bias, and its running mean and variance (None in batch mode)."""
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or not norm.affine:
        raise TypeError(
            f"memory-efficient dense blocks need affine BatchNorm norms, got {norm!r}; "
            "build the model with memory_efficient=False"
        )
    if batch_mode(norm):
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


def batch_mode(norm: nn.BatchNorm2d) -> bool:
    """Whether ``norm`` normalises with batch statistics (else with its running ones)."""
    return norm.training or norm.running_mean is None


def conv_spec(conv: nn.Module) -> ConvSpec:
    """The spec of a 1D, 2D or 3D convolution with explicit zero padding."""
    if (
        not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        or conv.padding_mode != "zeros"
        or conv.padding == "same"
    ):
        raise TypeError(
            f"memory-efficient dense blocks need convolutions with explicit zero padding, got {conv!r}"
        )
    axes = (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))
    return ConvSpec(*axes, conv.groups, conv.out_channels)


def updates_running_stats(norm: nn.BatchNorm2d) -> bool:
    """Whether a forward of ``norm`` updates its running statistics."""
    return norm.training and norm.running_mean is not None and norm.running_var is not None


def update_running_stats(
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


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype batch statistics of ``dtype`` values are computed in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def var_mean(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-channel biased variance and mean of (N, C, *spatial) ``x``, computed in ``dtype``."""
    mean, var = torch.batch_norm_update_stats(x.to(dtype), None, None, 0.0)
    return var, mean


def bn_relu(x: Tensor, mean: Tensor, var: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    """relu(w (x - mean) / sqrt(var + eps) + b) per channel, a new tensor."""
    return F.batch_norm(x, mean, var, w, b, False, 0.0, eps).relu_()


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv(x: Tensor, w: Tensor, b: Tensor | None, spec: ConvSpec) -> Tensor:
    """The convolution ``spec`` describes (1D, 2D or 3D by its number of strides)."""
    function = _CONV[len(spec.stride)]
    return function(x, w, b, spec.stride, spec.padding, spec.dilation, spec.groups)


def conv_backward(
    grad: Tensor, x: Tensor, w: Tensor, b: Tensor | None, spec: ConvSpec
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of a convolution for its input, weight and bias (weight, bias in their dtypes)."""
    dtype = grad.dtype  # the dtype the forward convolution computed in (autocast or not)
    bias_sizes = None if b is None else [b.shape[0]]
    axes = [list(spec.stride), list(spec.padding), list(spec.dilation)]
    needed = [True, w.requires_grad, b is not None and b.requires_grad]
    gx, gw, gb = aten.convolution_backward(
        grad,
        x.to(dtype),
        w.to(dtype),
        bias_sizes,
        *axes,
        False,
        [0] * len(spec.stride),
        spec.groups,
        needed,
    )
    return gx, None if gw is None else gw.to(w.dtype), None if gb is None else gb.to(b.dtype)


def bn_backward(
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
        return aten.native_batch_norm_backward(
            grad, x, w, None, None, mean, invstd, True, eps, [need_input, True, True]
        )
    return aten.native_batch_norm_backward(
        grad, x, w, mean, var, None, None, False, eps, [need_input, True, True]
    )

"""Triton kernels for training a dense layer's bottleneck, BN-ReLU-Conv1x1, on a channels_last
block buffer with the BN-ReLU fused into the GEMMs (CUDA; CPU under ``TRITON_INTERPRET=1``).

Rows are pixels ``m = (n * H + h) * W + w`` of an (N, K, H, W) prefix ``x = buffer[:, :K]``,
read in place: row ``m`` starts at ``m`` times the buffer's channel count (its pixels are evenly
spaced, channel stride 1), so no kernel divides to find a pixel. With per-channel
``mean``, ``invstd``, ``gamma``, ``beta`` (K,) the BN-ReLU is

    xhat = (x - mean) * invstd,  pre = gamma * xhat + beta,  a = relu(pre)

and it is recomputed where it is loaded, never stored. For a weight ``w`` (C, K) (the 1x1
convolution's, C = bottleneck width):

- :func:`bn_relu_conv1x1`: ``y = a @ w^T`` (M, C);
- :func:`bn_relu_conv1x1_input_grad`: ``g = (dy @ w) * [pre > 0]``, accumulated as
  ``grad += g * gamma * invstd`` into the prefix's gradient, with the column sums ``sum_m g``
  and ``sum_m g * xhat`` (the BatchNorm bias and weight gradients);
- :func:`bn_relu_conv1x1_weight_grad`: ``dw = dy^T @ a`` (C, K), the rows split over programs.

Accumulation is in the statistics' dtype (float32, float64 for float64 inputs); the GEMM operands
are in the weight's dtype (the autocast dtype in mixed precision).

The gradients are deterministic: no atomics; each program writes its partial sums (of the
BatchNorm sums, of the weight gradient's row splits) to its own row of a scratch tensor that
torch then sums in a fixed order. They run with one fixed tile per operand width, not autotuned:
tuning would rerun the in-place accumulation into the gradient buffer, which it would first have
to copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from densenet.nn.kernels.conv import (
    _configs,
    _precision,
    _row_stride,
    configs_by_kind,
    m_bucket,
    pixel_grid,
)

__all__ = ["bn_relu_conv1x1", "bn_relu_conv1x1_input_grad", "bn_relu_conv1x1_weight_grad"]

# programs the weight gradient aims for (tiles x row splits): a few per SM of an H100
_WEIGHT_GRAD_PROGRAMS = 512
# tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) that compile for sm80 and sm90 without
# spilling (``python -m densenet.tasks.gpu_check``), for GEMMs on tensor cores (16-bit operands under
# autocast, or float32 as TF32) and IEEE float32 ones on the FMA units (they hold more
# registers): for the forward, autotuned; one for the input gradient; one of each kind for the
# weight gradient (IEEE float32 spilled at every larger tile tried)
FORWARD_TILES = {
    "tensor cores": [(128, 128, 32, 8, 3), (64, 64, 32, 4, 4)],
    "float32": [(64, 64, 32, 4, 4)],
}
INPUT_GRAD_TILE = (128, 64, 32, 8, 3)
WEIGHT_GRAD_TILES = {"tensor cores": [(128, 64, 64, 8, 3)], "float32": [(32, 32, 32, 4, 3)]}


def _by_unit(operand: str) -> Callable[[dict, dict], str]:
    """The tile group of a launch by ``operand``'s dtype and its ``PRECISION``."""

    def kind(named_args: dict, constexprs: dict) -> str:
        ieee = named_args[operand].element_size() >= 4 and constexprs["PRECISION"] != "tf32"
        return "float32" if ieee else "tensor cores"

    return kind


_FORWARD_CONFIGS, _forward_prune = configs_by_kind(FORWARD_TILES, _by_unit("w_ptr"))
_WEIGHT_GRAD_CONFIGS, _weight_grad_prune = configs_by_kind(WEIGHT_GRAD_TILES, _by_unit("dy_ptr"))


@triton.jit
def _rows(block, M, BLOCK_M: tl.constexpr):
    """Pixel rows ``block * BLOCK_M + [0, BLOCK_M)`` (int64) and which of them are < M."""
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows.to(tl.int64), rows < M


@triton.jit
def _bn_relu_tile(x_ptr, rows, row_ok, ks, k_ok, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr):
    """(xhat, pre) of a (rows, ks) tile of the prefix, in the statistics' dtype."""
    dtype = mean_ptr.dtype.element_ty
    x = tl.load(
        x_ptr + rows[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
    )
    mean = tl.load(mean_ptr + ks, mask=k_ok, other=0.0)[None, :]
    invstd = tl.load(invstd_ptr + ks, mask=k_ok, other=0.0)[None, :]
    gamma = tl.load(gamma_ptr + ks, mask=k_ok, other=0.0).to(dtype)[None, :]
    beta = tl.load(beta_ptr + ks, mask=k_ok, other=0.0).to(dtype)[None, :]
    xhat = (x.to(dtype) - mean) * invstd
    return xhat, gamma * xhat + beta


@triton.autotune(
    configs=_FORWARD_CONFIGS,
    key=["M_BUCKET", "C"],
    prune_configs_by={"early_config_prune": _forward_prune},
    cache_results=True,
)
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _forward_kernel(
    x_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, w_ptr, y_ptr,
    M, M_BUCKET, K, C, sx, sy,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y[m, c] = sum_k a[m, k] w[c, k]; a tile (BLOCK_M, BLOCK_N) of y per program."""
    rows, row_ok = _rows(tl.program_id(0), M, BLOCK_M)
    x_rows = rows * sx
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=mean_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        _, pre = _bn_relu_tile(
            x_ptr, x_rows, row_ok, ks, k_ok, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr
        )
        b_ok = k_ok[:, None] & col_ok[None, :]
        b = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=b_ok, other=0.0)
        acc = tl.dot(tl.maximum(pre, 0.0).to(b.dtype), b, acc, input_precision=PRECISION)
    y_ptrs = (y_ptr + rows * sy)[:, None] + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=_configs([INPUT_GRAD_TILE]), key=[])
@triton.jit(do_not_specialize=["M"])
def _input_grad_kernel(
    dy_ptr, w_ptr, x_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, grad_ptr, sums_ptr,
    M, K, C, sd, sx, sg,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """g = (dy @ w) * [pre > 0] on a tile (BLOCK_M, BLOCK_N) of prefix channels, reduced over
    the C bottleneck channels in steps of BLOCK_K; grad += g gamma invstd; the tile's column
    sums ``sum_m g`` and ``sum_m g xhat`` go to row ``program_id(0)`` of sums (rows, 2, K)."""
    rows, row_ok = _rows(tl.program_id(0), M, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < K
    dy_rows = dy_ptr + rows * sd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=mean_ptr.dtype.element_ty)
    for c0 in range(0, C, BLOCK_K):
        cs = c0 + tl.arange(0, BLOCK_K)
        c_ok = cs < C
        dy = tl.load(
            dy_rows[:, None] + cs[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0
        )
        b_ok = c_ok[:, None] & k_ok[None, :]
        b = tl.load(w_ptr + cs[:, None] * K + ks[None, :], mask=b_ok, other=0.0)
        acc = tl.dot(dy.to(b.dtype), b, acc, input_precision=PRECISION)
    xhat, pre = _bn_relu_tile(
        x_ptr, rows * sx, row_ok, ks, k_ok, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr
    )
    g = tl.where(pre > 0, acc, 0.0)
    scale = tl.load(gamma_ptr + ks, mask=k_ok, other=0.0).to(acc.dtype)
    scale *= tl.load(invstd_ptr + ks, mask=k_ok, other=0.0)
    ok = row_ok[:, None] & k_ok[None, :]
    grad_ptrs = (grad_ptr + rows * sg)[:, None] + ks[None, :]
    grad = tl.load(grad_ptrs, mask=ok)
    tl.store(grad_ptrs, (grad + g * scale[None, :]).to(grad_ptr.dtype.element_ty), mask=ok)
    sums = sums_ptr + tl.program_id(0).to(tl.int64) * 2 * K
    tl.store(sums + ks, tl.sum(g, axis=0), mask=k_ok)
    tl.store(sums + K + ks, tl.sum(g * xhat, axis=0), mask=k_ok)


@triton.autotune(
    configs=_WEIGHT_GRAD_CONFIGS,
    key=[],
    prune_configs_by={"early_config_prune": _weight_grad_prune},
)
@triton.jit(do_not_specialize=["M"])
def _weight_grad_kernel(
    dy_ptr, x_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, dw_ptr,
    M, K, C, sd, sx,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dw[s, c, k] = sum_m dy[m, c] a[m, k] over split s = program_id(2) of the rows (split
    evenly, in steps of BLOCK_M): a tile (BLOCK_N bottleneck channels, BLOCK_K prefix channels)
    of dw per program on axes 0 and 1."""
    cs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cs < C
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    blocks = tl.cdiv(tl.cdiv(M, BLOCK_M), tl.num_programs(2))
    first = tl.program_id(2) * blocks
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=mean_ptr.dtype.element_ty)
    for block in range(first, first + blocks):
        rows, row_ok = _rows(block, M, BLOCK_M)
        dy_ptrs = (dy_ptr + rows * sd)[:, None] + cs[None, :]
        dy = tl.load(dy_ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        _, pre = _bn_relu_tile(
            x_ptr, rows * sx, row_ok, ks, k_ok, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr
        )
        a = tl.maximum(pre, 0.0).to(dy.dtype)
        acc = tl.dot(tl.trans(dy), a, acc, input_precision=PRECISION)
    dw_ptrs = dw_ptr + tl.program_id(2).to(tl.int64) * C * K + cs[:, None] * K + ks[None, :]
    tl.store(dw_ptrs, acc, mask=c_ok[:, None] & k_ok[None, :])


def _check(x: Tensor, c: int, weight_shape: tuple[int, ...], stats: tuple[Tensor, ...]) -> int:
    """The pixel count M, once the shapes fit a prefix ``x`` (N, K, H, W) and C output channels."""
    k = x.shape[1]
    if weight_shape != (c, k) or any(t.shape != (k,) for t in stats):
        raise ValueError(
            f"bn_relu_conv1x1: prefix {tuple(x.shape)}, weight {weight_shape} and per-channel "
            f"tensors {[tuple(t.shape) for t in stats]} do not fit"
        )
    return x.shape[0] * x.shape[2] * x.shape[3]


def bn_relu_conv1x1(
    x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor, weight: Tensor
) -> Tensor:
    """``conv1x1(relu(gamma (x - mean) invstd + beta), weight)``, the BN-ReLU applied on load.

    Args:
        x: (N, K, H, W) channels_last view, e.g. ``buffer[:, :K]``.
        mean, invstd: (K,) in the statistics' dtype (float32, or float64); gamma, beta: (K,).
        weight: (C, K) in the GEMM's dtype.

    Returns (N, C, H, W) channels_last in the weight's dtype.
    """
    batch, k, height, width = x.shape
    c = weight.shape[0]
    m = _check(x, c, tuple(weight.shape), (mean, invstd, gamma, beta))
    shape = (batch, c, height, width)
    y = torch.empty(shape, dtype=weight.dtype, device=x.device, memory_format=torch.channels_last)

    _forward_kernel[pixel_grid(m, c)](
        x, mean, invstd, gamma, beta, weight.contiguous(), y,
        m, m_bucket(m), k, c, _row_stride(x, "x"), _row_stride(y, "y"),
        PRECISION=_precision(weight.dtype),
    )  # fmt: skip
    return y


def bn_relu_conv1x1_input_grad(
    dy: Tensor,
    weight: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    gamma: Tensor,
    beta: Tensor,
    grad: Tensor,
) -> tuple[Tensor, Tensor]:
    """Accumulate ``g * gamma * invstd`` into ``grad`` (in place), where
    ``g = conv1x1_input_grad(dy, weight) * [gamma (x - mean) invstd + beta > 0]`` is the gradient
    at the BatchNorm's output, and return ``(sum_m g, sum_m g xhat)`` (K,): the BatchNorm's bias
    and weight gradients (in the statistics' dtype).

    Args:
        dy: (N, C, H, W) channels_last, the gradient of :func:`bn_relu_conv1x1`'s output.
        weight, x, mean, invstd, gamma, beta: as for :func:`bn_relu_conv1x1`.
        grad: (N, K, H, W) channels_last view in the statistics' dtype, e.g. ``grad_buffer[:, :K]``.
    """
    batch, k, height, width = x.shape
    c = weight.shape[0]
    m = _check(x, c, tuple(weight.shape), (mean, invstd, gamma, beta))
    if dy.shape != (batch, c, height, width) or grad.shape != x.shape:
        raise ValueError(
            f"bn_relu_conv1x1_input_grad: dy {tuple(dy.shape)} and grad {tuple(grad.shape)} do "
            f"not fit prefix {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    tile = _input_grad_kernel.configs[0].kwargs
    grid = (triton.cdiv(m, tile["BLOCK_M"]), triton.cdiv(k, tile["BLOCK_N"]))
    sums = torch.empty((grid[0], 2, k), dtype=mean.dtype, device=x.device)
    _input_grad_kernel[grid](
        dy, weight.contiguous(), x, mean, invstd, gamma, beta, grad, sums,
        m, k, c, _row_stride(dy, "dy"), _row_stride(x, "x"), _row_stride(grad, "grad"),
        PRECISION=_precision(weight.dtype),
    )  # fmt: skip
    sums = sums.sum(0)
    return sums[0], sums[1]


def bn_relu_conv1x1_weight_grad(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor
) -> Tensor:
    """``dy^T @ relu(gamma (x - mean) invstd + beta)`` over pixels: the gradient (C, K) of
    :func:`bn_relu_conv1x1`'s weight, in the statistics' dtype; arguments as there."""
    batch, k, height, width = x.shape
    c = dy.shape[1]
    m = _check(x, c, (c, k), (mean, invstd, gamma, beta))
    if dy.shape != (batch, c, height, width):
        raise ValueError(f"bn_relu_conv1x1_weight_grad: dy {tuple(dy.shape)}, x {tuple(x.shape)}")
    precision = _precision(dy.dtype)
    (config,) = _weight_grad_prune(_weight_grad_kernel.configs, {"dy_ptr": dy}, PRECISION=precision)
    tile = config.kwargs
    tiles = triton.cdiv(c, tile["BLOCK_N"]), triton.cdiv(k, tile["BLOCK_K"])
    splits = min(triton.cdiv(m, tile["BLOCK_M"]), max(1, _WEIGHT_GRAD_PROGRAMS // math.prod(tiles)))
    dw = torch.empty((splits, c, k), dtype=mean.dtype, device=x.device)
    _weight_grad_kernel[(*tiles, splits)](
        dy, x, mean, invstd, gamma, beta, dw,
        m, k, c, _row_stride(dy, "dy"), _row_stride(x, "x"),
        PRECISION=precision,
    )  # fmt: skip
    return dw.sum(0)

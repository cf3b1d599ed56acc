"""Triton convolutions for the inference form of a DenseNet, on channels_last tensors.

Both kernels are GEMMs over pixels: rows are the output pixels ``m = (n * H_out + h) * W_out + w``,
the reduction runs over input channels (and, for the 3x3 convolution, the nine taps), and columns
are output channels. Tensors are addressed by their (batch, height, width) strides with channel
stride 1, so an input can be a channel prefix of a dense block's buffer and an output a channel
slice of one (row stride = the buffer's channel count), with no copy either way. Accumulation is
float32; float32 products are exact IEEE unless ``torch.backends.cuda.matmul.allow_tf32`` is set.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (slowly), which is how they are tested.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["conv3x3", "pointwise_conv"]

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


Tile = tuple[int, int, int, int, int]  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages


def _configs(shapes: list[Tile]) -> list[triton.Config]:
    """Autotuning candidates ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``; one small
    tile under the interpreter, where tuning would only multiply the (slow) runs."""
    if INTERPRETED:
        shapes = [(32, 16, 32, 1, 1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def configs_by_kind(
    tiles: dict[str, list[Tile]], kind: Callable[[dict, dict], str]
) -> tuple[list[triton.Config], Callable[..., list[triton.Config]]]:
    """Autotuning candidates in named groups of tiles, and the ``early_config_prune`` that keeps
    the group ``kind(arguments, constexprs)`` names for a launch; a list that tests replaced is
    kept whole."""
    groups = {name: _configs(group) for name, group in tiles.items()}
    every = [config for group in groups.values() for config in group]

    def prune(configs: list[triton.Config], named_args: dict, **constexprs: object) -> list:
        return groups[kind(named_args, constexprs)] if configs is every else configs

    return every, prune


def _by_alignment(named_args: dict, constexprs: dict) -> str:
    """The tile group of a launch whose ``ALIGNED`` says whether every channel count and stride
    it was given is a multiple of 16."""
    return "aligned" if constexprs["ALIGNED"] else "unaligned"


def _aligned(*integers: int) -> bool:
    """Whether all are multiples of 16: Triton's JIT then knows them to be, and vectorises the
    loads they address; other launches need smaller tiles to fit in registers."""
    return all(i % 16 == 0 for i in integers)


# Hopper-sized tiles: wide N for the bottleneck (4k = 128 or 192 channels) and the transitions,
# narrow N for the growth convolution (k = 12 ... 48 channels); smaller ones where a channel
# count or stride is not a multiple of 16 (k = 12: its loads are not vectorised, so they hold
# more registers). Each compiles for sm80 and sm90 within their shared memory and 255
# registers, without spilling (``python -m densenet.tasks.gpu_check``); larger tiles spilled or
# overflowed.
POINTWISE_TILES = {
    "aligned": [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 32, 4, 4)],
    "unaligned": [(64, 32, 32, 4, 3), (64, 64, 16, 4, 3)],
}
GROWTH_TILES = {
    "aligned": [(128, 32, 64, 4, 4), (256, 32, 64, 8, 3), (128, 64, 64, 4, 4), (64, 32, 64, 4, 4)],
    "unaligned": [(64, 16, 32, 4, 3), (64, 32, 32, 4, 3)],
}
_POINTWISE_CONFIGS, _pointwise_prune = configs_by_kind(POINTWISE_TILES, _by_alignment)
_GROWTH_CONFIGS, _growth_prune = configs_by_kind(GROWTH_TILES, _by_alignment)


# The pixel counts (M, and H, W) are never specialised (``do_not_specialize``): a new batch or
# image size then reuses the compiled kernels, whose loads are vectorised by the channel counts
# and strides (multiples of 16 in the ImageNet DenseNets) instead. Autotuning is keyed by
# ``M_BUCKET``, M rounded up to a power of two (an argument the kernels do not read): a new
# batch size whose bucket was seen is neither compiled nor tuned again. The tuning results are
# cached on disk (Triton's cache directory): another process does not tune a seen bucket again.
PIXEL_ARGUMENTS = ("M", "M_BUCKET", "H", "W", "H_OUT", "W_OUT")


def pixel_grid(m: int, columns: int) -> Callable[[dict], tuple[int, int]]:
    """The launch grid of a kernel that tiles (``m`` pixel rows, ``columns``) by its config's
    (BLOCK_M, BLOCK_N)."""

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(columns, meta["BLOCK_N"])

    return grid


def m_bucket(m: int) -> int:
    """The autotuning bucket of ``m`` pixel rows: the next power of two."""
    return 1 << max(0, m - 1).bit_length()


@triton.jit
def _pixel_rows(pid_m, M, H_OUT, W_OUT, BLOCK_M: tl.constexpr):
    """The block's output-pixel rows as (n, h, w) int64 vectors and a validity mask."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < M
    rows = rows.to(tl.int64)
    n = rows // (H_OUT * W_OUT)
    rest = rows % (H_OUT * W_OUT)
    return n, rest // W_OUT, rest % W_OUT, valid


# Tuned per pixel-count bucket and output width, not per input width: the layers of a block
# differ only in K, and tuning each (about 0.1 s per candidate) would cost minutes per batch size.
@triton.autotune(
    configs=_POINTWISE_CONFIGS,
    key=["M_BUCKET", "N", "POOL", "ALIGNED"],
    cache_results=True,
    prune_configs_by={"early_config_prune": _pointwise_prune},
)
@triton.jit(do_not_specialize=["M", "M_BUCKET", "H_OUT", "W_OUT"])
def _pointwise_kernel(
    x_ptr, w_ptr, bias_ptr, low_ptr, high_ptr, y_ptr,
    M, M_BUCKET, K, N, H_OUT, W_OUT,
    sxn, sxh, sxw, syn, syh, syw,
    POOL: tl.constexpr, RELU: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n, h, w, row_ok = _pixel_rows(pid_m, M, H_OUT, W_OUT, BLOCK_M)
    if POOL:  # the top-left pixel of the 2x2 cell
        x_rows = x_ptr + n * sxn + (2 * h) * sxh + (2 * w) * sxw
    else:
        x_rows = x_ptr + n * sxn + h * sxh + w * sxw
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        low = tl.load(low_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        high = tl.load(high_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        a_ok = row_ok[:, None] & k_ok[None, :]
        a_ptrs = x_rows[:, None] + ks[None, :]
        if POOL:
            a = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for dy in tl.static_range(2):
                for dx in tl.static_range(2):
                    v = tl.load(a_ptrs + dy * sxh + dx * sxw, mask=a_ok, other=0.0)
                    a += tl.minimum(tl.maximum(v.to(tl.float32), low), high)
            a = a * 0.25
        else:
            v = tl.load(a_ptrs, mask=a_ok, other=0.0)
            a = tl.minimum(tl.maximum(v.to(tl.float32), low), high)
        b = tl.load(
            w_ptr + ks[:, None] * N + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0
        )
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)
    acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    y_ptrs = (y_ptr + n * syn + h * syh + w * syw)[:, None] + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(
    configs=_GROWTH_CONFIGS,
    key=["M_BUCKET", "C", "N", "AFFINE_RELU", "ALIGNED"],
    cache_results=True,
    prune_configs_by={"early_config_prune": _growth_prune},
)
@triton.jit(do_not_specialize=["M", "M_BUCKET", "H", "W"])
def _conv3x3_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr,
    M, M_BUCKET, C, N, H, W,
    sxn, sxh, sxw, syn, syh, syw,
    AFFINE_RELU: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n, h, w, row_ok = _pixel_rows(pid_m, M, H, W, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + n * sxn + h * sxh + w * sxw  # the centre tap's pixels
    chunks = tl.cdiv(C, BLOCK_K)
    # one reduction over K = 9 taps x C channels, in chunks of BLOCK_K channels of one tap: a
    # single loop that the compiler pipelines across taps (loads of the next tap's chunk
    # overlap this one's products)
    for step in range(0, 9 * chunks):
        tap = step // chunks
        dy = tap // 3 - 1
        dx = tap % 3 - 1
        cs = (step - tap * chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
        c_ok = cs < C
        hh = h + dy
        ww = w + dx
        inside = row_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        a_ok = inside[:, None] & c_ok[None, :]
        a = tl.load((x_rows + dy * sxh + dx * sxw)[:, None] + cs[None, :], mask=a_ok, other=0.0)
        b = tl.load(
            w_ptr + (tap * C + cs)[:, None] * N + cols[None, :],
            mask=c_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if AFFINE_RELU:  # BN-ReLU of the input; the zero padding stays zero
            s = tl.load(scale_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            t = tl.load(shift_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            a = tl.where(a_ok, tl.maximum(a.to(tl.float32) * s + t, 0.0), 0.0)
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)
    y_ptrs = (y_ptr + n * syn + h * syh + w * syw)[:, None] + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _precision(dtype: torch.dtype) -> str:
    """IEEE float32 products unless torch itself is allowed TF32 (irrelevant for bf16/fp16)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _pixel_strides(t: Tensor, name: str) -> tuple[int, int, int]:
    """The (batch, height, width) strides of an (N, C, H, W) view with channel stride 1."""
    if t.dim() != 4 or t.stride(1) != 1:
        raise ValueError(f"{name} must be a 4-d channels_last tensor (channel stride 1)")
    return t.stride(0), t.stride(2), t.stride(3)


def _row_stride(t: Tensor, name: str) -> int:
    """The one stride between consecutive pixels (rows ``(n * H + h) * W + w``) of an
    (N, C, H, W) view with channel stride 1 and evenly spaced pixels: a channels_last tensor or
    a channel slice of one. Kernels then address row ``m`` as ``m * stride``, with no division."""
    _pixel_strides(t, name)
    try:
        return t.permute(0, 2, 3, 1).view(-1, t.shape[1]).stride(0)
    except RuntimeError:
        raise ValueError(
            f"{name}'s pixels are not evenly spaced (strides {t.stride()}): give a channels_last "
            "tensor or a channel slice of one"
        ) from None


def pointwise_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    low: Tensor,
    high: Tensor,
    out: Tensor,
    *,
    pool: bool = False,
    relu: bool = False,
) -> Tensor:
    """A 1x1 convolution of the clamped input, optionally 2x2-average-pooled first:

        out[n, :, i, j] = act(bias + weight^T @ mean_{a,b} clamp(x[n, :, s*i + a, s*j + b], low, high))

    with ``s = 2`` and ``a, b`` in {0, 1} when ``pool`` (floor mode, as ``avg_pool2d(., 2)``;
    the clamp comes before the pooling), else ``s = 1`` and ``a = b = 0``; ``act`` is ReLU when
    ``relu``, else the identity. ``clamp(x, low, high) = min(max(x, low), high)`` per channel.

    Args:
        x: (N, K, H, W) channels_last view, e.g. ``buffer[:, :K]`` of a block buffer.
        weight: (K, C_out) contiguous, the convolution's weight transposed.
        bias: (C_out,); low, high: (K,) (``high`` may hold +inf).
        out: (N, C_out, H_out, W_out) channels_last view, written in place and returned;
            H_out, W_out = H // 2, W // 2 when ``pool``, else H, W.
    """
    batch, k, height, width = x.shape
    h_out, w_out = (height // 2, width // 2) if pool else (height, width)
    c_out = weight.shape[1]
    if weight.shape[0] != k or out.shape != (batch, c_out, h_out, w_out):
        raise ValueError(
            f"pointwise_conv: input {tuple(x.shape)}, weight {tuple(weight.shape)} and output "
            f"{tuple(out.shape)} do not fit (pool={pool})"
        )
    m = batch * h_out * w_out
    strides = *_pixel_strides(x, "x"), *_pixel_strides(out, "out")

    _pointwise_kernel[pixel_grid(m, c_out)](
        x, weight.contiguous(), bias, low, high, out,
        m, m_bucket(m), k, c_out, h_out, w_out, *strides,
        POOL=pool, RELU=relu, PRECISION=_precision(x.dtype), ALIGNED=_aligned(k, c_out, *strides),
    )  # fmt: skip
    return out


def conv3x3(
    x: Tensor,
    weight: Tensor,
    out: Tensor,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
) -> Tensor:
    """A 3x3 convolution, stride 1, zero padding 1, no bias, as an implicit GEMM:

        out[n, o, i, j] = sum_{c, a, b} weight[(3a + b) * C + c, o] * act(x)[n, c, i + a - 1, j + b - 1]

    where ``act(x) = relu(scale * x + shift)`` per channel when ``scale`` and ``shift`` are given
    (a BN-ReLU that cannot fold into the weights, because the padding must stay zero), else ``x``,
    and pixels outside the image are zero.

    Args:
        x: (N, C, H, W) channels_last view.
        weight: (9 * C, C_out) contiguous: ``conv.weight.permute(2, 3, 1, 0).reshape(9 * C, C_out)``.
        out: (N, C_out, H, W) channels_last view, e.g. ``buffer[:, c0 : c0 + C_out]``; written in
            place and returned.
        scale, shift: (C,) or both None.
    """
    batch, c, height, width = x.shape
    c_out = weight.shape[1]
    if weight.shape[0] != 9 * c or out.shape != (batch, c_out, height, width):
        raise ValueError(
            f"conv3x3: input {tuple(x.shape)}, weight {tuple(weight.shape)} and output "
            f"{tuple(out.shape)} do not fit"
        )
    if (scale is None) != (shift is None):
        raise ValueError("conv3x3: give both scale and shift, or neither")
    m = batch * height * width

    affine = scale is not None
    strides = *_pixel_strides(x, "x"), *_pixel_strides(out, "out")
    _conv3x3_kernel[pixel_grid(m, c_out)](
        x, weight.contiguous(), scale if affine else weight, shift if affine else weight, out,
        m, m_bucket(m), c, c_out, height, width, *strides,
        AFFINE_RELU=affine, PRECISION=_precision(x.dtype), ALIGNED=_aligned(c, c_out, *strides),
    )  # fmt: skip
    return out

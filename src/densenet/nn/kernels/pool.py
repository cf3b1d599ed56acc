"""The ImageNet stem's ReLU and 3x3 max-pool (padding 1) in one pass that writes its result
straight into the first channels of block 1's buffer, on channels_last tensors (CUDA; CPU under
``TRITON_INTERPRET=1``).

ReLU and max-pooling commute (both are monotonic), and ``relu(max(window))`` is
``max(0, max(window))``: the running maximum starts at zero, so the padding, read as zero, never
wins over a real value that a ReLU would keep.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from densenet.nn.kernels.conv import _pixel_rows, _pixel_strides, pixel_grid

__all__ = ["pooled_size", "relu_max_pool"]

# (BLOCK_M output pixels, BLOCK_N channels), warps: a memory-bound pass; the stem has 64
# channels (96 for densenet161)
POOL_TILE = (64, 64, 4)


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": POOL_TILE[0], "BLOCK_N": POOL_TILE[1]}, num_warps=POOL_TILE[2])
    ],
    key=[],
)
@triton.jit(do_not_specialize=["M", "H", "W", "H_OUT", "W_OUT"])
def _relu_max_pool_kernel(
    x_ptr, y_ptr,
    M, C, H, W, H_OUT, W_OUT, STRIDE_H, STRIDE_W,
    sxn, sxh, sxw, syn, syh, syw,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    n, i, j, row_ok = _pixel_rows(tl.program_id(0), M, H_OUT, W_OUT, BLOCK_M)
    cs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cs < C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty)
    for tap in tl.static_range(9):
        hh = i * STRIDE_H + (tap // 3 - 1)
        ww = j * STRIDE_W + (tap % 3 - 1)
        inside = row_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        x_ptrs = (x_ptr + n * sxn + hh * sxh + ww * sxw)[:, None] + cs[None, :]
        v = tl.load(x_ptrs, mask=inside[:, None] & c_ok[None, :], other=0.0)
        acc = tl.maximum(acc, v.to(acc.dtype))
    y_ptrs = (y_ptr + n * syn + i * syh + j * syw)[:, None] + cs[None, :]
    tl.store(y_ptrs, acc, mask=row_ok[:, None] & c_ok[None, :])


def pooled_size(height: int, width: int, stride: tuple[int, int]) -> tuple[int, int]:
    """(H_out, W_out) of the 3x3 max-pool with padding 1 and ``stride`` on an (H, W) input."""
    return (height - 1) // stride[0] + 1, (width - 1) // stride[1] + 1


def relu_max_pool(x: Tensor, out: Tensor, stride: tuple[int, int] = (2, 2)) -> Tensor:
    """``relu(max_pool2d(x, 3, stride, padding=1))``, written into ``out`` and returned.

    Args:
        x: (N, C, H, W) channels_last, the stem convolution's output.
        out: (N, C, H_out, W_out) channels_last view, e.g. ``buffer[:, :C]`` of block 1's buffer,
            with (H_out, W_out) = ``pooled_size(H, W, stride)``.
    """
    batch, c, height, width = x.shape
    h_out, w_out = pooled_size(height, width, stride)
    if out.shape != (batch, c, h_out, w_out):
        raise ValueError(
            f"relu_max_pool: input {tuple(x.shape)} and output {tuple(out.shape)} do not fit "
            f"(stride {stride})"
        )
    m = batch * h_out * w_out

    _relu_max_pool_kernel[pixel_grid(m, c)](
        x, out,
        m, c, height, width, h_out, w_out, *stride,
        *_pixel_strides(x, "x"), *_pixel_strides(out, "out"),
    )  # fmt: skip
    return out

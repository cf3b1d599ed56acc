"""densenet.nn.kernels.training: the fused BN-ReLU-Conv1x1 kernels against torch autograd, float32
and float64, on a channel prefix of a channels_last buffer.

Without a GPU they run on the CPU under the Triton interpreter, in a subprocess started by
``test_kernels_under_the_interpreter`` (the interpreter must be on before triton is imported).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    KERNEL_DEVICE,
    KERNELS_RUN_HERE,
    TRITON_INTERPRETED,
    needs_kernels,
    run_under_the_interpreter,
)
from test_memory import _CountOps, assert_same_run, inputs, pair, run, set_mode

pytest.importorskip("triton")
from densenet.nn.kernels import training as kernels  # noqa: E402 (needs triton)

DEVICE = KERNEL_DEVICE


@pytest.mark.slow
@pytest.mark.skipif(KERNELS_RUN_HERE, reason="the kernel tests run in this process")
def test_kernels_under_the_interpreter():
    run_under_the_interpreter(__file__)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def problem(dtype: torch.dtype, k: int = 40, c: int = 24, side: int = 5):
    """A prefix of K channels of a channels_last (2, K + 8, side, side) buffer (M = 50 pixels by
    default, not a multiple of the tile), BatchNorm statistics and affine parameters, a 1x1
    weight (C, K)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(DEVICE)

    buffer = randn(2, k + 8, side, side).contiguous(memory_format=torch.channels_last)
    x = buffer[:, :k]
    mean, var = randn(k) * 0.3, randn(k).abs() + 0.5
    gamma, beta = randn(k), randn(k)
    gamma[0] = 0.0  # a dead channel
    return x, mean, torch.rsqrt(var + 1e-5), var, gamma, beta, randn(c, k) / k**0.5


def reference(x, mean, var, gamma, beta, weight):
    """Torch autograd through batch_norm (given statistics), ReLU and a 1x1 convolution."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, gamma, beta, weight)]
    xr, gr, br, wr = leaves
    a = F.batch_norm(xr, mean, var, gr, br, False, 0.0, 1e-5).relu()
    return F.conv2d(a, wr[:, :, None, None]), leaves


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_gradients_equal_autograd(dtype):
    from densenet.nn.kernels import training

    x, mean, invstd, var, gamma, beta, weight = problem(dtype)
    y_ref, (xr, gr, br, wr) = reference(x, mean, var, gamma, beta, weight)
    dy = torch.randn_like(y_ref).contiguous(memory_format=torch.channels_last)
    y_ref.backward(dy)
    tol = 1e-12 if dtype == torch.float64 else 1e-5

    y = training.bn_relu_conv1x1(x, mean, invstd, gamma, beta, weight)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel(y, y_ref) < tol

    # the BatchNorm input gradient with the statistics held fixed: g * gamma * invstd, added to
    # what the gradient buffer held
    grad_buffer = torch.randn(x.shape[0], x.shape[1] + 8, *x.shape[2:], dtype=dtype, device=DEVICE)
    grad_buffer = grad_buffer.contiguous(memory_format=torch.channels_last)
    before = grad_buffer.clone()
    k = x.shape[1]
    db, dg = training.bn_relu_conv1x1_input_grad(
        dy, weight, x, mean, invstd, gamma, beta, grad_buffer[:, :k]
    )
    assert rel(grad_buffer[:, :k] - before[:, :k], xr.grad) < tol
    assert torch.equal(grad_buffer[:, k:], before[:, k:])
    assert rel(db, br.grad) < tol
    assert rel(dg, gr.grad) < tol

    dw = training.bn_relu_conv1x1_weight_grad(dy, x, mean, invstd, gamma, beta)
    assert rel(dw, wr.grad) < tol


PRODUCTION = [(torch.float16, t) for t in kernels.FORWARD_TILES["tensor cores"]] + [
    (torch.float32, t) for t in kernels.FORWARD_TILES["float32"]
]


@needs_kernels
@pytest.mark.parametrize(("dtype", "tile"), PRODUCTION, ids=str)
def test_production_tiles_in_float16_and_float32(monkeypatch, tile, dtype):
    """The forward with each tile the GPU can pick for the operands' dtype, the gradients with
    theirs (several K steps, two N tiles, masked edges, several row blocks and weight-gradient
    row splits), in float16 operands as autocast gives them and in float32, with float32
    statistics."""
    from test_kernels import force_tile

    from densenet.nn.kernels import training

    unit = "tensor cores" if dtype == torch.float16 else "float32"
    force_tile(monkeypatch, training._forward_kernel, tile)
    force_tile(monkeypatch, training._input_grad_kernel, training.INPUT_GRAD_TILE)
    force_tile(monkeypatch, training._weight_grad_kernel, training.WEIGHT_GRAD_TILES[unit][0])
    k, c = 2 * tile[2] + 5, tile[1] + 9
    x, mean, invstd, var, gamma, beta, weight = problem(torch.float32, k, c, side=13)
    x, weight = x.to(dtype), weight.to(dtype)
    exact = (t.double() for t in (x, mean, var, gamma, beta, weight))
    y_ref, (xr, gr, br, wr) = reference(*exact)
    dy = torch.randn_like(y_ref).to(dtype).contiguous(memory_format=torch.channels_last)
    y_ref.backward(dy.double())

    tol = 2e-3 if dtype == torch.float16 else 1e-5
    assert rel(training.bn_relu_conv1x1(x, mean, invstd, gamma, beta, weight), y_ref) < tol
    grad = torch.zeros(x.shape, device=DEVICE).contiguous(memory_format=torch.channels_last)
    db, dg = training.bn_relu_conv1x1_input_grad(dy, weight, x, mean, invstd, gamma, beta, grad)
    assert rel(grad, xr.grad) < tol and rel(db, br.grad) < tol and rel(dg, gr.grad) < tol
    dw = training.bn_relu_conv1x1_weight_grad(dy, x, mean, invstd, gamma, beta)
    assert rel(dw, wr.grad) < tol
    # no atomics: the same gradients, bit for bit, every time
    again = torch.zeros_like(grad)
    assert torch.equal(
        training.bn_relu_conv1x1_input_grad(dy, weight, x, mean, invstd, gamma, beta, again)[1],
        dg,
    )
    assert torch.equal(again, grad)
    assert torch.equal(training.bn_relu_conv1x1_weight_grad(dy, x, mean, invstd, gamma, beta), dw)


@needs_kernels
@pytest.mark.skipif(TRITON_INTERPRETED, reason="the Triton interpreter has no bfloat16 arithmetic")
def test_bfloat16_operands_accumulate_in_float32():
    from densenet.nn.kernels import training

    x, mean, invstd, var, gamma, beta, weight = problem(torch.float32)
    y_ref, _ = reference(x, mean, var, gamma, beta, weight)
    y = training.bn_relu_conv1x1(x.bfloat16(), mean, invstd, gamma, beta, weight.bfloat16())
    assert y.dtype == torch.bfloat16
    assert rel(y, y_ref) < 2e-2


@needs_kernels
def test_shapes_that_do_not_fit_and_uneven_pixels_raise():
    from densenet.nn.kernels import training

    x, mean, invstd, _, gamma, beta, weight = problem(torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        training.bn_relu_conv1x1(x, mean, invstd, gamma, beta, weight[:, :-1])
    with pytest.raises(ValueError, match="not evenly spaced"):  # rows are found by one stride
        training.bn_relu_conv1x1(x[:, :, 1:], mean, invstd, gamma, beta, weight)


@needs_kernels
@pytest.mark.parametrize("mode", ["train", "frozen_bn"])
def test_triton_model_gradients_and_running_statistics_equal_plain(mode):
    plain, fused = pair("imagenet", drop_rate=0.2)
    fused.set_memory_efficient("triton")
    for model in (plain, fused):
        model.to(DEVICE, memory_format=torch.channels_last)
        set_mode(model, mode)
    x = inputs("imagenet").to(DEVICE).contiguous(memory_format=torch.channels_last)
    assert_same_run(run(fused, x), run(plain, x))
    for name, value in plain.state_dict().items():
        assert torch.allclose(fused.state_dict()[name], value, rtol=1e-10, atol=0), name
    counts = []
    for model in (plain, fused):
        with _CountOps() as ops:
            model(x).sum().backward()
        counts.append(ops.counts["convolution"])
    layers = sum(fused.config["block_config"])
    assert counts[1] == counts[0] - layers  # every bottleneck convolution ran in the kernels

"""Memory-efficient training of an RDNet dense stage: one buffer for the stage's features, no
concatenation kept, and no 1x1 convolution recomputed.

A stage of L blocks feeds block i the concatenation of the stage input and the i earlier
outputs. A plain autograd graph keeps, for every block, that concatenation (memory quadratic in
L), the depthwise convolution's output, the LayerNorm's output (C_i channels each), the
expansion's output and its GELU (the expansion width, about 4 C_i, each) and the projection's
output. Here the whole stage is one autograd function:

- forward: one buffer (N, C0 + L k, H, W) holds the stage's features; block i reads its prefix
  ``buffer[:, :C_i]`` in place (a strided view) and writes its k channels into the next slice.
  Saved for backward: the buffer (the stage's output, which the next transition keeps anyway),
  each block's expansion output ``h`` (before GELU) and projection output ``p`` (k channels),
  and the stochastic depth and dropout masks;
- backward, from the last block to the first: the depthwise convolution and LayerNorm are
  recomputed from the prefix and the GELU from ``h`` (depthwise and elementwise passes); the
  two 1x1 convolutions, the block's costly products, are not: their gradients come from the
  saved ``h`` and ``p`` and the recomputed inputs. Channel c of the buffer's gradient sums the
  gradients of every block reading it, in place.

Gradients equal the plain stage's (to rounding). Stochastic depth and dropout draw their masks
as the plain block does, in the same order, so a seeded step matches the plain model's. Under
autocast, backward recomputes under the forward's autocast state.

``densenet.nn.rdnet.DenseStage`` calls :func:`memory_efficient_stage` with its blocks when it is
memory-efficient and gradients are enabled; this module reads the blocks' parts by their names
(``layers.layers``, ``gamma``, ``drop_path_rate``, ``proj_drop_rate``) and knows no model class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from densenet.nn.bn_relu import conv_backward, conv_spec, memory_format

__all__ = ["memory_efficient_stage"]


def memory_efficient_stage(blocks: Sequence[nn.Module], x: Tensor) -> Tensor:
    """Run an RDNet stage's dense ``blocks`` on ``x`` (N, C0, H, W) as one memory-efficient
    autograd function: (N, C0 + L k, H, W), equal to the plain stage's output (the input and
    every block's features concatenated), with exact gradients for ``x`` and every parameter."""
    blocks = list(blocks)
    tensors: list[Tensor | None] = []
    for block in blocks:
        tensors += _parameters(block)
    return _StageFunction.apply(tuple(blocks), x, *tensors)


def _parameters(block: nn.Module) -> list[Tensor | None]:
    """A block's parameters as the autograd function takes them: the depthwise convolution's
    weight and bias [0:2], the LayerNorm's [2:4], the expansion's [4:6], the projection's
    [6:8], the layer scale [8], the squeeze-excitation's weight and bias [9:11] (None without)."""
    dw, norm, expand, _, project, *se = block.layers.layers
    own = [dw.weight, dw.bias, norm.weight, norm.bias, expand.weight, expand.bias]
    own += [project.weight, project.bias, block.gamma]
    return own + ([se[0].fc.weight, se[0].fc.bias] if se else [None, None])


def _masks(block: nn.Module, p: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The stochastic depth mask (N, 1, 1, 1) and dropout mask (like ``p``) of a training-mode
    block, scaled by 1 / (1 - rate) as the plain block scales them (None where not drawn), drawn
    with the plain block's calls in its order."""
    if not block.training:
        return None, None
    path = drop = None
    if block.drop_path_rate:
        keep = 1 - block.drop_path_rate
        path = p.new_empty((p.shape[0],) + (1,) * (p.dim() - 1)).bernoulli_(keep).div_(keep)
    if block.proj_drop_rate:
        drop = F.dropout(torch.ones_like(p), block.proj_drop_rate, True)
    return path, drop


def _tail(block: nn.Module, p: Tensor, path: Tensor | None, drop: Tensor | None) -> Tensor:
    """A block's output from its projection ``p``: squeeze-excitation (if it has one), layer
    scale, stochastic depth and dropout (their masks given). (N, k, H, W) -> the same."""
    se = block.layers.layers[5:]
    x = se[0](p) if se else p
    x = x * block.gamma.view(1, -1, 1, 1)
    if path is not None:
        x = x * path
    return x if drop is None else x * drop


def _pointwise_backward(
    grad: Tensor, x: Tensor, conv: nn.Conv2d
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of the 1x1 convolution ``conv(x)`` for its input, weight and bias (the last two
    in their own dtypes, None where not needed), from the output gradient ``grad``."""
    return conv_backward(grad, x, conv.weight, conv.bias, conv_spec(conv))


def _grad(outputs: Tensor, inputs: Sequence[Tensor | None], grad: Tensor) -> list[Tensor | None]:
    """``torch.autograd.grad`` for the ``inputs`` that need a gradient (None for the others)."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    found = iter(torch.autograd.grad(outputs, wanted, grad, allow_unused=True) if wanted else ())
    return [next(found) if t is not None and t.requires_grad else None for t in inputs]


class _StageFunction(torch.autograd.Function):
    """(blocks, x, *per-block parameters) -> the stage's buffer (N, C0 + L k, H, W)."""

    @staticmethod
    def forward(ctx: Any, blocks: tuple[nn.Module, ...], x: Tensor, *params: Tensor | None) -> Any:
        n, c0, h, w = x.shape
        growth = [block.gamma.numel() for block in blocks]
        shape, fmt = (n, c0 + sum(growth), h, w), memory_format(x)
        buffer = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        buffer[:, :c0].copy_(x)
        saved: list[Tensor | None] = []
        c = c0
        for block, k in zip(blocks, growth):
            dw, norm, expand, act, project = block.layers.layers[:5]
            hidden = expand(norm(dw(buffer[:, :c])))
            p = project(act(hidden))
            path, drop = _masks(block, p)
            buffer[:, c : c + k].copy_(_tail(block, p, path, drop))
            saved += [hidden, p, path, drop]
            c += k
        device = x.device.type
        ctx.blocks, ctx.growth = blocks, growth
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(buffer, *saved)
        return buffer

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_buffer: Tensor) -> Any:
        blocks: tuple[nn.Module, ...] = ctx.blocks
        buffer, *saved = ctx.saved_tensors
        grad = grad_buffer.clone(memory_format=memory_format(buffer))
        grads: list[Tensor | None] = []
        c = buffer.shape[1]
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype, enabled):
            for i in range(len(blocks) - 1, -1, -1):
                block, k = blocks[i], ctx.growth[i]
                c -= k
                hidden, p, path, drop = saved[4 * i : 4 * i + 4]
                dw, norm, expand, act, project = block.layers.layers[:5]
                params = _parameters(block)
                # the tail (squeeze-excitation, layer scale, masks) from the saved projection
                p = p.detach().requires_grad_()
                out = _tail(block, p, path, drop)
                grad_p, *tail = _grad(out, [p, *params[8:]], grad[:, c : c + k])
                # the projection and GELU: the GELU recomputed from the saved expansion
                hidden = hidden.detach().requires_grad_()
                a = act(hidden)
                grad_a, *project_grads = _pointwise_backward(grad_p, a.detach(), project)
                (grad_hidden,) = torch.autograd.grad(a, hidden, grad_a)
                # the expansion, then the depthwise convolution and LayerNorm recomputed
                prefix = buffer[:, :c].detach().requires_grad_()
                z = norm(dw(prefix))
                grad_z, *expand_grads = _pointwise_backward(grad_hidden, z.detach(), expand)
                grad_prefix, *head = _grad(z, [prefix, *params[:4]], grad_z)
                grad[:, :c] += grad_prefix
                grads[:0] = [*head, *expand_grads, *project_grads, *tail]
        grad_x = grad[:, :c].to(grad_buffer.dtype) if ctx.needs_input_grad[1] else None
        return None, grad_x, *grads

"""Memory-efficient RDNet stages (densenet.nn.rdnet_memory): float64 outputs and gradients equal to
the plain model's (with stochastic depth and dropout), channels_last and autocast, and the
activation memory it keeps."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import RDNET_SMALL, randomized

import densenet
from densenet.nn.rdnet import RDNet


def pair(**kwargs) -> tuple[RDNet, RDNet]:
    """The small RDNet (randomised, float64) and a memory-efficient copy of it."""
    plain = randomized(RDNet(**{**RDNET_SMALL, **kwargs}))
    efficient = copy.deepcopy(plain)
    efficient.set_memory_efficient(True)
    return plain, efficient


def step(model: RDNet, x: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, list, torch.Tensor]:
    """The output, every parameter's gradient and the input's gradient of one backward pass of
    a weighted sum of the outputs (random draws seeded)."""
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    out = model(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    grads = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out.detach(), grads, x.grad


def close(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() < tolerance


@pytest.mark.parametrize(
    ("rates", "train"), [({}, False), ({"drop_path_rate": 0.5, "proj_drop_rate": 0.3}, True)]
)
def test_float64_gradients_equal_the_plain_models(rates, train):
    plain, efficient = pair(**rates)
    plain.train(train)
    efficient.train(train)
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    out, grads, grad_x = step(plain, x)
    out2, grads2, grad_x2 = step(efficient, x)
    assert close(out2, out, 1e-12) and close(grad_x2, grad_x, 1e-10)
    assert len(grads) == len(grads2) and all(g is not None for g in grads2)
    for (name, _), g, g2 in zip(plain.named_parameters(), grads, grads2):
        assert close(g2, g, 1e-10), name


def test_channels_last_and_frozen_parameters():
    plain, efficient = pair()
    for model in (plain, efficient):
        model.float().to(memory_format=torch.channels_last)
        model.stem.requires_grad_(False)
        model.dense_stages[0][-1].dense_block0.layers.layers[0].requires_grad_(False)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    out, grads, grad_x = step(plain, x)
    out2, grads2, grad_x2 = step(efficient, x)
    assert close(out2, out, 1e-5) and close(grad_x2, grad_x, 1e-4)
    for g, g2 in zip(grads, grads2):
        assert (g is None and g2 is None) or close(g2, g, 1e-4)


def test_under_bfloat16_autocast_as_close_to_float32_as_the_plain_model():
    plain, efficient = pair()
    x = torch.randn(2, 3, 64, 64)
    _, exact, _ = step(plain.float(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads, _ = step(plain, x)
        out2, grads2, _ = step(efficient.float(), x)
    assert out2.dtype == out.dtype == torch.bfloat16 and close(out2.float(), out.float(), 2e-2)
    exact, grads, grads2 = (torch.cat([g.flatten() for g in gs]) for gs in (exact, grads, grads2))
    error = ((grads - exact).norm() / exact.norm()).item()  # bfloat16's own: about 7e-3
    assert ((grads2 - exact).norm() / exact.norm()).item() < max(2 * error, 1e-3)


def saved_bytes(model: RDNet, x: torch.Tensor) -> int:
    """Bytes of the unique non-parameter storages autograd saves in one forward pass."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()  # (what backward saves while it recomputes is not kept)
    return sum(seen.values())


def test_it_keeps_less_than_half_the_activations_of_the_plain_model():
    torch.manual_seed(0)
    plain = densenet.rdnet_tiny(num_classes=10).train()
    efficient = copy.deepcopy(plain)
    efficient.set_memory_efficient(True)
    x = torch.randn(1, 3, 64, 64)
    assert saved_bytes(efficient, x) < 0.45 * saved_bytes(plain, x)


def test_switches():
    model = densenet.rdnet_tiny(num_classes=3, memory_efficient=True)
    assert model.memory_efficient and all(s[-1].memory_efficient for s in model.dense_stages)
    model.set_memory_efficient(False)
    assert not any(s[-1].memory_efficient for s in model.dense_stages)
    with pytest.raises(ValueError, match="True or False"):
        model.set_memory_efficient("triton")

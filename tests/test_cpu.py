"""densenet.infer.cpu: the oneDNN backend computes the eager model's function (float32 to 1e-5,
bfloat16 to 1e-2) for every configuration and input shape, with the ReLUs fused and no BatchNorm
or concatenation left; the precision helpers."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_batchnorm, tiny_model
from test_inference import OpLog, rel_error

import densenet.infer.cpu
import densenet.infer.form
from densenet import optimize
from densenet.infer.cpu import OneDNNDenseNet, default_dtype, native_bfloat16
from densenet.infer.optimize import onednn_bfloat16

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this PyTorch build has no oneDNN"
)


def check_same(model, *inputs: torch.Tensor, dtype=torch.float32, tolerance=1e-5):
    model = randomize_batchnorm(model).eval()
    fast = optimize(model, dtype=dtype, backend="onednn")
    assert isinstance(fast, OneDNNDenseNet)
    with torch.inference_mode():
        for x in inputs:
            out, ref = fast(x), model(x)
            assert out.shape == ref.shape and out.dtype == x.dtype
            assert rel_error(out, ref) < tolerance
    return fast


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"stem": "cifar", "block_config": (1, 3, 2)},
        {"bn_size": 0},  # no bottleneck: BN-ReLU, then the 3x3 convolution
        {"bn_size": 2, "compression": 0.7, "num_classes": 0},
        {"in_channels": 1},
    ],
)
def test_matches_eager_model(config):
    model = tiny_model(**config)
    x = torch.randn(2, model.config["in_channels"], 37, 30)
    check_same(model, x, x.contiguous(memory_format=torch.channels_last))


def test_new_input_shapes_reorder_the_weights_again():
    """The blocked weight layout is chosen per input shape; alternating shapes stay correct."""
    shapes = [(1, 3, 32, 32), (4, 3, 48, 40), (1, 3, 32, 32)]
    fast = check_same(tiny_model(), *(torch.randn(s) for s in shapes))
    assert fast.stem._packed[0] == torch.Size((1, 3, 32, 32))


@pytest.mark.skipif(not onednn_bfloat16(), reason="this CPU's oneDNN has no bfloat16 (AVX2 only)")
def test_bfloat16_within_1e2():
    fast = check_same(tiny_model(), torch.randn(2, 3, 40, 40), dtype=torch.bfloat16, tolerance=1e-2)
    assert fast.dtype == torch.bfloat16 and fast.classifier.weight.dtype == torch.float32


def test_bfloat16_on_a_cpu_without_it_is_a_clear_error(monkeypatch):
    """Where oneDNN cannot run bfloat16, optimize says so before oneDNN crashes mid-reorder."""
    monkeypatch.setattr(densenet.infer.optimize, "onednn_bfloat16", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CPU whose oneDNN runs bfloat16"):
        optimize(tiny_model().eval(), dtype=torch.bfloat16, backend="onednn")


def test_relu_fused_no_batchnorm_no_concatenation():
    """Every convolution is one oneDNN primitive (the ReLUs after the stem and the bottlenecks
    are its post-ops); what is left are the prefix clamps and the copies into the buffers."""
    model = randomize_batchnorm(tiny_model()).eval()  # 2 blocks of 2 layers
    fast = optimize(model, backend="onednn")
    with torch.inference_mode(), OpLog() as log:
        fast(torch.randn(1, 3, 32, 32))
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert log.ops.count("_convolution_pointwise") == convs
    assert not {"conv2d", "convolution", "relu", "relu_", "batch_norm", "cat"} & set(log.ops)
    assert log.ops.count("copy_") == 2 * (1 + 2)  # per block: its input, then 2 layers


def test_onednn_refusals():
    model = tiny_model().eval()
    with pytest.raises(RuntimeError, match="backend='onednn' needs"):
        optimize(model, dtype=torch.float64, backend="onednn")
    with pytest.raises(RuntimeError, match="inference-only"):
        optimize(model, backend="onednn").train()


def test_default_dtype(monkeypatch):
    if sys.platform == "linux":  # the kernel's CPU flags say the same
        flags = set(
            re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)[1].split()
        )
        assert native_bfloat16() == bool(flags & {"avx512_bf16", "amx_tile"})
    assert default_dtype("cuda") == torch.bfloat16
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(densenet.infer.cpu, "native_bfloat16", lambda native=native: native)
        assert default_dtype("cpu") == dtype

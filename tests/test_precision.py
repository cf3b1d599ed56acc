"""The one precision resolver and the per-device bfloat16 probe (``densenet.infer.precision``)."""

import pytest
import torch
from conftest import tiny_model

import densenet.infer.cpu
from densenet.infer.optimize import onednn_bfloat16, optimize
from densenet.infer.precision import bfloat16_support, compute_dtype, resolve_dtype
from densenet.infer.runtime import amp_dtype


def test_resolve_dtype_per_device(monkeypatch):
    assert resolve_dtype(None, "cpu") == torch.float32  # exact by default on the CPU
    assert resolve_dtype(None, "cuda") == torch.bfloat16
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    assert resolve_dtype("float16", "cpu") == torch.float16
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(densenet.infer.cpu, "native_bfloat16", lambda native=native: native)
        assert resolve_dtype("auto", "cpu") == dtype
    assert compute_dtype(None, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="dtype must be auto or one of float32, bfloat16"):
        resolve_dtype("int4", "cpu")


def test_one_bfloat16_probe_per_device():
    """The CPU's answers all come from one probe: native implies oneDNN runs it."""
    cpu = bfloat16_support("cpu")
    assert cpu in ("native", "emulated", None)
    assert densenet.infer.cpu.native_bfloat16() == (cpu == "native")
    assert onednn_bfloat16() == (cpu is not None)
    assert bfloat16_support("meta") is None
    assert amp_dtype("auto", torch.device("cpu")) is None  # autocast stays float32 on the CPU


def test_optimize_takes_the_resolved_default():
    assert optimize(tiny_model().eval(), backend="eager").dtype == resolve_dtype(None, "cpu")

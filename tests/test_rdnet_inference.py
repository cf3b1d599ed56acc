"""An RDNet's inference form (densenet.infer.rdnet_form, through densenet.optimize): float32
exact against the eager model, bfloat16, its buffer, the openvino engine, the Runner and class
activation maps, and what it refuses."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from conftest import RDNET_SMALL, randomized

import densenet
from densenet.errors import DenseNetError
from densenet.infer import openvino as O
from densenet.infer.cam import explain
from densenet.infer.rdnet_form import InferenceRDNet, onednn_linear
from densenet.infer.runner import Runner
from densenet.nn.rdnet import RDNet
from densenet.tasks.bench import randomize_batchnorm

CPU = torch.device("cpu")
SHAPES = [(1, 64, 64), (3, 70, 90)]  # batch, height, width: 70 and 90 leave pixels over


def small(**kwargs) -> RDNet:
    """The small RDNet, every parameter randomised, float32, eval mode."""
    return randomized(RDNet(**{**RDNET_SMALL, **kwargs})).float()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def reference(model: RDNet, x: torch.Tensor) -> torch.Tensor:
    """The eager model's output in float64."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


@pytest.mark.parametrize("kwargs", [{}, {"in_channels": 1}, {"num_classes": 0}])
def test_float32_matches_the_eager_model(kwargs):
    model = small(**kwargs)
    state = copy.deepcopy(model.state_dict())
    fast = densenet.optimize(model)
    assert isinstance(fast, InferenceRDNet) and fast.dtype == torch.float32
    assert fast.config == model.config and fast.num_features == model.num_features
    for batch, height, width in SHAPES:
        x = torch.randn(batch, model.config["in_channels"], height, width)
        out, ref = fast(x), reference(model, x)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert rel_error(out, ref) < 1e-5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # unmodified
    assert torch.equal(copy.deepcopy(fast)(x), fast(x))  # a copy reorders its own weights


def test_the_published_configuration_matches_too():
    torch.manual_seed(0)
    model = randomize_batchnorm(densenet.rdnet_tiny(num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    assert rel_error(densenet.optimize(model)(x), reference(model, x)) < 1e-5


def test_bfloat16_and_the_input_dtype():
    model = small()
    fast = densenet.optimize(model, dtype="bfloat16")
    assert fast.dtype == torch.bfloat16
    x = torch.randn(2, 3, 64, 64)
    out = fast(x)
    assert out.dtype == torch.float32 and rel_error(out, reference(model, x)) < 3e-2
    assert fast(x.bfloat16()).dtype == torch.bfloat16


def test_stages_fill_one_buffer_and_the_graph_form_concatenates(monkeypatch):
    model = small()
    fast, graph = InferenceRDNet(model), InferenceRDNet(model, graph=True)
    linear = fast.stages[0].blocks[0].expand
    assert linear.onednn == onednn_linear(CPU, torch.float32)
    assert not graph.stages[0].blocks[0].expand.onednn
    calls = []
    cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or cat(*a, **k))
    x = torch.randn(2, 3, 64, 64)
    out = fast(x)
    assert not calls  # no concatenation: each block writes its slice of the stage buffer
    assert rel_error(graph(x), out) < 1e-5 and len(calls) == sum(RDNET_SMALL["num_blocks"])


def test_what_it_refuses():
    model = small()
    for asked in ({"backend": "onednn"}, {"backend": "triton"}, {"compile": True}):
        with pytest.raises(ValueError, match="an RDNet runs on backend 'eager'"):
            densenet.optimize(model, **asked)
    with pytest.raises(ValueError, match="channels last only"):
        densenet.optimize(model, channels_last=False)
    with pytest.raises(RuntimeError, match="eval mode"):
        densenet.optimize(small().train())
    with pytest.raises(RuntimeError, match="inference-only"):
        densenet.optimize(model).train()


def test_the_runner_runs_the_form_and_explains_it():
    model = small()
    loaded = densenet.load(model)
    x = torch.randn(2, 3, 64, 64)
    runner = Runner(loaded, CPU)
    assert isinstance(runner.model, InferenceRDNet) and runner.precision == "float32"
    maps, eager = runner.activation_maps(x), explain(model, x)
    assert rel_error(maps.logits, eager.logits) < 1e-5 and rel_error(maps.maps, eager.maps) < 1e-5
    half = Runner(loaded, CPU, dtype="bfloat16")
    assert half.precision == "bfloat16" and rel_error(half.logits(x), eager.logits) < 3e-2
    with pytest.raises(DenseNetError, match="optimize it"):
        Runner(loaded, CPU, optimize=False, dtype="bfloat16")


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="needs openvino")
def test_the_openvino_engine_converts_the_form_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # OpenVINO's and densenet's caches
    model = small()
    fast = densenet.optimize(model, backend="openvino")
    assert isinstance(fast, O.OpenVINODenseNet) and fast.dtype == torch.float32
    for batch, height, width in SHAPES:
        x = torch.randn(batch, 3, height, width)
        assert rel_error(fast(x), reference(model, x)) < 1e-5
    cached = sorted(O.cache_dir().glob("*.xml"))
    assert len(cached) == 1 and O.cache_dir().is_relative_to(tmp_path)
    again = densenet.optimize(model, backend="openvino")  # read from the cache
    assert sorted(O.cache_dir().glob("*.xml")) == cached
    assert torch.equal(again(x), fast(x))

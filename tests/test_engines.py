"""The engine table (``densenet.infer.engines``): the default engine of ``optimize`` for each device,
CPU kind and precision, ``densenet info --engines`` and ``--backend`` on the commands."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch
from conftest import SHIPPED_ENGINE_TABLE, TINY, randomize_batchnorm, tiny_model
from PIL import Image

import densenet
import densenet.infer.engines
import densenet.infer.optimize
import densenet.infer.runner
from densenet.cli import main
from densenet.infer.form import InferenceDenseNet
from densenet.infer.optimize import BACKENDS, default_engine
from densenet.weights.checkpoint import TrainCheckpoint, save_checkpoint

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
has_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="openvino not installed"
)


@pytest.fixture
def machine(monkeypatch):
    """``machine(kind, openvino)``: the shipped table, on a CPU of ``kind`` (``cpu_kind``) whose
    oneDNN runs bfloat16, with or without the openvino package."""
    monkeypatch.setattr(densenet.infer.engines, "ENGINE_TABLE", SHIPPED_ENGINE_TABLE)
    monkeypatch.setattr(densenet.infer.optimize, "onednn_bfloat16", lambda: True)

    def set_machine(kind: str, openvino: bool = True) -> None:
        monkeypatch.setattr(densenet.infer.engines, "cpu_kind", lambda: kind)
        monkeypatch.setattr(densenet.infer.optimize, "_openvino_installed", lambda: openvino)

    return set_machine


def test_every_row_names_its_measurement_at_batch_1_and_16():
    for row in SHIPPED_ENGINE_TABLE:
        assert row.device in ("cpu", "cuda") and row.engine in BACKENDS, row
        sizes = ("batch 1", "batch 16") if row.device == "cpu" else ("batch 1", "batch 256")
        assert all(size in row.measured for size in sizes), row
        assert re.search(r"\d{4}-\d\d-\d\d", row.measured), row  # when
        assert re.search(r"\d\.\d\dx|images/s", row.measured), row  # and the figures


@pytest.mark.parametrize(
    "kind, dtype, openvino, expected",
    [
        ("AVX512_BF16", torch.float32, True, "openvino"),  # Zen 4: measured fastest
        ("AVX512_BF16", torch.bfloat16, True, "openvino"),
        ("AVX512_BF16", torch.float32, False, "onednn"),  # openvino missing: the next row
        ("AVX512_BF16", torch.bfloat16, False, "onednn"),
        ("AVX512_BF16", torch.float16, True, "eager"),  # never measured
        ("AVX512_BF16", torch.float64, True, "eager"),
        ("AVX2", torch.float32, True, "onednn"),  # Zen 3; openvino not measured faster there
        ("AVX2", torch.bfloat16, True, "eager"),
        ("AMX", torch.bfloat16, True, "onednn"),  # the Xeon: openvino not measured there
        ("AMX", torch.float32, True, "onednn"),
        ("AVX512", torch.float32, True, "eager"),  # AVX-512 without BF16: never measured
        ("DEFAULT", torch.float32, True, "eager"),
    ],
)
def test_the_cpu_default_is_the_tables_row_for_the_kind_and_precision(
    machine, kind, dtype, openvino, expected
):
    machine(kind, openvino)
    engine, row = default_engine(CPU, dtype)
    assert engine == expected
    assert (row is None) == (expected == "eager")
    if row is not None:
        assert (row.kind, row.dtype, row.engine) == (kind, dtype, engine)


def test_a_row_whose_engine_cannot_run_here_is_skipped(machine, monkeypatch):
    machine("AVX512_BF16", openvino=False)
    monkeypatch.setattr(densenet.infer.optimize, "onednn_bfloat16", lambda: False)
    assert default_engine(CPU, torch.bfloat16)[0] == "eager"
    assert default_engine(CPU, torch.float32, channels_last=False)[0] == "eager"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_never_defaults_to_triton(machine, monkeypatch, dtype):
    """The triton kernels as they are now have not run on a GPU: CUDA runs the eager form (the
    form measured there) until a GPU run measures them and a row says so."""
    monkeypatch.setattr(densenet.infer.optimize, "_triton_usable", lambda device: True)
    engine, row = default_engine(CUDA, dtype)
    assert engine == "eager"
    assert (row is not None) == (dtype == torch.bfloat16)  # the H200's measurement
    assert densenet.infer.optimize._backend(None, True, CUDA, dtype) == "inductor"  # compile=True


def test_optimize_builds_the_tables_engine(machine):
    model = randomize_batchnorm(tiny_model()).eval()
    machine("AVX2")
    assert isinstance(densenet.optimize(model), densenet.infer.cpu.OneDNNDenseNet)
    machine("AVX512")
    assert isinstance(densenet.optimize(model), InferenceDenseNet)


@has_openvino
def test_openvino_default_runs_and_explains_with_the_eager_form(machine):
    """Where the table picks openvino, the Runner runs it; class activation maps, which need a
    feature map, come from the eager form in the same precision."""
    machine("AVX512_BF16")
    torch.manual_seed(0)
    loaded = densenet.load(randomize_batchnorm(tiny_model(num_classes=5)).eval())
    runner = densenet.Runner(loaded, CPU)
    assert isinstance(runner.module, densenet.infer.openvino.OpenVINODenseNet)
    x = torch.randn(2, 3, 32, 32)
    maps = runner.activation_maps(x)
    torch.testing.assert_close(maps.logits, runner.logits(x), rtol=1e-4, atol=1e-5)


def test_info_engines_names_the_machine_and_each_precisions_engine(machine, monkeypatch, capsys):
    machine("AVX2", openvino=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["info", "--engines"]) == 0
    out = capsys.readouterr().out
    assert "kind AVX2" in out and "openvino not installed" in out and "cuda: none" in out
    lines = {line.split()[0]: line.split(None, 2)[1:] for line in out.splitlines()[2:-1]}
    assert lines["float32"][0] == "onednn" and "AMD EPYC Zen 3" in lines["float32"][1]
    assert lines["bfloat16"] == ["eager", "not measured: eager"]
    assert lines["float16"] == ["eager", "not measured: eager"]
    assert main(["info", "--engines", "--json"]) == 0
    (cpu,) = json.loads(capsys.readouterr().out)
    assert cpu["kind"] == "AVX2" and cpu["engines"][0]["engine"] == "onednn"


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm(densenet.get_model("densenet_bc_100_k12", num_classes=3, **TINY))
    pre = densenet.Preprocessing(16, 16, mean=(0.5,) * 3, std=(0.25,) * 3)
    card = densenet.ModelCard(("a", "b", "c"), pre, arch="densenet_bc_100_k12")
    path = tmp_path / "tiny.pth"
    save_checkpoint(TrainCheckpoint(card, model.state_dict(), {"num_classes": 3, **TINY}), path)
    Image.new("RGB", (40, 40), (90, 20, 200)).save(tmp_path / "image.png")
    return path


@pytest.mark.parametrize(
    "backend, form", [("onednn", "OneDNNDenseNet"), ("eager", "InferenceDenseNet")]
)
def test_backend_option_reaches_optimize(tiny_checkpoint, monkeypatch, capsys, backend, form):
    built: list = []

    def spy(model, **kwargs):
        built.append(densenet.infer.optimize.optimize(model, **kwargs))
        return built[-1]

    monkeypatch.setattr(densenet.infer.runner, "optimize_model", spy)
    image = str(tiny_checkpoint.parent / "image.png")
    args = ["predict", image, "--weights", str(tiny_checkpoint), "--device", "cpu"]
    assert main([*args, "--backend", backend]) == 0
    assert [type(m).__name__ for m in built] == [form]
    assert main([*args, "--backend", backend, "--no-optimize"]) == 2
    assert "--backend picks the optimized model's engine" in capsys.readouterr().err
    assert len(built) == 1  # refused before any model was loaded


def test_runner_refuses_a_backend_for_a_form_it_does_not_build():
    loaded = densenet.load(tiny_model(num_classes=5).eval())
    with pytest.raises(densenet.errors.DenseNetError, match="runs as given: drop --backend"):
        densenet.Runner(loaded, CPU, optimize=False, backend="onednn")
    with pytest.raises(densenet.errors.DenseNetError, match="does not apply to int8"):
        densenet.Runner(loaded, CPU, dtype="int8", backend="onednn")

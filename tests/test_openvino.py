"""The openvino engine (``densenet.optimize(model, backend="openvino")``) against the eager model,
OpenVINO IR export and loading (``densenet export --format openvino``, ``densenet.load(DIR)``),
the checks an IR from a stranger gets, and the error without openvino."""

from __future__ import annotations

import gc
import importlib.util
import json
import re
import sys

import numpy as np
import pytest
import torch
from conftest import randomize_batchnorm, tiny_model
from PIL import Image

import densenet
from densenet.cli import main
from densenet.errors import DenseNetError
from densenet.infer import openvino as O
from densenet.tasks import export as E

ov = pytest.importorskip("openvino")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture(scope="module")
def model() -> densenet.DenseNet:
    torch.manual_seed(0)
    return randomize_batchnorm(tiny_model()).eval()


@pytest.fixture(autouse=True)
def cache_home(tmp_path_factory, monkeypatch):
    """OpenVINO's and densenet's caches in a folder of the test session, not the user's."""
    home = tmp_path_factory.getbasetemp() / "home"
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture(scope="module")
def ir_folder(model, tmp_path_factory):
    return E.to_openvino(model, tmp_path_factory.mktemp("openvino") / "tiny")


def test_engine_float32_matches_eager_at_any_batch_and_size(model):
    fast = densenet.optimize(model, backend="openvino", dtype="float32")
    assert fast.dtype == torch.float32 and fast.arch == model.arch
    for shape in [(1, 3, 64, 64), (3, 3, 64, 64), (3, 3, 97, 80)]:
        x = torch.randn(shape)
        with torch.no_grad():
            reference = model(x)
        out = fast(x)
        assert out.dtype == torch.float32 and out.shape == reference.shape
        assert rel_error(out, reference) < 1e-4
        assert torch.equal(out.argmax(1), reference.argmax(1))


def test_throughput_form_splits_a_batch_across_its_requests(model, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # two streams even on one core
    fast = densenet.optimize(model, backend="openvino", dtype="float32", throughput=True)
    assert str(fast.compiled.get_property("PERFORMANCE_HINT")) == "THROUGHPUT"
    assert len(fast.requests) >= 2
    for batch in (1, 5):  # fewer images than requests, and a split of unequal parts
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            reference = model(x)
        out = fast(x)
        assert out.shape == reference.shape and rel_error(out, reference) < 1e-4


def test_engine_auto_is_openvinos_default_precision(model):
    fast = densenet.optimize(model, backend="openvino", dtype="auto")
    hint = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    assert fast.dtype == {"bf16": torch.bfloat16, "f16": torch.float16}.get(hint, torch.float32)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
    assert rel_error(fast(x), reference) < (1e-4 if fast.dtype == torch.float32 else 3e-2)


def test_engine_runs_volumes_and_a_second_start_reads_the_converted_form(cache_home):
    volume_model = tiny_model(spatial_dims=3).eval()
    fast = densenet.optimize(volume_model, backend="openvino")
    x = torch.randn(2, 3, 32, 32, 32)
    with torch.no_grad():
        reference = volume_model(x)
    assert rel_error(fast(x), reference) < 1e-4
    cached = list(O.cache_dir().glob("*.xml"))
    assert cached and O.cache_dir().is_relative_to(cache_home)
    again = densenet.optimize(volume_model, backend="openvino")  # read from the cache
    assert rel_error(again(x), reference) < 1e-4


def signal_stack_is_usable() -> bool:
    """Whether this thread's alternate signal stack is off or lies in mapped memory."""
    import ctypes

    stack = O._SignalStack()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack)) == 0
    if stack.ss_flags & 2:  # SS_DISABLE
        return True
    with open("/proc/self/maps") as maps:
        spans = [[int(x, 16) for x in line.split()[0].split("-")] for line in maps]
    return any(low <= stack.ss_sp and stack.ss_sp + stack.ss_size <= high for low, high in spans)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_second_start_leaves_the_signal_stack_usable(cache_home):
    """OpenVINO's CPU plugin can leave the thread's alternate signal stack on memory it freed
    (a cached compile does); a Python signal handler, such as the SIGCHLD handler of a
    DataLoader, then crashed the process when a child process ended."""
    model = tiny_model(spatial_dims=3).eval()
    for _ in range(2):  # the second start reads the converted form and the compiled blob
        densenet.optimize(model, backend="openvino")(torch.randn(1, 3, 32, 32, 32))
    gc.collect()
    assert signal_stack_is_usable()


def test_engine_refuses_other_devices_and_precisions(model):
    fast = densenet.optimize(model, backend="openvino")
    with pytest.raises(DenseNetError, match="runs on the CPU"):
        fast(torch.zeros(1, 3, 32, 32, device="meta"))
    with pytest.raises(DenseNetError, match="OpenVINO runs float32, bfloat16 or float16"):
        densenet.optimize(model, backend="openvino", dtype=torch.float64)
    with pytest.raises(DenseNetError, match="runs on the CPU, the model is on meta"):
        densenet.optimize(tiny_model().eval().to("meta"), backend="openvino")


def test_runner_runs_the_engine(model):
    runner = densenet.Runner(densenet.load(model), torch.device("cpu"), backend="openvino")
    assert isinstance(runner.module, O.OpenVINODenseNet) and runner.precision == "float32"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_error(runner.logits(x), model(x)) < 1e-4


def test_missing_openvino_is_named(model, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a)
    )
    extra = re.escape("pip install 'densenet-toolkit[openvino]'")
    with pytest.raises(DenseNetError, match=f"needs the openvino package.*: {extra}$"):
        densenet.optimize(model, backend="openvino")
    with pytest.raises(DenseNetError, match=extra):
        E.to_openvino(model, tmp_path / "ir")
    assert not (tmp_path / "ir").exists()


# ---- the IR -------------------------------------------------------------------------------------


def test_export_writes_the_ir_with_its_card_and_load_runs_it(ir_folder, model):
    assert sorted(p.name for p in ir_folder.iterdir()) == ["model.bin", "model.xml"]
    meta = E.read_metadata(ir_folder)
    assert meta.card == densenet.ModelCard.for_model(model) and meta.dtype == "float32"
    loaded = densenet.load(ir_folder)
    assert isinstance(loaded.module, E.OpenVINOModel) and loaded.card == meta.card
    for path in (ir_folder, ir_folder / "model.xml"):
        module = densenet.load(path).module
        for shape in [(1, 3, 64, 64), (3, 3, 80, 72)]:
            x = torch.randn(shape)
            with torch.no_grad():
                assert rel_error(module(x), model(x)) < 1e-4


def test_float16_weights_and_a_fixed_batch(model, tmp_path):
    folder = E.to_openvino(model, tmp_path / "ir", dtype="float16", batch_size=2, fold=True)
    assert E.read_metadata(folder).dtype == "float16"
    module = densenet.load(folder).module
    x = torch.randn(3, 3, 64, 64)  # two batches of 2, the last padded
    with torch.no_grad():
        assert rel_error(module(x), model(x)) < 1e-2
    with pytest.raises(DenseNetError, match="float32 or float16 weights, not bfloat16"):
        E.to_openvino(model, tmp_path / "bf16", dtype="bfloat16")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DenseNetError, match="is a file; an OpenVINO IR is a folder"):
        E.to_openvino(model, tmp_path / "file")
    with pytest.raises(DenseNetError, match="cannot create the output folder"):
        E.to_openvino(model, tmp_path / "file" / "ir")


@pytest.mark.parametrize("version", ["extension", "opset999"])
def test_an_ir_with_a_non_standard_operator_is_refused(ir_folder, tmp_path, version):
    xml = (ir_folder / "model.xml").read_text()
    bad, count = re.subn(r'(type="ReLU" version=")opset1"', rf'\g<1>{version}"', xml, count=1)
    assert count == 1
    (tmp_path / "model.xml").write_text(bad)
    (tmp_path / "model.bin").write_bytes((ir_folder / "model.bin").read_bytes())
    with pytest.raises(DenseNetError, match=f"model.xml is not a readable OpenVINO IR.*{version}"):
        densenet.load(tmp_path)


def test_operators_outside_the_standard_opsets_are_refused():
    class Info:
        version_id = "custom_extension"

    class Op:
        get_type_name = staticmethod(lambda: "MyOp")
        get_type_info = staticmethod(Info)
        get_friendly_name = staticmethod(lambda: "layer1")

    model = type("Model", (), {"get_ops": staticmethod(lambda: [Op()])})
    with pytest.raises(DenseNetError, match="m.xml: layer 'layer1' is a MyOp of custom_extension"):
        O.check_operations(model, "m.xml")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace's, under convert_model
def test_an_ir_without_a_card_is_refused(model, tmp_path):
    converted = ov.convert_model(model, example_input=torch.randn(1, 3, 32, 32))
    ov.save_model(converted, tmp_path / "model.xml")
    with pytest.raises(DenseNetError, match="has no class names in its rt_info"):
        densenet.load(tmp_path)


def test_predict_and_eval_run_the_ir(ir_folder, model, tmp_path, capsys):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 80, 3), np.uint8))
    image.save(tmp_path / "photo.png")
    (reference,) = densenet.Classifier(model, device="cpu").predict(tmp_path / "photo.png", 3)
    assert main(["predict", str(tmp_path / "photo.png"), "--model", str(ir_folder), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert [t["label"] for t in result["top"][:3]] == [label for label, _ in reference]
    argv = ["predict", str(tmp_path), "--model", str(ir_folder), "--out", str(tmp_path / "rows")]
    assert main([*argv, "--no-progress"]) == 0  # bulk: resumable, so the IR's files are hashed
    assert json.loads(capsys.readouterr().out)["rows"] == 1
    assert main([*argv, "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["shards_skipped"] == 1
    two = tiny_model(num_classes=2).eval()
    folder = E.to_openvino(two, tmp_path / "ir", categories=["a", "b"], image_size=32)
    for index, name in enumerate("ab"):
        (tmp_path / "val" / name).mkdir(parents=True)
        Image.new("RGB", (40, 40), (40 * index, 90, 200)).save(tmp_path / "val" / name / "0.png")
    argv = ["eval", str(tmp_path / "val"), "--model", str(folder), "--json", "--workers", "0"]
    assert main([*argv, "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2


def test_cli_export_writes_the_folder(model, tmp_path, monkeypatch, capsys):
    loaded = densenet.LoadedModel(model, densenet.ModelCard.for_model(model))
    monkeypatch.setattr(
        importlib.import_module("densenet.infer.load"), "load", lambda spec, weights: loaded
    )
    out = tmp_path / "ir"
    argv = ["export", "--model", "densenet121", "--weights", "none", "--format", "openvino"]
    assert main([*argv, "--out", str(out), "--dtype", "float16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(out) and report["size_mb"] > 0
    assert E.read_metadata(out).dtype == "float16"


def test_a_truncated_weights_file_is_one_line(ir_folder, tmp_path):
    (tmp_path / "model.xml").write_bytes((ir_folder / "model.xml").read_bytes())
    (tmp_path / "model.bin").write_bytes((ir_folder / "model.bin").read_bytes()[:1000])
    with pytest.raises(DenseNetError, match="is not a readable OpenVINO IR"):
        densenet.load(tmp_path)

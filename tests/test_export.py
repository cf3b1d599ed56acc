"""Export: ONNX checked with ONNX Runtime, TorchScript reloaded without the package, torch.export
programs, the Triton repository, ``densenet predict`` on an ONNX file and the errors."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import TINY, randomize_batchnorm, tiny_model
from PIL import Image

import densenet
from densenet.cli import main
from densenet.tasks import export as E

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SHAPES = [(1, 3, 64, 64), (3, 3, 97, 131), (8, 3, 48, 48), (2, 3, 256, 300)]  # last: over 224


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module")
def model() -> densenet.DenseNet:
    torch.manual_seed(0)
    return randomize_batchnorm(tiny_model()).eval()


@pytest.fixture(scope="module")
def onnx_file(model, tmp_path_factory):
    return E.to_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


# ---- ONNX -------------------------------------------------------------------------------------


def test_onnx_graph_dynamic_axes_and_metadata(onnx_file, model):
    proto = onnx.load(str(onnx_file))
    onnx.checker.check_model(proto)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, dims(inp)) == ("images", ["batch", 3, "height", "width"])
    assert (out.name, dims(out)) == ("logits", ["batch", 1000])
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [o.version for o in proto.opset_import if o.domain == ""] == [E.DEFAULT_OPSET]
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    card, pre = props["card"], props["card"]["preprocessing"]
    assert card["classes"] == densenet.imagenet_classes()
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]
    assert (pre["resize_size"], pre["crop_size"], props["export"]["batch_size"]) == (256, 224, None)
    meta = E.read_metadata(onnx_file)
    assert meta.card == densenet.ModelCard.for_model(model) and meta.dtype == "float32"


def test_metadata_of_earlier_versions_still_reads():
    flat = {"categories": ["a", "b"], "arch": "densenet121", "mean": [0.5] * 3, "std": [0.2] * 3,
            "resize_size": 40, "crop_size": 32, "min_size": [29, 29], "dtype": "float16"}  # fmt: skip
    meta = E.ExportMetadata.from_dict(flat)
    assert meta.card.classes == ("a", "b") and meta.card.arch == "densenet121"
    assert meta.card.preprocessing == densenet.Preprocessing(
        40, 32, mean=(0.5,) * 3, std=(0.2,) * 3
    )
    assert meta.dtype == "float16" and E.ExportMetadata.from_dict(meta.to_dict()) == meta


@pytest.mark.parametrize("shape", SHAPES)
def test_onnx_runtime_matches_pytorch(onnx_file, model, shape):
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = model(x)
    assert rel_error(run_onnx(onnx_file, x), ref) < 1e-5


def test_onnx_fold_pools_before_the_transition_conv(onnx_file, model, tmp_path):
    folded = E.to_onnx(model, tmp_path / "folded.onnx", fold=True)
    graph, plain = onnx.load(str(folded)).graph, onnx.load(str(onnx_file)).graph
    ops = [n.op_type for n in graph.node]
    assert len(ops) < len(plain.node) and {"ScatterND", "Mul", "Add"}.isdisjoint(ops)
    assert folded.stat().st_size < onnx_file.stat().st_size
    consumers = {i: n.op_type for n in graph.node for i in n.input}
    pools = [n for n in graph.node if n.op_type == "AveragePool"]
    assert pools and all(consumers[n.output[0]] == "Conv" for n in pools)
    umask = os.umask(0)
    os.umask(umask)
    assert E.read_metadata(folded).folded and folded.stat().st_mode & 0o777 == 0o666 & ~umask
    for shape in SHAPES[1:3]:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert rel_error(run_onnx(folded, x), model(x)) < 1e-5


def test_onnx_fold_without_bottleneck_and_with_negative_bn_scales(tmp_path):
    net = randomize_batchnorm(tiny_model(bn_size=0, compression=1.0), seed=1).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data[::3] *= -1
    path = E.to_onnx(net, tmp_path / "folded.onnx", fold=True)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"ScatterND", "Mul", "Add"}.isdisjoint(ops)
    x = torch.randn(2, 3, 80, 72)
    with torch.no_grad():
        assert rel_error(run_onnx(path, x), net(x)) < 1e-5


def test_onnx_fixed_batch_and_size_padded_by_the_runner(model, tmp_path):
    path = E.to_onnx(model, tmp_path / "fixed.onnx", batch_size=2, image_size=64)
    proto = onnx.load(str(path))
    assert dims(proto.graph.input[0]) == [2, 3, 64, 64]
    meta = E.read_metadata(path)
    pre = meta.card.preprocessing
    assert (meta.batch_size, meta.image_size, pre.crop_size, pre.resize_size) == (2, 64, 64, 73)
    runner = E.OnnxModel(path)
    x = torch.randn(3, 3, 64, 64)  # one full batch of 2, then 1 padded to 2
    with torch.no_grad():
        assert rel_error(runner(x), model(x)) < 1e-5
    with pytest.raises(E.ExportError, match="ONNX Runtime failed"):
        runner(torch.randn(2, 3, 96, 96))


def test_onnx_float16_runs_close(model, tmp_path):
    path = E.to_onnx(model, tmp_path / "half.onnx", dtype="float16")
    assert (
        onnx.load(str(path)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    )
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert rel_error(E.OnnxModel(path)(x), model(x)) < 1e-2


@pytest.mark.slow
def test_onnx_bfloat16_exports_and_cpu_runtime_says_why_it_cannot_run(model, tmp_path):
    path = E.to_onnx(model, tmp_path / "bf16.onnx", dtype="bfloat16")
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    try:
        E.OnnxModel(path)
    except E.ExportError as error:
        assert "bfloat16" in str(error) and "float16 or float32" in str(error)
    else:  # pragma: no cover - a runtime with bfloat16 kernels
        pytest.skip("this ONNX Runtime loads bfloat16 graphs, but its Python API cannot feed them")


@pytest.mark.parametrize(("opset", "message"), [(17, "too old"), (10_000, "newer than")])
def test_onnx_opset_out_of_range(model, tmp_path, opset, message):
    with pytest.raises(E.ExportError, match=message):
        E.to_onnx(model, tmp_path / "m.onnx", opset=opset)
    assert not (tmp_path / "m.onnx").exists()


def test_missing_exporter_and_runtime_are_named(model, tmp_path, onnx_file, monkeypatch):
    real = importlib.util.find_spec
    missing = {"onnxscript", "onnxruntime"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a)
    )
    extra = re.escape("pip install 'densenet-toolkit[export]'")  # onnx, onnxscript, onnxruntime
    with pytest.raises(E.ExportError, match=f"needs the onnxscript package.*: {extra}"):
        E.to_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(E.ExportError, match=r"pip install 'densenet-toolkit\[export\]'"):
        E.OnnxModel(onnx_file)
    missing.remove("onnxscript")  # int8 asks for ONNX Runtime before the export
    with pytest.raises(E.ExportError, match=f"needs the onnxruntime package.*: {extra}"):
        E.to_onnx(model, tmp_path / "m.onnx", dtype="int8", calibration_images=tmp_path)
    assert not (tmp_path / "m.onnx").exists()


def test_int8_onnx_takes_image_models_and_calibration_takes_int8(
    model, onnx_file, tmp_path, capsys
):
    """An int8 export of a volume model, calibration images without int8, and quantizing an
    exported file are one error each, before any work."""
    volumes = densenet.DenseNet(**TINY, num_classes=2, in_channels=1, spatial_dims=3)
    with pytest.raises(densenet.errors.DenseNetError, match="int8 takes image models only"):
        E.to_onnx(volumes, tmp_path / "v.onnx", dtype="int8", calibration_images=tmp_path)
    with pytest.raises(E.ExportError, match="calibration images are for dtype int8 only"):
        E.to_onnx(model, tmp_path / "m.onnx", calibration_images=tmp_path)
    assert main(["quantize", str(onnx_file), str(tmp_path), "--out", str(tmp_path / "q.pt")]) == 2
    assert "(OnnxModel): quantize needs a float DenseNet" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---- errors common to every format ----------------------------------------------------------


def test_unknown_format_and_unwritable_output(model, tmp_path):
    with pytest.raises(E.ExportError, match="unknown export format 'tflite'"):
        E.export(model, tmp_path / "m.tflite", "tflite")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for fmt in set(E.FORMATS) - {"openvino"}:  # a folder: tests/test_openvino.py
        with pytest.raises(E.ExportError, match="output path"):
            E.export(model, blocker / "m.bin", fmt)
        with pytest.raises(E.ExportError, match="is a directory"):
            E.export(model, tmp_path, fmt)
    with pytest.raises(E.ExportError, match="unsupported dtype"):
        E.to_exported(model, tmp_path / "m.pt2", dtype="int8")
    with pytest.raises(E.ExportError, match="10 class names"):
        E.to_exported(model, tmp_path / "m.pt2", categories=[str(i) for i in range(10)])


# ---- TorchScript ------------------------------------------------------------------------------

FRESH_PROCESS = """
import sys

class NoDensenet:
    def find_spec(self, name, path=None, target=None):
        if name == "densenet" or name.startswith("densenet."):
            raise ImportError("densenet is blocked in this process")

sys.meta_path.insert(0, NoDensenet())
try:
    import densenet  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("densenet is importable")

import json
import torch

for name in sys.argv[1:]:
    files = {"densenet.json": ""}
    module = torch.jit.load(name + ".pt", _extra_files=files)
    x = torch.load(name + ".in.pt")
    torch.save(module(x), name + ".out.pt")
    assert json.loads(files["densenet.json"])["card"]["classes"][0] == "tench"
"""


@pytest.mark.slow
def test_torchscript_reloads_in_a_process_without_the_package(model, tmp_path):
    cases = {"script": {}, "folded": {"fold": True}}
    inputs = {"script": torch.randn(3, 3, 97, 131), "folded": torch.randn(1, 3, 240, 256)}
    for name, options in cases.items():
        E.to_torchscript(model, tmp_path / f"{name}.pt", **options)
        torch.save(inputs[name], tmp_path / f"{name}.in.pt")
    done = subprocess.run(
        [sys.executable, "-I", "-c", textwrap.dedent(FRESH_PROCESS), *cases],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name in cases:
        with torch.no_grad():
            ref = model(inputs[name])
        assert rel_error(torch.load(tmp_path / f"{name}.out.pt"), ref) < 1e-5
    assert E.read_metadata(tmp_path / "script.pt").extra["torchscript"] == "script"


def test_torchscript_trace_and_bfloat16(model, tmp_path):
    path = E.to_torchscript(model, tmp_path / "m.pt", method="trace", dtype="bfloat16")
    meta = E.read_metadata(path)
    assert (meta.extra["torchscript"], meta.dtype) == ("trace", "bfloat16")
    module = torch.jit.load(str(path))
    for shape in SHAPES[:2]:
        x = torch.randn(*shape)
        with torch.no_grad():
            out = module(x.bfloat16())
            assert out.dtype == torch.bfloat16 and rel_error(out, model(x)) < 1e-2


# ---- torch.export -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"fold": True, "dtype": "float16"}])
def test_exported_program_reloads_with_dynamic_batch(model, tmp_path, options):
    path = E.to_exported(model, tmp_path / "m.pt2", **options)
    module = torch.export.load(path).module()
    dtype = E.DTYPES[options.get("dtype", "float32")]
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for shape in SHAPES[:3]:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert rel_error(module(x.to(dtype)), model(x)) < tolerance
    meta = E.read_metadata(path)
    assert (meta.folded, meta.dtype) == (bool(options.get("fold")), str(dtype).split(".")[1])


def test_exported_fixed_batch_rejects_other_batches(model, tmp_path):
    path = E.to_exported(model, tmp_path / "m.pt2", batch_size=2, image_size=64)
    module = torch.export.load(path).module()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_error(module(x), model(x)) < 1e-5
        with pytest.raises(AssertionError, match=r"size\(\)\[0\] == 2"):  # torch's shape guard
            module(torch.randn(3, 3, 64, 64))


# ---- Triton -----------------------------------------------------------------------------------

TRITON_DYNAMIC = """\
name: "tiny"
backend: "onnxruntime"
max_batch_size: 16
input [
  {
    name: "images"
    data_type: TYPE_FP32
    dims: [ 3, -1, -1 ]
  }
]
output [
  {
    name: "logits"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    label_filename: "labels.txt"
  }
]
dynamic_batching { }
"""


def test_triton_repository(onnx_file, tmp_path):
    folder = E.write_triton_repo(onnx_file, tmp_path / "repo", name="tiny", max_batch_size=16)
    assert folder == tmp_path / "repo" / "tiny"
    assert (folder / "config.pbtxt").read_text() == TRITON_DYNAMIC
    assert (folder / "1" / "model.onnx").read_bytes() == onnx_file.read_bytes()
    labels = (folder / "labels.txt").read_text().splitlines()
    assert labels == densenet.imagenet_classes()


def test_triton_config_fixed_batch_and_half():
    card = densenet.ModelCard(("a", "b", "c"))
    meta = E.ExportMetadata(card, dtype="float16", batch_size=4, image_size=128)
    text = E.triton_config(meta, "m")
    assert "max_batch_size: 0\n" in text and "dynamic_batching" not in text
    assert "dims: [ 4, 3, 128, 128 ]" in text and "dims: [ 4, 3 ]" in text
    assert text.count("data_type: TYPE_FP16") == 2


# ---- command line and predict -----------------------------------------------------------------


def test_predict_runs_an_onnx_file(onnx_file, model, tmp_path, capsys):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 260, 3), np.uint8))
    image.save(tmp_path / "photo.png")
    reference = densenet.Classifier(model, device="cpu").predict(tmp_path / "photo.png", topk=3)
    (top,) = densenet.Classifier(str(onnx_file), device="cpu").predict(tmp_path / "photo.png", 3)
    assert [label for label, _ in top] == [label for label, _ in reference[0]]
    np.testing.assert_allclose([p for _, p in top], [p for _, p in reference[0]], rtol=1e-4)
    assert main(["predict", str(tmp_path / "photo.png"), "--model", str(onnx_file), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert [t["label"] for t in result["top"][:3]] == [label for label, _ in reference[0]]


@pytest.mark.slow
def test_cli_export_onnx_with_triton_repo(model, tmp_path, monkeypatch, capsys):
    card = densenet.ModelCard.for_model(model, arch="densenet121")
    loaded = densenet.LoadedModel(model, card)
    monkeypatch.setattr(
        importlib.import_module("densenet.infer.load"), "load", lambda spec, weights: loaded
    )
    out = tmp_path / "m.onnx"
    argv = ["export", "--model", "densenet121", "--weights", "none", "--format", "onnx"]
    argv += ["--out", str(out), "--batch-size", "2", "--triton-repo", str(tmp_path / "repo")]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(out) and report["batch_size"] == 2 and report["weights"] is None
    config = (tmp_path / "repo" / "densenet121" / "config.pbtxt").read_text()
    assert "max_batch_size: 0" in config and "dims: [ 2, 3, -1, -1 ]" in config
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_error(run_onnx(out, x), model(x)) < 1e-5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "torchscript", "--out", "m.pt", "--opset", "18"], "--opset applies to"),
        (["--format", "onnx"], "give the output file with --out"),
        (["--format", "onnx", "--out", "m.onnx", "--opset", "11"], "opset 11 is too old"),
        (["--format", "onnx", "--out", "m.onnx", "--triton-max-batch", "8"], "with --triton-repo"),
    ],
)
def test_cli_export_errors(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--model", "densenet_40_k12", "--weights", "none", *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_export_never_writes_over_its_input_and_takes_no_exported_file(model, tmp_path, capsys):
    weights = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), weights)
    before = weights.read_bytes()
    argv = ["export", "--model", "densenet121", "--weights", str(weights), "--format", "onnx"]
    assert main([*argv, "--out", str(weights)]) == 2
    assert "is the input" in capsys.readouterr().err and weights.read_bytes() == before
    E.to_torchscript(model, tmp_path / "m.pt", method="trace")
    argv = ["export", "--model", str(tmp_path / "m.pt"), "--format", "exported"]
    assert main([*argv, "--out", str(tmp_path / "m.pt2")]) == 2
    assert "is an exported file" in capsys.readouterr().err
    assert not (tmp_path / "m.pt2").exists()


def test_cli_unknown_format(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--format", "tflite", "--out", "m.tflite"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("exporter", "name"),
    [(E.to_torchscript, "m.pt"), (E.to_exported, "m.pt2"), (E.to_onnx, "m.onnx")],
)
def test_densenet_load_reads_every_exported_format(model, tmp_path, exporter, name):
    card = densenet.ModelCard.for_model(model, classes=[f"c{i}" for i in range(1000)])
    path = exporter(model, tmp_path / name, card=card)
    loaded = densenet.load(path)
    assert loaded.card == card
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_error(loaded.module(x), model(x)) < 1e-5


def test_a_multi_label_card_gives_sigmoid_probabilities(model, tmp_path):
    card = densenet.ModelCard.for_model(model, multi_label=True)
    path = E.to_onnx(model, tmp_path / "tags.onnx", card=card)
    classifier = densenet.Classifier(path, device="cpu")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x).sigmoid()
    torch.testing.assert_close(classifier.probabilities(x), expected, rtol=1e-4, atol=1e-6)


def test_a_one_channel_model_exports_with_one_channel_inputs(tmp_path):
    model = randomize_batchnorm(tiny_model(in_channels=1)).eval()
    path = E.to_onnx(model, tmp_path / "grey.onnx", fold=True)
    loaded = densenet.load(path)
    assert loaded.card.in_channels == 1 and len(loaded.card.preprocessing.mean) == 1
    x = torch.randn(2, 1, 64, 64)
    assert rel_error(loaded.module(x), model(x).detach()) < 1e-4
    grey = Image.new("L", (80, 80), 100)
    assert densenet.Classifier(path, device="cpu").predict(grey, topk=1)[0][0][0]


@pytest.mark.parametrize("fmt", ["torchscript", "exported"])
def test_a_float16_export_classifies_float32_images(model, tmp_path, fmt):
    """A float16 TorchScript or .pt2 file is fed float16 inputs: the same top class as the model."""
    path = tmp_path / ("m.pt" if fmt == "torchscript" else "m.pt2")
    write = E.to_torchscript if fmt == "torchscript" else E.to_exported
    write(model, path, dtype="float16")
    classifier = densenet.Classifier(path, device="cpu")
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images).softmax(1)
    probabilities = classifier.probabilities(images)
    assert probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities, expected, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("fmt", ["torchscript", "exported"])
def test_an_exported_file_is_read_once_by_load(model, tmp_path, fmt, monkeypatch):
    """The module and its metadata come from one read of the archive."""
    path = tmp_path / ("m.pt" if fmt == "torchscript" else "m.pt2")
    (E.to_torchscript if fmt == "torchscript" else E.to_exported)(model, path)
    target = (torch.jit, "load") if fmt == "torchscript" else (torch.export, "load")
    original, reads = getattr(*target), []

    def counted(*args, **kwargs):
        reads.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(*target, counted)
    loaded = densenet.load(path)
    assert len(reads) == 1 and loaded.card.num_classes == model.num_classes

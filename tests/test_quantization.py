"""int8 post-training quantization: the report, the file densenet.load reads, the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RDNET_SMALL, TINY, randomize_batchnorm, randomized, tiny_model
from PIL import Image

import densenet
from densenet.cli import main
from densenet.data.volumes import VolumeTransform
from densenet.infer import quantization
from densenet.infer.quantization import QuantizeError, quantize, save_quantized
from densenet.nn.rdnet import RDNet
from densenet.tasks.bench import run_benchmark
from densenet.tasks.evaluate import evaluate_dataset
from densenet.weights.checkpoint import TrainCheckpoint, save_checkpoint


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """24 small crops of scikit-image's photos."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea"):
        image = getattr(data, name)()
        for i in range(8):
            crop = image[i * 20 : i * 20 + 160, i * 25 : i * 25 + 160]
            Image.fromarray(np.ascontiguousarray(crop)).resize((48, 48)).save(
                root / f"{name}{i}.png"
            )
    return root


def test_fx_int8_model_is_close_and_round_trips_through_load(photos, tmp_path):
    torch.manual_seed(0)  # a tiny random model: its int8 error varies with the draw (0.02-0.2)
    model = randomize_batchnorm(tiny_model(num_classes=10)).eval()
    result = quantize(model, photos, holdout=8, batch_size=8, engine="fx", progress=False)
    assert result.report["backend"] == "fx-x86"
    convs = [m for m in result.module.modules() if isinstance(m, torch.ao.nn.quantized.Conv2d)]
    assert len(convs) >= 4  # the convolutions run in int8
    assert result.report["images"] == 8 and result.report["calibration_images"] == 16
    assert result.report["relative_logit_error"] < 0.1
    assert result.report["top1_agreement"] >= 0.75
    path = save_quantized(result, tmp_path / "tiny.int8.pt")
    loaded = densenet.load(path)
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(loaded.module(x), result.module(x))
    assert loaded.card.classes == result.card.classes
    # an int8 file runs as what it is, also when int8 is asked for
    classifier = densenet.Classifier(path, device="cpu", dtype="int8")
    assert classifier.runner.precision == "int8"
    assert len(classifier.predict([torch.rand(3, 48, 48)], topk=2)[0]) == 2


def test_nncf_int8_is_an_openvino_ir_that_load_runs(photos, tmp_path, capsys):
    """With openvino and nncf installed, ``densenet quantize`` quantizes with NNCF and writes an
    IR folder (``MODEL.int8/``) with the card and the report, which ``densenet.load`` runs in
    int8 with the logits it was measured with."""
    pytest.importorskip("nncf")
    pytest.importorskip("openvino")
    torch.manual_seed(0)
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pth")
    model = densenet.load(checkpoint).module
    argv = ["quantize", str(checkpoint), str(photos), "--holdout", "8", "--batch-size", "8"]
    assert main([*argv, "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == "nncf-openvino" and report["held_out"]
    assert report["images"] == 8 and report["calibration_images"] == 16
    # a tiny random model: lenient bounds, which an unquantized or broken graph would miss
    assert report["top1_agreement"] >= 0.5 and 0 < report["relative_logit_error"] < 0.3
    out = Path(report["out"])
    assert out == tmp_path / "tiny.int8" and sorted(p.name for p in out.iterdir()) == [
        "model.bin", "model.xml"
    ]  # fmt: skip
    loaded = densenet.load(out)
    assert loaded.precision == "int8" and loaded.card.num_classes == 2
    assert densenet.infer.exported.read_metadata(out).extra["quantization"] == {
        k: v for k, v in report.items() if k != "out"
    }
    import openvino as ov

    ops = {op.get_type_name() for op in ov.Core().read_model(out / "model.xml").get_ops()}
    assert "FakeQuantize" in ops  # the convolutions' inputs and weights are int8
    x = torch.cat(quantization.calibration_batches(photos, loaded.card, progress=False))
    with torch.no_grad():
        exact, int8 = model(x), loaded.module(x)
    assert (int8.argmax(1) == exact.argmax(1)).float().mean() >= 0.5
    assert (int8 - exact).norm() / exact.norm() < 0.3
    classifier = densenet.Classifier(out, device="cpu", dtype="int8")
    assert classifier.runner.precision == "int8"


def test_an_rdnet_quantizes_with_nncf_and_runs_through_the_runner(photos):
    """An RDNet's inference form is quantized by NNCF (every matrix product but those on pooled
    vectors in int8); FX refuses it before any work."""
    pytest.importorskip("nncf")
    pytest.importorskip("openvino")
    model = randomized(RDNet(**RDNET_SMALL)).float()
    with pytest.raises(QuantizeError, match="quantizes with the nncf engine"):
        quantize(model, photos, engine="fx", progress=False)
    result = quantize(model, photos, holdout=8, batch_size=8, progress=False)
    assert result.report["backend"] == "nncf-openvino"
    # lenient bounds for a tiny random model, which an unquantized or broken graph would miss
    assert result.report["top1_agreement"] >= 0.5
    assert 0 < result.report["relative_logit_error"] < 0.3
    # a MatMul's weight: an int8 constant dequantized (Multiply), or float32 (Constant)
    weights = {
        op.get_friendly_name(): op.input_value(1).get_node().get_type_name()
        for op in result.graph.get_ops()
        if op.get_type_name() == "MatMul"
    }
    pooled = {name for name in weights if "classifier" in name or ".se/" in name}
    assert len(pooled) == 3 and {weights[name] for name in pooled} == {"Constant"}
    assert len(weights) == 17 and {w for n, w in weights.items() if n not in pooled} == {"Multiply"}
    runner = densenet.Runner(
        densenet.load(model),
        torch.device("cpu"),
        dtype="int8",
        calibration_images=photos,
        progress=False,
    )
    assert runner.precision == "int8" and runner.logits(torch.randn(2, 3, 48, 48)).shape == (2, 5)


def test_without_nncf_int8_falls_back_to_fx_with_a_warning(photos, tmp_path, monkeypatch):
    """Without nncf, ``quantize`` uses PyTorch's FX (deprecated there) and says so; the command
    writes its TorchScript file."""
    real = quantization.importlib.util.find_spec
    monkeypatch.setattr(
        quantization.importlib.util, "find_spec", lambda n, *a: None if n == "nncf" else real(n, *a)
    )
    assert quantization.default_engine() == "fx"
    with pytest.warns(FutureWarning, match="deprecated.*densenet-toolkit\\[openvino\\]"):
        result = quantize(tiny_model(), photos, num_images=4, progress=False)
    assert result.report["backend"] == "fx-x86" and result.graph is None
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pth")
    with pytest.warns(FutureWarning, match="deprecated"):
        assert (
            main(["quantize", str(checkpoint), str(photos), "--images", "4", "--no-progress"]) == 0
        )
    assert densenet.load(tmp_path / "tiny.int8.pt").precision == "int8"


def test_with_nothing_held_out_each_calibration_image_is_read_once(photos, monkeypatch):
    """int8 is then compared with float32 on the calibration batches already read."""
    opened, real = [], quantization.open_image
    monkeypatch.setattr(quantization, "open_image", lambda p: opened.append(p) or real(p))
    result = quantize(tiny_model(), photos, num_images=4, engine="fx", progress=False)
    assert not result.report["held_out"] and result.report["images"] == 4
    assert len(opened) == 4


def test_errors_are_one_line(tmp_path, photos, capsys):
    with pytest.raises(QuantizeError, match="no calibration images in"):
        quantize(tiny_model(), tmp_path, progress=False)
    with pytest.raises(QuantizeError, match="does not exist"):
        quantize(tiny_model(), tmp_path / "missing", progress=False)
    with pytest.raises(QuantizeError, match="batch_size must be at least 1, got 0"):
        quantize(tiny_model(), photos, batch_size=0)
    with pytest.raises(QuantizeError, match="unknown int8 engine 'onnx'; choose one of nncf, fx"):
        quantize(tiny_model(), photos, engine="onnx")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(QuantizeError, match=r"calibration image .*broken\.png"):
        quantize(tiny_model(), tmp_path, progress=False)
    assert main(["quantize", "densenet121", str(tmp_path / "missing")]) == 2
    assert "densenet quantize: error: calibration folder" in capsys.readouterr().err


def tiny_checkpoint(path: Path, volume: bool = False) -> Path:
    """A `densenet train` checkpoint of a tiny 2-class DenseNet of 48-pixel images, or of
    one-channel 8x16x16 volumes."""
    args = {"num_classes": 2, **TINY, **({"spatial_dims": 3, "in_channels": 1} if volume else {})}
    model = densenet.get_model("densenet_bc_100_k12", **args)
    card = densenet.ModelCard(
        ("a", "b"),
        densenet.Preprocessing(48, 48),
        arch="densenet_bc_100_k12",
        in_channels=args.get("in_channels", 3),
        volume=VolumeTransform((8, 16, 16)) if volume else None,
    )
    save_checkpoint(TrainCheckpoint(card, model.state_dict(), model_args=args), path)
    return path


def test_int8_takes_float_image_models_only(photos, tmp_path, capsys):
    """A volume model (with images or volumes to calibrate on) and an exported file (int8 or
    float) are one error each, exit status 2, before any work: nothing is written."""
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    np.save(volumes / "v.npy", np.zeros((1, 8, 16, 16), dtype=np.float32))
    volume_model = tiny_checkpoint(tmp_path / "volume.pth", volume=True)
    out = tmp_path / "out.int8.pt"
    for folder in (photos, volumes):
        assert main(["quantize", str(volume_model), str(folder), "--out", str(out)]) == 2
        assert "int8 takes image models only" in capsys.readouterr().err
    export = ["export", "--format", "onnx", "--dtype", "int8", "--calibration", str(photos)]
    assert main([*export, "--model", str(volume_model), "--out", str(tmp_path / "v.onnx")]) == 2
    assert "int8 takes image models only" in capsys.readouterr().err
    with pytest.raises(QuantizeError, match="image models only"):
        quantize(densenet.load(volume_model), photos, progress=False)

    int8 = save_quantized(
        quantize(tiny_model(), photos, num_images=4, progress=False), tmp_path / "m.int8.pt"
    )
    scripted = densenet.tasks.export.to_torchscript(tiny_model(), tmp_path / "m.pt")
    for exported in (int8, scripted):
        assert main(["quantize", str(exported), str(photos), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"cannot quantize {exported} (" in err  # an int8 IR or TorchScript file
        assert "needs a float DenseNet" in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "v.onnx").exists()


@pytest.mark.parametrize(
    ("flag", "value", "bound"),
    [("--images", "0", ">= 1"), ("--images", "-1", ">= 1"), ("--batch-size", "0", ">= 1"),
     ("--batch-size", "-1", ">= 1"), ("--holdout", "-1", ">= 0")],
)  # fmt: skip
def test_quantize_numbers_are_range_checked(flag, value, bound, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["quantize", "densenet121", "photos", flag, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"densenet quantize: error: argument {flag}: {value} is out of range ({bound})"


def test_quantize_checks_its_output_path_before_the_work(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        "densenet.infer.quantization.quantize", lambda *a, **k: pytest.fail("worked")
    )
    model = str(tiny_checkpoint(tmp_path / "tiny.pth"))
    missing = tmp_path / "missing" / "m.int8.pt"
    assert main(["quantize", model, str(photos), "--out", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--out {missing}: the folder {missing.parent} does not exist" in err
    assert ".tmp" not in err
    if quantization.default_engine() == "fx":  # a file
        assert main(["quantize", model, str(photos), "--out", str(tmp_path)]) == 2
        assert "is a folder, not a regular file" in capsys.readouterr().err
    else:  # NNCF's IR: a folder
        (tmp_path / "file").write_text("")
        assert main(["quantize", model, str(photos), "--out", str(tmp_path / "file")]) == 2
        assert "is a file; NNCF's int8 model is a folder" in capsys.readouterr().err
    for inside in (model, str(photos / "coffee0.png")):  # an input, or a file of the input folder
        assert main(["quantize", model, str(photos), "--out", inside]) == 2
        assert "the input" in capsys.readouterr().err


def test_quantize_says_when_it_compares_on_its_calibration_images(photos, tmp_path, capsys):
    """Fewer images than --holdout + 1: the table says int8 was compared on the images it was
    calibrated on, and a warning says why; --weights none warns of random weights."""
    model = str(tiny_checkpoint(tmp_path / "tiny.pth"))
    argv = ["quantize", model, str(photos), "--images", "6", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "m.int8.pt")]) == 0
    captured = capsys.readouterr()
    assert "6       calibration (none held out)" in captured.out
    assert "densenet quantize: warning: none of the 6 images was held out" in captured.err
    assert main([*argv, "--holdout", "2", "--out", str(tmp_path / "m.int8.pt")]) == 0
    captured = capsys.readouterr()
    assert "2       held out" in captured.out and "warning" not in captured.err
    assert main(["quantize", "densenet121", str(tmp_path / "none"), "--weights", "none"]) == 2
    err = capsys.readouterr().err
    assert "densenet quantize: warning: --weights none: random weights" in err


WITHOUT_INT8 = {
    "predict": ["predict", "x.png"],
    "predict float32": ["predict", "x.png", "--dtype", "float32"],
    "embed": ["embed", "x", "--out", "o"],
    "eval": ["eval", "d"],
    "serve": ["serve"],
    "export": ["export", "--format", "onnx", "--out", "m.onnx"],
}


@pytest.mark.parametrize("flag", ["--calibration-images", "--calibration"])  # the older spelling
@pytest.mark.parametrize("argv", WITHOUT_INT8.values(), ids=WITHOUT_INT8)
def test_calibration_images_without_int8_is_a_usage_error(argv, flag, capsys):
    assert main([*argv, flag, "photos"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"densenet {argv[0]}: error: --calibration-images applies with --dtype int8 only; add "
        "--dtype int8 or drop it\n"
    )


def test_the_old_calibration_keyword_still_works_with_a_deprecation_warning(tmp_path):
    """``calibration=`` (the int8 images' older name) reaches the quantization as
    ``calibration_images=`` does, with a DeprecationWarning; both at once are a TypeError."""
    missing = tmp_path / "missing"
    model = tiny_model()
    calls = {
        "quantize": lambda **kw: quantize(model, **kw, engine="fx", progress=False),
        "calibration_batches": lambda **kw: quantization.calibration_batches(
            card=densenet.load(model).card, **kw
        ),
        "Runner": lambda **kw: densenet.Runner(
            densenet.load(model), torch.device("cpu"), dtype="int8", progress=False, **kw
        ),
        "Classifier": lambda **kw: densenet.Classifier(model, device="cpu", dtype="int8", **kw),
    }
    for name, call in calls.items():
        with pytest.raises(QuantizeError, match="calibration folder .*missing does not exist"):
            call(calibration_images=missing)
        with (
            pytest.warns(DeprecationWarning, match=f"{name}\\(\\): calibration= is deprecated"),
            pytest.raises(QuantizeError, match="calibration folder .*missing does not exist"),
        ):
            call(calibration=missing)
        with pytest.raises(TypeError, match="give calibration_images= only"):
            call(calibration=missing, calibration_images=missing)


def test_the_function_stays_callable_after_the_command_line_is_imported():
    import densenet.cli  # noqa: F401 (imports the quantize command and the quantization module)

    assert callable(densenet.quantize) and densenet.quantize is quantize


def test_predict_and_embed_run_int8_calibrated_on_a_folder(photos, tmp_path, capsys):
    """``--dtype int8 --calibration-images DIR`` quantizes on the fly (the Runner), for the Python API,
    predict and embed alike; without calibration images it is one error."""
    torch.manual_seed(0)
    model = randomize_batchnorm(tiny_model(num_classes=10)).eval()
    images = sorted(str(p) for p in photos.iterdir())[:6]
    exact = densenet.Classifier(model, device="cpu")
    int8 = densenet.Classifier(model, device="cpu", dtype="int8", calibration_images=photos)
    assert int8.runner.precision == "int8"
    if quantization.default_engine() == "nncf":  # OpenVINO runs NNCF's int8 graph
        assert isinstance(int8.model, quantization.CompiledModule)
    else:
        assert any(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in int8.model.modules())
    agree = [a[0][0] == b[0][0] for a, b in zip(exact.predict(images), int8.predict(images))]
    assert sum(agree) >= 4
    with pytest.raises(densenet.errors.DenseNetError, match="int8 needs calibration images"):
        densenet.Classifier(model, device="cpu", dtype="int8")

    args = ["--model", "densenet121", "--weights", "none", "--device", "cpu", "--dtype", "int8"]
    assert main(["predict", images[0], *args]) == 2
    assert "int8 needs calibration images" in capsys.readouterr().err
    out = tmp_path / "vectors"
    int8_args = [*args, "--calibration-images", str(photos)]
    assert main(["embed", str(photos), "--out", str(out), *int8_args]) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert table.num_rows == 24 and table.schema.metadata  # one row per image
    assert '"precision": "int8"' in (out / "_densenet_bulk.json").read_text()


def test_eval_measures_the_int8_model_next_to_float32(photos, tmp_path):
    """``evaluate_dataset(dtype="int8", calibration_images=DIR)`` (``densenet eval --dtype int8``)
    scores the quantized model: the same images, a loss near float32's."""
    data = tmp_path / "val"
    for photo in photos.iterdir():
        (data / photo.stem.rstrip("0123456789")).mkdir(parents=True, exist_ok=True)
        (data / photo.stem.rstrip("0123456789") / photo.name).symlink_to(photo)
    torch.manual_seed(0)
    model = randomize_batchnorm(tiny_model(num_classes=3)).eval()
    common = {"model": model, "weights": None, "device": "cpu", "workers": 0, "progress": False}
    exact = evaluate_dataset(str(data), **common)
    int8 = evaluate_dataset(str(data), **common, dtype="int8", calibration_images=photos)
    assert (exact["precision"], int8["precision"]) == ("float32", "int8")
    assert exact["images"] == int8["images"] == 24
    assert int8["loss"] == pytest.approx(exact["loss"], rel=0.2)


def test_bench_times_int8_next_to_onnxruntime_and_openvino_int8():
    """``densenet bench --dtype int8``: densenet's NNCF and FX int8 and the other int8 engines beside float32 torchvision, each checked
    against float64 and its error reported (OpenVINO's when installed)."""
    torch.manual_seed(0)
    model = randomize_batchnorm(tiny_model(growth_rate=8))
    results = run_benchmark([model], [2], dtype="int8", image_size=32, rounds=1, repeats=1)
    by_engine = {r.engine: r for r in results}
    assert list(by_engine) == [
        "torchvision eager", "densenet int8", "densenet int8 fx", "onnxruntime int8",
        "openvino int8",
    ]  # fmt: skip
    assert by_engine["torchvision eager"].dtype == "float32"
    for name in ("densenet int8 fx", "onnxruntime int8"):
        r = by_engine[name]
        assert r.dtype == "int8" and 0 < r.rel_error < 0.15 and r.ms > 0, r
    for name in ("densenet int8", "openvino int8"):  # NNCF's
        r = by_engine[name]
        assert r.note.startswith("not installed") or 0 < r.rel_error < 0.15, r


def test_int8_onnx_export_runs_in_onnxruntime_and_openvino_alike(photos, tmp_path, capsys):
    """``export --format onnx --dtype int8 --calibration DIR``: a QDQ model whose int8 logits
    are near float32's in ONNX Runtime (through ``densenet.load``) and the same in OpenVINO."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = randomize_batchnorm(tiny_model(num_classes=10)).eval()
    weights = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "tiny.int8.onnx"
    assert main(["export", "--format", "onnx", "--dtype", "int8", "--model", "densenet121",
                 "--weights", "none", "--out", str(out)]) == 2  # fmt: skip
    assert "needs calibration images" in capsys.readouterr().err
    densenet.tasks.export.to_onnx(model, out, dtype="int8", calibration_images=photos, fold=True)
    import onnx

    ops = {node.op_type for node in onnx.load(out).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    loaded = densenet.load(out)
    assert loaded.card.num_classes == 10
    x = torch.cat(quantization.calibration_batches(photos, loaded.card, progress=False))[:8]
    with torch.no_grad():
        exact, int8 = model(x), loaded.module(x)
    assert (int8 - exact).norm() / exact.norm() < 0.15
    ov = pytest.importorskip("openvino")
    compiled = ov.Core().compile_model(str(out), "CPU")
    by_openvino = torch.from_numpy(compiled(x.numpy())[0])
    assert torch.equal(by_openvino.argmax(1), int8.argmax(1))
    assert (by_openvino - int8).norm() / int8.norm() < 0.05

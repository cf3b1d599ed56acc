"""densenet.infer.runner.Runner: the one way Classifier, bulk, Ray and evaluation run a loaded model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import randomize_batchnorm, tiny_model

import densenet
from densenet.errors import DenseNetError
from densenet.infer.exported import OnnxModel
from densenet.infer.form import BucketedModel, InferenceOnly
from densenet.infer.runner import NonFiniteOutputError, Runner, count_weights

CPU = torch.device("cpu")


def loaded_tiny(**kwargs) -> densenet.LoadedModel:
    torch.manual_seed(0)
    return densenet.load(randomize_batchnorm(tiny_model(num_classes=5, **kwargs)).eval())


def test_logits_and_probabilities_are_the_models_as_the_card_says():
    loaded = loaded_tiny()
    runner = Runner(loaded, CPU)
    assert isinstance(runner.module, InferenceOnly) and runner.precision == "float32"
    x = torch.randn(3, 3, 40, 44)
    with torch.inference_mode():
        reference = loaded.module(x)
    logits = runner.logits(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runner.probabilities(x), reference.softmax(1), rtol=1e-4, atol=1e-6)
    # (N, V, C, H, W) views: each image's probabilities averaged over its views
    views = torch.stack([x, x.flip(-1)], 1)
    expected = (reference.softmax(1) + runner.probabilities(x.flip(-1))) / 2
    torch.testing.assert_close(runner.probabilities(views), expected, rtol=1e-4, atol=1e-6)


def test_a_multi_label_card_gives_sigmoids():
    loaded = loaded_tiny()
    loaded = densenet.LoadedModel(loaded.module, loaded.card.replace(multi_label=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = loaded.module(x).sigmoid()
    torch.testing.assert_close(Runner(loaded, CPU).probabilities(x), expected, rtol=1e-4, atol=1e-6)


def test_headless_gives_the_pooled_features_and_keeps_the_loaded_model():
    loaded = loaded_tiny()
    runner = Runner(loaded, CPU, headless=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = loaded.module.forward_head(loaded.module.forward_features(x), pre_logits=True)
    features = runner.logits(x)
    assert features.shape == (2, loaded.module.num_features)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    assert loaded.module.num_classes == 5  # the classifier was dropped from a copy
    with pytest.raises(TypeError, match="pooled features need a DenseNet"):
        Runner(densenet.LoadedModel(torch.nn.Identity(), loaded.card), CPU, headless=True)


def test_activation_maps_come_from_the_model_that_runs():
    runner = Runner(loaded_tiny(), CPU, max_batch=4)
    assert isinstance(runner.module, BucketedModel) and not runner.module.cuda_graphs
    x = torch.randn(3, 3, 64, 64)
    maps = runner.activation_maps(x)
    assert maps.maps.shape[:2] == (3, 5)
    torch.testing.assert_close(maps.logits, runner.logits(x), rtol=1e-4, atol=1e-5)


def test_unoptimized_and_exported_modules_run_as_given():
    loaded = loaded_tiny()
    plain = Runner(loaded, CPU, optimize=False)
    assert plain.module is loaded.module
    half = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(5)).half()
    half(torch.zeros(1, 3 * 8 * 8, dtype=torch.float16))  # materialise the float16 weights
    runner = Runner(densenet.LoadedModel(half, loaded.card), CPU)
    assert runner.precision == "float16"
    assert runner.logits(torch.randn(2, 3, 8, 8)).dtype == torch.float32  # fed its own dtype
    assert Runner(densenet.LoadedModel(half, loaded.card), CPU, dtype="float16").module is half


@pytest.mark.parametrize("dtype", ["int8", "bfloat16", torch.float16])
def test_a_precision_the_module_will_not_run_in_is_refused(dtype):
    loaded = loaded_tiny()
    with pytest.raises(DenseNetError, match="cannot run this DenseNet in .*--no-optimize"):
        Runner(loaded, CPU, optimize=False, dtype=dtype)
    assert Runner(loaded, CPU, optimize=False, dtype="float32").module is loaded.module


def nan_model(**kwargs) -> torch.nn.Module:
    """A tiny DenseNet whose output is NaN for every input: its final BatchNorm's running
    variance is -1, which the inference form folds into the classifier as sqrt(-1), NaN."""
    model = randomize_batchnorm(tiny_model(num_classes=5, **kwargs)).eval()
    model.features.norm5.running_var.fill_(-1.0)
    return model


@pytest.mark.parametrize("how", [{}, {"max_batch": 2}, {"optimize": False}])
def test_non_finite_output_is_one_error_naming_the_model(how):
    card = densenet.ModelCard.for_model(nan_model(), arch="densenet121", weights="broken.pth")
    runner = Runner(densenet.LoadedModel(nan_model(), card), CPU, **how)
    x = torch.randn(3, 3, 32, 32)
    named = r"model densenet121 \(weights broken.pth\) produced non-finite output"
    for output in (runner.logits, runner.probabilities, runner.activation_maps):
        with pytest.raises(NonFiniteOutputError, match=named):
            output(x)
    with pytest.raises(NonFiniteOutputError, match=named):
        runner.warm_up()
    assert issubclass(NonFiniteOutputError, DenseNetError)  # one line and exit 2 on the CLI


@pytest.mark.parametrize("classes", [2, 7])
def test_a_card_naming_another_number_of_classes_is_one_error(classes):
    loaded = loaded_tiny()  # 5 outputs
    card = loaded.card.replace(classes=tuple(f"c{i}" for i in range(classes)))
    runner = Runner(densenet.LoadedModel(loaded.module, card), CPU)
    with pytest.raises(
        DenseNetError, match=f"gives 5 outputs per image but its card names {classes}"
    ):
        runner.probabilities(torch.randn(2, 3, 32, 32))
    headless = Runner(densenet.LoadedModel(loaded.module, card), CPU, headless=True)
    assert headless.logits(torch.randn(2, 3, 32, 32)).shape == (2, loaded.module.num_features)


def test_a_calibration_that_gives_non_finite_probabilities_is_named():
    class Overflowing:  # a card's calibration as a broken checkpoint may hold one
        def apply(self, logits):
            return logits * float("inf")

    loaded = loaded_tiny()
    broken = densenet.LoadedModel(loaded.module, loaded.card.replace(calibration=Overflowing()))
    with pytest.raises(NonFiniteOutputError, match="its calibration .*calibrate it again"):
        Runner(broken, CPU).probabilities(torch.randn(2, 3, 32, 32))


@pytest.mark.filterwarnings("ignore")  # torch.jit.trace is deprecated; exported files are traced
def test_weights_are_counted_from_the_model_as_loaded_whatever_form_runs_it():
    """A DenseNet's parameters, optimized or not; an exported file's tensors; none for ONNX
    Runtime."""
    loaded = loaded_tiny()
    expected = sum(p.numel() for p in loaded.module.parameters())
    for how in ({}, {"max_batch": 2}, {"optimize": False}):
        assert Runner(loaded, CPU, **how).weights_count == expected
    headless = Runner(loaded, CPU, headless=True).weights_count
    assert headless == expected - loaded.module.classifier.weight.numel() - 5
    scripted = torch.jit.trace(loaded.module, torch.randn(1, 3, 32, 32))
    held = sum(t.numel() for t in loaded.module.state_dict().values())  # BatchNorm stats too
    assert count_weights(scripted) == held
    onnx_like = OnnxModel.__new__(OnnxModel)  # ONNX Runtime holds the weights, not torch
    torch.nn.Module.__init__(onnx_like)
    assert count_weights(onnx_like) is None


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_an_int8_files_packed_weights_are_counted():
    """TorchScript leaves an int8 layer's packed weights out of its state_dict."""
    from densenet.infer.quantization import quantize_module

    model = loaded_tiny().module
    x = torch.randn(2, 3, 32, 32)
    int8 = torch.jit.trace(quantize_module(model, [x]), x, check_trace=False)
    convolutions = sum(p.numel() for n, p in model.named_parameters() if "conv" in n)
    assert count_weights(int8) > convolutions + model.classifier.weight.numel()


def test_the_runner_is_told_what_it_runs_by_the_loaded_model():
    """``load`` says the kind, spatial dims and input dtype; the Runner reads them, not guesses:
    a DenseNet told to be an exported file runs as given."""
    loaded = loaded_tiny()
    assert (loaded.kind, loaded.spatial_dims, loaded.input_dtype) == ("densenet", 2, None)
    half = torch.nn.Linear(2, 5).half()
    assert densenet.LoadedModel(half, loaded.card).input_dtype == torch.float16
    assert densenet.LoadedModel(half, loaded.card).kind == "module"
    told = dataclasses.replace(loaded, kind="exported", input_dtype=torch.float64)
    runner = Runner(told, CPU)
    assert runner.module is loaded.module and runner.input_dtype == torch.float64
    with pytest.raises(ValueError, match="kind must be one of"):
        densenet.LoadedModel(half, loaded.card, kind="onnx")


def test_bucketing_is_the_runners_choice():
    """Buckets by default on CUDA only; ``buckets=True`` (or ``max_batch``) on any device."""
    loaded = loaded_tiny()
    assert not isinstance(Runner(loaded, CPU, batch_size=4).module, BucketedModel)
    for how in ({"batch_size": 4, "buckets": True}, {"max_batch": 4}):
        assert Runner(loaded, CPU, **how).module.buckets == (1, 2, 4)

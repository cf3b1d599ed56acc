"""The engines ``densenet bench`` times (``densenet.tasks.bench``): named ways to run a model's
weights, each built from the model, an example input and a dtype.

torchvision eager (the baseline: float32, NCHW; for an RDNet, which torchvision lacks, timm eager),
torchvision under ``torch.compile`` (the second reference), timm, ONNX Runtime and OpenVINO (CPU)
when installed, and ``densenet.optimize`` with each backend (eager, inductor, onednn and openvino
on CPU, triton on CUDA) and, on CUDA, replayed as CUDA graphs; with dtype ``"int8"``, densenet's
int8 (NNCF's, and PyTorch's FX fallback) beside ONNX Runtime's static QDQ int8 and OpenVINO's NNCF
int8 (CPU, each calibrated on the same random-normal images).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from densenet.infer.exported import INPUT_NAME
from densenet.infer.form import BucketedModel
from densenet.infer.openvino import (
    CompiledModule,
    compile_for_cpu,
    keeps_signal_stack,
    require_openvino,
)
from densenet.infer.optimize import RDNET_BACKENDS, optimize
from densenet.infer.quantization import quantize_module, quantize_nncf, quantize_onnx
from densenet.nn.model import DenseNet
from densenet.nn.rdnet import RDNET_ARCHITECTURES, RDNet

__all__ = [
    "BASELINE",
    "COMPILED_REFERENCE",
    "ENGINES",
    "RDNET_BASELINE",
    "Engine",
    "baseline_engine",
    "engine_names",
]

CALIBRATION_IMAGES = 32  # random-normal images the int8 engines calibrate on


@dataclass
class Engine:
    """A named way to run the model: ``build(model, x)`` returns a callable ``x -> logits`` (or
    raises ``ImportError`` when its package is missing)."""

    name: str
    build: Callable[[DenseNet, Tensor, torch.dtype], Callable[[Tensor], Tensor]]
    devices: tuple[str, ...] = ("cpu", "cuda")
    reduced_precision: bool = True  # runs at the requested dtype (else always float32)
    own_precision: bool = False  # picks its precision itself (shown as "default")
    int8: bool = False  # runs int8, calibrated on ``_calibration``: only with dtype "int8"


def _autocast(fn: Callable[[Tensor], Tensor], x: Tensor, dtype: torch.dtype):
    """``fn`` under autocast to ``dtype`` (a no-op for float32)."""

    def run(inp: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return fn(inp)

    return run


def _channels_last(model: nn.Module) -> nn.Module:
    return model.to(memory_format=torch.channels_last)


def _torchvision(model: DenseNet) -> nn.Module:
    import torchvision

    if not isinstance(model, DenseNet):
        raise NotImplementedError(f"torchvision has no {type(model).__name__}")
    config = model.config
    if config["stem"] != "imagenet" or config["compression"] != 0.5 or not config["bn_size"]:
        raise NotImplementedError("torchvision builds only ImageNet-stem DenseNet-BC models")
    keys = ("growth_rate", "block_config", "num_init_features", "bn_size", "num_classes")
    tv = torchvision.models.DenseNet(**{key: config[key] for key in keys})
    tv.load_state_dict(model.state_dict())
    return tv.eval().to(next(model.parameters()).device)


def _tv_eager(model: DenseNet, x: Tensor, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    return _torchvision(model)


def _tv_eager_cl(model: DenseNet, x: Tensor, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    tv = _channels_last(_torchvision(model))
    return _autocast(tv, x, dtype)


def _compile_mode(x: Tensor) -> str:
    """CUDA graphs pay for small GPU batches, which are launch-bound."""
    return "reduce-overhead" if x.device.type == "cuda" and x.shape[0] <= 8 else "default"


def _tv_compile(model: DenseNet, x: Tensor, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    tv = _channels_last(_torchvision(model))
    return _autocast(torch.compile(tv, mode=_compile_mode(x)), x, dtype)


def _timm_model(model: DenseNet) -> nn.Module:
    """timm's model of ``model``'s architecture with its weights, eval mode, on its device."""
    import timm

    arch = getattr(model, "arch", None)
    if arch not in timm.list_models(["densenet*", "rdnet*"]):
        raise NotImplementedError(f"timm has no architecture {arch!r}")
    net = timm.create_model(arch, pretrained=False, num_classes=model.num_classes)
    net.load_state_dict(model.state_dict())
    return net.eval().to(next(model.parameters()).device)


def _timm_eager(model: DenseNet, x: Tensor, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    return _timm_model(model)


def _timm(model: DenseNet, x: Tensor, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    return _autocast(_channels_last(_timm_model(model)), x, dtype)


def _runs_on(model: DenseNet, backend: str) -> None:
    """``NotImplementedError`` (an engine that does not apply) for an RDNet's missing engines."""
    if isinstance(model, RDNet) and backend not in RDNET_BACKENDS:
        raise NotImplementedError(f"an RDNet runs on backends {', '.join(RDNET_BACKENDS)}")


def _ours(backend: str, precision: str | None = None):
    """``optimize(backend=...)`` in the benchmark's dtype, or in ``precision`` (``"auto"``)."""

    def build(model: DenseNet, x: Tensor, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        _runs_on(model, backend)
        return optimize(model, dtype=precision or dtype, backend=backend)

    return build


def _ours_compile(model: DenseNet, x: Tensor, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    _runs_on(model, "inductor")
    mode = _compile_mode(x)
    return optimize(model, dtype=dtype, compile=True if mode == "default" else mode)


def _cuda_graph(backend: str):
    """``optimize(backend=...)`` captured as one CUDA graph per input shape and replayed."""

    def build(model: DenseNet, x: Tensor, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        _runs_on(model, backend)
        fast = optimize(model, dtype=dtype, backend=backend)
        return BucketedModel(fast, max_batch=x.shape[0], cuda_graphs=True)

    return build


def _export_onnx(model: DenseNet, x: Tensor, path: str) -> None:
    torch.onnx.export(
        model,
        (x,),
        path,
        input_names=[INPUT_NAME],
        output_names=["y"],
        dynamo=False,
        dynamic_axes={INPUT_NAME: {0: "n"}, "y": {0: "n"}},
    )


def _ort_session(ort: Any, path: str) -> Callable[[Tensor], Tensor]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda inp: torch.from_numpy(session.run(None, {INPUT_NAME: inp.numpy()})[0])


def _onnxruntime(model: DenseNet, x: Tensor, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        _export_onnx(model, x, path)
        return _ort_session(ort, path)


@keeps_signal_stack
def _ov_request(ov: Any, ov_model: Any, precision: str | None) -> Callable[[Tensor], Tensor]:
    config = {"NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(torch.get_num_threads())}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    request = ov.Core().compile_model(ov_model, "CPU", config).create_infer_request()
    return lambda inp: torch.from_numpy(request.infer({0: inp.numpy()})[0].copy())


def _openvino(precision: str | None):
    def build(model: DenseNet, x: Tensor, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        import openvino as ov

        return _ov_request(
            ov, keeps_signal_stack(ov.convert_model)(model, example_input=x), precision
        )

    return build


def _calibration(x: Tensor) -> list[Tensor]:
    """What the int8 engines calibrate on: ``CALIBRATION_IMAGES`` random-normal images of
    ``x``'s size (one generator for all engines), in batches of 8."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(CALIBRATION_IMAGES, *x.shape[1:], generator=generator)
    return list(images.split(8))


def _densenet_int8_fx(model: DenseNet, x: Tensor, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """PyTorch's FX int8 (``densenet.infer.quantization.quantize_module``), the fallback."""
    return quantize_module(model.cpu(), _calibration(x))


def _densenet_int8_nncf(
    model: DenseNet, x: Tensor, dtype: torch.dtype
) -> Callable[[Tensor], Tensor]:
    """densenet's NNCF int8 (``densenet.infer.quantization.quantize_nncf``), as ``densenet quantize``
    writes it, compiled as ``densenet.load`` compiles it."""
    ov = require_openvino("densenet int8")
    graph = quantize_nncf(model.cpu(), _calibration(x), progress=False)
    return CompiledModule(compile_for_cpu(ov, graph, torch.float32), "int8 DenseNet")


def _onnxruntime_int8(model: DenseNet, x: Tensor, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """ONNX Runtime's static QDQ quantization (``densenet.infer.quantization.quantize_onnx``)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        fp32, int8 = os.path.join(folder, "model.onnx"), os.path.join(folder, "int8.onnx")
        _export_onnx(model, x, fp32)
        quantize_onnx(fp32, int8, _calibration(x))
        return _ort_session(ort, int8)


@keeps_signal_stack
def _openvino_int8(model: DenseNet, x: Tensor, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """OpenVINO's model quantized by NNCF's post-training ``quantize``."""
    import nncf
    import openvino as ov

    calibration = nncf.Dataset([batch.numpy() for batch in _calibration(x)])
    quantized = nncf.quantize(ov.convert_model(model, example_input=x), calibration)
    return _ov_request(ov, quantized, None)


ENGINES: dict[str, Engine] = {
    e.name: e
    for e in [
        Engine("torchvision eager", _tv_eager, reduced_precision=False),
        Engine("torchvision eager CL", _tv_eager_cl),
        Engine("torchvision compile CL", _tv_compile),
        Engine("timm eager", _timm_eager, reduced_precision=False),
        Engine("timm eager CL", _timm),
        Engine("onnxruntime", _onnxruntime, ("cpu",), reduced_precision=False),
        Engine("openvino f32", _openvino("f32"), ("cpu",), reduced_precision=False),
        Engine("openvino default", _openvino(None), ("cpu",), False, own_precision=True),
        Engine("densenet.optimize", _ours("eager")),
        Engine("densenet.optimize onednn", _ours("onednn"), ("cpu",)),
        Engine("densenet openvino", _ours("openvino"), ("cpu",)),
        Engine("densenet openvino auto", _ours("openvino", "auto"), ("cpu",), own_precision=True),
        Engine("densenet.optimize compile", _ours_compile),
        Engine("densenet.optimize triton", _ours("triton"), ("cuda",)),
        Engine("densenet.optimize CUDA graph", _cuda_graph("eager"), ("cuda",)),
        Engine("densenet.optimize triton CUDA graph", _cuda_graph("triton"), ("cuda",)),
        Engine("densenet int8", _densenet_int8_nncf, ("cpu",), int8=True),
        Engine("densenet int8 fx", _densenet_int8_fx, ("cpu",), int8=True),
        Engine("onnxruntime int8", _onnxruntime_int8, ("cpu",), int8=True),
        Engine("openvino int8", _openvino_int8, ("cpu",), int8=True),
    ]
}
BASELINE = "torchvision eager"
RDNET_BASELINE = "timm eager"  # torchvision has no RDNet
COMPILED_REFERENCE = "torchvision compile CL"


def baseline_engine(model: str | DenseNet | RDNet) -> str:
    """The engine the ratios are to: timm eager for an RDNet (torchvision has none), else
    torchvision eager."""
    rdnet = isinstance(model, RDNet) or (isinstance(model, str) and model in RDNET_ARCHITECTURES)
    return RDNET_BASELINE if rdnet else BASELINE


def engine_names(engines: Sequence[str] | None, device: torch.device, int8: bool) -> list[str]:
    """The engines to time on ``device``: those in ``engines`` that run there (``ValueError`` for
    a name not in ``ENGINES``), by default all that run there in int8 (``int8``) or else all the
    others."""
    unknown = [n for n in engines or () if n not in ENGINES]
    if unknown:
        raise ValueError(f"unknown engines {unknown}; choose from {list(ENGINES)}")
    return [
        n
        for n in engines or ENGINES
        if device.type in ENGINES[n].devices and (engines or ENGINES[n].int8 == int8)
    ]

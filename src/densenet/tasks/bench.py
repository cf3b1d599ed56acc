"""Inference speed of DenseNet implementations, measured in one process on identical inputs.

Every engine runs the same weights on the same random-normal input: torchvision eager (the
baseline: float32, NCHW; for an RDNet, which torchvision lacks, timm eager), torchvision under ``torch.compile`` (the second reference), timm, ONNX
Runtime and OpenVINO (CPU) when installed, and ``densenet.optimize`` with each backend (eager,
inductor, onednn and openvino on CPU, triton on CUDA) and, on CUDA, replayed as CUDA graphs; with dtype
``"int8"``, densenet's int8 (NNCF's, and PyTorch's FX fallback) beside ONNX Runtime's static QDQ int8 and OpenVINO's NNCF int8
(CPU, each calibrated on the same random-normal images). Each engine's
output is checked against a float64 evaluation of the model before it is timed; float32 engines
are checked and timed with TF32 off (TF32 rounds products to 10 mantissa bits, about 1e-3 relative: not float32).
Engines are then timed in interleaved rounds (so a noisy machine slows all of them alike) and the
median is reported, with its ratio to both references. Used by ``densenet bench`` and
``benchmarks/bench_inference.py``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from densenet.data.files import text_table
from densenet.infer.engines import cpu_flags, cpu_kind, cpu_name
from densenet.infer.exported import INPUT_NAME
from densenet.infer.form import BucketedModel
from densenet.infer.openvino import (
    CompiledModule,
    compile_for_cpu,
    keeps_signal_stack,
    require_openvino,
)
from densenet.infer.optimize import RDNET_BACKENDS, optimize
from densenet.infer.precision import DTYPES, dtype_name
from densenet.infer.quantization import quantize_module, quantize_nncf, quantize_onnx
from densenet.infer.runtime import resolve_device
from densenet.nn.model import DenseNet
from densenet.nn.rdnet import RDNET_ARCHITECTURES, RDNet
from densenet.nn.registry import get_model

__all__ = ["ENGINES", "Result", "machine", "run_benchmark"]

CHECKED = 8  # images of each batch whose outputs are compared with the float64 reference
OTHER_BATCHES = (1, 64)  # what each engine also runs first with ``shapes_vary``
FLOAT32_TOLERANCE = 1e-4  # relative error allowed against the float64 reference
REDUCED_TOLERANCE = 2e-2  # the same for bfloat16, float16 and OpenVINO's default precision
INT8_TOLERANCE = 0.15  # the same for int8 (random weights and inputs; the error is reported)
CALIBRATION_IMAGES = 32  # random-normal images the int8 engines calibrate on


@dataclass
class Result:
    """One engine at one batch size: median latency of a forward pass and its error."""

    model: str
    engine: str
    batch: int
    dtype: str
    ms: float | None = None
    images_per_s: float | None = None
    speedup: float | None = None  # vs the baseline: torchvision (an RDNet: timm) eager float32
    vs_compiled: float | None = None  # vs torch.compile(torchvision), when that engine ran
    rel_error: float | None = None
    setup_s: float | None = None
    note: str = ""
    times_ms: list[float] = field(default_factory=list, repr=False)


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
    tv = torchvision.models.DenseNet(
        config["growth_rate"], config["block_config"], config["num_init_features"],
        config["bn_size"], num_classes=config["num_classes"],
    )  # fmt: skip
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
        model, (x,), path, input_names=[INPUT_NAME], output_names=["y"], dynamo=False,
        dynamic_axes={INPUT_NAME: {0: "n"}, "y": {0: "n"}},
    )  # fmt: skip


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


def _rel_error(y: Tensor, ref: Tensor) -> float:
    y = y.detach().to("cpu", torch.float64)
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, and every LayerNorm
    and RDNet layer scale (``gamma``) non-trivial values, so that a wrong fold changes the
    output (a fresh BatchNorm is the identity in eval mode, a fresh layer scale is 1e-6)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                n = m.weight.numel()
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
            gamma = getattr(m, "gamma", None)
            if isinstance(gamma, nn.Parameter):
                gamma.copy_(torch.rand(gamma.shape, generator=generator) * 0.5 + 0.1)
    return model


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[Tensor], Tensor], x: Tensor, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls (CUDA: events around each call)."""
    times = []
    for _ in range(repeats):
        if x.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - begin) * 1e3)
    return times


@contextlib.contextmanager
def _precision(result: Result) -> Iterator[None]:
    """TF32 off while a float32 engine is built, checked or timed (no-op for other dtypes)."""
    if result.dtype != "float32":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _setup(
    name: str, model: DenseNet, x: Tensor, dtype: torch.dtype, shapes_vary: bool = False
) -> tuple[Callable[[Tensor], Tensor] | None, Result]:
    """Build an engine, run it once (compilation), check its output; a failed check or a missing
    package leaves a result with a note and no callable. With ``shapes_vary`` the engine first
    runs batches of ``OTHER_BATCHES`` images (as a service would), then ``x``."""
    engine = ENGINES[name]
    run_dtype = dtype if engine.reduced_precision else torch.float32
    precision = "int8" if engine.int8 else dtype_name(run_dtype)
    result = Result(getattr(model, "arch", None) or "custom", name, x.shape[0], precision)
    if engine.own_precision:
        result.dtype = "default"
    begin = time.perf_counter()
    try:
        with _precision(result):
            fn = engine.build(model, x, run_dtype)
            with torch.inference_mode():
                for batch in OTHER_BATCHES if shapes_vary else ():
                    fn(torch.randn(batch, *x.shape[1:], device=x.device))
                fn(x)
        _synchronize(x.device)
    except ImportError as error:
        result.note = f"not installed ({error.name})"
        return None, result
    except NotImplementedError as error:
        result.note = f"n/a: {error}"
        return None, result
    except Exception as error:  # an engine that fails is reported, not fatal
        result.note = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        return None, result
    result.setup_s = time.perf_counter() - begin
    return fn, result


def _check(fn, result: Result, x: Tensor, reference: Tensor) -> bool:
    with _precision(result), torch.inference_mode():
        result.rel_error = _rel_error(fn(x)[: len(reference)], reference)
    tolerance = {"float32": FLOAT32_TOLERANCE, "int8": INT8_TOLERANCE}.get(
        result.dtype, REDUCED_TOLERANCE
    )
    if not result.rel_error <= tolerance:
        result.note = f"wrong output: relative error {result.rel_error:.2e} > {tolerance:.2g}"
        return False
    return True


def run_benchmark(
    models: Sequence[str | DenseNet | RDNet] = ("densenet121",),
    batch_sizes: Sequence[int] = (1, 16),
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    engines: Sequence[str] | None = None,
    image_size: int = 224,
    rounds: int = 5,
    repeats: int | None = None,
    warmup: int = 2,
    seed: int = 0,
    shapes_vary: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[Result]:
    """Measure every engine on every model and batch size.

    Args:
        models: architecture names (random weights, randomised norms: ``randomize_batchnorm``)
            or ``DenseNet`` and ``RDNet`` instances (weights as given).
        batch_sizes: images per forward pass.
        device: ``"cpu"`` or ``"cuda"``.
        dtype: the precision of the engines that support reduced precision (float32, bfloat16,
            float16), or ``"int8"``: the int8 engines (CPU: densenet's NNCF and FX int8, ONNX Runtime's
            static QDQ, OpenVINO with NNCF; each calibrated on the same random-normal images);
            the baseline (torchvision eager; timm eager for an RDNet) always runs float32 NCHW.
        engines: names from ``ENGINES`` (default: all that run on ``device`` and in ``dtype``).
        image_size: input height and width in pixels.
        rounds: timing rounds; each round times every engine ``repeats`` times in turn.
        repeats: calls per engine per round (default: enough for about 0.2 s of work on CPU).
        warmup: untimed calls per engine after its check.
        shapes_vary: before its check, each engine also runs batches of 1 and 64 images in the
            same process (a compiled engine then has seen other shapes, as in a service).
        progress: called with text as the benchmark goes: first what will run, then each
            engine as it is set up, then each model and batch size's rows as soon as measured.

    Returns:
        one ``Result`` per model, batch size and engine; ``ms`` is the median over all timed
        calls, ``speedup`` the ratio of the baseline's median to it (torchvision eager float32;
        for an RDNet timm eager float32) and ``vs_compiled`` that of torch.compile(torchvision),
        when it ran.
    """
    device = resolve_device(device)
    precision = torch.float32 if dtype == "int8" else DTYPES[dtype]
    say = progress or (lambda line: None)
    unknown = [n for n in engines or () if n not in ENGINES]
    if unknown:
        raise ValueError(f"unknown engines {unknown}; choose from {list(ENGINES)}")
    int8 = dtype == "int8"  # the int8 engines (CPU), else the others, unless named
    names = [
        n for n in engines or ENGINES
        if device.type in ENGINES[n].devices and (engines or ENGINES[n].int8 == int8)
    ]  # fmt: skip
    baselines = [b for b in dict.fromkeys(map(_baseline, models)) if b not in names]
    say(
        f"{len(models)} model(s) x {len(batch_sizes)} batch size(s) x "
        f"{len(baselines) + len(names)} engines ({', '.join([*baselines, *names])}), "
        f"{rounds} timing rounds each"
    )
    results: list[Result] = []
    for model in models:
        if isinstance(model, str):
            torch.manual_seed(seed)
            model = randomize_batchnorm(get_model(model), seed)
        model = model.eval().to(device)
        arch = getattr(model, "arch", None) or "custom"
        baseline = _baseline(model)
        timed_here = names if baseline in names else [baseline, *names]
        for batch in batch_sizes:
            generator = torch.Generator().manual_seed(seed)
            x = torch.randn(batch, 3, image_size, image_size, generator=generator)
            with torch.inference_mode():
                reference = model.double()(x[:CHECKED].double().to(device)).cpu()
            model.float()
            x = x.to(device)
            first = len(results)
            live: list[tuple[Callable[[Tensor], Tensor], Result]] = []
            for name in timed_here:
                say(f"{arch} batch {batch}: setting up {name}")
                fn, result = _setup(name, model, x, precision, shapes_vary)
                results.append(result)
                if fn is not None and _check(fn, result, x, reference):
                    with _precision(result), torch.inference_mode():
                        for _ in range(warmup):
                            fn(x)
                    live.append((fn, result))
            _timed_rounds(live, x, rounds, repeats, say)
            for _, result in live:
                result.ms = statistics.median(result.times_ms)
                result.images_per_s = batch * 1e3 / result.ms
            timed = {r.engine: r.ms for _, r in live}
            for _, result in live:
                if baseline in timed:
                    result.speedup = timed[baseline] / result.ms
                if COMPILED_REFERENCE in timed:
                    result.vs_compiled = timed[COMPILED_REFERENCE] / result.ms
            say(format_table(results[first:]))
    return results


def _baseline(model: str | DenseNet | RDNet) -> str:
    """The engine the ratios are to: timm eager for an RDNet (torchvision has none), else
    torchvision eager."""
    rdnet = isinstance(model, RDNet) or (isinstance(model, str) and model in RDNET_ARCHITECTURES)
    return RDNET_BASELINE if rdnet else BASELINE


def _timed_rounds(live, x: Tensor, rounds: int, repeats: int | None, say) -> None:
    if repeats is None:  # about 0.2 s per engine per round, judged from the slowest
        slowest = 1.0
        for fn, result in live:
            with _precision(result), torch.inference_mode():
                slowest = max(slowest, *_time(fn, x, 1))
        repeats = max(1, min(20, int(200 / slowest)))
    for index in range(rounds):
        say(f"round {index + 1}/{rounds}, {repeats} calls per engine")
        for fn, result in live:
            with _precision(result), torch.inference_mode():
                result.times_ms += _time(fn, x, repeats)


def machine(device: str | torch.device = "cpu") -> dict[str, Any]:
    """The software and hardware the figures come from."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": f"{cpu_name()} ({os.cpu_count()} logical cores)",
        "cpu_kind": cpu_kind(),
        "cpu_flags": " ".join(cpu_flags()),
    }
    with contextlib.suppress(ImportError):
        import torchvision

        info["torchvision"] = torchvision.__version__
    for package in ("onnxruntime", "openvino", "timm"):
        with contextlib.suppress(ImportError, AttributeError):
            info[package] = __import__(package).__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_table(results: Sequence[Result]) -> str:
    """The results as an aligned text table."""
    header = ["model", "batch", "engine", "dtype", "ms", "img/s", "vs baseline", "vs tv compile"]
    rows = [[*header, "rel. error", "note"]]
    for r in results:
        rows.append([
            r.model, str(r.batch), r.engine, r.dtype,
            f"{r.ms:.2f}" if r.ms is not None else "-",
            f"{r.images_per_s:,.0f}" if r.images_per_s is not None else "-",
            f"{r.speedup:.2f}x" if r.speedup is not None else "-",
            f"{r.vs_compiled:.2f}x" if r.vs_compiled is not None else "-",
            f"{r.rel_error:.1e}" if r.rel_error is not None else "-",
            r.note or (f"setup {r.setup_s:.0f} s" if r.setup_s and r.setup_s >= 1 else ""),
        ])  # fmt: skip
    return text_table(rows)


def to_json(results: Sequence[Result], device: str | torch.device = "cpu") -> dict[str, Any]:
    """Results and machine description as a JSON-ready dict."""
    return {"machine": machine(device), "results": [asdict(r) for r in results]}

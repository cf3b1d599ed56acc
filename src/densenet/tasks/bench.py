"""Inference speed of DenseNet implementations, measured in one process on identical inputs.

Every engine (``densenet.tasks.bench_engines``) runs the same weights on the same random-normal
input. Each engine's output is checked against a float64 evaluation of the model before it is
timed; float32 engines are checked and timed with TF32 off (TF32 rounds products to 10 mantissa
bits, about 1e-3 relative: not float32). Engines are then timed in interleaved rounds (so a noisy
machine slows all of them alike) and the median is reported, with its ratio to both references.
Used by ``densenet bench`` and ``benchmarks/bench_inference.py``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from densenet.data.files import text_table
from densenet.infer.engines import cpu_flags, cpu_kind, cpu_name
from densenet.infer.precision import DTYPES, dtype_name
from densenet.infer.runtime import resolve_device
from densenet.nn.model import DenseNet
from densenet.nn.rdnet import RDNet
from densenet.nn.registry import get_model
from densenet.tasks.bench_engines import (
    COMPILED_REFERENCE,
    ENGINES,
    baseline_engine,
    engine_names,
)

__all__ = ["ENGINES", "Result", "machine", "run_benchmark"]

CHECKED = 8  # images of each batch whose outputs are compared with the float64 reference
OTHER_BATCHES = (1, 64)  # what each engine also runs first with ``shapes_vary``
FLOAT32_TOLERANCE = 1e-4  # relative error allowed against the float64 reference
REDUCED_TOLERANCE = 2e-2  # the same for bfloat16, float16 and OpenVINO's default precision
INT8_TOLERANCE = 0.15  # the same for int8 (random weights and inputs; the error is reported)
FIGURES = {  # format_table's columns of figures: the Result field and its format
    "ms": ("ms", "{:.2f}"),
    "img/s": ("images_per_s", "{:,.0f}"),
    "vs baseline": ("speedup", "{:.2f}x"),
    "vs tv compile": ("vs_compiled", "{:.2f}x"),
    "rel. error": ("rel_error", "{:.1e}"),
}


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
    names = engine_names(engines, device, int8=dtype == "int8")
    say(_announcement(models, batch_sizes, names, rounds))
    plan = _Plan(
        names, device, precision, image_size, seed, shapes_vary, warmup, rounds, repeats, say
    )
    results: list[Result] = []
    for model in models:
        model = _benchmarked(model, device, seed)
        for batch in batch_sizes:
            results += _measure(plan, model, batch)
    return results


@dataclass
class _Plan:
    """What every model and batch size of one ``run_benchmark`` call shares (its arguments)."""

    names: list[str]  # the engines asked for; each model's baseline runs too
    device: torch.device
    precision: torch.dtype
    image_size: int
    seed: int
    shapes_vary: bool
    warmup: int
    rounds: int
    repeats: int | None
    say: Callable[[str], None]  # progress


def _announcement(
    models: Sequence[str | DenseNet | RDNet],
    batch_sizes: Sequence[int],
    names: list[str],
    rounds: int,
) -> str:
    """The first progress line: what will run."""
    baselines = [b for b in dict.fromkeys(map(baseline_engine, models)) if b not in names]
    return (
        f"{len(models)} model(s) x {len(batch_sizes)} batch size(s) x "
        f"{len(baselines) + len(names)} engines ({', '.join([*baselines, *names])}), "
        f"{rounds} timing rounds each"
    )


def _benchmarked(model: str | DenseNet | RDNet, device: torch.device, seed: int) -> nn.Module:
    """``model`` in eval mode on ``device``; a name is built with random weights and randomised
    norms (``randomize_batchnorm``)."""
    if isinstance(model, str):
        torch.manual_seed(seed)
        model = randomize_batchnorm(get_model(model), seed)
    return model.eval().to(device)


def _inputs(plan: _Plan, model: nn.Module, batch: int) -> tuple[Tensor, Tensor]:
    """A random-normal batch on the device, and the float64 outputs of its first ``CHECKED``
    images (on the CPU)."""
    generator = torch.Generator().manual_seed(plan.seed)
    x = torch.randn(batch, 3, plan.image_size, plan.image_size, generator=generator)
    with torch.inference_mode():
        reference = model.double()(x[:CHECKED].double().to(plan.device)).cpu()
    model.float()
    return x.to(plan.device), reference


def _measure(plan: _Plan, model: nn.Module, batch: int) -> list[Result]:
    """Every engine of ``plan`` and the model's baseline at ``batch`` images: set up, checked,
    warmed up and timed in interleaved rounds; the rows are said as soon as measured."""
    arch = getattr(model, "arch", None) or "custom"
    baseline = baseline_engine(model)
    x, reference = _inputs(plan, model, batch)
    results: list[Result] = []
    live: list[tuple[Callable[[Tensor], Tensor], Result]] = []
    for name in plan.names if baseline in plan.names else [baseline, *plan.names]:
        plan.say(f"{arch} batch {batch}: setting up {name}")
        fn, result = _setup(name, model, x, plan.precision, plan.shapes_vary)
        results.append(result)
        if fn is not None and _check(fn, result, x, reference):
            with _precision(result), torch.inference_mode():
                for _ in range(plan.warmup):
                    fn(x)
            live.append((fn, result))
    _timed_rounds(live, x, plan.rounds, plan.repeats, plan.say)
    _summarise([result for _, result in live], baseline)
    plan.say(format_table(results))
    return results


def _summarise(timed: list[Result], baseline: str) -> None:
    """Each timed result's median, images per second and ratios to the references that ran."""
    for result in timed:
        result.ms = statistics.median(result.times_ms)
        result.images_per_s = result.batch * 1e3 / result.ms
    medians = {r.engine: r.ms for r in timed}
    for result in timed:
        if baseline in medians:
            result.speedup = medians[baseline] / result.ms
        if COMPILED_REFERENCE in medians:
            result.vs_compiled = medians[COMPILED_REFERENCE] / result.ms


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
    rows = [["model", "batch", "engine", "dtype", *FIGURES, "note"]]
    for r in results:
        figures = [_figure(getattr(r, field), form) for field, form in FIGURES.values()]
        note = r.note or (f"setup {r.setup_s:.0f} s" if r.setup_s and r.setup_s >= 1 else "")
        rows.append([r.model, str(r.batch), r.engine, r.dtype, *figures, note])
    return text_table(rows)


def _figure(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def to_json(results: Sequence[Result], device: str | torch.device = "cpu") -> dict[str, Any]:
    """Results and machine description as a JSON-ready dict."""
    return {"machine": machine(device), "results": [asdict(r) for r in results]}

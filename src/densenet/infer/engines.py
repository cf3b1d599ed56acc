"""Which engine ``densenet.optimize`` runs by default: one table of measurements.

Each row names a device, a CPU kind (``cpu_kind``), a precision and the engine measured fastest
there, with the measurement it comes from (the machine, the command and the ratios). The first
row that fits and whose engine can run here wins (``choose``); a device, kind and precision that
no row names runs the eager form: the default is never an engine nobody measured there. A new
row needs a measurement on that kind of machine at batch 1 and 16 (``densenet bench``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["ENGINE_TABLE", "EngineRow", "choose", "cpu_flags", "cpu_kind", "cpu_name"]

ANY = "any"  # a row's kind that fits every device of its type (CUDA: GPUs are not told apart)
# the /proc/cpuinfo flags that decide a CPU's kind, as `densenet info --engines` shows them
KIND_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


@dataclass(frozen=True)
class EngineRow:
    """``engine`` is the default on ``device`` ("cpu", "cuda") of ``kind`` (``cpu_kind()``, or
    ``ANY``) in ``dtype``, as ``measured`` says (machine, date, command, ratios)."""

    device: str
    kind: str
    dtype: torch.dtype
    engine: str
    measured: str


_ZEN4 = "AMD EPYC Zen 4, 2 vCPUs (avx512_bf16, no AMX)"
_ZEN3 = "AMD EPYC Zen 3, 2 vCPUs (avx2, no AVX-512)"
_XEON = "Intel Xeon, 2 vCPUs (avx512_bf16 amx_bf16 amx_int8), 2026-12-07"
_BENCH = "densenet bench --batch-sizes 1 16"
_OURS = '--engines densenet.optimize "densenet.optimize onednn" "densenet openvino"'
_RATIOS = "densenet121, ratios to torchvision eager float32 in the same run"

# The first row that fits the device, CPU kind and precision, and whose engine runs here, wins.
# Figures: README "Backends" and "Benchmark", BENCHMARKS.md.
ENGINE_TABLE: tuple[EngineRow, ...] = (
    EngineRow(
        "cpu", "AVX512_BF16", torch.float32, "openvino",
        f"{_ZEN4}, 2026-12-07, `OMP_NUM_THREADS=1 {_BENCH} --rounds 5 --repeats 2 {_OURS}`, "
        f"{_RATIOS}: batch 1 1.67x against onednn's 1.40x and the eager form's 1.30x, batch 16 "
        "1.96x against 1.78x and 1.70x (the same with --rounds 3: 1.62x/1.44x/1.32x, "
        "1.71x/1.61x/1.59x)",
    ),
    EngineRow(
        "cpu", "AVX512_BF16", torch.float32, "onednn",
        f"{_ZEN4}, 2026-11-26, `{_BENCH} --rounds 5 --engines onnxruntime \"openvino f32\" "
        f'densenet.optimize "densenet.optimize onednn"`, {_RATIOS}: batch 1 1.87x against the '
        "eager form's 1.55x (2 threads); one thread: batch 1 1.56x against 1.56x, batch 16 1.49x "
        "against 1.50x; 2026-12-07 (the openvino row's runs): 1.40x/1.44x against 1.30x/1.32x, "
        "1.78x/1.61x against 1.70x/1.59x",
    ),
    EngineRow(
        "cpu", "AVX512_BF16", torch.bfloat16, "openvino",
        f"{_ZEN4}, 2026-12-07, `OMP_NUM_THREADS=1 {_BENCH} --rounds 5 --repeats 2 --dtype "
        f"bfloat16 {_OURS}`, {_RATIOS}: batch 1 3.05x against onednn's 2.35x and the eager "
        "form's 2.10x, batch 16 3.91x against 3.17x and 3.16x (the same with --rounds 3: "
        "2.99x/2.61x/2.80x, 4.14x/3.45x/3.27x)",
    ),
    EngineRow(
        "cpu", "AVX512_BF16", torch.bfloat16, "onednn",
        f"{_ZEN4}, 2026-11-26, `{_BENCH} --rounds 5 --dtype bfloat16 --engines \"openvino "
        f'default" densenet.optimize "densenet.optimize onednn"`, {_RATIOS}: 2 threads: batch 1 '
        "3.10x against the eager form's 2.31x, batch 16 2.65x against 2.65x; one thread: 2.26x "
        "against 2.16x, 2.47x against 2.54x",
    ),
    EngineRow(
        "cpu", "AVX2", torch.float32, "onednn",
        f"{_ZEN3}, 2026-12-04, `{_BENCH} --rounds 5 --engines onnxruntime \"openvino f32\" "
        f'densenet.optimize "densenet.optimize onednn"`, {_RATIOS}: 2 threads: batch 1 1.84x '
        "against the eager form's 1.60x, batch 16 1.68x against 1.61x; OMP_NUM_THREADS=1: 1.38x "
        "against 1.35x, 1.78x against 1.74x; densenet169, 201, 161 at batch 1: 1.75x, 1.52x, "
        "1.52x against 0.92x, 0.91x, 1.06x",
    ),
    EngineRow(
        "cpu", "AMX", torch.bfloat16, "onednn",
        f"{_XEON}, each engine timed in its own block of calls, {_RATIOS}: batch 1 3.30x, batch "
        "16 4.87x (torch.compile(torchvision) in bfloat16 autocast: 3.06x, 4.75x; the eager and "
        "openvino engines not measured there)",
    ),
    EngineRow(
        "cpu", "AMX", torch.float32, "onednn",
        f"{_XEON}, each engine timed in its own block of calls, {_RATIOS}: batch 1 1.77x, batch "
        "16 1.84x (ONNX Runtime: 2.40x, 1.89x; the eager and openvino engines not measured "
        "there)",
    ),
    EngineRow(
        "cuda", ANY, torch.bfloat16, "eager",
        "NVIDIA H200, 2026-11-26, torch 2.11, densenet121 bfloat16 channels_last, CUDA events: "
        "batch 256 10,767-10,835 images/s against torchvision eager's 9,444-9,530, batch 1 as "
        "a CUDA graph 1.39-1.45 ms against 1.83-1.86 ms; compile=True (inductor) ran batch 256 "
        "at 19,082-19,358 images/s in a fresh process but at 14,441-14,607 after batch 1 and "
        "64, and compiles each new input shape; the triton kernels have changed since an "
        "earlier form was timed on an H200 and have not been timed on a GPU as they are now",
    ),
)  # fmt: skip


def cpu_kind() -> str:
    """This CPU's kind as the table names it: PyTorch's vector capability
    (``torch.backends.cpu.get_cpu_capability()``: ``"AVX2"``, ``"DEFAULT"``...), an AVX-512 one
    told apart by its bfloat16 hardware: ``"AMX"`` (AMX tiles), ``"AVX512_BF16"`` (AVX-512 BF16
    without AMX) or ``"AVX512"``."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return capability
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    return "AVX512_BF16" if torch.cpu._is_avx512_bf16_supported() else capability


def _cpuinfo(field: str) -> str:
    """The first value of ``field`` in ``/proc/cpuinfo`` ("" where there is none)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name.strip() == field:
                return value.strip()
    return ""


def cpu_name() -> str:
    """This CPU's model name (``/proc/cpuinfo``), or ``"unknown"``."""
    return _cpuinfo("model name") or "unknown"


def cpu_flags() -> list[str]:
    """Which of ``KIND_FLAGS`` this CPU has (``/proc/cpuinfo``; empty where it cannot be read)."""
    flags = set(_cpuinfo("flags").split())
    return [flag for flag in KIND_FLAGS if flag in flags]


def choose(
    device: torch.device, dtype: torch.dtype, usable: Callable[[str], bool]
) -> EngineRow | None:
    """The first row for ``device`` (of this CPU's kind on the CPU) and ``dtype`` whose engine
    is ``usable`` here; None: nothing measured, the eager form runs."""
    kind = cpu_kind() if device.type == "cpu" else ANY
    rows = (r for r in ENGINE_TABLE if r.device == device.type and r.kind in (kind, ANY))
    return next((r for r in rows if r.dtype == dtype and usable(r.engine)), None)

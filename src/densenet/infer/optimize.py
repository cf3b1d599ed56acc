"""``densenet.optimize``: a DenseNet's inference form (``densenet.infer.form``) on the backend that
runs it fastest where it is: eager, ``torch.compile`` (inductor), oneDNN on the CPU
(``densenet.infer.cpu``), OpenVINO on the CPU (``densenet.infer.openvino``) or Triton kernels on CUDA
(``densenet.infer.gpu``).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any

import torch
from torch import nn

from densenet.choices import BACKENDS
from densenet.infer import engines
from densenet.infer.cpu import OneDNNDenseNet
from densenet.infer.engines import EngineRow
from densenet.infer.form import InferenceDenseNet
from densenet.infer.openvino import OpenVINODenseNet
from densenet.infer.precision import DTYPES, bfloat16_support, resolve_dtype
from densenet.infer.rdnet_form import InferenceRDNet
from densenet.nn.model import DenseNet
from densenet.nn.rdnet import RDNet

__all__ = ["BACKENDS", "COMPILE_MODES", "default_engine", "engine_choices", "optimize"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
RDNET_BACKENDS = ("eager", "openvino")  # an RDNet's engines; eager by default (README, RDNet)


def onednn_bfloat16() -> bool:
    """Whether oneDNN can run bfloat16 convolutions on this CPU (it refuses on AVX2-only ones)."""
    return bfloat16_support("cpu") is not None


def _openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def _triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run for a model on ``device``: CUDA with triton installed,
    or any device under the Triton interpreter (``TRITON_INTERPRET=1``, for tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def channels_aligned(model: nn.Module) -> bool:
    """Whether every convolution after the stem reads and writes a multiple of 16 channels (all
    the ImageNet DenseNets; not the paper's k = 12 CIFAR models): only then do the Triton
    kernels compile to vectorised loads and run their large tiles (``densenet.tasks.gpu_check``);
    other models get smaller tiles, not measured against cuDNN on a GPU."""
    return all(
        m.in_channels % 16 == 0 and m.out_channels % 16 == 0
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and not name.endswith("conv0")
    )


def _usable(
    engine: str, device: torch.device, dtype: torch.dtype, channels_last: bool | None, aligned: bool
) -> bool:
    """Whether ``engine`` runs here: a row of the engine table whose engine does not is skipped
    (the openvino package missing, oneDNN without bfloat16, a model whose channel counts are not
    ``aligned`` for the triton kernels: ``channels_aligned``)."""
    if engine == "openvino":
        return device.type == "cpu" and _openvino_installed()
    if engine == "onednn":
        return (
            device.type == "cpu"
            and dtype in ONEDNN_DTYPES
            and channels_last is not False
            and torch.backends.mkldnn.is_available()
            and (dtype != torch.bfloat16 or onednn_bfloat16())
        )
    if engine == "triton":
        return aligned and _triton_usable(device)
    return engine in BACKENDS


def default_engine(
    device: torch.device,
    dtype: torch.dtype,
    channels_last: bool | None = None,
    aligned: bool = True,
) -> tuple[str, EngineRow | None]:
    """The engine ``optimize`` runs by default on ``device`` in ``dtype``, and the row of
    ``densenet.infer.engines.ENGINE_TABLE`` (its measurement) that names it; ``("eager", None)`` where
    no row fits and runs here."""
    row = engines.choose(
        device, dtype, lambda engine: _usable(engine, device, dtype, channels_last, aligned)
    )
    return (row.engine, row) if row is not None else ("eager", None)


def engine_choices() -> list[dict[str, Any]]:
    """What ``optimize`` runs by default on this machine: for the CPU and, when there is one,
    the CUDA device, its name (the CPU's kind and flags too) and, for each precision, the engine
    with the measurement it comes from (``"not measured: eager"`` where no row fits)."""
    devices = [
        {
            "device": "cpu",
            "name": engines.cpu_name(),
            "kind": engines.cpu_kind(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "flags": engines.cpu_flags(),
            "openvino": _openvino_installed(),
        }
    ]
    if torch.cuda.is_available():
        devices.append({"device": "cuda", "name": torch.cuda.get_device_name()})
    for device in devices:
        device["engines"] = []
        for name, dtype in DTYPES.items():
            engine, row = default_engine(torch.device(device["device"]), dtype)
            why = row.measured if row is not None else "not measured: eager"
            device["engines"].append({"dtype": name, "engine": engine, "measured": why})
    return devices


def _backend(
    backend: str | None,
    compile: bool | str,
    device: torch.device,
    dtype: torch.dtype,
    channels_last: bool | None = None,
    aligned: bool = True,
) -> str:
    """The backend ``optimize`` builds: the one named, inductor when compiling, or the table's
    choice (``default_engine``)."""
    if backend is None:
        if compile:
            return "inductor"
        return default_engine(device, dtype, channels_last, aligned)[0]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if compile and backend != "inductor":
        raise ValueError(
            f"compile={compile!r} applies to backend='inductor' only, got backend={backend!r}"
        )
    if backend == "triton" and not _triton_usable(device):
        raise RuntimeError(
            f"backend='triton' needs a CUDA model and the triton package (model on {device}, "
            f"triton {'installed' if importlib.util.find_spec('triton') else 'missing'}); "
            "set TRITON_INTERPRET=1 to run its kernels on the CPU (slowly, for tests)"
        )
    onednn = (
        device.type == "cpu" and dtype in ONEDNN_DTYPES and torch.backends.mkldnn.is_available()
    )
    if backend == "onednn" and not onednn:
        raise RuntimeError(
            f"backend='onednn' needs a CPU model, dtype float32 or bfloat16 and a PyTorch build "
            f"with oneDNN (model on {device}, dtype {dtype}); use backend='eager'"
        )
    if backend == "onednn" and dtype == torch.bfloat16 and not onednn_bfloat16():
        raise RuntimeError(
            "backend='onednn' with dtype bfloat16 needs a CPU whose oneDNN runs bfloat16 "
            f"(AVX-512 BW/VL/DQ or AVX-NE-CONVERT); this one is {engines.cpu_kind()}: use "
            "dtype float32, or backend='eager' (bfloat16 emulated, slower than float32)"
        )
    return backend


def optimize(
    model: DenseNet | RDNet,
    *,
    dtype: torch.dtype | str | None = None,
    channels_last: bool | None = None,
    compile: bool | str = False,
    backend: str | None = None,
    growth_conv: str = "cudnn",
    throughput: bool = False,
) -> nn.Module:
    """The inference-only form of ``model``, with the same outputs.

    Args:
        model: a ``densenet.DenseNet`` or ``densenet.RDNet`` in eval mode (call
            ``model.eval()`` first); it is not modified. Its device is kept. An RDNet runs on
            the ``"eager"`` backend (``densenet.infer.rdnet_form.InferenceRDNet``, channels
            last; the default) or ``"openvino"``.
        dtype: compute precision, a ``torch.dtype`` or a name that ``--dtype`` takes
            (``"auto"``: bfloat16 where the device computes it natively, else float32; with
            backend ``"openvino"``, OpenVINO's own default precision); default float32 on CPU
            and bfloat16 on CUDA. Float32 matches the eager model to a relative error under 1e-5
            (with TF32 off), bfloat16/float16 to about 1e-2.
        channels_last: compute in channels_last memory format; default True (the triton backend
            always uses it).
        compile: ``torch.compile`` the result (the inductor backend): ``True`` for the default
            mode (with inductor's weight freezing), or a mode name such as ``"reduce-overhead"``
            (CUDA graphs, best for small GPU batches). Shapes stay static: the first call with
            each input shape compiles a kernel for that shape only.
        backend: ``"eager"`` (an ``InferenceDenseNet``), ``"inductor"`` (it, compiled; the same as
            ``compile=True``; on the CPU slower than eager, with a warning), ``"triton"`` (a
            ``densenet.infer.gpu.TritonDenseNet``: fused Triton kernels; CUDA only, or any device
            under ``TRITON_INTERPRET=1``), ``"onednn"`` (a ``densenet.infer.cpu.OneDNNDenseNet``: the
            fastest CPU form; float32 or bfloat16, channels_last), ``"openvino"`` (a
            ``densenet.infer.openvino.OpenVINODenseNet``: the form converted and compiled by OpenVINO
            for the CPU, float32 logits; needs the ``openvino`` extra). Default: inductor when
            ``compile`` is set; else the engine measured fastest on this device, CPU kind and
            precision (``default_engine``: a row of ``densenet.infer.engines.ENGINE_TABLE`` whose
            engine runs here), and the eager form where none was measured
            (``densenet.tasks.export`` always reads the eager form). A 1D or 3D model
            (``spatial_dims``) runs eager, inductor or openvino only (eager by default).
        growth_conv: the triton backend's 3x3 growth convolutions: ``"cudnn"`` (cuDNN, then a
            copy into the block buffer; the default, the faster one as measured in the README)
            or ``"triton"`` (the implicit GEMM writing straight into the buffer).
        throughput: the form will see many images at a time (evaluation, bulk runs): the
            openvino engine then compiles with OpenVINO's throughput hint (several streams, a
            batch split across them) instead of its latency hint; the other engines ignore it.

    Returns:
        an ``InferenceDenseNet`` (or its compiled wrapper), a ``TritonDenseNet``, a
        ``OneDNNDenseNet`` or an ``InferenceRDNet``, mapping (N, C, H, W) inputs ((N, C, L),
        (N, C, D, H, W) for 1D and 3D models) of any float dtype to outputs of the same dtype
        (an ``OpenVINODenseNet``: float32 outputs); it keeps the model's ``arch`` and
        ``config``.
    """
    device = _device_of(model)
    backend, dtype = _choose(model, device, dtype, channels_last, compile, backend)
    return _build(model, backend, dtype, channels_last, compile, growth_conv, throughput)


def _device_of(model: DenseNet | RDNet) -> torch.device:
    """``model``'s device, once it is a model that ``optimize`` takes: a DenseNet or RDNet in
    eval mode."""
    if not isinstance(model, (DenseNet, RDNet)):
        raise TypeError(
            f"optimize() takes a densenet.DenseNet or RDNet, got {type(model).__name__}"
        )
    if model.training:
        raise RuntimeError(
            "optimize() needs a model in eval mode (its BatchNorm running statistics are folded "
            "into the weights); call model.eval() first"
        )
    return next(model.parameters()).device


def _choose(
    model: DenseNet | RDNet,
    device: torch.device,
    dtype: torch.dtype | str | None,
    channels_last: bool | None,
    compile: bool | str,
    backend: str | None,
) -> tuple[str, torch.dtype | str | None]:
    """The backend ``optimize`` builds ``model`` on and the dtype it passes, once the arguments
    are checked: OpenVINO's as asked (it decides ``"auto"`` and None itself), else a floating
    point ``torch.dtype``."""
    if isinstance(model, RDNet):
        _check_rdnet(backend, compile, channels_last)
    if backend == "openvino":  # OpenVINO decides "auto" and checks its own precisions
        if compile:
            raise ValueError("compile applies to backend='inductor' only, got backend='openvino'")
        if isinstance(dtype, str) and dtype != "auto":
            dtype = resolve_dtype(dtype, device)
        return backend, dtype
    dtype = resolve_dtype(dtype, device)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    if isinstance(model, RDNet):
        return "eager", dtype
    _compile_mode(compile)
    if model.spatial_dims != 2:  # the eager form (or it compiled) folds volumes and signals
        backend = backend or ("inductor" if compile else "eager")
        if backend not in ("eager", "inductor"):
            raise ValueError(
                f"backend={backend!r} runs 2D models only, got spatial_dims={model.spatial_dims}; "
                "use backend='eager' or 'inductor'"
            )
    backend = _backend(backend, compile, device, dtype, channels_last, channels_aligned(model))
    if backend == "inductor" and device.type == "cpu":
        warnings.warn(
            "optimize(compile=...) on the CPU measured slower than the uncompiled forms (inductor "
            "calls the same oneDNN convolutions and adds its own elementwise kernels); "
            "backend='onednn' is the fastest CPU form",
            stacklevel=3,  # optimize's caller
        )
    return backend, dtype


def _compile_mode(compile: bool | str) -> str:
    """The ``torch.compile`` mode that ``optimize(compile=...)`` means."""
    mode = "default" if compile in (True, False) else compile
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be True, False or one of {COMPILE_MODES}, got {compile!r}")
    return mode


def _build(
    model: DenseNet | RDNet,
    backend: str,
    dtype: torch.dtype | str | None,
    channels_last: bool | None,
    compile: bool | str,
    growth_conv: str,
    throughput: bool,
) -> nn.Module:
    """``model``'s inference form on ``backend`` in ``dtype``, as ``_choose`` decided them."""
    if backend == "openvino":
        return OpenVINODenseNet(model, dtype, throughput=throughput)
    if isinstance(model, RDNet):
        return InferenceRDNet(model, dtype)
    if backend == "triton":
        from densenet.infer.gpu import TritonDenseNet  # imports triton, which some platforms lack

        return TritonDenseNet(InferenceDenseNet(model, dtype, channels_last=True), growth_conv)
    if backend == "onednn":
        return OneDNNDenseNet(InferenceDenseNet(model, dtype, channels_last=True))
    fast = InferenceDenseNet(model, dtype, True if channels_last is None else channels_last)
    if backend == "eager":
        return fast
    options = {**torch._inductor.list_mode_options(_compile_mode(compile)), "freezing": True}
    return torch.compile(fast, options=options, dynamic=False)


def _check_rdnet(backend: str | None, compile: bool | str, channels_last: bool | None) -> None:
    """Raise unless an RDNet's inference form can be built as asked: its engines are
    ``RDNET_BACKENDS``, it computes channels last and is not compiled."""
    unsupported = backend not in (None, *RDNET_BACKENDS)
    if unsupported or compile:
        asked = f"backend={backend!r}" if unsupported else "compile"
        raise ValueError(
            f"an RDNet runs on backend 'eager' (the default) or 'openvino', not {asked}"
        )
    if channels_last is False:
        raise ValueError(
            "an RDNet's inference form computes channels last only (its LayerNorms and 1x1 "
            "convolutions act on each pixel's channels); drop channels_last=False"
        )

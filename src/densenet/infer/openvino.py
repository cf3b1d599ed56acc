"""OpenVINO on the CPU: the ``openvino`` engine of ``densenet.optimize`` and the pieces that an
OpenVINO IR file (``densenet export --format openvino``) shares with it.

``OpenVINODenseNet`` converts a DenseNet's inference form (``InferenceDenseNet``, BatchNorms
folded, its dense blocks written as concatenations; for an RDNet, ``InferenceRDNet`` built for a
graph runtime) straight from the module
(``openvino.convert_model``, no file in between), with a dynamic batch and spatial size, and
compiles it for the CPU with the precision asked: float32 is exact (OpenVINO's f32 inference
precision); ``"auto"`` is OpenVINO's own default, bfloat16 where the CPU computes it. The
converted form is kept as an IR in ``cache_dir()``, named by a hash of the model's weights, and
OpenVINO's model cache (``CACHE_DIR``) is there too: a second start with the same model skips
folding, tracing and converting.

An IR read from a file is checked before it is compiled (``check_operations``): OpenVINO's reader
is C++ (no Python runs), builds operators of the standard opsets only unless extensions are
loaded (densenet loads none), and every operator must come from a standard opset.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib
import importlib.util
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from densenet.data.files import atomic_write, check_regular_file
from densenet.errors import DenseNetError, first_line
from densenet.infer.form import METADATA, InferenceDenseNet, concatenating
from densenet.infer.rdnet_form import InferenceRDNet
from densenet.nn.model import DenseNet
from densenet.nn.rdnet import RDNet

__all__ = [
    "INSTALL_OPENVINO",
    "OpenVINODenseNet",
    "OpenVINOError",
    "cache_dir",
    "check_operations",
    "compile_for_cpu",
    "keeps_signal_stack",
    "converted_form",
    "is_ir",
    "read_ir",
    "require_openvino",
    "write_ir",
]

INSTALL_OPENVINO = "pip install 'densenet-toolkit[openvino]'"
# OpenVINO's inference precisions (``INFERENCE_PRECISION_HINT``) and its CPU capability for each
PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
CAPABILITIES = {torch.float32: "FP32", torch.bfloat16: "BF16", torch.float16: "FP16"}
STANDARD_OPSET = re.compile(r"opset\d+")
# operators that hold graphs of their own, which ``get_ops`` does not list: a DenseNet has none
SUBGRAPH_OPERATORS = frozenset({"Loop", "If", "TensorIterator"})
EXAMPLE_BATCH = 2  # the conversion example's batch (1 could be specialised)
CACHED_IRS = 8  # converted forms kept in the cache, the ones used last
IR_FILES = ("model.xml", "model.bin")  # an IR folder: the graph, then its weights
METADATA_KEY = "densenet"  # the model card's key in the IR's rt_info (JSON)


class OpenVINOError(DenseNetError, RuntimeError):
    """OpenVINO is missing, or cannot run a model as asked; the message says what to change."""


class OpenVINOMissing(OpenVINOError, ImportError):
    """The openvino package is not installed (an ``ImportError`` too, ``name`` openvino)."""

    name = "openvino"


class _SignalStack(ctypes.Structure):
    _fields_ = [
        ("ss_sp", ctypes.c_void_p),
        ("ss_flags", ctypes.c_int),
        ("ss_size", ctypes.c_size_t),
    ]


@functools.cache
def _sigaltstack() -> Callable[..., int] | None:
    """libc's ``sigaltstack``, or None where it cannot be found."""
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).sigaltstack
    return None


def keeps_signal_stack(function: Callable) -> Callable:
    """Run ``function`` and then give the calling thread back its alternate signal stack.

    OpenVINO's CPU plugin (2026.4) points the thread that creates it at an alternate signal stack
    of its own and can free that memory without unsetting it; the next signal delivered to a
    handler that runs on the alternate stack (every Python handler, such as the SIGCHLD handler
    of PyTorch's DataLoader) then kills the process with SIGSEGV. Every call into OpenVINO that
    can create or drop its CPU plugin goes through this."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sigaltstack = _sigaltstack()
        saved = _SignalStack()
        if sigaltstack is None or sigaltstack(None, ctypes.byref(saved)) != 0:
            return function(*args, **kwargs)
        try:
            return function(*args, **kwargs)
        finally:
            sigaltstack(ctypes.byref(saved), None)

    return wrapper


def require_openvino(purpose: str) -> ModuleType:
    """The ``openvino`` package, or ``OpenVINOMissing`` naming how to install it."""
    if importlib.util.find_spec("openvino") is None:
        raise OpenVINOMissing(
            f"{purpose} needs the openvino package, which is not installed: {INSTALL_OPENVINO}"
        )
    return importlib.import_module("openvino")


def cache_dir() -> Path:
    """Where converted forms and OpenVINO's compiled models are cached: ``openvino`` in the
    package's cache folder, ``~/.cache/densenet`` (where named data sets live too)."""
    return Path("~/.cache/densenet/openvino").expanduser()


@keeps_signal_stack
def precision_of(dtype: torch.dtype | str | None, ov: ModuleType) -> torch.dtype:
    """The inference precision ``dtype`` asks of OpenVINO on this CPU: None, float32;
    ``"auto"``, OpenVINO's default (bfloat16 where the CPU computes it, else float32); a 16-bit
    one only where the CPU computes it (its ``OPTIMIZATION_CAPABILITIES``), else
    ``OpenVINOError``."""
    if dtype is None:
        return torch.float32
    core = ov.Core()
    if dtype == "auto":
        hint = core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
        return next((t for t, name in PRECISIONS.items() if name == hint), torch.float32)
    if dtype not in PRECISIONS:
        raise OpenVINOError(
            f"OpenVINO runs float32, bfloat16 or float16, not {dtype}; use dtype float32 or auto"
        )
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if CAPABILITIES[dtype] not in capabilities:
        raise OpenVINOError(
            f"this CPU does not compute {dtype} in OpenVINO (it offers {', '.join(capabilities)}); "
            "use dtype float32, or auto for the fastest precision it has"
        )
    return dtype


@keeps_signal_stack
def compile_for_cpu(
    ov: ModuleType, model: Any, precision: torch.dtype, hint: str = "LATENCY"
) -> Any:
    """``model`` (an ``openvino.Model``) compiled for the CPU in ``precision`` with the
    performance ``hint`` (``"LATENCY"``: one request at a time uses every thread;
    ``"THROUGHPUT"``: several streams) on PyTorch's number of threads (``torch.set_num_threads``,
    ``OMP_NUM_THREADS``), through OpenVINO's model cache when it can be written."""
    config = {
        "INFERENCE_PRECISION_HINT": PRECISIONS[precision],
        "PERFORMANCE_HINT": hint,
        "INFERENCE_NUM_THREADS": str(torch.get_num_threads()),
    }
    with contextlib.suppress(OSError):  # a read-only home: compile every time
        cache_dir().mkdir(parents=True, exist_ok=True)
        config["CACHE_DIR"] = str(cache_dir())
    try:
        return ov.Core().compile_model(model, "CPU", config)
    except RuntimeError as error:  # OpenVINO's own exception type
        raise OpenVINOError(f"OpenVINO cannot compile the model: {reason(error)}") from None


def reason(error: BaseException) -> str:
    """The first line of an OpenVINO error that says something (its messages start with lines
    naming the C++ source files the exception passed through)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = [line for line in lines if not line.startswith("Exception from ")]
    return (said or lines or [first_line(error)])[0][:200]


def ir_file(path: str | os.PathLike) -> Path:
    """The graph of an IR: ``path`` itself (an ``.xml`` file), or ``model.xml`` in folder
    ``path``."""
    path = Path(path)
    return path / IR_FILES[0] if path.is_dir() else path


def is_ir(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an OpenVINO IR: an ``.xml`` file, or a folder holding
    ``model.xml``."""
    path = Path(path)
    return path.suffix == ".xml" or (path.is_dir() and (path / IR_FILES[0]).exists())


@keeps_signal_stack
def read_ir(ov: ModuleType, path: str | os.PathLike) -> Any:
    """The ``openvino.Model`` of an IR (``ir_file``; its weights in the ``.bin`` beside it),
    read by OpenVINO's C++ reader and checked (``check_operations``) before anything compiles
    it; ``OpenVINOError`` naming the file otherwise."""
    xml = ir_file(path)
    if not xml.is_file():
        raise OpenVINOError(
            f"OpenVINO IR {xml} does not exist (give a folder holding model.xml and model.bin, "
            "or the .xml file)"
        )
    try:
        model = ov.Core().read_model(xml)
    except RuntimeError as error:
        raise OpenVINOError(f"{xml} is not a readable OpenVINO IR ({reason(error)})") from None
    check_operations(model, xml)
    return model


def write_ir(ov: ModuleType, model: Any, xml: str | os.PathLike, compress: bool = False) -> Path:
    """Write ``model`` as the IR ``xml`` and the ``.bin`` beside it, each atomically
    (``densenet.data.files.atomic_write``), the weights first; ``compress``: weights in float16
    (``compress_to_fp16``). Returns ``xml``."""
    xml = Path(xml)
    targets = [xml, xml.with_suffix(".bin")]
    for target in targets:
        check_regular_file(target)
    with tempfile.TemporaryDirectory(dir=xml.parent, prefix=".openvino-") as scratch:
        written = Path(scratch) / "model.xml"
        ov.save_model(model, written, compress_to_fp16=compress)
        for source, target in reversed(list(zip([written, written.with_suffix(".bin")], targets))):
            atomic_write(target, functools.partial(os.replace, source))
    return xml


def check_operations(model: Any, source: str | os.PathLike) -> None:
    """Refuse an ``openvino.Model`` read from ``source`` unless every operator comes from one of
    OpenVINO's standard opsets (``opsetN``) and none holds a subgraph of its own."""
    for op in model.get_ops():
        kind, version = op.get_type_name(), op.get_type_info().version_id
        if not STANDARD_OPSET.fullmatch(version) or kind in SUBGRAPH_OPERATORS:
            raise OpenVINOError(
                f"{source}: layer {op.get_friendly_name()!r} is a {kind} of {version}, not an "
                "operator of OpenVINO's standard opsets without subgraphs; refused (export the "
                "model again with densenet export --format openvino)"
            )


def input_shape(
    ov: ModuleType, channels: int, spatial: int, batch: int | None = None, size: int | None = None
) -> Any:
    """The ``openvino.PartialShape`` (N, C, *spatial) of a converted model's input: ``batch``
    and ``size`` (every spatial axis) fixed where given, else dynamic (-1)."""
    fixed = -1 if size is None else size
    return ov.PartialShape([-1 if batch is None else batch, channels, *[fixed] * spatial])


@keeps_signal_stack
def convert(ov: ModuleType, module: nn.Module, example: Tensor, shape: Any) -> Any:
    """``module`` converted to an ``openvino.Model`` with input ``shape``, from its trace on
    ``example`` (traced here without the tracer's check, which runs the module three more
    times); ``OpenVINOError`` if OpenVINO cannot convert it."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's notice
            traced = torch.jit.trace(module, example, check_trace=False)
            return ov.convert_model(traced, example_input=example, input=[shape])
    except Exception as error:  # OpenVINO's frontends raise many types
        raise OpenVINOError(f"OpenVINO cannot convert this model: {reason(error)}") from None


def in_batches(x: Tensor, batch_size: int | None, run: Callable[[Tensor], Tensor]) -> Tensor:
    """``run`` over ``x`` for a graph of a fixed ``batch_size`` (None: any): in chunks of that
    size, the last padded with zeros and its outputs trimmed. (N, ...) -> (N, ...)."""
    if batch_size is None:
        return run(x)
    outputs = []
    for chunk in x.split(batch_size):
        n = chunk.shape[0]
        if n < batch_size:
            chunk = torch.cat([chunk, chunk.new_zeros((batch_size - n, *chunk.shape[1:]))])
        outputs.append(run(chunk)[:n])
    return torch.cat(outputs)


class CompiledModule(nn.Module):
    """A compiled OpenVINO model as a module: (N, C, ...) float tensor on the CPU in, (N,
    outputs) float32 tensor out (a graph of a fixed batch size runs ``in_batches``). Compiled
    with the throughput hint, a batch is split across OpenVINO's optimal number of inference
    requests (one per stream), which run at once; used by one call at a time."""

    def __init__(self, compiled: Any, name: str) -> None:
        super().__init__()
        self.compiled, self.name = compiled, name
        self.requests = [
            compiled.create_infer_request()
            for _ in range(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        ]
        batch = compiled.input(0).get_partial_shape()[0]
        self.batch_size = batch.get_length() if batch.is_static else None
        self._lock = threading.Lock()

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            raise OpenVINOError(
                f"{self.name} runs on the CPU (OpenVINO), got an input on {x.device}; use "
                "--device cpu"
            )
        return in_batches(x.detach().to(torch.float32), self.batch_size, self._infer)

    def _infer(self, x: Tensor) -> Tensor:
        parts = x.chunk(len(self.requests)) if self.batch_size is None else [x]
        requests = self.requests[: len(parts)]
        with self._lock:
            try:
                self._run(requests, parts)
            except RuntimeError as error:  # OpenVINO's own exception type
                raise OpenVINOError(f"OpenVINO failed on {self.name}: {reason(error)}") from None
            outputs = [request.get_output_tensor(0).data for request in requests]
            return torch.from_numpy(np.concatenate(outputs)).float()

    @staticmethod
    def _run(requests: list[Any], parts: list[Tensor]) -> None:
        """Run each request on its part at once; return when all are done."""
        started = []
        try:
            for request, part in zip(requests, parts):
                request.start_async({0: part.contiguous().numpy()})
                started.append(request)
        finally:
            for request in started:
                request.wait()


def traceable_form(model: DenseNet | RDNet) -> tuple[nn.Module, int]:
    """``model``'s float32 inference form as a graph runtime takes it (concatenations, portable
    operators), and its input channels."""
    if isinstance(model, RDNet):
        return InferenceRDNet(model, torch.float32, graph=True), model.config["in_channels"]
    form = concatenating(InferenceDenseNet(model, torch.float32, channels_last=False))
    return form, model.features.conv0.in_channels


def converted_form(ov: ModuleType, model: DenseNet | RDNet) -> Any:
    """``model``'s inference form as an ``openvino.Model``: from the cache when this model was
    converted before (``cache_dir()``, an IR named by ``fingerprint``; the ``CACHED_IRS`` used
    last are kept, and twice as many of OpenVINO's compiled blobs), else converted and cached."""
    xml = cache_dir() / f"{fingerprint(model, ov)}.xml"
    if xml.is_file():
        with contextlib.suppress(OpenVINOError, OSError):  # a damaged entry: convert again
            converted = read_ir(ov, xml)
            os.utime(xml)
            return converted
    form, channels = traceable_form(model)
    side, spatial_dims = max(model.min_input_size, 32), getattr(model, "spatial_dims", 2)
    example = torch.randn(EXAMPLE_BATCH, channels, *[side] * spatial_dims)
    converted = convert(ov, form, example, input_shape(ov, channels, spatial_dims))
    with contextlib.suppress(OSError, DenseNetError):  # a read-only cache: convert every time
        xml.parent.mkdir(parents=True, exist_ok=True)
        write_ir(ov, converted, xml)
        for pattern, kept in (("*.xml", CACHED_IRS), ("*.blob", 2 * CACHED_IRS)):
            files = sorted(xml.parent.glob(pattern), key=lambda path: path.stat().st_mtime)
            for old in files[:-kept]:  # OpenVINO's compiled blobs too (a precision each)
                old.unlink()
                old.with_suffix(".bin").unlink(missing_ok=True)
    return converted


def fingerprint(model: DenseNet | RDNet, ov: ModuleType) -> str:
    """A SHA-256 (hex) of what the converted form depends on: the model's type, configuration
    and tensors, OpenVINO's version and the source of the code that builds the form."""
    digest = hashlib.sha256()
    here = Path(__file__)
    sources = [here, here.with_name("form.py"), here.with_name("rdnet_form.py")]
    described = [type(model).__name__, repr(sorted(model.config.items()))]
    for part in [ov.__version__, *described, *sources]:
        digest.update(part.read_bytes() if isinstance(part, Path) else part.encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class OpenVINODenseNet(CompiledModule):
    """A DenseNet's inference form compiled by OpenVINO for the CPU.

    Args:
        model: an eval-mode ``densenet.DenseNet`` on the CPU (1D, 2D or 3D), or ``RDNet``.
        dtype: None or float32 (exact: OpenVINO's f32 precision), ``"auto"`` (OpenVINO's
            default: bfloat16 where the CPU computes it, else float32), bfloat16 or float16
            (where the CPU computes it).
        throughput: compile with OpenVINO's throughput hint (several streams, each batch split
            across them: for many images at a time) instead of its latency hint (one request
            on every thread: for one image at a time).

    Input (N, in_channels, *spatial) float, any batch and spatial size; output (N,
    num_classes) float32 logits (pooled features for a model without classifier). ``dtype`` is
    the precision OpenVINO computes in.
    """

    def __init__(
        self,
        model: DenseNet | RDNet,
        dtype: torch.dtype | str | None = None,
        throughput: bool = False,
    ) -> None:
        ov = require_openvino("backend='openvino'")
        device = next(model.parameters()).device
        if device.type != "cpu":
            raise OpenVINOError(
                f"backend='openvino' runs on the CPU, the model is on {device}; move it to the "
                "CPU or use another backend"
            )
        precision = precision_of(dtype, ov)
        converted = converted_form(ov, model)
        hint = "THROUGHPUT" if throughput else "LATENCY"
        super().__init__(compile_for_cpu(ov, converted, precision, hint), type(model).__name__)
        self.dtype, self.spatial_dims = precision, getattr(model, "spatial_dims", 2)
        for name in METADATA:
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))
        self.eval()

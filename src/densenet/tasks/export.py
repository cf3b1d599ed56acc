"""Export a DenseNet for deployment: ONNX, TorchScript, ``torch.export`` programs and OpenVINO IR,
with the class names and preprocessing constants stored in the file, an ONNX Runtime wrapper that
``Classifier`` can run, and a Triton Inference Server model repository for the ONNX file
(``densenet.tasks.triton_repo``).

Every format takes (N, C, H, W) normalised images (C: the card's ``in_channels``) and returns (N, num_classes) logits. By default
the batch size, height and width are all dynamic; ``batch_size`` / ``image_size`` fix them.

- ONNX (``to_onnx``): torch's ``torch.export``-based exporter (``dynamo=True``, opset 18 or newer),
  input ``images``, output ``logits``, metadata in the model's ``metadata_props``.
- TorchScript (``to_torchscript``): ``torch.jit.script`` (``torch.jit.trace`` where scripting
  fails), loadable with ``torch.jit.load`` without this package; metadata in the extra file
  ``densenet.json``.
- ``torch.export`` (``to_exported``): an ``ExportedProgram`` saved as ``.pt2``, loadable with
  ``torch.export.load``; metadata in the extra file ``densenet.json``.
- OpenVINO IR (``to_openvino``): a folder with ``model.xml`` and ``model.bin``, converted by
  ``openvino.convert_model``; metadata in the graph's rt_info (``densenet``).

``fold=True`` exports the inference form (``densenet.optimize``: BatchNorms folded into the
convolutions or reduced to per-channel clamps, transitions pooling first) instead of the training
form; in ONNX its dense blocks are written as concatenations, which runtimes plan themselves.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet.data.card import ModelCard
from densenet.data.files import atomic_write, check_output_file
from densenet.deprecation import renamed_keywords
from densenet.errors import first_line
from densenet.infer.exported import (
    DTYPES,
    EXTRA_FILE,
    INPUT_NAME,
    INSTALL_EXPORT,
    OUTPUT_NAME,
    ExportError,
    ExportMetadata,
    OnnxModel,
    OpenVINOModel,
    read_metadata,
    require,
)
from densenet.infer.form import BNReLU, concatenating
from densenet.infer.openvino import (
    IR_FILES,
    METADATA_KEY,
    convert,
    input_shape,
    require_openvino,
    write_ir,
)
from densenet.infer.optimize import optimize
from densenet.infer.quantization import calibration_batches, check_image_model, quantize_onnx
from densenet.tasks.triton_repo import triton_config, write_triton_repo

__all__ = [
    "DTYPES",
    "FORMATS",
    "ExportError",
    "ExportMetadata",
    "OnnxModel",
    "OpenVINOModel",
    "export",
    "read_metadata",
    "to_exported",
    "to_onnx",
    "to_openvino",
    "to_torchscript",
    "triton_config",
    "write_triton_repo",
]

MIN_OPSET = 18  # the oldest opset torch's ONNX exporter writes without a lossy version conversion
DEFAULT_OPSET = 18  # ONNX Runtime >= 1.14, TensorRT >= 8.6, Triton's onnxruntime backend
EXAMPLE_BATCH = 2  # the example batch of a dynamic-batch export (1 would be specialised)


# ---- the three formats --------------------------------------------------------------------


@renamed_keywords(calibration="calibration_images")
def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    batch_size: int | None = None,
    image_size: int | None = None,
    dtype: str | torch.dtype = "float32",
    fold: bool = False,
    opset: int = DEFAULT_OPSET,
    card: ModelCard | None = None,
    categories: Sequence[str] | None = None,
    calibration_images: str | os.PathLike | None = None,
) -> Path:
    """Write ``model`` as an ONNX file (weights inside, one file).

    Args:
        model: a ``densenet.DenseNet`` (any configuration; weights as loaded).
        path: the ``.onnx`` file to write; replaced atomically.
        batch_size: a fixed batch size; default None (dynamic axis ``batch``).
        image_size: a fixed square input size in pixels; default None (dynamic ``height`` and
            ``width``).
        dtype: float32, float16 or bfloat16: the weights, the input and the output; or int8:
            a QDQ model (``densenet.infer.quantization.quantize_onnx``: ONNX Runtime's static
            quantization, calibrated on the images in ``calibration_images``) with float32 input and
            output, which ONNX Runtime and OpenVINO run in int8.
        fold: export the inference form (``densenet.optimize``, BatchNorm folded).
        opset: the ONNX operator set, at least 18.
        card: the model card to store (class names, preprocessing; ``densenet.load`` returns
            it); default ``ModelCard.for_model(model)``.
        categories: class names replacing the card's.

    Input ``images`` (N, 3, H, W) in ``dtype``; output ``logits`` (N, num_classes) in ``dtype``.
    Returns the path written.
    """
    onnx = require("onnx", "ONNX export", INSTALL_EXPORT)
    int8 = dtype == "int8"
    _check_onnx_request(onnx, model, opset, int8, calibration_images, card)
    path = _writable(path)
    float_dtype = "float32" if int8 else dtype  # int8: a float32 export, then quantized
    net, example, meta = _prepare(
        model, card, categories, batch_size, image_size, float_dtype, fold, for_onnx=True
    )
    if int8:  # read before the export: a folder without readable images fails first
        batches = calibration_batches(calibration_images, meta.card, progress=False)
    proto = _onnx_proto(net, example, opset, batch_size, image_size)
    if int8:
        proto = _quantized(onnx, proto, batches)
        meta = _with_extra(meta, quantization="int8 QDQ: per-channel weights, uint8 activations")
    proto.producer_name = "densenet"
    proto.doc_string = (
        f"{meta.card.arch or 'DenseNet'}: {INPUT_NAME} (N, 3, H, W) -> {OUTPUT_NAME} (N, classes)"
    )
    for key, value in meta.to_dict().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    return path


def _check_onnx_request(
    onnx: Any,
    model: nn.Module,
    opset: int,
    int8: bool,
    calibration_images: str | os.PathLike | None,
    card: ModelCard | None,
) -> None:
    """``ExportError`` (before any work) unless ``to_onnx`` can write what is asked: the exporter
    and, for int8, ONNX Runtime installed, calibration images given for int8 only, an image
    model and an ``opset`` that the installed onnx writes."""
    require("onnxscript", "ONNX export (torch's exporter)", INSTALL_EXPORT)
    if int8:
        require("onnxruntime", "int8 ONNX export (ONNX Runtime's quantization)", INSTALL_EXPORT)
        if calibration_images is None:
            raise ExportError(
                "an int8 ONNX model needs calibration images: give a folder of a few hundred of "
                "your images (--calibration-images DIR)"
            )
        check_image_model(card or ModelCard.for_model(model))
    elif calibration_images is not None:
        raise ExportError("calibration images are for dtype int8 only; drop them or export int8")
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(
            f"opset {opset} is {'too old' if opset < MIN_OPSET else 'newer than the installed onnx supports'}"
            f"; use an opset from {MIN_OPSET} to {newest} (default {DEFAULT_OPSET})"
        )


def _onnx_proto(
    net: nn.Module, example: Tensor, opset: int, batch_size: int | None, image_size: int | None
) -> Any:
    """``net`` exported by torch's ``torch.export``-based exporter, as an ONNX ``ModelProto``:
    the batch axis dynamic unless ``batch_size`` fixes it, height and width unless
    ``image_size`` does."""
    axes: dict[int, str] = {}
    if batch_size is None:
        axes[0] = "batch"
    if image_size is None:
        axes.update({2: "height", 3: "width"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            verbose=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_shapes=(axes,) if axes else None,
            optimize=True,
        )
    return program.model_proto


def to_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    batch_size: int | None = None,
    image_size: int | None = None,
    dtype: str | torch.dtype = "float32",
    fold: bool = False,
    method: str = "auto",
    card: ModelCard | None = None,
    categories: Sequence[str] | None = None,
) -> Path:
    """Write ``model`` as a TorchScript archive, loadable with ``torch.jit.load`` (no need for
    this package); the metadata is the archive's extra file ``densenet.json``.

    Args:
        method: ``"script"`` (``torch.jit.script``), ``"trace"`` (``torch.jit.trace`` on an example
            batch) or ``"auto"``: script, and trace where scripting fails. Both accept any batch
            size and image size; ``batch_size`` / ``image_size`` set the tracing example and are
            recorded in the metadata.
        others: as ``to_onnx``.
    """
    if not hasattr(torch.jit, "script"):
        raise ExportError(
            f"this torch ({torch.__version__}) has no TorchScript; use --format exported"
        )
    if method not in ("auto", "script", "trace"):
        raise ExportError(f"method must be auto, script or trace, got {method!r}")
    path = _writable(path)
    net, example, meta = _prepare(model, card, categories, batch_size, image_size, dtype, fold)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices
        warnings.simplefilter("ignore", UserWarning)  # its tracer and type-annotation notes
        scripted, used = None, method
        if method in ("auto", "script"):
            try:
                scripted = torch.jit.script(net)
                used = "script"
            except Exception as error:
                if method == "script":
                    raise ExportError(
                        f"torch.jit.script failed ({first_line(error)}); use trace"
                    ) from None
        if scripted is None:
            with torch.no_grad():
                scripted = torch.jit.trace(net, (example,), check_trace=False)
            used = "trace"
        meta = _with_extra(meta, torchscript=used)
        extra = {EXTRA_FILE: json.dumps(meta.to_dict())}
        atomic_write(path, lambda tmp: torch.jit.save(scripted, tmp, _extra_files=extra))
    return path


def to_exported(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    batch_size: int | None = None,
    image_size: int | None = None,
    dtype: str | torch.dtype = "float32",
    fold: bool = False,
    card: ModelCard | None = None,
    categories: Sequence[str] | None = None,
) -> Path:
    """Write ``model`` as a ``torch.export`` program (``.pt2``): ``torch.export.load(path)
    .module()`` runs it; the metadata is the archive's extra file ``densenet.json``. Arguments as
    ``to_onnx``."""
    path = _writable(path)
    net, example, meta = _prepare(model, card, categories, batch_size, image_size, dtype, fold)
    dims: dict[int, Any] = {}
    if batch_size is None:
        dims[0] = torch.export.Dim("batch")
    if image_size is None:
        dims.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    program = torch.export.export(net, (example,), dynamic_shapes=(dims,) if dims else None)
    extra = {EXTRA_FILE: json.dumps(meta.to_dict())}
    atomic_write(path, lambda tmp: torch.export.save(program, tmp, extra_files=extra))
    return path


def to_openvino(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    batch_size: int | None = None,
    image_size: int | None = None,
    dtype: str | torch.dtype = "float32",
    fold: bool = False,
    card: ModelCard | None = None,
    categories: Sequence[str] | None = None,
) -> Path:
    """Write ``model`` as an OpenVINO IR in folder ``path``: ``model.xml`` (the graph, with the
    metadata as JSON in its rt_info, key ``densenet``) and ``model.bin`` (the weights), converted
    by ``openvino.convert_model``; ``openvino.Core().read_model(path / "model.xml")`` reads it.

    Args:
        dtype: float32, or float16: the weights stored in float16 (OpenVINO's
            ``compress_to_fp16``; the input and output stay float32).
        others: as ``to_onnx`` (``fold``: the inference form with concatenating blocks).

    Returns the folder.
    """
    ov = require_openvino("OpenVINO export")
    name = _dtype_name(dtype)
    if name not in ("float32", "float16"):
        raise ExportError(
            f"an OpenVINO IR stores float32 or float16 weights, not {name}; OpenVINO picks the "
            "compute precision when it runs the model"
        )
    folder = check_ir_folder(path)
    net, example, meta = _prepare(
        model, card, categories, batch_size, image_size, "float32", fold, for_onnx=True
    )
    shape = input_shape(ov, example.shape[1], example.dim() - 2, batch_size, image_size)
    converted = convert(ov, net, example, shape)
    converted.set_rt_info(
        json.dumps(dataclasses.replace(meta, dtype=name).to_dict()), [METADATA_KEY]
    )
    write_ir(ov, converted, folder / IR_FILES[0], compress=name == "float16")
    return folder


def check_ir_folder(path: str | os.PathLike) -> Path:
    """``path`` as a Path if an IR can be written there: a folder (created if missing) whose
    ``model.xml`` and ``model.bin`` are regular files or absent; else ``ExportError``."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ExportError(
            f"output {folder} is a file; an OpenVINO IR is a folder (model.xml, model.bin): give "
            "a folder name"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(f"cannot create the output folder {folder}: {error.strerror}") from None
    for name in IR_FILES:
        check_output_file(folder / name)
    return folder


EXPORTERS: dict[str, Callable[..., Path]] = {
    "onnx": to_onnx,
    "torchscript": to_torchscript,
    "exported": to_exported,
    "openvino": to_openvino,
}
FORMATS = tuple(EXPORTERS)


def export(model: nn.Module, path: str | os.PathLike, format: str, **options: Any) -> Path:
    """Write ``model`` to ``path`` in ``format`` (``onnx``, ``torchscript``, ``exported`` or
    ``openvino``: a folder); ``options`` as the format's function (``to_onnx``,
    ``to_torchscript``, ``to_exported``, ``to_openvino``)."""
    if format not in EXPORTERS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(EXPORTERS)}")
    return EXPORTERS[format](model, path, **options)


# ---- helpers --------------------------------------------------------------------------------


def _quantized(onnx: Any, proto: Any, batches: list[Tensor]) -> Any:
    """The float32 ONNX model ``proto`` as ONNX Runtime's static QDQ int8 model."""
    with tempfile.TemporaryDirectory() as folder:
        source, target = os.path.join(folder, "float32.onnx"), os.path.join(folder, "int8.onnx")
        onnx.save(proto, source)
        quantize_onnx(source, target, batches)
        quantized = onnx.load(target)
    del quantized.metadata_props[:]  # the quantizer's own note; the caller writes the card
    return quantized


def _prepare(
    model: nn.Module,
    card: ModelCard | None,
    categories: Sequence[str] | None,
    batch_size: int | None,
    image_size: int | None,
    dtype: str | torch.dtype,
    fold: bool,
    for_onnx: bool = False,
) -> tuple[nn.Module, Tensor, ExportMetadata]:
    """The module to export (a CPU copy in eval mode and ``dtype``, folded if asked), an example
    input and the metadata. ``for_onnx``: the folded form in NCHW with concatenating blocks."""
    dtype_name = _dtype_name(dtype)
    for label, value in (("batch_size", batch_size), ("image_size", image_size)):
        if value is not None and value < 1:
            raise ExportError(f"{label} must be a positive integer, got {value}")
    num_classes = int(getattr(model, "num_classes", 1000))
    if num_classes < 1:
        raise ExportError("the model has no classifier (num_classes=0); export one with classes")
    card = card or ModelCard.for_model(model)
    if categories is not None:
        card = card.replace(classes=tuple(categories))
    if card.num_classes != num_classes:
        raise ExportError(
            f"{card.num_classes} class names given for a model with {num_classes} outputs; "
            f"give exactly {num_classes}"
        )
    pre = card.preprocessing
    if image_size is not None and card.volume is not None:
        raise ExportError("image_size is for image models; a volume model's size is its card's")
    if image_size is not None:  # a fixed input size: crop to it, resize in the same ratio
        if image_size < min(pre.min_size):
            raise ExportError(
                f"image_size {image_size} is below the model's minimum {pre.min_size[0]}"
            )
        card = card.replace(preprocessing=pre.with_crop(image_size))
    meta = ExportMetadata(card, dtype_name, fold, batch_size, image_size)
    net = copy.deepcopy(model).cpu().eval()
    if fold:
        net = optimize(
            net, dtype=DTYPES[dtype_name], channels_last=not for_onnx, backend="eager"
        )  # the form whose modules export reads
        if for_onnx:
            _onnx_form(net)
    else:
        net = net.to(DTYPES[dtype_name])
    example = torch.randn(batch_size or EXAMPLE_BATCH, *card.input_shape, dtype=DTYPES[dtype_name])
    return net, example, meta


class _AffineReLU(nn.Module):
    """``relu(x * scale + shift)`` per channel, written as a batch norm with zero mean, unit
    variance and no epsilon (exact): one ONNX BatchNormalization node, which ONNX Runtime runs
    in one pass, instead of a Mul and an Add. Input (N, C, H, W); output (N, C, H, W)."""

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.flatten().clone())
        self.register_buffer("shift", shift.flatten().clone())
        self.register_buffer("zeros", torch.zeros_like(self.scale))
        self.register_buffer("ones", torch.ones_like(self.scale))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(F.batch_norm(x, self.zeros, self.ones, self.scale, self.shift, eps=0.0))


def _onnx_form(net: nn.Module) -> None:
    """Rewrite an inference-form network in place for ONNX: concatenating dense blocks and
    single-node BN-ReLUs (the same function)."""
    concatenating(net)
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, BNReLU):
                setattr(module, name, _AffineReLU(child.scale, child.shift))


def _dtype_name(dtype: str | torch.dtype) -> str:
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return name
    raise ExportError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def _with_extra(meta: ExportMetadata, **extra: Any) -> ExportMetadata:
    return dataclasses.replace(meta, extra={**meta.extra, **extra})


def _writable(path: str | os.PathLike) -> Path:
    """``path`` as a Path after checking that a file can be written there (before any work)."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"output path {path} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(
            f"cannot create the folder of output path {path}: {error.strerror}"
        ) from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ExportError(f"output path {path} is not writable; choose another --out")
    return path

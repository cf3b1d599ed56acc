"""Post-training static int8 quantization of a DenseNet or RDNet on the CPU (``densenet.quantize``).

Two engines, calibrated alike on the user's images:

- ``"nncf"`` (when openvino and nncf are installed): NNCF's ``quantize`` of the OpenVINO model
  converted from the network's inference form (BatchNorms folded; an RDNet's LayerNorm affines
  and layer scales folded, ``densenet.infer.rdnet_form``): per-channel int8 weights,
  per-tensor activations (FakeQuantize operators of OpenVINO's standard opsets), run by
  OpenVINO's int8 kernels. The file written is an OpenVINO IR folder (``model.xml`` with the
  card and the report in its rt_info, ``model.bin``).
- ``"fx"``: PyTorch's FX graph mode with the x86 backend (``torch.ao.quantization``, deprecated
  in PyTorch): per-channel int8 weights, per-tensor uint8 activations, each ``conv1 -> norm2
  -> relu2`` one int8 convolution with its ReLU. The file written is TorchScript with the card
  and the report. DenseNets only.

``densenet.load`` reads both.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from densenet.data.card import ModelCard
from densenet.data.files import atomic_write
from densenet.data.images import ImageError, find_images, open_image
from densenet.deprecation import renamed_keywords
from densenet.errors import DenseNetError, first_line
from densenet.infer.exported import EXTRA_FILE, INPUT_NAME, ExportMetadata
from densenet.infer.load import LoadedModel, load
from densenet.infer.openvino import (
    INSTALL_OPENVINO,
    IR_FILES,
    METADATA_KEY,
    CompiledModule,
    OpenVINOError,
    compile_for_cpu,
    converted_form,
    keeps_signal_stack,
    require_openvino,
    write_ir,
)
from densenet.nn.model import DenseNet
from densenet.nn.rdnet import RDNet
from densenet.weights.published import WeightsArg

__all__ = [
    "ENGINES",
    "QuantizeError",
    "QuantizedModel",
    "calibration_batches",
    "check_image_model",
    "compare",
    "default_engine",
    "quantize",
    "quantize_module",
    "quantize_nncf",
    "quantize_onnx",
    "save_quantized",
]

# int8 torch.cat requantizes inputs of other scales to its output's; the report measures the error.
warnings.filterwarnings("ignore", message="All inputs of this cat operator")

ENGINES = ("nncf", "fx")
# an RDNet form's matrix products on pooled vectors (its classifier, its squeeze-excitations),
# by the names of their converted nodes: kept in float32
RDNET_FLOAT_NODES = [r".*classifier.*", r".*\.se/.*"]
FX_DEPRECATED = (
    "int8 through torch.ao.quantization FX, which is deprecated in PyTorch; for NNCF int8 "
    f"(OpenVINO) instead: {INSTALL_OPENVINO}"
)


class QuantizeError(DenseNetError, ValueError):
    """Quantization that cannot be done: no calibration images, or a layer int8 cannot run."""


def check_image_model(card: ModelCard) -> None:
    """``QuantizeError`` unless the card's model takes images: int8 is calibrated on images."""
    if card.volume is not None:
        raise QuantizeError(
            "int8 takes image models only (it is calibrated on images); this model takes "
            "volumes: run it in float32, float16 or bfloat16"
        )


def _check_quantizable(loaded: LoadedModel, source: object, engine: str) -> None:
    """``QuantizeError`` unless ``loaded`` (from ``source``) is a float DenseNet of images, or
    an RDNet for the nncf ``engine``."""
    if not isinstance(loaded.module, (DenseNet, RDNet)):
        name = source if isinstance(source, (str, os.PathLike)) else "this model"
        raise QuantizeError(
            f"cannot quantize {name} ({type(loaded.module).__name__}): quantize needs a float "
            "DenseNet or RDNet (an architecture with weights, a weights file or a checkpoint of "
            "densenet train), not an exported or int8 file"
        )
    if isinstance(loaded.module, RDNet) and engine != "nncf":
        raise QuantizeError(
            f"an RDNet quantizes with the nncf engine (OpenVINO), not {engine}: "
            f"{INSTALL_OPENVINO} and nncf, then quantize with engine nncf"
        )
    check_image_model(loaded.card)


@dataclass
class QuantizedModel:
    """The int8 ``module`` (input float32 (N, C, H, W), output float32 logits (N, classes)), its
    ``card`` and the ``report`` of what was lost against float32."""

    module: nn.Module
    card: ModelCard
    report: dict[str, Any] = field(default_factory=dict)
    graph: Any = None  # NNCF's ``openvino.Model`` (saved as an IR); None for FX


def default_engine() -> str:
    """``"nncf"`` when openvino and nncf are installed, else ``"fx"``."""
    installed = all(importlib.util.find_spec(name) for name in ("openvino", "nncf"))
    return "nncf" if installed else "fx"


def _batches(paths: list[str], card: ModelCard, batch_size: int, desc: str, progress: bool):
    """(N, C, H, W) float32 batches of the images at ``paths`` through the card's transform."""
    transform = card.preprocessing.transform()
    with tqdm(total=len(paths), desc=desc, unit="image", disable=not progress, leave=False) as bar:
        for start in range(0, len(paths), batch_size):
            images = []
            for path in paths[start : start + batch_size]:
                try:
                    images.append(transform(open_image(path)))
                except (ImageError, OSError) as error:
                    raise QuantizeError(f"calibration image {first_line(error)}") from None
            bar.update(len(images))
            yield torch.stack(images)


def _check_folder(calibration_images: str | os.PathLike) -> None:
    if not Path(calibration_images).exists():
        raise QuantizeError(f"calibration folder {calibration_images} does not exist")


def _calibration_paths(calibration_images: str | os.PathLike, limit: int) -> list[str]:
    """``limit`` of the images in the folder ``calibration_images`` (``_spread``), once
    ``_check_folder`` has seen it exists."""
    paths = find_images([calibration_images])
    if not paths:
        raise QuantizeError(f"no calibration images in {calibration_images} (png, jpg, ...)")
    return _spread(paths, limit)


def _spread(items: list[str], count: int) -> list[str]:
    """``count`` of ``items`` evenly spaced over the whole list, in order (all if fewer): from
    class folders, every class rather than the first few."""
    if len(items) <= count:
        return items
    return [items[i * len(items) // count] for i in range(count)]


@renamed_keywords(calibration="calibration_images")
def calibration_batches(
    calibration_images: str | os.PathLike,
    card: ModelCard,
    *,
    num_images: int = 300,
    batch_size: int = 16,
    progress: bool = True,
) -> list[Tensor]:
    """``num_images`` images spread evenly over the folder ``calibration_images`` through the
    card's transform, as (N, C, H, W) float32 batches; ``QuantizeError`` if there are none or one
    cannot be read."""
    _check_folder(calibration_images)
    paths = _calibration_paths(calibration_images, num_images)
    return list(_batches(paths, card, batch_size, "calibrating", progress))


def quantize_onnx(source: str | os.PathLike, target: str | os.PathLike, batches: Sequence[Tensor]):
    """ONNX Runtime's static QDQ int8 quantization of the float32 ONNX file ``source`` (input
    ``images``) into ``target``: per-channel int8 weights, uint8 activations calibrated on
    ``batches``; ONNX Runtime and OpenVINO run the result."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch.numpy()}

    reader, qdq = Reader(), QuantFormat.QDQ
    quantize_static(
        os.fspath(source), os.fspath(target), reader, quant_format=qdq, per_channel=True
    )


def _labelled(folder: str | os.PathLike, card: ModelCard, batch_size: int):
    """(images, labels) batches of ``folder/<class name>/*`` for the card's classes."""
    folders = [(Path(folder) / name, i) for i, name in enumerate(card.classes)]
    items = [(p, i) for path, i in folders if path.is_dir() for p in find_images([path])]
    if not items:
        raise QuantizeError(f"no images in {folder}/<class> for the classes {card.classes[:3]}...")
    paths, labels = zip(*items)
    batches = _batches(list(paths), card, batch_size, "validating", False)
    for start, x in zip(range(0, len(paths), batch_size), batches):
        yield x, torch.tensor(labels[start : start + batch_size])


def quantize_module(module: nn.Module, batches: Sequence[Tensor]) -> nn.Module:
    """``module`` (float32, CPU) in int8: FX prepare, observe the (N, C, H, W) ``batches``,
    convert; a layer FX or int8 cannot handle is named in the ``QuantizeError``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    mapping = get_default_qconfig_mapping("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prepared = prepare_fx(copy.deepcopy(module).eval(), mapping, (batches[0][:1],))
        except Exception as error:  # the traced code names the module it cannot trace
            raise QuantizeError(
                f"cannot quantize {type(module).__name__}: {first_line(error)}"
            ) from error
        with torch.no_grad():
            for x in batches:
                prepared(x)
        return convert_fx(prepared)


def quantize_nncf(model: DenseNet | RDNet, batches: Sequence[Tensor], progress: bool = True) -> Any:
    """``model`` (float32, CPU) in int8 as an ``openvino.Model``: its inference form converted
    by OpenVINO (``densenet.infer.openvino.converted_form``), quantized by NNCF on the images of the
    (N, C, H, W) ``batches``, one at a time. The classifier stays in float32: per-tensor int8
    of its input, the pooled features, costs most of the logits' error for little time (a
    DenseNet's only MatMul; an RDNet's 1x1 convolutions are MatMuls too: its classifier and
    squeeze-excitations, on pooled vectors too, are named, ``RDNET_FLOAT_NODES``)."""
    return _nncf(require_openvino("int8 with NNCF"), model, batches, progress)


@keeps_signal_stack
def _nncf(
    ov: ModuleType, model: DenseNet | RDNet, batches: Sequence[Tensor], progress: bool
) -> Any:
    """``quantize_nncf`` with the ``openvino`` package ``ov``."""
    import nncf

    samples = [image[None].numpy() for batch in batches for image in batch]
    if isinstance(model, RDNet):
        classifier = nncf.IgnoredScope(patterns=RDNET_FLOAT_NODES, validate=False)
    else:
        classifier = nncf.IgnoredScope(types=["MatMul"], validate=False)
    level = logging.getLogger("nncf").level
    nncf.set_log_level(logging.ERROR)  # its notes on the graph, not for the user
    # NNCF's progress bars print to stdout, where --json goes: to stderr, or nowhere
    bars = sys.stderr if progress else io.StringIO()
    try:
        with contextlib.redirect_stdout(bars):
            return nncf.quantize(
                converted_form(ov, model),
                nncf.Dataset(samples),
                subset_size=len(samples),
                ignored_scope=classifier,
            )
    except OpenVINOError as error:
        raise QuantizeError(f"cannot quantize {type(model).__name__}: {error}") from None
    finally:
        nncf.set_log_level(level)


def compare(reference: nn.Module, quantized: nn.Module, batches) -> dict[str, Any]:
    """Top-1 agreement and relative logit error ||q - f|| / ||f|| of ``quantized`` against
    ``reference`` on ``batches``, and the labels' accuracy of both when given (x, y) pairs."""
    agree = total = 0
    err = norm = 0.0
    correct, labelled = [0, 0], False
    with torch.no_grad():
        for batch in batches:
            x, y = batch if isinstance(batch, tuple) else (batch, None)
            f, q = reference(x).float(), quantized(x).float()
            agree += int((f.argmax(1) == q.argmax(1)).sum())
            total += len(x)
            err += float((q - f).pow(2).sum())
            norm += float(f.pow(2).sum())
            if y is not None:
                labelled = True
                correct[0] += int((f.argmax(1) == y).sum())
                correct[1] += int((q.argmax(1) == y).sum())
    report = {
        "images": total,
        "top1_agreement": agree / max(total, 1),
        "relative_logit_error": (err / max(norm, 1e-30)) ** 0.5,
    }
    if labelled:
        report["accuracy_float32"] = correct[0] / total
        report["accuracy_int8"] = correct[1] / total
    return report


def _checked_engine(engine: str | None, num_images: int, holdout: int, batch_size: int) -> str:
    """The int8 engine to use (None: ``default_engine()``, with a warning when that is FX);
    ``QuantizeError`` for an unknown one or counts below their least."""
    limits = {"num_images": (num_images, 1), "holdout": (holdout, 0), "batch_size": (batch_size, 1)}
    for name, (value, least) in limits.items():
        if value < least:
            raise QuantizeError(f"{name} must be at least {least}, got {value}")
    if engine not in (None, *ENGINES):
        raise QuantizeError(f"unknown int8 engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine is None:
        engine = default_engine()
        if engine == "fx":
            warnings.warn(FX_DEPRECATED, FutureWarning, stacklevel=4)  # quantize's caller
    return engine


def _quantized(module: DenseNet | RDNet, batches: list[Tensor], engine: str, progress: bool):
    """``module`` in int8 by ``engine`` on ``batches``: the module that runs it, and NNCF's
    ``openvino.Model`` (None for FX)."""
    if engine != "nncf":
        return quantize_module(module, batches), None
    ov = require_openvino("int8 with NNCF")
    graph = _nncf(ov, module, batches, progress)
    return CompiledModule(compile_for_cpu(ov, graph, torch.float32), "int8 DenseNet"), graph


@renamed_keywords(calibration="calibration_images")
def quantize(
    model: str | os.PathLike | nn.Module | LoadedModel,
    calibration_images: str | os.PathLike,
    *,
    weights: WeightsArg = "DEFAULT",
    num_images: int = 300,
    holdout: int = 50,
    validation: str | os.PathLike | None = None,
    batch_size: int = 16,
    engine: str | None = None,
    progress: bool = True,
) -> QuantizedModel:
    """Post-training static int8 quantization calibrated on the images in ``calibration_images``.

    Args:
        model: a name, a file or a module (``densenet.load``), or a ``LoadedModel``.
        calibration_images: a folder of images (searched recursively): ``num_images`` of them,
            spread evenly over its sorted images (every class of class folders), are read;
            ``holdout`` of those, spread alike (when more remain), are not calibrated on but
            compared with float32 for the report. ``calibration=`` is its deprecated spelling.
        weights: for a name, its weights (``densenet.load``; None: random).
        validation: a folder with one sub-folder per class name of the card: the accuracy of
            float32 and int8 on its images goes into the report too.
        batch_size: images per calibration batch.
        engine: ``"nncf"`` (OpenVINO int8), ``"fx"`` (PyTorch's deprecated FX int8), or None:
            ``default_engine()``, with a warning when that is FX.
        progress: show progress bars.

    The report's ``held_out`` is False when there were not more than ``holdout`` images: int8
    is then compared with float32 on the images it was calibrated on.
    """
    engine = _checked_engine(engine, num_images, holdout, batch_size)
    _check_folder(calibration_images)  # before a download
    source = model
    if not isinstance(model, LoadedModel):
        model = load(model, weights=weights, progress=progress)
    _check_quantizable(model, source, engine)
    paths = _calibration_paths(calibration_images, num_images)
    card, module = model.card, model.module.cpu().float().eval()
    held = _spread(paths, holdout) if len(paths) > holdout else []
    compared = set(held)
    fit = [path for path in paths if path not in compared]
    batches = list(_batches(fit, card, batch_size, "calibrating", progress))
    quantized, graph = _quantized(module, batches, engine, progress)
    compared_on = _batches(held, card, batch_size, "comparing", progress) if held else batches
    report = compare(module, quantized, compared_on)
    if validation is not None:
        report["validation"] = compare(module, quantized, _labelled(validation, card, batch_size))
    backend = "nncf-openvino" if engine == "nncf" else "fx-x86"
    report.update(calibration_images=len(fit), held_out=bool(held), backend=backend)
    return QuantizedModel(quantized, card, report, graph)


def save_quantized(quantized: QuantizedModel, path: str | os.PathLike) -> Path:
    """Write ``quantized`` with its card and report, read by ``densenet.load``: NNCF's as an
    OpenVINO IR in folder ``path`` (``model.xml``, ``model.bin``), FX's as a TorchScript file."""
    meta = ExportMetadata(quantized.card, "int8", extra={"quantization": quantized.report})
    if quantized.graph is not None:
        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise QuantizeError(f"{folder} is a file; an NNCF int8 model is a folder: give one")
        folder.mkdir(parents=True, exist_ok=True)
        quantized.graph.set_rt_info(json.dumps(meta.to_dict()), [METADATA_KEY])
        write_ir(require_openvino("an int8 IR"), quantized.graph, folder / IR_FILES[0])
        return folder
    side = max(quantized.card.preprocessing.min_size or (32, 32))
    example = torch.randn(1, quantized.card.in_channels, side, side)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(quantized.module, example, check_trace=False)
        extra = {EXTRA_FILE: json.dumps(meta.to_dict())}
        atomic_write(path, lambda tmp: torch.jit.save(scripted, tmp, _extra_files=extra))
    return Path(path)

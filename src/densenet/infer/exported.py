"""Exported files (written by ``densenet export``): the metadata every format stores
(``ExportMetadata``: the model card and how the graph was exported), reading it back, and
``OnnxModel`` and ``OpenVINOModel``, which run an ONNX file with ONNX Runtime and an OpenVINO IR
with OpenVINO as modules."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from densenet.data.card import ModelCard, Preprocessing
from densenet.errors import DenseNetError, first_line
from densenet.infer.archives import check_exported, check_torchscript
from densenet.infer.openvino import (
    METADATA_KEY,
    CompiledModule,
    compile_for_cpu,
    in_batches,
    ir_file,
    is_ir,
    read_ir,
    require_openvino,
)
from densenet.infer.precision import DTYPES

__all__ = [
    "DTYPES",
    "EXTRA_FILE",
    "INSTALL_EXPORT",
    "ExportError",
    "ExportMetadata",
    "OnnxModel",
    "OpenVINOModel",
    "load_exported",
    "read_metadata",
]

INPUT_NAME, OUTPUT_NAME = "images", "logits"
EXTRA_FILE = "densenet.json"  # metadata inside TorchScript and .pt2 archives
INSTALL_EXPORT = "pip install 'densenet-toolkit[export]'"  # onnx, onnxscript, onnxruntime
ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
}


class ExportError(DenseNetError, RuntimeError):
    """An export that cannot be done as asked; the message says why and what to change."""


@dataclass(frozen=True)
class ExportMetadata:
    """What an exported file stores besides the graph: the model ``card`` (class names,
    preprocessing) and the export's ``dtype``, ``folded`` form and fixed ``batch_size`` /
    ``image_size`` (None where that input dimension is dynamic)."""

    card: ModelCard
    dtype: str = "float32"
    folded: bool = False
    batch_size: int | None = None
    image_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"card": ..., "export": {dtype, folded, ...}}``."""
        export = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del export["card"]
        return {"card": self.card.to_dict(), "export": export}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExportMetadata:
        """The inverse of ``to_dict``; also reads the flat layout of earlier versions."""
        if "card" in data:
            return cls(ModelCard.from_dict(data["card"]), **data.get("export", {}))
        known = Preprocessing.__dataclass_fields__
        pre = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        card = ModelCard(
            tuple(data["categories"]),
            Preprocessing(**pre),
            arch=data.get("arch"),
            weights=data.get("weights"),
        )
        fields = ("dtype", "folded", "batch_size", "image_size", "extra")
        export = {k: data[k] for k in fields if k in data}
        return cls(card, **export)


def require(module: str, purpose: str, install: str):
    """Import an optional dependency, or ``ExportError`` saying how to install it."""
    if importlib.util.find_spec(module) is None:
        raise ExportError(
            f"{purpose} needs the {module} package, which is not installed: {install}"
        )
    return importlib.import_module(module)


def _from_props(props: Mapping[str, str], path: Path) -> ExportMetadata:
    """The metadata in ONNX ``metadata_props`` (one JSON value per key)."""
    if "card" not in props and "categories" not in props:
        raise ExportError(
            f"{path} has no class names in its metadata: it was not written by densenet export"
        )
    return _metadata(lambda: {k: json.loads(v) for k, v in props.items()}, path)


def _metadata(read: Callable[[], Any], path: Path) -> ExportMetadata:
    """``ExportMetadata`` from what ``read()`` returns (parsed JSON); ``ExportError`` naming
    ``path`` when it cannot be read or is not metadata."""
    try:
        data = read()
        if not isinstance(data, Mapping):
            raise TypeError(f"it holds a JSON {type(data).__name__}, not an object")
        return ExportMetadata.from_dict(data)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ExportError(
            f"{path}: its densenet metadata is damaged ({first_line(error)[:160]}); export the "
            "model again"
        ) from None


def read_metadata(path: str | os.PathLike) -> ExportMetadata:
    """The metadata stored in an exported ``.onnx``, TorchScript or ``.pt2`` file, or an
    OpenVINO IR (its folder or ``.xml`` file)."""
    path = Path(path)
    if is_ir(path):
        ov = require_openvino("reading an OpenVINO IR")
        return _ir_metadata(read_ir(ov, path), ir_file(path))
    if not path.is_file():
        raise FileNotFoundError(f"exported model {path} does not exist")
    if path.suffix == ".onnx":
        onnx = require("onnx", "reading ONNX metadata", INSTALL_EXPORT)
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as error:  # protobuf and onnx raise their own types
            raise ExportError(f"{path} is not a readable ONNX file ({first_line(error)})") from None
        return _from_props({p.key: p.value for p in proto.metadata_props}, path)
    return load_exported(path)[1]


def load_exported(path: Path) -> tuple[nn.Module, ExportMetadata]:
    """A TorchScript or ``.pt2`` file written by ``densenet export``, read once: its module (in
    eval mode, on the CPU) and its metadata. The archive is checked first
    (``densenet.infer.archives``): a file that could run code is refused unread."""
    exported = path.suffix == ".pt2"
    (check_exported if exported else check_torchscript)(path)
    metadata = _metadata(lambda: json.loads(_extra_file(path)), path)
    kind = "a torch.export program" if exported else "a TorchScript archive"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if exported:
                module = torch.export.load(path).module()
            else:
                module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as error:  # torch raises many types for a damaged archive
        raise ExportError(
            f"{path} cannot be read as {kind} ({first_line(error)[:160]}); export it again"
        ) from None
    return module, metadata


def _extra_file(path: Path) -> bytes:
    """The ``densenet.json`` stored in an archive's ``extra/`` folder."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.split("/", 1)[-1] == f"extra/{EXTRA_FILE}":
                return archive.read(name)
    raise ExportError(f"{path} has no {EXTRA_FILE}: it was not written by densenet export")


class OnnxModel(nn.Module):
    """An exported ONNX file run by ONNX Runtime, as a module: (N, 3, H, W) float tensor in,
    (N, num_classes) float32 logits out, on the input's device. ``metadata`` is the file's
    ``ExportMetadata``.

    Args:
        path: an ``.onnx`` file written by ``densenet export``.
        device: ``cpu`` or ``cuda``; CUDA uses ONNX Runtime's CUDA provider when installed
            (``onnxruntime-gpu``), else the CPU with a warning.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        super().__init__()
        ort = require("onnxruntime", "running an ONNX model", INSTALL_EXPORT)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} does not exist")
        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            else:
                warnings.warn(
                    "this onnxruntime has no CUDA provider (install onnxruntime-gpu); running on CPU",
                    stacklevel=2,
                )
        try:
            self.session = ort.InferenceSession(str(self.path), providers=providers)
        except Exception as error:  # ONNX Runtime raises its own untyped errors
            reason = first_line(error)
            if "bfloat16" in reason:
                reason = (
                    "this ONNX Runtime has no bfloat16 kernels for it; export float16 or float32"
                )
            raise ExportError(f"ONNX Runtime cannot load {self.path}: {reason}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = _from_props(meta, self.path)
        self.num_classes = self.metadata.card.num_classes
        (inp,), (out,) = self.session.get_inputs(), self.session.get_outputs()
        self.input_name, self.output_name = inp.name, out.name
        dtype = ORT_TYPES.get(inp.type)
        if dtype not in ("float32", "float16"):
            raise ExportError(
                f"{self.path} takes {inp.type} input, which ONNX Runtime's Python API cannot feed; "
                "export float32 or float16 to run it here"
            )
        self.input_dtype = DTYPES[dtype]
        self.batch_size = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def forward(self, x: Tensor) -> Tensor:
        device = x.device
        x = x.detach().to("cpu", self.input_dtype)
        return in_batches(x, self.batch_size, self._run).to(device)

    def _run(self, x: Tensor) -> Tensor:
        try:
            (out,) = self.session.run([self.output_name], {self.input_name: x.numpy()})
        except Exception as error:  # ONNX Runtime raises its own untyped errors
            raise ExportError(f"ONNX Runtime failed on {self.path}: {first_line(error)}") from None
        return torch.from_numpy(out).float()


class OpenVINOModel(CompiledModule):
    """An OpenVINO IR written by ``densenet export --format openvino``, run by OpenVINO on the
    CPU in float32, as a module: (N, C, H, W) float tensor in, (N, num_classes) float32 logits
    out. The IR is checked before it is compiled (``densenet.infer.openvino.read_ir``); ``metadata``
    is its ``ExportMetadata`` (its rt_info's ``densenet`` entry).

    Args:
        path: the IR's folder (holding ``model.xml`` and ``model.bin``) or its ``.xml`` file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        ov = require_openvino("running an OpenVINO IR")
        model = read_ir(ov, path)
        metadata = _ir_metadata(model, ir_file(path))
        super().__init__(compile_for_cpu(ov, model, torch.float32), str(ir_file(path)))
        self.path, self.metadata = ir_file(path), metadata
        self.num_classes = metadata.card.num_classes


def _ir_metadata(model: Any, path: Path) -> ExportMetadata:
    """The metadata in an ``openvino.Model``'s rt_info (``METADATA_KEY``: JSON)."""
    if not model.has_rt_info([METADATA_KEY]):
        raise ExportError(
            f"{path} has no class names in its rt_info: it was not written by densenet export"
        )
    return _metadata(lambda: json.loads(model.get_rt_info([METADATA_KEY]).astype(str)), path)

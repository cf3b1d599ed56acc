"""Export a DenseNet for deployment: ONNX, TorchScript and ``torch.export`` programs, with the class
names and preprocessing constants stored in the file, an ONNX Runtime wrapper that ``Classifier``
can run, and a Triton Inference Server model repository for the ONNX file.

Every format takes (N, 3, H, W) normalised images and returns (N, num_classes) logits. By default
the batch size, height and width are all dynamic; ``batch_size`` / ``image_size`` fix them.

- ONNX (``to_onnx``): torch's ``torch.export``-based exporter (``dynamo=True``, opset 18 or newer),
  input ``images``, output ``logits``, metadata in the model's ``metadata_props``.
- TorchScript (``to_torchscript``): ``torch.jit.script`` (``torch.jit.trace`` where scripting
  fails), loadable with ``torch.jit.load`` without this package; metadata in the extra file
  ``densenet.json``.
- ``torch.export`` (``to_exported``): an ``ExportedProgram`` saved as ``.pt2``, loadable with
  ``torch.export.load``; metadata in the extra file ``densenet.json``.

``fold=True`` exports the inference form (``densenet.optimize``: BatchNorms folded into the
convolutions or reduced to per-channel clamps, transitions pooling first) instead of the training
form; in ONNX its dense blocks are written as concatenations, which runtimes plan themselves.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform

__all__ = [
    "DTYPES",
    "FORMATS",
    "ExportError",
    "ExportMetadata",
    "OnnxModel",
    "export",
    "read_metadata",
    "to_exported",
    "to_onnx",
    "to_torchscript",
    "triton_config",
    "write_triton_repo",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MIN_OPSET = 18  # the oldest opset torch's ONNX exporter writes without a lossy version conversion
DEFAULT_OPSET = 18  # ONNX Runtime >= 1.14, TensorRT >= 8.6, Triton's onnxruntime backend
INPUT_NAME, OUTPUT_NAME = "images", "logits"
EXTRA_FILE = "densenet.json"  # metadata inside TorchScript and .pt2 archives
EXAMPLE_BATCH = 2  # the example batch of a dynamic-batch export (1 would be specialised)
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}
ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
}


class ExportError(RuntimeError):
    """An export that cannot be done as asked; the message says why and what to change."""


@dataclass(frozen=True)
class ExportMetadata:
    """What a deployment needs besides the graph: class names and preprocessing, stored in every
    exported file. It offers the ``categories``, ``min_size`` and ``transforms()`` that
    ``densenet.Classifier`` reads from a weights entry.

    ``batch_size`` / ``image_size`` are None where the exported input dimension is dynamic.
    """

    categories: tuple[str, ...]
    arch: str | None = None
    weights: str | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize_size: int = 256
    crop_size: int = 224
    min_size: tuple[int, int] = (29, 29)
    dtype: str = "float32"
    folded: bool = False
    batch_size: int | None = None
    image_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        categories: Sequence[str] | None = None,
        **fields: Any,
    ) -> ExportMetadata:
        """The metadata of ``model``: its weights entry's class names and preprocessing where it
        has one, else ``densenet.Classifier``'s defaults."""
        from .predict import _default_categories

        entry = getattr(model, "weights_entry", None)
        num_classes = int(getattr(model, "num_classes", 1000))
        if num_classes < 1:
            raise ExportError(
                "the model has no classifier (num_classes=0); export one with classes"
            )
        if categories is None:
            categories = entry.categories if entry is not None else _default_categories(num_classes)
        if len(categories) != num_classes:
            raise ExportError(
                f"{len(categories)} class names given for a model with {num_classes} outputs; "
                f"give exactly {num_classes}"
            )
        if entry is not None:
            fields = {
                "weights": entry.name,
                "resize_size": entry.resize_size,
                "crop_size": entry.crop_size,
                "min_size": tuple(entry.min_size),
                **fields,
            }
        image_size = fields.get("image_size")
        if image_size is not None:  # a fixed input size: crop to it, resize in the same ratio
            resize = fields.get("resize_size", cls.resize_size)
            crop = fields.get("crop_size", cls.crop_size)
            fields = {
                **fields,
                "crop_size": image_size,
                "resize_size": round(image_size * resize / crop),
            }
        return cls(categories=tuple(categories), arch=getattr(model, "arch", None), **fields)

    def transforms(self):
        """The evaluation transform the exported model expects (PIL image -> (3, H, W) tensor)."""
        return eval_transform(self.resize_size, self.crop_size, self.mean, self.std)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportMetadata:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for name in ("categories", "mean", "std", "min_size"):
            if name in known:
                known[name] = tuple(known[name])
        return cls(**known)


# ---- the three formats --------------------------------------------------------------------


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    batch_size: int | None = None,
    image_size: int | None = None,
    dtype: str | torch.dtype = "float32",
    fold: bool = False,
    opset: int = DEFAULT_OPSET,
    categories: Sequence[str] | None = None,
) -> Path:
    """Write ``model`` as an ONNX file (weights inside, one file).

    Args:
        model: a ``densenet.DenseNet`` (any configuration; weights as loaded).
        path: the ``.onnx`` file to write; replaced atomically.
        batch_size: a fixed batch size; default None (dynamic axis ``batch``).
        image_size: a fixed square input size in pixels; default None (dynamic ``height`` and
            ``width``).
        dtype: float32, float16 or bfloat16: the weights, the input and the output.
        fold: export the inference form (``densenet.optimize``, BatchNorm folded).
        opset: the ONNX operator set, at least 18.
        categories: class names to store; default the weights' (ImageNet) or ``class i``.

    Input ``images`` (N, 3, H, W) in ``dtype``; output ``logits`` (N, num_classes) in ``dtype``.
    Returns the path written.
    """
    onnx = _require("onnx", "ONNX export", "pip install onnx onnxscript")
    _require("onnxscript", "ONNX export (torch's exporter)", "pip install onnxscript")

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(
            f"opset {opset} is {'too old' if opset < MIN_OPSET else 'newer than the installed onnx supports'}"
            f"; use an opset from {MIN_OPSET} to {newest} (default {DEFAULT_OPSET})"
        )
    path = _writable(path)
    net, example, meta = _prepare(
        model, batch_size, image_size, dtype, fold, categories, for_onnx=True
    )
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
    proto = program.model_proto
    proto.producer_name = "densenet"
    proto.doc_string = (
        f"{meta.arch or 'DenseNet'}: {INPUT_NAME} (N, 3, H, W) -> {OUTPUT_NAME} (N, classes)"
    )
    for key, value in meta.to_dict().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    _atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    return path


def to_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    batch_size: int | None = None,
    image_size: int | None = None,
    dtype: str | torch.dtype = "float32",
    fold: bool = False,
    method: str = "auto",
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
    net, example, meta = _prepare(model, batch_size, image_size, dtype, fold, categories)
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
                        f"torch.jit.script failed ({_first_line(error)}); use trace"
                    ) from None
        if scripted is None:
            with torch.no_grad():
                scripted = torch.jit.trace(net, (example,), check_trace=False)
            used = "trace"
        meta = _with_extra(meta, torchscript=used)
        extra = {EXTRA_FILE: json.dumps(meta.to_dict())}
        _atomic_write(path, lambda tmp: torch.jit.save(scripted, tmp, _extra_files=extra))
    return path


def to_exported(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    batch_size: int | None = None,
    image_size: int | None = None,
    dtype: str | torch.dtype = "float32",
    fold: bool = False,
    categories: Sequence[str] | None = None,
) -> Path:
    """Write ``model`` as a ``torch.export`` program (``.pt2``): ``torch.export.load(path)
    .module()`` runs it; the metadata is the archive's extra file ``densenet.json``. Arguments as
    ``to_onnx``."""
    path = _writable(path)
    net, example, meta = _prepare(model, batch_size, image_size, dtype, fold, categories)
    dims: dict[int, Any] = {}
    if batch_size is None:
        dims[0] = torch.export.Dim("batch")
    if image_size is None:
        dims.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    program = torch.export.export(net, (example,), dynamic_shapes=(dims,) if dims else None)
    extra = {EXTRA_FILE: json.dumps(meta.to_dict())}
    _atomic_write(path, lambda tmp: torch.export.save(program, tmp, extra_files=extra))
    return path


EXPORTERS: dict[str, Callable[..., Path]] = {
    "onnx": to_onnx,
    "torchscript": to_torchscript,
    "exported": to_exported,
}
FORMATS = tuple(EXPORTERS)


def export(model: nn.Module, path: str | os.PathLike, format: str, **options: Any) -> Path:
    """Write ``model`` to ``path`` in ``format`` (``onnx``, ``torchscript`` or ``exported``);
    ``options`` as the format's function (``to_onnx``, ``to_torchscript``, ``to_exported``)."""
    if format not in EXPORTERS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(EXPORTERS)}")
    return EXPORTERS[format](model, path, **options)


def read_metadata(path: str | os.PathLike) -> ExportMetadata:
    """The metadata stored in an exported ``.onnx``, TorchScript or ``.pt2`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model {path} does not exist")
    if path.suffix == ".onnx":
        onnx = _require("onnx", "reading ONNX metadata", "pip install onnx")
        proto = onnx.load(str(path), load_external_data=False)
        return _metadata_from_props({p.key: p.value for p in proto.metadata_props}, path)
    files = {EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if path.suffix == ".pt2":
            torch.export.load(path, extra_files=files)
        else:
            torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    if not files[EXTRA_FILE]:
        raise ExportError(f"{path} has no {EXTRA_FILE}: it was not written by densenet export")
    return ExportMetadata.from_dict(json.loads(files[EXTRA_FILE]))


# ---- running an ONNX file -----------------------------------------------------------------


class OnnxModel(nn.Module):
    """An exported ONNX file run by ONNX Runtime, as a module: (N, 3, H, W) float tensor in,
    (N, num_classes) float32 logits out, on the input's device. ``weights_entry`` is the file's
    ``ExportMetadata`` (class names, preprocessing), so ``densenet.Classifier`` can take it.

    Args:
        path: an ``.onnx`` file written by ``densenet export``.
        device: ``cpu`` or ``cuda``; CUDA uses ONNX Runtime's CUDA provider when installed
            (``onnxruntime-gpu``), else the CPU with a warning.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        super().__init__()
        ort = _require("onnxruntime", "running an ONNX model", "pip install onnxruntime")
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
        except Exception as error:
            reason = _first_line(error)
            if "bfloat16" in reason:
                reason = (
                    "this ONNX Runtime has no bfloat16 kernels for it; export float16 or float32"
                )
            raise ExportError(f"ONNX Runtime cannot load {self.path}: {reason}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.weights_entry = _metadata_from_props(meta, self.path)
        self.num_classes = len(self.weights_entry.categories)
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
        chunks = x.split(self.batch_size) if self.batch_size else (x,)
        outputs = []
        for chunk in chunks:
            n = chunk.shape[0]
            if self.batch_size and n < self.batch_size:  # a fixed-batch graph: pad, then trim
                pad = chunk.new_zeros((self.batch_size - n, *chunk.shape[1:]))
                chunk = torch.cat([chunk, pad])
            try:
                (out,) = self.session.run([self.output_name], {self.input_name: chunk.numpy()})
            except Exception as error:
                raise ExportError(
                    f"ONNX Runtime failed on {self.path}: {_first_line(error)}"
                ) from None
            outputs.append(torch.from_numpy(out[:n]).float())
        return torch.cat(outputs).to(device)


# ---- Triton Inference Server -----------------------------------------------------------------


def write_triton_repo(
    onnx_path: str | os.PathLike,
    repo: str | os.PathLike,
    name: str | None = None,
    max_batch_size: int = 64,
) -> Path:
    """Put an exported ONNX file into a Triton model repository for the ``onnxruntime`` backend:
    ``repo/<name>/config.pbtxt``, ``repo/<name>/1/model.onnx`` and ``repo/<name>/labels.txt``
    (class names, so Triton's classification extension returns labels).

    Args:
        onnx_path: a file written by ``to_onnx``.
        repo: the model repository folder (created if missing).
        name: the model name; default the architecture's (``densenet121``...).
        max_batch_size: the largest batch Triton forms with dynamic batching; a fixed-batch
            export gets 0 (Triton then passes the batch dimension through unchanged).

    Returns the model's folder.
    """
    meta = read_metadata(onnx_path)
    name = name or meta.arch or Path(onnx_path).stem
    if not name or "/" in name or name.startswith("."):
        raise ExportError(
            f"Triton model name {name!r} is not a valid folder name; pass another name"
        )
    if max_batch_size < 1:
        raise ExportError(f"max_batch_size must be at least 1, got {max_batch_size}")
    folder = Path(repo) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, folder / "1" / "model.onnx")
    (folder / "labels.txt").write_text("\n".join(meta.categories) + "\n", encoding="utf-8")
    (folder / "config.pbtxt").write_text(
        triton_config(meta, name, max_batch_size), encoding="utf-8"
    )
    return folder


def triton_config(meta: ExportMetadata, name: str, max_batch_size: int = 64) -> str:
    """The ``config.pbtxt`` text of an exported ONNX model described by ``meta``."""
    side = -1 if meta.image_size is None else meta.image_size
    image_dims = [3, side, side]
    output_dims = [len(meta.categories)]
    if meta.batch_size is not None:  # the batch is a fixed part of the tensor shapes
        max_batch_size = 0
        image_dims.insert(0, meta.batch_size)
        output_dims.insert(0, meta.batch_size)
    data_type = TRITON_TYPES[meta.dtype]
    batching = "dynamic_batching { }\n" if max_batch_size else ""
    return (
        f'name: "{name}"\n'
        f'backend: "onnxruntime"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n"
        f"  {{\n"
        f'    name: "{INPUT_NAME}"\n'
        f"    data_type: {data_type}\n"
        f"    dims: [ {', '.join(map(str, image_dims))} ]\n"
        f"  }}\n"
        f"]\n"
        f"output [\n"
        f"  {{\n"
        f'    name: "{OUTPUT_NAME}"\n'
        f"    data_type: {data_type}\n"
        f"    dims: [ {', '.join(map(str, output_dims))} ]\n"
        f'    label_filename: "labels.txt"\n'
        f"  }}\n"
        f"]\n"
        f"{batching}"
    )


# ---- helpers --------------------------------------------------------------------------------


def _prepare(
    model: nn.Module,
    batch_size: int | None,
    image_size: int | None,
    dtype: str | torch.dtype,
    fold: bool,
    categories: Sequence[str] | None,
    for_onnx: bool = False,
) -> tuple[nn.Module, Tensor, ExportMetadata]:
    """The module to export (a CPU copy in eval mode and ``dtype``, folded if asked), an example
    input and the metadata. ``for_onnx``: the folded form in NCHW with concatenating blocks."""
    dtype_name = _dtype_name(dtype)
    for label, value in (("batch_size", batch_size), ("image_size", image_size)):
        if value is not None and value < 1:
            raise ExportError(f"{label} must be a positive integer, got {value}")
    meta = ExportMetadata.from_model(
        model,
        categories,
        dtype=dtype_name,
        folded=fold,
        batch_size=batch_size,
        image_size=image_size,
    )
    if image_size is not None and image_size < min(meta.min_size):
        raise ExportError(
            f"image_size {image_size} is below the model's minimum {meta.min_size[0]}"
        )
    net = copy.deepcopy(model).cpu().eval()
    if fold:
        from .inference import optimize

        net = optimize(net, dtype=DTYPES[dtype_name], channels_last=not for_onnx)
        if for_onnx:
            _onnx_form(net)
    else:
        net = net.to(DTYPES[dtype_name])
    size = image_size or meta.crop_size
    example = torch.randn(batch_size or EXAMPLE_BATCH, 3, size, size, dtype=DTYPES[dtype_name])
    return net, example, meta


class _ConcatBlock(nn.Module):
    """A dense block of the inference form written as concatenations. In ONNX the inference
    form's slice writes into one preallocated buffer become scatter nodes, while runtimes plan a
    concatenation's memory themselves. Input (N, C, H, W); output (N, C + L * k, H, W)."""

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


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
    from .inference import BNReLU, InferenceBlock

    for name, stage in net.stages.named_children():
        if isinstance(stage, InferenceBlock):
            setattr(net.stages, name, _ConcatBlock(stage.layers))
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
    return ExportMetadata.from_dict({**meta.to_dict(), "extra": {**meta.extra, **extra}})


def _metadata_from_props(props: dict[str, str], path: Path) -> ExportMetadata:
    if "categories" not in props:
        raise ExportError(
            f"{path} has no class names in its metadata: it was not written by densenet export"
        )
    return ExportMetadata.from_dict(
        {k: json.loads(v) for k, v in props.items() if k in ExportMetadata.__dataclass_fields__}
    )


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


def _atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Call ``write(temporary path)`` then rename it to ``path``: never a partial file at ``path``.
    The file gets the usual permissions (0666 less the umask), not the temporary file's 0600."""
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.stem}.", suffix=f".partial{path.suffix}"
    )
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _require(module: str, purpose: str, install: str):
    if importlib.util.find_spec(module) is None:
        raise ExportError(
            f"{purpose} needs the {module} package, which is not installed: {install}"
        )
    return importlib.import_module(module)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

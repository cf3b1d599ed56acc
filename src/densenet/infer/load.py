"""The one way in: ``densenet.load(spec)`` -> ``LoadedModel(module, card)`` for an architecture
name (with published weights, a weights file or a training checkpoint), a weights file, a training
checkpoint, a TorchScript archive, a ``torch.export`` program (.pt2), an ONNX file or an OpenVINO
IR.
``Classifier``, ``densenet eval``, ``export`` and ``serve`` all load through it."""

from __future__ import annotations

import dataclasses
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from densenet.data.card import ModelCard
from densenet.data.files import atomic_write
from densenet.infer.exported import EXTRA_FILE, OnnxModel, OpenVINOModel, load_exported
from densenet.infer.openvino import OpenVINOError, is_ir
from densenet.infer.runtime import resolve_device
from densenet.nn.model import DenseNet
from densenet.nn.network import Network
from densenet.nn.registry import (
    arch_of_file,
    arch_of_state,
    build_model,
    described_by,
    get_model,
    list_models,
    model_config,
    network_of,
)
from densenet.weights.adapt import file_head, load_state, read_weights
from densenet.weights.convert import load_checkpoint
from densenet.weights.download import verify_file
from densenet.weights.published import (
    CHECKPOINT_SUFFIXES,
    Weights,
    WeightsArg,
    WeightsError,
    WeightsFile,
    get_weights,
    is_path,
    list_weights,
    parse_weights,
)

__all__ = [
    "KINDS",
    "NETWORK_KINDS",
    "LoadedModel",
    "convert_weights",
    "load",
    "verify_weights",
]

DEFAULT_ARCH = "densenet121"


KINDS = ("densenet", "network", "exported", "module")
NETWORK_KINDS = KINDS[:2]  # a densenet.nn.network.Network: pooled features, class activation maps


@dataclass(frozen=True)
class LoadedModel:
    """A module in eval mode, its card (class names, preprocessing) and what runs it needs to
    know, as ``load`` found it:

    - ``precision``: for an exported file, the precision it was exported in (``"int8"``,
      ``"float16"``...);
    - ``kind``: ``"densenet"`` (a ``DenseNet``, which has inference forms), ``"network"``
      (another ``densenet.nn.network.Network``: an RDNet), ``"exported"`` (an exported file's
      module: ONNX, OpenVINO, TorchScript, .pt2) or ``"module"`` (any other);
    - ``spatial_dims``: 1, 2 or 3 (a network's own, else its card's input shape's);
    - ``input_dtype``: the dtype inputs are cast to (None: any float, as a network takes; an
      exported TorchScript or .pt2 module takes its weights' dtype).

    The last three default to what the module and card say (``kind_of``...), for a value made
    by hand: ``LoadedModel(module, card)``.
    """

    module: nn.Module
    card: ModelCard
    precision: str | None = None
    kind: str = ""
    spatial_dims: int = 0
    input_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        kind = self.kind or kind_of(self.module)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        own = getattr(self.module, "spatial_dims", None)  # a DenseNet's; an RDNet is 2D
        dims = self.spatial_dims or own or len(self.card.input_shape) - 1
        dtype = self.input_dtype or (None if kind in NETWORK_KINDS else weights_dtype(self.module))
        for name, value in (("kind", kind), ("spatial_dims", dims), ("input_dtype", dtype)):
            object.__setattr__(self, name, value)


def kind_of(module: nn.Module) -> str:
    """``LoadedModel.kind`` of a module made by hand (``load`` knows it of what it loads)."""
    if isinstance(module, DenseNet):
        return "densenet"
    if isinstance(module, Network):
        return "network"
    if isinstance(module, (OnnxModel, OpenVINOModel, torch.jit.ScriptModule)):
        return "exported"
    return "module"


def weights_dtype(module: object) -> torch.dtype | None:
    """The dtype of a module's first floating-point parameter or buffer (None: no such tensor,
    e.g. an ONNX Runtime session, which converts its inputs itself)."""
    if not isinstance(module, nn.Module):
        return None
    tensors = [*module.parameters(), *module.buffers()]
    return next((t.dtype for t in tensors if t.is_floating_point()), None)


def load(
    spec: str | os.PathLike | nn.Module | None = None,
    *,
    weights: WeightsArg = "DEFAULT",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> LoadedModel:
    """Load a model and its card.

    Args:
        spec: an architecture name (``densenet.list_models()``); a file: ``.onnx`` (run by ONNX
            Runtime), an OpenVINO IR (its folder or ``.xml``; run by OpenVINO on the CPU),
            ``.pt2`` (``torch.export``), a TorchScript archive, a training checkpoint of
            ``densenet train`` or a weights file (.pth/.pt/.safetensors, its architecture from
            its name, ``densenet121-...``); a module (its card from its configuration); or None:
            the file that ``weights`` names, else ``densenet121``.
        weights: for an architecture name: None (random), ``"DEFAULT"``, a weights name or entry,
            a weights file, or a training checkpoint of that architecture.
        device: where the module is put (``"auto"``: CUDA when present).
        progress: show a progress bar while downloading.
    """
    target = resolve_device(device)
    if isinstance(spec, nn.Module):
        return LoadedModel(spec.eval().to(target), ModelCard.for_model(spec))
    arch = None if spec is None else str(spec)
    if arch is not None and arch not in list_models():  # a model file: as if ``weights`` named it
        arch, weights = None, WeightsFile(Path(arch))
    loaded = _load_arch(arch, weights, target, progress)
    return dataclasses.replace(loaded, module=loaded.module.to(target))


def _load_arch(
    arch: str | None, weights: WeightsArg, device: torch.device, progress: bool
) -> LoadedModel:
    """Architecture ``arch`` with ``weights``, parsed and read once; with no ``arch``, the
    model file that ``weights`` names (a training checkpoint's network, or the one a weights
    file's name or keys describe), else ``DEFAULT_ARCH``'s."""
    spec = parse_weights(weights, arch or DEFAULT_ARCH)
    model_file = isinstance(spec, WeightsFile) and arch is None
    if model_file and (exported := _load_model_file(spec.path, device)) is not None:
        return exported
    if spec is None:
        module = get_model(arch or DEFAULT_ARCH).eval()
        return LoadedModel(module, ModelCard.for_model(module))
    file, checkpoint = read_weights(spec, progress)
    if checkpoint is not None:
        card = checkpoint.card
        if arch not in (None, card.arch):
            raise WeightsError(
                f"{file.path} is a checkpoint of {card.arch}, not {arch}; name {card.arch} (or "
                "no architecture)"
            )
        module = build_model(card.arch, file, **checkpoint.model_args).eval()
        side = module.min_input_size  # the network's own (checkpoints before version 2 lack it)
        pre = dataclasses.replace(card.preprocessing, min_size=(side, side))
        return LoadedModel(module, card.replace(preprocessing=pre))
    if isinstance(spec, Weights):
        return LoadedModel(build_model(spec.arch, file).eval(), spec.card)
    arch = arch or arch_of_file(file.path) or arch_of_state(file.content, file.path)
    module = build_model(arch, file).eval()
    return LoadedModel(module, _state_card(module, arch, file.path.name))


def _state_card(module: nn.Module, arch: str, file_name: str) -> ModelCard:
    """The card of a module built from a plain state_dict: the number of classes is the file's
    classifier's; the preprocessing is the architecture's published weights' (RDNet's:
    bicubic, crop 0.9), if it has any."""
    card = ModelCard.for_model(module, weights=file_name)
    if list_weights(arch):
        published = get_weights(arch).card.preprocessing
        card = card.replace(preprocessing=published.for_channels(card.in_channels))
    return card


def _load_model_file(path: Path, device: torch.device) -> LoadedModel | None:
    """A TorchScript archive, ``.pt2``, ONNX file or OpenVINO IR (a folder or ``.xml``), or
    None for a weights file or training checkpoint (.pth/.pt/.safetensors), which
    ``_load_arch`` reads."""
    if not path.is_file():
        if is_ir(path):
            return _load_ir(path, device)
        if not is_path(str(path)):
            model_config(str(path))  # an unknown architecture: the error lists the valid ones
        raise WeightsError(f"model file {path} does not exist")
    if path.suffix == ".pt2" or _is_torchscript(path):
        module, metadata = load_exported(path)
        return LoadedModel(module, metadata.card, metadata.dtype, "exported")
    if path.suffix in CHECKPOINT_SUFFIXES:
        return None
    if path.suffix == ".onnx":
        onnx = OnnxModel(path, device)
        return LoadedModel(onnx, onnx.metadata.card, kind="exported")
    if is_ir(path):
        return _load_ir(path, device)
    raise WeightsError(
        f"{path}: unknown model file type; give a .pth/.pt/.safetensors weights file or "
        "checkpoint, a TorchScript .pt, a .pt2 or an .onnx file"
    )


def _load_ir(path: Path, device: torch.device) -> LoadedModel:
    """An OpenVINO IR, run by OpenVINO on the CPU in float32 (an NNCF int8 IR in int8)."""
    if device.type != "cpu":
        raise OpenVINOError(f"OpenVINO IR {path} runs on the CPU, not {device}; use --device cpu")
    ir = OpenVINOModel(path)
    int8 = ir.metadata.dtype == "int8"
    return LoadedModel(ir, ir.metadata.card, "int8" if int8 else "float32", "exported")


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive written by ``densenet export`` (a zip with our extra file)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith(f"/extra/{EXTRA_FILE}") for name in archive.namelist())


def verify_weights(target: str, arch: str | None = None) -> dict[str, Any]:
    """Check a weights file (or an architecture's cached official file): its SHA-256 against the
    hex part of its name, and that it loads strictly into its architecture (``arch``, else the
    one its name starts with, else the one its keys and shapes describe). Returns what was
    checked; raises ``WeightsError`` for a file that does not load."""
    if target in list_models():
        entry = get_weights(target)
        if not entry.cache_path.is_file():
            raise WeightsError(
                f"{target}'s weights are not cached ({entry.cache_path}); "
                f"run `densenet weights download {target}`"
            )
        target, arch = str(entry.cache_path), entry.arch
    else:
        arch = arch_of_file(target, arch)
    digest = verify_file(target)
    state, arch, config = _checked_state(target, arch)
    return {"path": target, "sha256": digest, "loads_into": arch or "DenseNet", "config": config}


def _checked_state(
    path: str | os.PathLike, arch: str | None
) -> tuple[dict[str, Tensor], str | None, dict[str, Any]]:
    """A weights file's state_dict, once it loaded strictly into its network: ``arch`` (with
    the file's number of classes and input channels), else the one its keys and shapes describe;
    returns the state, the architecture (None for a custom configuration) and the configuration.
    ``WeightsError`` names what does not fit."""
    state = load_checkpoint(path)
    config = None
    if arch is None:
        arch, config = described_by(state, path)
    network = network_of(arch)[0]
    if config is None:  # a named architecture, with the file's classes and input channels
        config = model_config(arch)
        config["num_classes"], config["in_channels"] = file_head(state, network)
    try:
        module = network(**config)
    except ValueError as error:
        raise WeightsError(f"{path} describes no valid DenseNet ({error})") from None
    load_state(module, state, path)
    return state, arch, config


def convert_weights(source: str, dest: str, arch: str | None = None) -> dict[str, Any]:
    """Write ``source``'s state_dict (old or new key names) as ``dest`` (.safetensors, current
    keys), once it loaded strictly into its architecture (``arch``, the file's name, or its keys
    and shapes), with the file's number of classes."""
    from safetensors.torch import save_file

    if Path(dest).suffix != ".safetensors":
        raise WeightsError(f"{dest}: convert writes safetensors; name the file *.safetensors")
    state, arch, _ = _checked_state(source, arch_of_file(source, arch))
    atomic_write(dest, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, tmp))
    return {"source": source, "dest": dest, "checked_against": arch}

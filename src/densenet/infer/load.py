"""The one way in: ``densenet.load(spec)`` -> ``LoadedModel(module, card)`` for an architecture
name (with published weights, a weights file or a training checkpoint), a weights file, a training
checkpoint, a TorchScript archive, a ``torch.export`` program (.pt2), an ONNX file or an OpenVINO
IR.
``Classifier``, ``densenet eval``, ``export`` and ``serve`` all load through it."""

from __future__ import annotations

import dataclasses
import os
import re
import zipfile
from collections.abc import Mapping
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
from densenet.nn.rdnet import RDNet
from densenet.nn.registry import get_model, list_models, model_config, network_of
from densenet.weights.adapt import file_head, load_state
from densenet.weights.checkpoint import TrainCheckpoint, is_train_checkpoint
from densenet.weights.convert import load_checkpoint, read_torch_file, state_dict_of
from densenet.weights.download import verify_file
from densenet.weights.published import (
    CHECKPOINT_SUFFIXES,
    WeightsArg,
    WeightsError,
    WeightsFile,
    WeightsSpec,
    get_weights,
    is_path,
    list_weights,
    parse_weights,
)

__all__ = [
    "KINDS",
    "NETWORK_KINDS",
    "LoadedModel",
    "arch_of_file",
    "config_of_state",
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
    arch = DEFAULT_ARCH if spec is None else str(spec)
    if arch not in list_models():
        loaded = _load_file(Path(spec), target)
    elif isinstance(parsed := parse_weights(weights, arch), WeightsFile) and spec is None:
        loaded = _load_file(parsed.path, target)  # the file that ``weights`` names
    else:
        loaded = _load_arch(arch, parsed, progress)
    return dataclasses.replace(loaded, module=loaded.module.to(target))


def _load_arch(arch: str, weights: WeightsSpec, progress: bool) -> LoadedModel:
    """Architecture ``arch`` with ``weights`` (see ``load``); a file is read once."""
    if not isinstance(weights, WeightsFile):
        module = get_model(arch, weights=weights, progress=progress).eval()
        card = weights.card if weights is not None else ModelCard.for_model(module)
        return LoadedModel(module, card)
    content = read_torch_file(weights.path)
    if is_train_checkpoint(content):
        checkpoint = TrainCheckpoint.from_state(content, weights.path)
        if checkpoint.card.arch != arch:
            raise WeightsError(
                f"{weights.path} is a checkpoint of {checkpoint.card.arch}, not {arch}; name "
                f"{checkpoint.card.arch} (or no architecture)"
            )
        return _from_checkpoint(checkpoint, weights.path)
    return _from_state(arch, content, weights.path)


def _from_checkpoint(checkpoint: TrainCheckpoint, path: str | os.PathLike) -> LoadedModel:
    spec = WeightsFile(Path(path), checkpoint.model)
    module = get_model(checkpoint.card.arch, weights=spec, **checkpoint.model_args).eval()
    side = module.min_input_size  # the network's own (checkpoints before version 2 lack it)
    pre = dataclasses.replace(checkpoint.card.preprocessing, min_size=(side, side))
    return LoadedModel(module, checkpoint.card.replace(preprocessing=pre))


def _from_state(arch: str, content: Any, path: str | os.PathLike) -> LoadedModel:
    """A plain state_dict: the number of classes is the file's classifier's; the preprocessing
    is the architecture's published weights' (RDNet's: bicubic, crop 0.9), if it has any."""
    module = get_model(arch, weights=WeightsFile(Path(path), content)).eval()
    card = ModelCard.for_model(module, weights=Path(path).name)
    if list_weights(arch):
        published = get_weights(arch).card.preprocessing
        card = card.replace(preprocessing=published.for_channels(card.in_channels))
    return LoadedModel(module, card)


def _load_file(path: Path, device: torch.device) -> LoadedModel:
    if is_ir(path):  # run by OpenVINO on the CPU, in float32 (an NNCF int8 IR in int8)
        if device.type != "cpu":
            raise OpenVINOError(
                f"OpenVINO IR {path} runs on the CPU, not {device}; use --device cpu"
            )
        ir = OpenVINOModel(path)
        int8 = ir.metadata.dtype == "int8"
        return LoadedModel(ir, ir.metadata.card, "int8" if int8 else "float32", "exported")
    if not path.is_file():
        if not is_path(str(path)):
            model_config(str(path))  # an unknown architecture: the error lists the valid ones
        raise WeightsError(f"model file {path} does not exist")
    if path.suffix == ".onnx":
        onnx = OnnxModel(path, device)
        return LoadedModel(onnx, onnx.metadata.card, kind="exported")
    if path.suffix == ".pt2" or _is_torchscript(path):
        module, metadata = load_exported(path)
        return LoadedModel(module, metadata.card, metadata.dtype, "exported")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise WeightsError(
            f"{path}: unknown model file type; give a .pth/.pt/.safetensors weights file or "
            "checkpoint, a TorchScript .pt, a .pt2 or an .onnx file"
        )
    content = read_torch_file(path)
    if is_train_checkpoint(content):
        return _from_checkpoint(TrainCheckpoint.from_state(content, path), path)
    return _from_state(arch_of_file(path) or arch_of_state(content, path), content, path)


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive written by ``densenet export`` (a zip with our extra file)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith(f"/extra/{EXTRA_FILE}") for name in archive.namelist())


def arch_of_file(path: str | os.PathLike, arch: str | None = None) -> str | None:
    """``arch`` if given, else the architecture a file's name starts with
    (``densenet121-a639ec97.pth``), else None."""
    if arch:
        return arch
    stem = Path(path).name.split("-")[0].split(".")[0]
    return stem if stem in list_models() else None


def arch_of_state(content: Any, path: str | os.PathLike) -> str:
    """The registry architecture a weights file's keys and shapes describe (a torchvision or
    timm DenseNet, or a timm or NAVER RDNet, state_dict of any class count), else
    ``WeightsError``."""
    state = state_dict_of(content, path)
    if RDNet.STEM_WEIGHT in state:
        return rdnet_of_state(state, path)
    config = config_of_state(state, path)
    arch = next((n for n in list_models() if _same_network(model_config(n), config)), None)
    if arch is None:
        raise WeightsError(
            f"{path} is a DenseNet of no registered architecture ({config}); name it with "
            "--model, or load it with densenet.DenseNet(**config)"
        )
    return arch


def rdnet_of_state(state: Mapping[str, Tensor], path: str | os.PathLike) -> str:
    """The RDNet size whose tensors have the shapes of ``state``'s (any number of classes and
    input channels), else ``WeightsError``; the networks are built on the meta device."""
    own = (RDNet.STEM_WEIGHT, RDNet.CLASSIFIER + "weight", RDNet.CLASSIFIER + "bias")
    shapes = {k: v.shape for k, v in state.items() if k not in own}
    for name in list_models("rdnet*"):
        with torch.device("meta"):
            expected = get_model(name).state_dict()
        if {k: v.shape for k, v in expected.items() if k not in own} == shapes:
            return name
    raise WeightsError(
        f"{path} is an RDNet of no registered size; name it with --model, or build it with "
        "densenet.RDNet(...)"
    )


def config_of_state(state: Mapping[str, Tensor], path: str | os.PathLike) -> dict[str, Any]:
    """The ``DenseNet(...)`` arguments a state_dict (current key names) was saved from, read from
    its keys and shapes: stem, init features, growth rate, bottleneck, block configuration,
    compression, classes. Raises ``WeightsError`` when it is not a DenseNet's."""
    stem = state.get("features.conv0.weight")
    first = state.get("features.denseblock1.denselayer1.conv1.weight")
    if stem is None or first is None or stem.dim() != 4 or first.dim() != 4:
        raise WeightsError(
            f"cannot tell the architecture of {path} from its keys (no DenseNet stem and first "
            "dense layer); name it with --model"
        )
    layers: dict[int, int] = {}
    for key in state:
        found = re.match(r"features\.denseblock(\d+)\.denselayer(\d+)\.", key)
        if found:
            block, layer = int(found.group(1)), int(found.group(2))
            layers[block] = max(layers.get(block, 0), layer)
    second = state.get("features.denseblock1.denselayer1.conv2.weight")
    growth_rate = (second if second is not None else first).shape[0]
    transition = state.get("features.transition1.conv.weight")
    classifier = state.get("classifier.weight")
    return {
        "growth_rate": growth_rate,
        "block_config": tuple(layers[b] for b in sorted(layers)),
        "num_init_features": stem.shape[0],
        "bn_size": first.shape[0] // growth_rate if second is not None else 0,
        "compression": transition.shape[0] / transition.shape[1] if transition is not None else 0.5,
        "num_classes": classifier.shape[0] if classifier is not None else 0,
        "in_channels": stem.shape[1],
        "stem": "imagenet" if stem.shape[-1] == 7 else "cifar",
    }


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
    if arch is None and RDNet.STEM_WEIGHT in state:
        arch = rdnet_of_state(state, path)
    network = network_of(arch)[0] if arch is not None else DenseNet
    if arch is not None:
        config = model_config(arch)
        config["num_classes"], config["in_channels"] = file_head(state, network)
    else:
        config = config_of_state(state, path)
        arch = next((n for n in list_models() if _same_network(model_config(n), config)), None)
    try:
        module = network(**config)
    except ValueError as error:
        raise WeightsError(f"{path} describes no valid DenseNet ({error})") from None
    load_state(module, state, path)
    return state, arch, config


def _same_network(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two configurations build the same network up to the classifier."""
    ignored = ("num_classes", "drop_rate", "in_channels")
    return {k: v for k, v in a.items() if k not in ignored} == {
        k: v for k, v in b.items() if k not in ignored
    }


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

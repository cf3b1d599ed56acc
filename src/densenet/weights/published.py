"""The published weights: the table of files with what is known about them (accuracy,
parameters, preprocessing, where they are cached), read without torch, so that ``densenet
info`` answers at once; downloading, verifying and loading them is ``densenet.weights.adapt``'s.
Also what a user's ``weights`` argument names, understood once (``parse_weights``): a published
entry, a local file, or none."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from densenet.architectures import model_min_size
from densenet.data.labels import imagenet_classes
from densenet.errors import DenseNetError

if TYPE_CHECKING:
    from densenet.data.card import ModelCard

__all__ = [
    "BASE_URL_ENV",
    "CHECKPOINT_SUFFIXES",
    "DEFAULT_BASE_URL",
    "WEIGHTS",
    "Weights",
    "WeightsError",
    "cache_dir",
    "get_weights",
    "hash_prefix",
    "is_path",
    "list_weights",
    "parse_weights",
    "WeightsArg",
    "WeightsFile",
    "WeightsSpec",
]

DEFAULT_BASE_URL = "https://download.pytorch.org/models/"
BASE_URL_ENV = "DENSENET_WEIGHTS_URL"


class WeightsError(DenseNetError, RuntimeError):
    """A weights file or name that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Weights:
    """A published weights file and what is known about it.

    ``file_name`` ends in ``-<first 8 hex digits of the file's SHA-256>.pth``, or for weights
    on the Hugging Face hub (``hf_hub_id``, the repository) is the file in that repository,
    checked by ``huggingface_hub`` as it downloads it.
    """

    arch: str
    name: str
    file_name: str
    acc1: float  # ImageNet-1k validation top-1 accuracy, %, single crop at crop_size
    acc5: float | None  # None: not published
    num_params: int
    gflops: float  # per crop_size x crop_size image (2 x multiply-accumulates)
    file_size_mb: float
    resize_size: int = 256
    crop_size: int = 224
    recipe: str = "ported from the original Torch models (Huang et al.)"
    extra: Mapping[str, Any] = field(default_factory=dict)
    interpolation: str = "bilinear"
    hf_hub_id: str | None = None

    @property
    def min_size(self) -> tuple[int, int]:
        """The smallest input (height, width) of the architecture, pixels."""
        side = model_min_size(self.arch)
        return side, side

    @property
    def url(self) -> str:
        if self.hf_hub_id is not None:
            return f"https://huggingface.co/{self.hf_hub_id}/blob/main/{self.file_name}"
        return os.environ.get(BASE_URL_ENV, DEFAULT_BASE_URL).rstrip("/") + "/" + self.file_name

    @property
    def sha256_prefix(self) -> str:
        return hash_prefix(self.file_name)

    @cached_property
    def categories(self) -> tuple[str, ...]:
        return tuple(imagenet_classes())

    @property
    def cache_path(self) -> Path:
        """Where the file is cached (for hub weights: in the hub's cache, once downloaded)."""
        if self.hf_hub_id is not None:
            return _hub_cached(self)
        return cache_dir() / self.file_name

    @property
    def card(self) -> ModelCard:
        """The class names and preprocessing of these weights."""
        from densenet.data.card import ModelCard, Preprocessing  # torchvision: only when asked

        preprocessing = Preprocessing(
            self.resize_size, self.crop_size, self.interpolation, min_size=self.min_size
        )
        return ModelCard(self.categories, preprocessing, arch=self.arch, weights=self.name)

    def transforms(self):
        """The evaluation transform these weights were measured with (PIL image -> tensor)."""
        return self.card.preprocessing.transform()

    def meta(self) -> dict[str, Any]:
        """JSON-ready metadata."""
        return {
            "arch": self.arch,
            "name": self.name,
            "url": self.url,
            "sha256_prefix": self.sha256_prefix,
            "acc1": self.acc1,
            "acc5": self.acc5,
            "num_params": self.num_params,
            "gflops": self.gflops,
            "file_size_mb": self.file_size_mb,
            "min_size": list(self.min_size),
            "resize_size": self.resize_size,
            "crop_size": self.crop_size,
            "interpolation": self.interpolation,
            "num_classes": len(self.categories),
            "recipe": self.recipe,
        }


def _imagenet1k_v1(arch: str, file_name: str, acc1, acc5, params, gflops, size_mb) -> Weights:
    return Weights(arch, "IMAGENET1K_V1", file_name, acc1, acc5, params, gflops, size_mb)


# Published top-1/top-5 accuracies and file sizes are torchvision's for the same files.
WEIGHTS: dict[str, dict[str, Weights]] = {
    w.arch: {w.name: w, "DEFAULT": w}
    for w in (
        _imagenet1k_v1("densenet121", "densenet121-a639ec97.pth", 74.434, 91.972, 7_978_856, 5.668, 30.845),
        _imagenet1k_v1("densenet161", "densenet161-8d451a50.pth", 77.138, 93.560, 28_681_000, 15.456, 110.369),
        _imagenet1k_v1("densenet169", "densenet169-b2777c0a.pth", 75.600, 92.806, 14_149_480, 6.720, 54.708),
        _imagenet1k_v1("densenet201", "densenet201-c1103571.pth", 76.896, 93.370, 20_013_928, 8.583, 77.373),
    )
}  # fmt: skip


def _rdnet(
    arch: str, name: str, acc1: float, params: int, gflops: float, crop: int = 224
) -> Weights:
    """NAVER's RDNet weights on the Hugging Face hub, as timm's pretrained configuration gives
    them: bicubic, crop ratio 0.9 at 224 (resize 248), 1.0 at 384, ImageNet mean and std."""
    resize = math.floor(crop / 0.9) if crop == 224 else crop
    return Weights(
        arch=arch,
        name=name,
        file_name="model.safetensors",
        acc1=acc1,
        acc5=None,
        num_params=params,
        gflops=gflops,
        file_size_mb=params * 4 / 1e6,  # float32 tensors
        resize_size=resize,
        crop_size=crop,
        interpolation="bicubic",
        recipe="NAVER's (Kim et al., ECCV 2024), Apache-2.0",
        hf_hub_id=f"naver-ai/{arch}.{name.lower()}",
    )


def _register(*entries: Weights) -> None:
    """Add ``entries`` to ``WEIGHTS``, each architecture's first as its ``DEFAULT``."""
    for entry in entries:
        WEIGHTS.setdefault(entry.arch, {"DEFAULT": entry})[entry.name] = entry


# Top-1 as published with the paper (no top-5 is given for them: acc5 None)
_register(
    _rdnet("rdnet_tiny", "NV_IN1K", 82.8, 23_863_008, 10.065),
    _rdnet("rdnet_small", "NV_IN1K", 83.7, 50_436_448, 17.412),
    _rdnet("rdnet_base", "NV_IN1K", 84.4, 87_451_096, 30.716),
    _rdnet("rdnet_large", "NV_IN1K", 84.8, 186_269_632, 69.351),
    _rdnet("rdnet_large", "NV_IN1K_FT_IN1K_384", 85.8, 186_269_632, 203.789, crop=384),
)


def list_weights(arch: str) -> list[str]:
    """Names of the published weights for ``arch`` (empty if none)."""
    return [n for n in WEIGHTS.get(arch, {}) if n != "DEFAULT"]


def get_weights(arch: str, name: str = "DEFAULT") -> Weights:
    """The weights entry ``name`` (``"DEFAULT"``, ``"IMAGENET1K_V1"``...) of architecture ``arch``."""
    available = WEIGHTS.get(arch, {})
    if name not in available:
        valid = ", ".join(["DEFAULT", *list_weights(arch)]) if available else "none are published"
        raise WeightsError(f"no weights {name!r} for {arch}; valid names: {valid}")
    return available[name]


def cache_dir() -> Path:
    """torch.hub's checkpoint folder, shared with torchvision."""
    import torch  # only when a path is asked for

    return Path(torch.hub.get_dir()) / "checkpoints"


def hash_prefix(file_name: str) -> str | None:
    """The SHA-256 prefix a file's name ends in (``densenet121-a639ec97.pth``), or None."""
    match = re.search(r"-([0-9a-f]{8,64})\.", os.path.basename(file_name))
    return match.group(1) if match else None


def _hub_cached(entry: Weights) -> Path:
    """``entry``'s file in the hub cache; where it is not there (or huggingface_hub is not
    installed), the repository's folder in the hub cache that it would be fetched into."""
    folder = f"models--{entry.hf_hub_id.replace('/', '--')}"
    try:
        import huggingface_hub
    except ImportError:
        return Path("~/.cache/huggingface/hub").expanduser() / folder
    found = huggingface_hub.try_to_load_from_cache(entry.hf_hub_id, entry.file_name)
    return (
        Path(found)
        if isinstance(found, str)
        else Path(huggingface_hub.constants.HF_HUB_CACHE) / folder
    )


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")


@dataclass(frozen=True)
class WeightsFile:
    """A local weights file or training checkpoint that a ``weights`` argument names;
    ``content``, its state_dict in current key names once it was read
    (``densenet.weights.adapt.read_weights``, so that a file is read once), else None."""

    path: Path
    content: Any = field(default=None, compare=False, repr=False)


WeightsSpec = Weights | WeightsFile | None
"""A ``weights`` argument once understood (``parse_weights``): a published entry, a local file,
or None (random initialisation)."""

WeightsArg = Weights | WeightsFile | str | os.PathLike | None
"""What a user may pass as ``weights``: a ``WeightsSpec``, a weights name (``"DEFAULT"``,
``"IMAGENET1K_V1"``) or a path. The builders and ``get_model`` default to None (random
initialisation, as torchvision's); ``densenet.load`` and what loads through it (``Classifier``,
bulk runs, ``quantize``, Ray) to ``"DEFAULT"``, since they give a model to use."""


def is_path(weights: str | os.PathLike) -> bool:
    """Whether a ``weights`` value names a file rather than published weights."""
    text = os.fspath(weights)
    return (
        isinstance(weights, os.PathLike)
        or text.endswith((*CHECKPOINT_SUFFIXES, ".onnx", ".pt2"))
        or os.sep in text
        or os.path.isfile(text)
    )


def parse_weights(weights: Any, arch: str) -> WeightsSpec:
    """The one reading of a user's ``weights`` for architecture ``arch``: None; a ``Weights``
    entry (of ``arch``); a weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"``: ``arch``'s entry);
    a path (``os.PathLike``, or a string with a checkpoint suffix, a separator, or naming a
    file) as a ``WeightsFile``. A value already parsed passes unchanged; anything else is a
    ``WeightsError``."""
    if weights is None or isinstance(weights, WeightsFile):
        return weights
    if isinstance(weights, Weights):
        if weights.arch != arch:
            raise WeightsError(f"weights {weights.file_name} are for {weights.arch}, not {arch}")
        return weights
    if isinstance(weights, (str, os.PathLike)) and is_path(weights):
        return WeightsFile(Path(weights))
    if isinstance(weights, str):
        return get_weights(arch, weights)
    raise WeightsError(f"weights must be None, a name, a Weights entry or a path, got {weights!r}")

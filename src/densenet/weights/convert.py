"""Key conversion: a state_dict in old torchvision, MONAI or NAVER key names in this package's
(``state_dict_of``), and a weights file read into one (``load_checkpoint``)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from densenet.data.files import read_torch_file as _read_torch_file
from densenet.weights.published import (
    WeightsError,
)

__all__ = [
    "convert_legacy_keys",
    "convert_rdnet_keys",
    "load_checkpoint",
    "convert_monai_keys",
    "read_torch_file",
    "state_dict_of",
]


_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def convert_legacy_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename the original files' ``denselayerM.norm.1.weight`` to ``denselayerM.norm1.weight``
    (and likewise ``relu.2``, ``conv.2``...); current keys pass unchanged."""
    return {_LEGACY_KEY.sub(r"\1\2", key): value for key, value in state_dict.items()}


_MONAI_LAYER = re.compile(
    r"^(features\.denseblock\d+\.denselayer\d+)\.layers\.((?:norm|conv)[12]\..+)$"
)


_MONAI_OTHER = re.compile(r"^features\.(?:(?:conv0|norm0|norm5)\.|transition\d+\.(?:norm|conv)\.)")


def is_monai_state(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether ``state_dict`` is MONAI's ``DenseNet`` (``DenseNet121/169/201/264``)."""
    return any(k.startswith("class_layers.") or _MONAI_LAYER.match(k) for k in state_dict)


def convert_monai_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """MONAI's ``DenseNet`` state_dict (any ``spatial_dims``) in this package's key names:
    ``denselayerM.layers.norm1`` -> ``denselayerM.norm1``, ``class_layers.out`` -> ``classifier``;
    the stem, transitions and ``norm5`` share our names. Any other key raises ``WeightsError``
    naming it (the file is then not MONAI's DenseNet)."""
    converted = {}
    for key, value in state_dict.items():
        if key.startswith("class_layers.out."):
            new = "classifier." + key.removeprefix("class_layers.out.")
        elif (match := _MONAI_LAYER.match(key)) is not None:
            new = f"{match[1]}.{match[2]}"
        elif _MONAI_OTHER.match(key):
            new = key
        else:
            raise WeightsError(f"{key!r} is not a key of MONAI's DenseNet; cannot map it")
        converted[new] = value
    return converted


def read_torch_file(path: str | os.PathLike, what: str = "weights file") -> Any:
    """``densenet.data.files.read_torch_file`` raising ``WeightsError``."""
    return _read_torch_file(path, what, WeightsError)


def convert_rdnet_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """NAVER's original RDNet keys in timm's (and this package's) names: ``stem.stem.`` ->
    ``stem.``; other keys pass unchanged."""
    return {
        "stem." + key.removeprefix("stem.stem.") if key.startswith("stem.stem.") else key: value
        for key, value in state_dict.items()
    }


def state_dict_of(content: Any, path: str | os.PathLike) -> dict[str, Tensor]:
    """The model state_dict in a torch file's ``content``, in current key names (legacy
    torchvision, MONAI ``DenseNet`` and NAVER's RDNet keys converted). A training checkpoint's
    (or NAVER's) ``"model"`` entry is taken."""
    if isinstance(content, Mapping) and isinstance(content.get("model"), Mapping):
        content = content["model"]
    if not isinstance(content, Mapping) or not all(isinstance(v, Tensor) for v in content.values()):
        raise WeightsError(f"weights file {path} holds no state_dict of tensors")
    if is_monai_state(content):
        return convert_monai_keys(content)
    return convert_rdnet_keys(convert_legacy_keys(content))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model state_dict stored in ``path`` (.pth/.pt through ``torch.load(weights_only=True)``,
    or .safetensors), in current key names. A training checkpoint's ``"model"`` entry is taken."""
    return state_dict_of(read_torch_file(path), path)

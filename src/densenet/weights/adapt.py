"""Fitting trained parameters to a network: ``read_weights`` turns a parsed ``weights`` into the
state_dict it names, read once; ``build_with_weights`` is the one place that fits it to a new
model (its classifier, input channels and 1D or 3D kernels).

Published files are cached in torch.hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``), so
a torchvision cache is reused; RDNet's are fetched from the Hugging Face hub (``fetch``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from densenet.data.files import read_torch_file
from densenet.weights.checkpoint import TrainCheckpoint, is_train_checkpoint
from densenet.weights.convert import state_dict_of
from densenet.weights.download import fetch
from densenet.weights.published import (
    Weights,
    WeightsError,
    WeightsFile,
    WeightsSpec,
)

__all__ = [
    "load_weights",
    "build_with_weights",
    "file_head",
    "head_classes",
    "inflate_kernels",
    "load_state",
    "read_weights",
]


def read_weights(
    spec: Weights | WeightsFile, progress: bool = True
) -> tuple[WeightsFile, TrainCheckpoint | None]:
    """The file that ``spec`` names, read once: a ``WeightsFile`` holding its state_dict in
    current key names (old and foreign keys converted), and the training checkpoint the file is,
    if it is one (its card and model arguments). A published entry's file is fetched first
    (downloaded if not cached, ``fetch``); a file already read passes unchanged."""
    if isinstance(spec, Weights):
        path = fetch(spec, progress)
    elif spec.content is None:
        path = spec.path
    else:
        return spec, None
    content = read_torch_file(path, "weights file", WeightsError)  # read once, here
    checkpoint = TrainCheckpoint.from_state(content, path) if is_train_checkpoint(content) else None
    return WeightsFile(path, state_dict_of(content, path)), checkpoint


def file_head(state: Mapping[str, Tensor], network: type[nn.Module]) -> tuple[int, int]:
    """The number of classes (0: no classifier) and of input channels of the ``network`` class
    (its ``CLASSIFIER`` and ``STEM_WEIGHT``) that ``state`` was saved from."""
    classifier = state.get(network.CLASSIFIER + "weight")
    stem = state.get(network.STEM_WEIGHT)
    return (
        classifier.shape[0] if classifier is not None else 0,
        stem.shape[1] if stem is not None else 3,
    )


def head_classes(
    spec: WeightsSpec,
    state: Mapping[str, Tensor] | None,
    network: type[nn.Module],
    num_classes: int | None,
    new_head: bool = False,
) -> int | None:
    """The one decision on the classifier of a model built for ``spec``: the number of classes
    to build it with (None: the architecture's). No weights: ``num_classes``. A published entry:
    ``num_classes``, else its categories' (with another number its backbone loads under a new
    classifier). A file (``state``): its own classifier's (0: it has none), or, with
    ``new_head``, ``num_classes`` (its backbone under a new classifier); another
    ``num_classes`` without ``new_head`` is a ``WeightsError``. ``load_state`` then loads the
    backbone alone where the classifier's shape differs."""
    if spec is None:
        return num_classes
    if isinstance(spec, Weights):
        return len(spec.categories) if num_classes is None else num_classes
    own = file_head(state, network)[0]
    if num_classes is None or num_classes == own:
        return own
    if not new_head:
        raise WeightsError(
            f"{spec.path} holds a {own}-class classifier, not num_classes={num_classes}: drop "
            f"num_classes to keep it, or pass new_head=True to fine-tune its backbone under "
            f"a new {num_classes}-class classifier"
        )
    return num_classes


def build_with_weights(
    network: type[nn.Module],
    config: Mapping[str, Any],
    spec: WeightsSpec,
    num_classes: int | None = None,
    *,
    new_head: bool = False,
    inflate: str = "mean",
    progress: bool = True,
) -> nn.Module:
    """``network(**config)`` with the weights ``spec`` names: the one place that fits weights
    to a model. The classifier is ``head_classes``'s decision (the file's, a new one for
    ``num_classes``, or the backbone alone); the input channels and a 1D or 3D model's kernels
    are adapted by ``load_state``. A file is read before the model is built (its classifier
    sets the model's); published weights are fetched after, so a bad argument fails first."""
    file = read_weights(spec)[0] if isinstance(spec, WeightsFile) else None
    classes = head_classes(spec, file.content if file else None, network, num_classes, new_head)
    model = network(**{**config, **({} if classes is None else {"num_classes": classes})})
    if spec is not None:
        file = file or read_weights(spec, progress)[0]
        load_state(model, file.content, file.path, inflate)
    return model


STEM_KEY = "features.conv0.weight"


def adapt_input_channels(
    state: Mapping[str, Tensor], expected: Mapping[str, Tensor], key: str = STEM_KEY
) -> Mapping[str, Tensor]:
    """``state`` with its stem convolution (``key``: (out, 3, kh, kw)) adapted to the
    ``expected`` model's input channels C: the RGB kernels summed for C = 1 (so
    ``conv(grey, summed) == conv(grey replicated to RGB, kernels)``), else repeated R, G, B, R...
    and scaled by 3 / C (so an RGB image repeated to C channels gives the RGB activations).
    Other states pass."""
    weight, target = state.get(key), expected.get(key)
    if weight is None or target is None or weight.shape == target.shape:
        return state
    if (
        weight.shape[1] != 3
        or weight.shape[0] != target.shape[0]
        or weight.shape[2:] != target.shape[2:]
    ):
        return state
    channels = target.shape[1]
    if channels == 1:
        adapted = weight.sum(1, keepdim=True)
    else:
        adapted = weight[:, [c % 3 for c in range(channels)]] * (3 / channels)
    return {**state, key: adapted}


INFLATE_MODES = ("mean", "centre")


def inflate_kernels(
    state: Mapping[str, Tensor], expected: Mapping[str, Tensor], mode: str = "mean"
) -> Mapping[str, Tensor]:
    """``state``'s 2D convolution kernels (out, in, kh, kw) in the ``expected`` model's number of
    spatial axes: for 3D (out, in, kd, kh, kw), ``"mean"`` repeats each kernel kd times along depth
    divided by kd (I3D's inflation: on a volume of identical slices every depth position away
    from the borders, within kd // 2 of a face of zero padding, computes the 2D activations), or
    ``"centre"`` puts it in the middle depth slice, zeros elsewhere (identical slices give the 2D
    activations at every position, so the 2D logits exactly); for 1D (out, in, kw), the kernel's
    centre row (a signal is read as the middle row of an image). Other tensors pass."""
    if mode not in INFLATE_MODES:
        raise ValueError(f"inflate must be one of {INFLATE_MODES}, got {mode!r}")
    out = dict(state)
    for key, weight in state.items():
        target = expected.get(key)
        if target is None or weight.dim() != 4 or target.dim() not in (3, 5):
            continue
        depth = target.shape[2]  # 3D: the kernel's depth
        if target.dim() == 3:
            out[key] = weight[:, :, weight.shape[2] // 2]
        elif mode == "mean":
            out[key] = weight.unsqueeze(2).expand(-1, -1, depth, -1, -1) / depth
        else:
            inflated = weight.new_zeros(*weight.shape[:2], depth, *weight.shape[2:])
            inflated[:, :, depth // 2] = weight
            out[key] = inflated
    return out


def check_finite(state: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Raise ``WeightsError`` if a floating-point tensor of ``state`` holds NaN or infinity."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(
            f"{path}: {len(bad)} tensors hold NaN or infinite values (first: "
            f"{', '.join(bad[:3])}); the weights are unusable"
        )


def load_state(
    model: nn.Module,
    state: Mapping[str, Tensor],
    path: str | os.PathLike,
    inflate: str = "mean",
) -> nn.Module:
    """Load ``state`` (read from ``path``, named in messages) into ``model`` as ``load_weights``;
    2D kernels loaded into a 3D or 1D model are inflated as ``inflate_kernels(..., inflate)``.
    The model's ``CLASSIFIER`` and ``STEM_WEIGHT`` (``densenet.nn.network.Network``) name its
    classifier's keys and its stem kernel."""
    path = Path(path)
    check_finite(state, path)
    expected = model.state_dict()
    head = getattr(model, "CLASSIFIER", "classifier.")
    stem = getattr(model, "STEM_WEIGHT", STEM_KEY)
    state = adapt_input_channels(inflate_kernels(state, expected, inflate), expected, stem)
    mismatched = {
        k: (tuple(v.shape), tuple(expected[k].shape))
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    }
    if mismatched and all(k.startswith(head) for k in mismatched):
        warnings.warn(
            f"{path.name}: classifier shape {mismatched.get(head + 'weight', '?')[0]} differs "
            "from the model's; loaded the backbone, the classifier is freshly initialised",
            stacklevel=2,
        )
        state = {k: v for k, v in state.items() if not k.startswith(head)}
        state.update({k: v for k, v in expected.items() if k.startswith(head)})
        mismatched = {}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
        if unexpected:
            problems.append(
                f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})"
            )
        if mismatched:
            first = list(mismatched.items())[:3]
            shapes = ", ".join(f"{k}: file {a} vs model {b}" for k, (a, b) in first)
            problems.append(f"{len(mismatched)} shapes differ ({shapes})")
        raise WeightsError(
            f"weights file {path} does not fit this model; it is probably for another "
            f"architecture: {'; '.join(problems)}"
        )
    model.load_state_dict(state, strict=True)
    return model


def load_weights(
    model: nn.Module,
    weights: Weights | str | os.PathLike,
    progress: bool = True,
    inflate: str = "mean",
) -> nn.Module:
    """Load a registry entry or a local checkpoint into ``model`` strictly.

    When only the classifier's shape differs (another number of classes), the backbone is loaded
    and the classifier keeps its fresh initialisation, with a warning: the fine-tuning case.
    2D weights loaded into a 3D or 1D model are inflated (``inflate_kernels``, mode ``inflate``).
    """
    spec = weights if isinstance(weights, Weights) else WeightsFile(Path(weights))
    file = read_weights(spec, progress)[0]
    return load_state(model, file.content, file.path, inflate)

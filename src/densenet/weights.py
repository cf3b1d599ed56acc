"""Pretrained weights: the download, cache, verification and loading of checkpoints (official,
legacy-format, local or safetensors); the table of published files with their metadata, and
``parse_weights`` (a user's ``weights`` read once), are ``densenet.published``'s (re-exported
here). ``build_with_weights`` is the one place that fits weights to a new model.

Files are cached in torch.hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``), so a
torchvision cache is reused. ``DENSENET_WEIGHTS_URL`` replaces the download base URL (mirrors).
RDNet's weights are NAVER's on the Hugging Face hub, fetched by ``huggingface_hub`` (the
``hub`` extra) into its cache (``HF_HUB_CACHE``, with its checks; ``HF_HUB_OFFLINE=1`` uses the
cached file without asking the network, ``HF_ENDPOINT`` names a mirror).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import urllib.error
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .io import read_torch_file as _read_torch_file
from .io import write_text
from .published import (
    CHECKPOINT_SUFFIXES,
    WEIGHTS,
    Weights,
    WeightsArg,
    WeightsError,
    WeightsFile,
    WeightsSpec,
    cache_dir,
    get_weights,
    is_path,
    list_weights,
    parse_weights,
)
from .published import hash_prefix as _hash_prefix

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "WEIGHTS",
    "Weights",
    "WeightsArg",
    "WeightsError",
    "WeightsFile",
    "WeightsSpec",
    "build_with_weights",
    "cache_dir",
    "convert_legacy_keys",
    "convert_rdnet_keys",
    "download",
    "get_weights",
    "is_path",
    "list_weights",
    "load_checkpoint",
    "convert_monai_keys",
    "file_head",
    "head_classes",
    "inflate_kernels",
    "load_state",
    "load_weights",
    "parse_weights",
    "read_state",
    "read_torch_file",
    "resolve_weights",
    "state_dict_of",
    "verify_file",
]


def resolve_weights(arch: str, weights: WeightsArg) -> Weights | None:
    """The registry entry that ``weights`` names, or None for no weights or a local file
    (``parse_weights``)."""
    spec = parse_weights(weights, arch)
    return spec if isinstance(spec, Weights) else None


def read_state(spec: WeightsSpec, progress: bool = True) -> tuple[dict[str, Tensor], Path] | None:
    """The state_dict that ``spec`` names (current key names) and the file it is read from, or
    None for no weights: a published entry's cached file (downloaded first, ``fetch``), or a
    local file (its ``content`` if it was already read)."""
    if spec is None:
        return None
    if isinstance(spec, Weights):
        path = fetch(spec, progress)
        return load_checkpoint(path), path
    content = spec.content if spec.content is not None else read_torch_file(spec.path)
    return state_dict_of(content, spec.path), spec.path


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
    read = read_state(spec) if isinstance(spec, WeightsFile) else None
    classes = head_classes(spec, read[0] if read else None, network, num_classes, new_head)
    model = network(**{**config, **({} if classes is None else {"num_classes": classes})})
    if spec is not None:
        load_state(model, *(read or read_state(spec, progress)), inflate)
    return model


def download(url: str, path: Path, sha256_prefix: str | None = None, progress: bool = True) -> Path:
    """Download ``url`` to ``path`` with ``torch.hub.download_url_to_file`` (a temporary file,
    renamed once complete and, if ``sha256_prefix`` is given, verified): an interrupted download,
    or a truncated or corrupt one with a hash to check, leaves nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=sha256_prefix, progress=progress)
    except RuntimeError as error:  # torch.hub's 'invalid hash value (expected ..., got ...)'
        raise WeightsError(
            f"download of {url} is corrupt or truncated ({error}); nothing was cached, retry"
        ) from None
    except urllib.error.URLError as error:
        raise WeightsError(
            f"cannot download {url} ({getattr(error, 'reason', error)}); "
            f"to use the weights offline, put the file at {path}, or pass a weights file with "
            "--weights FILE (--weights none: random weights, for a smoke test)"
        ) from None
    if sha256_prefix:
        _remember_verified(path, sha256_prefix)
    return path


def fetch(entry: Weights, progress: bool = True) -> Path:
    """The cached file of ``entry``, downloaded first if it is not in the cache. A cached file is
    checked against the SHA-256 prefix in its name the first time it is used (and again whenever
    its size or modification time changes); raises ``WeightsError`` if it differs. Weights on
    the Hugging Face hub are ``huggingface_hub``'s to fetch and check (``fetch_from_hub``)."""
    if entry.hf_hub_id is not None:
        return fetch_from_hub(entry)
    path = entry.cache_path
    if not path.is_file():
        return download(entry.url, path, entry.sha256_prefix, progress)
    if _verified_stamp(path, entry.sha256_prefix) != _read_stamp(path):
        digest = sha256_file(path)
        if not digest.startswith(entry.sha256_prefix):
            raise WeightsError(
                f"cached weights file {path} is not the published {entry.arch} {entry.name}: its "
                f"SHA-256 starts with {digest[:8]}, not {entry.sha256_prefix}. Delete it to "
                "download it again; offline, or if the file is meant to differ, pass it with "
                "--weights FILE"
            )
        _remember_verified(path, entry.sha256_prefix)
    return path


def _hub() -> Any:
    """The ``huggingface_hub`` module, or ``WeightsError`` saying how to install it."""
    try:
        import huggingface_hub
    except ImportError:
        raise WeightsError(
            "these weights are on the Hugging Face hub, fetched with huggingface_hub: "
            "pip install 'densenet-toolkit[hub]', or pass a downloaded file with --weights FILE"
        ) from None
    return huggingface_hub


def fetch_from_hub(entry: Weights) -> Path:
    """``entry``'s file from the Hugging Face hub through ``huggingface_hub.hf_hub_download``:
    from its cache when there (offline too), else downloaded into a temporary file, checked
    against the size the hub publishes and renamed into place (stored under the hub's content
    hash); ``WeightsError`` otherwise."""
    hub = _hub()
    # its HTTP client's errors besides OSError: httpx's (huggingface_hub 1) or httpx2's (2)
    client = tuple(sys.modules[m].HTTPError for m in ("httpx", "httpx2") if m in sys.modules)
    try:
        return Path(hub.hf_hub_download(entry.hf_hub_id, entry.file_name))
    except (OSError, ValueError, hub.errors.EntryNotFoundError, *client) as error:
        raise WeightsError(
            f"cannot fetch {entry.file_name} of {entry.hf_hub_id} from the Hugging Face hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "offline, put it in the hub cache (hf download "
            f"{entry.hf_hub_id} {entry.file_name}, then HF_HUB_OFFLINE=1) or pass the file with "
            "--weights FILE (--weights none: random weights, for a smoke test)"
        ) from None


def _stamp_path(path: Path) -> Path:
    """The sidecar file recording that ``path`` was verified: ``.<name>.verified``."""
    return path.with_name(f".{path.name}.verified")


def _verified_stamp(path: Path, sha256_prefix: str) -> str:
    """What the sidecar holds once ``path``, as it is now, matched ``sha256_prefix``."""
    stat = path.stat()
    return f"{stat.st_size} {stat.st_mtime_ns} {sha256_prefix}\n"


def _read_stamp(path: Path) -> str | None:
    try:
        return _stamp_path(path).read_text(encoding="utf-8")
    except OSError:
        return None


def _remember_verified(path: Path, sha256_prefix: str) -> None:
    with contextlib.suppress(OSError):  # a read-only cache: the file is hashed on every use
        write_text(_stamp_path(path), _verified_stamp(path, sha256_prefix))


def _official_prefix(path: str | os.PathLike) -> str | None:
    """The hash prefix in ``path``'s name if it is a published file's name (``densenet121-
    a639ec97.pth``); another file's name may end in hex digits that are no hash (a date)."""
    name = os.path.basename(path)
    official = {w.file_name for entries in WEIGHTS.values() for w in entries.values()}
    return _hash_prefix(name) if name in official else None


def sha256_file(path: str | os.PathLike) -> str:
    sha256 = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            sha256.update(chunk)
    return sha256.hexdigest()


def verify_file(path: str | os.PathLike, sha256_prefix: str | None = None) -> str:
    """Check ``path``'s SHA-256 against ``sha256_prefix`` (default: the hex part of a published
    file's name; other files are only hashed);
    returns the full digest, raises ``WeightsError`` on a mismatch."""
    digest = sha256_file(path)
    expected = sha256_prefix or _official_prefix(path)
    if expected and not digest.startswith(expected):
        raise WeightsError(
            f"{path} is corrupt: SHA-256 {digest[:8]}... does not start with {expected}; "
            "delete it and download again"
        )
    return digest


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
    """``densenet.io.read_torch_file`` raising ``WeightsError``."""
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
    return load_state(model, *read_state(spec, progress), inflate)


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


def check_finite(state: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Raise ``WeightsError`` if a floating-point tensor of ``state`` holds NaN or infinity."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(
            f"{path}: {len(bad)} tensors hold NaN or infinite values (first: "
            f"{', '.join(bad[:3])}); the weights are unusable"
        )


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
        if target is None or weight.dim() != 4 or target.dim() == 4 or target.dim() not in (3, 5):
            continue
        if target.dim() == 3:
            out[key] = weight[:, :, weight.shape[2] // 2]
        elif mode == "mean":
            depth = target.shape[2]
            out[key] = weight.unsqueeze(2).expand(-1, -1, depth, -1, -1) / depth
        else:
            depth = target.shape[2]
            inflated = weight.new_zeros(*weight.shape[:2], depth, *weight.shape[2:])
            inflated[:, :, depth // 2] = weight
            out[key] = inflated
    return out


def load_state(
    model: nn.Module,
    state: Mapping[str, Tensor],
    path: str | os.PathLike,
    inflate: str = "mean",
) -> nn.Module:
    """Load ``state`` (read from ``path``, named in messages) into ``model`` as ``load_weights``;
    2D kernels loaded into a 3D or 1D model are inflated as ``inflate_kernels(..., inflate)``.
    The model's ``CLASSIFIER`` and ``STEM_WEIGHT`` (``densenet.network.Network``) name its
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

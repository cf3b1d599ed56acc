"""Downloading and checking published files: ``fetch`` gives an entry's cached file (downloaded
first, checked against the SHA-256 prefix in its name), ``verify_file`` checks any file.

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
import sys
import urllib.error
from pathlib import Path
from typing import Any

import torch

from densenet.data.files import write_text
from densenet.weights.published import (
    WEIGHTS,
    Weights,
    WeightsError,
)
from densenet.weights.published import hash_prefix as _hash_prefix

__all__ = ["download", "verify_file"]


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
    path, prefix = entry.cache_path, entry.sha256_prefix
    if not path.is_file():
        return download(entry.url, path, prefix, progress)
    if _verified_stamp(path, prefix) != _read_stamp(path):
        digest = sha256_file(path)
        if not digest.startswith(prefix):
            raise WeightsError(
                f"cached weights file {path} is not the published {entry.arch} {entry.name}: its "
                f"SHA-256 starts with {digest[:8]}, not {prefix}. Delete it to download it "
                "again; offline, or if the file is meant to differ, pass it with --weights FILE"
            )
        _remember_verified(path, prefix)
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

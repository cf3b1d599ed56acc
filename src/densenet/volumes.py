"""Volumes in (CT, MRI: NIfTI through nibabel, or NumPy ``.npy``) for 3D DenseNets
(``spatial_dims=3``): reading with the same per-file errors as images (``ImageError``), a fixed
shape and intensity scale (``VolumeTransform``: a CT window or a z-score), random shifts and
flips for training (``VolumeAugment``), and maps (class activation maps) written back as NIfTI
aligned with the volume they were computed on. Class folders and labels CSVs may hold volumes
as they hold images (``open_sample``).

Axes: a volume is (C, D, H, W) in the file's own voxel order (NIfTI's i, j, k become D, H, W;
a 4D NIfTI's fourth axis is the channels); a 3D ``.npy`` array is (D, H, W), a 4D one (C, D, H, W).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .images import ImageError, Reason, is_image_file, open_image
from .io import atomic_write

__all__ = [
    "VOLUME_SUFFIXES",
    "Volume",
    "VolumeAugment",
    "VolumeTransform",
    "file_stem",
    "is_sample_file",
    "is_volume_file",
    "open_sample",
    "read_volume",
    "write_map",
]

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy")
MAX_VOXELS = 1_000_000_000  # volumes larger than this are refused (memory)


def is_volume_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` has a volume file's suffix (``VOLUME_SUFFIXES``)."""
    return str(path).lower().endswith(VOLUME_SUFFIXES)


def file_stem(path: str | os.PathLike) -> str:
    """A file's name without its suffix, a volume's ``.nii.gz`` counted as one."""
    name = Path(path).name
    suffix = next((s for s in VOLUME_SUFFIXES if name.lower().endswith(s)), None)
    return name[: -len(suffix)] if suffix else Path(path).stem


def is_sample_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an image or a volume file, by its suffix."""
    return is_volume_file(path) or is_image_file(Path(path))


def open_sample(path: str | os.PathLike) -> Image.Image | Tensor:
    """The content of an image file (a PIL image, ``densenet.images.open_image``) or of a volume
    file (its (C, D, H, W) float32 voxels, ``read_volume``); ``ImageError`` if unreadable."""
    return read_volume(path).data if is_volume_file(path) else open_image(path)


@dataclass
class Volume:
    """``data`` (C, D, H, W) float32 and, for NIfTI, the ``affine`` (4, 4) from voxel indices
    to world coordinates (None for ``.npy``)."""

    data: Tensor
    affine: np.ndarray | None = None


def read_volume(path: str | os.PathLike, channels: int | None = None) -> Volume:
    """The volume in the file at ``path`` (``.nii``, ``.nii.gz`` or ``.npy``), or ``ImageError``
    naming the file: missing, empty, not a volume, corrupt, not 3D or 4D, too large, holding
    NaN or infinity, or with other ``channels`` than asked."""
    name = str(path)
    try:
        if Path(path).stat().st_size == 0:
            raise ImageError(f"{name}: empty file (0 bytes)", Reason.EMPTY)
        if name.lower().endswith(".npy"):
            array, affine = np.load(path, allow_pickle=False), None
        elif is_volume_file(name):
            array, affine = _read_nifti(path)
        else:
            raise ImageError(
                f"{name}: not a volume (NIfTI .nii/.nii.gz or NumPy .npy)", Reason.NOT_AN_IMAGE
            )
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file", Reason.MISSING) from None
    except (IsADirectoryError, PermissionError) as error:
        raise ImageError(f"{name}: cannot be read ({error.strerror})", Reason.UNREADABLE) from None
    except Exception as error:  # nibabel's and NumPy's errors for damaged files vary
        raise ImageError(f"{name}: corrupt or truncated volume ({error})", Reason.CORRUPT) from None
    data = _channels_first(array, name, nifti=affine is not None)
    if channels is not None and data.shape[0] != channels:
        raise ImageError(
            f"{name}: {data.shape[0]} channels, the model takes {channels}", Reason.BAD_SHAPE
        )
    return Volume(data, affine)


def _read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    import nibabel

    image = nibabel.load(os.fspath(path))
    if not isinstance(image, nibabel.Nifti1Image):  # NIfTI-2 is a subclass
        raise ImageError(f"{path}: not a NIfTI image ({type(image).__name__})", Reason.NOT_AN_IMAGE)
    _check_size(image.shape, str(path))
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def _check_size(shape: Sequence[int], name: str) -> None:
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise ImageError(
            f"{name}: a {len(shape)}D array {tuple(shape)}, not a 3D volume (D, H, W) or "
            "4D (with channels)",
            Reason.BAD_SHAPE,
        )
    if int(np.prod(shape)) > MAX_VOXELS:
        raise ImageError(
            f"{name}: {tuple(shape)} is over the limit of {MAX_VOXELS:,} voxels",
            Reason.TOO_MANY_PIXELS,
        )


def _channels_first(array: np.ndarray, name: str, nifti: bool) -> Tensor:
    """(D, H, W) or (C, D, H, W) (NIfTI: (D, H, W, C)) -> (C, D, H, W) float32."""
    _check_size(array.shape, name)
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ImageError(f"{name}: {array.dtype} values, not real numbers", Reason.CORRUPT)
    data = torch.from_numpy(np.asarray(array, dtype=np.float32))  # no copy if float32
    if data.dim() == 3:
        data = data[None]
    elif nifti:
        data = data.permute(3, 0, 1, 2).contiguous()
    if not torch.isfinite(data).all():
        raise ImageError(f"{name}: holds NaN or infinite values", Reason.CORRUPT)
    return data


@dataclass(frozen=True)
class VolumeTransform:
    """(C, D, H, W) volume -> (C, *size) float32 network input: with a ``window`` (low, high),
    e.g. a CT window in Hounsfield units (-1000, 400), values clipped to it and scaled to [0, 1];
    then resampled trilinearly to ``size`` (D, H, W); without a window, each channel z-scored
    (zero mean, unit standard deviation) after resampling."""

    size: tuple[int, int, int]
    window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if len(self.size) != 3 or min(self.size) < 1:
            raise ValueError(f"size must be three positive lengths (D, H, W), got {self.size}")
        if self.window is not None and not self.window[0] < self.window[1]:
            raise ValueError(f"window must be (low, high) with low < high, got {self.window}")

    def __call__(self, volume: Tensor) -> Tensor:
        x = volume.float()
        if self.window is not None:
            low, high = self.window
            x = (x.clamp(low, high) - low) / (high - low)
        x = F.interpolate(x[None], size=self.size, mode="trilinear", align_corners=False)[0]
        if self.window is None:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            std = x.std(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) / std.clamp_min(1e-6)
        return x


@dataclass(frozen=True)
class VolumeAugment:
    """Random training changes of a (C, D, H, W) network input: a shift by up to ``shift`` of
    each side (a fraction; the uncovered voxels are zero, the mean of a z-scored volume) and,
    with ``flip``, a mirror along the last axis (W: left-right in most scans) half the time.
    Draws from torch's random generator (``densenet.data.TransformedDataset`` seeds it)."""

    shift: float = 0.125
    flip: bool = True

    def __call__(self, x: Tensor) -> Tensor:
        sizes = x.shape[1:]
        pads = [round(self.shift * size) for size in sizes]
        padded = F.pad(x, [p for pad in reversed(pads) for p in (pad, pad)])
        starts = [int(torch.randint(0, 2 * pad + 1, ())) for pad in pads]
        x = padded[(slice(None), *(slice(a, a + n) for a, n in zip(starts, sizes)))]
        if self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x.contiguous()


def write_map(values: Tensor, like: str | os.PathLike | None, out: str | os.PathLike) -> Path:
    """Write ``values`` (d, h, w), a map over a network input such as a class activation map, as
    a NIfTI file (``.nii``, or gzipped ``.nii.gz``) aligned with the volume file ``like``:
    resampled trilinearly to its shape, with its affine (the identity for a ``.npy`` volume);
    ``like=None``: as it is, with the identity. Written atomically; returns the path."""
    import nibabel

    values = values.detach().float().cpu()
    size, affine = _grid(like) if like is not None else (tuple(values.shape), np.eye(4))
    resampled = F.interpolate(
        values[None, None], size=size, mode="trilinear", align_corners=False
    )[0, 0]  # fmt: skip
    content = nibabel.Nifti1Image(resampled.numpy(), affine).to_bytes()
    if str(out).endswith(".gz"):
        content = gzip.compress(content, mtime=0)
    return atomic_write(out, lambda tmp: Path(tmp).write_bytes(content))


def _grid(path: str | os.PathLike) -> tuple[tuple[int, int, int], np.ndarray]:
    """The (D, H, W) voxel grid of a volume file and its affine (the identity for ``.npy``),
    from the header alone (the voxels are not read)."""
    if str(path).lower().endswith(".npy"):
        shape = np.load(path, mmap_mode="r").shape
        return tuple(shape[-3:]), np.eye(4)
    import nibabel

    image = nibabel.load(os.fspath(path))
    return tuple(image.shape[:3]), image.affine

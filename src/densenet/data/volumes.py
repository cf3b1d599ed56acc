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

import contextlib
import gzip
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from densenet.data.files import atomic_write
from densenet.data.images import ImageError, Reason, is_image_file, open_image

__all__ = [
    "VOLUME_SUFFIXES",
    "Volume",
    "VolumeAugment",
    "VolumeTransform",
    "available_memory",
    "file_stem",
    "is_sample_file",
    "is_volume_file",
    "open_sample",
    "read_volume",
    "volume_channels",
    "write_map",
]

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy")
MAX_VOXELS = 2**28  # voxels of a volume (1 GiB as float32, a 1024x512x512 scan): above, refused
# a volume whose float32 voxels would take more than MIN_SUSPECT_BYTES and more than MAX_EXPANSION
# times its file's size is refused from its header (a gzip bomb: a small file of constant voxels)
MAX_EXPANSION = 256
MIN_SUSPECT_BYTES = 256 * 2**20


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
    """The content of an image file (a PIL image, ``densenet.data.images.open_image``) or of a volume
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
    naming the file: missing, empty, not a volume, corrupt, not 3D or 4D, too large (checked from
    its header, before the voxels are read), holding NaN or infinity, or with other ``channels``
    than asked."""
    name = str(path)
    with _volume_errors(name):
        file = _open_volume(path)
        if channels is not None and file.channels != channels:
            raise ImageError(
                f"{name}: {file.channels} channels, the model takes {channels}", Reason.BAD_SHAPE
            )
        array = file.read()
    return Volume(_channels_first(array, name, nifti=file.affine is not None), file.affine)


def volume_channels(path: str | os.PathLike) -> int:
    """The channels of the volume file at ``path``, from its header alone (the voxels are not
    read); ``ImageError`` as ``read_volume`` for a file it would refuse before reading them."""
    with _volume_errors(str(path)):
        return _open_volume(path).channels


@contextlib.contextmanager
def _volume_errors(name: str) -> Iterator[None]:
    """The errors of opening and reading a volume file as ``ImageError`` naming it."""
    try:
        yield
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file", Reason.MISSING) from None
    except (IsADirectoryError, PermissionError) as error:
        raise ImageError(f"{name}: cannot be read ({error.strerror})", Reason.UNREADABLE) from None
    except Exception as error:  # nibabel's and NumPy's errors for damaged files vary
        raise ImageError(f"{name}: corrupt or truncated volume ({error})", Reason.CORRUPT) from None


@dataclass
class _VolumeFile:
    """An opened volume file: ``voxels`` not yet read (a memory map or nibabel's array proxy),
    its ``affine`` (None for ``.npy``)."""

    voxels: Any
    affine: np.ndarray | None

    @property
    def channels(self) -> int:
        """1 for a 3D volume, else the length of its channel axis (NIfTI's last, NumPy's first)."""
        shape = self.voxels.shape
        return 1 if len(shape) == 3 else shape[-1] if self.affine is not None else shape[0]

    def read(self) -> np.ndarray:
        """The voxels as a float32 array of their own (never a view of the file)."""
        if isinstance(self.voxels, np.memmap):
            return np.array(self.voxels, dtype=np.float32)
        return np.asarray(self.voxels, dtype=np.float32)


def _open_volume(path: str | os.PathLike) -> _VolumeFile:
    """``path`` opened from its header, its shape, value type and size checked."""
    name = str(path)
    size = Path(path).stat().st_size
    if size == 0:
        raise ImageError(f"{name}: empty file (0 bytes)", Reason.EMPTY)
    if name.lower().endswith(".npy"):
        # a memory map reads the header only, and refuses a file shorter than it declares
        file = _VolumeFile(np.load(path, mmap_mode="r", allow_pickle=False), None)
    elif is_volume_file(name):
        file = _open_nifti(path)
    else:
        raise ImageError(
            f"{name}: not a volume (NIfTI .nii/.nii.gz or NumPy .npy)", Reason.NOT_AN_IMAGE
        )
    shape, dtype = file.voxels.shape, np.dtype(file.voxels.dtype)
    _check_size(shape, name)
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise ImageError(f"{name}: {dtype} values, not real numbers", Reason.CORRUPT)
    _check_memory(math.prod(shape), dtype, size, name)
    return file


def _open_nifti(path: str | os.PathLike) -> _VolumeFile:
    import nibabel

    image = nibabel.load(os.fspath(path))  # the header only; the voxels are read on demand
    if not isinstance(image, nibabel.Nifti1Image):  # NIfTI-2 is a subclass
        raise ImageError(f"{path}: not a NIfTI image ({type(image).__name__})", Reason.NOT_AN_IMAGE)
    proxy = image.dataobj
    needed = proxy.offset + math.prod(proxy.shape) * image.get_data_dtype().itemsize
    if not str(path).lower().endswith(".gz") and needed > Path(path).stat().st_size:
        raise ImageError(
            f"{path}: truncated volume (its header declares {needed:,} bytes, the file has "
            f"{Path(path).stat().st_size:,})",
            Reason.CORRUPT,
        )
    return _VolumeFile(proxy, image.affine)


def _check_size(shape: Sequence[int], name: str) -> None:
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise ImageError(
            f"{name}: a {len(shape)}D array {tuple(shape)}, not a 3D volume (D, H, W) or "
            "4D (with channels)",
            Reason.BAD_SHAPE,
        )
    if math.prod(shape) > MAX_VOXELS:
        raise ImageError(
            f"{name}: {tuple(shape)} is over the limit of {MAX_VOXELS:,} voxels",
            Reason.TOO_MANY_PIXELS,
        )


def _check_memory(voxels: int, dtype: np.dtype, file_size: int, name: str) -> None:
    """Refuse a volume whose reading (its values, then as float32, then the float32 copies of
    the channels-first layout and the resize) would not fit in the memory available, or a
    compressed one that would expand suspiciously far beyond its file's size (a gzip bomb: a
    small file of constant voxels)."""
    unpacked, needed = voxels * 4, voxels * (dtype.itemsize + 3 * 4)
    if unpacked > MIN_SUSPECT_BYTES and unpacked > MAX_EXPANSION * file_size:
        raise ImageError(
            f"{name}: {voxels:,} voxels would expand from a {file_size:,}-byte file to "
            f"{unpacked:,} bytes (more than {MAX_EXPANSION} times its size); refused",
            Reason.TOO_MANY_PIXELS,
        )
    available = available_memory()
    if available is not None and needed > available:
        raise ImageError(
            f"{name}: {voxels:,} voxels need {needed:,} bytes to read, more than the "
            f"{available:,} bytes of memory available",
            Reason.TOO_MANY_PIXELS,
        )


def available_memory() -> int | None:
    """The memory available to read data into, bytes (Linux's MemAvailable, else the physical
    memory), or None where the system does not say."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _channels_first(array: np.ndarray, name: str, nifti: bool) -> Tensor:
    """(D, H, W) or (C, D, H, W) (NIfTI: (D, H, W, C)) float32 -> (C, D, H, W)."""
    data = torch.from_numpy(array)
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
        if math.prod(self.size) > MAX_VOXELS:
            raise ValueError(
                f"size {tuple(self.size)} is over the limit of {MAX_VOXELS:,} voxels; give a "
                "smaller one"
            )
        if self.window is not None:
            low, high = self.window
            # float32 voxels are clipped to it and divided by its width: both must be finite there
            largest = torch.finfo(torch.float32).max
            if not (-largest <= low < high <= largest and high - low <= largest):
                raise ValueError(
                    f"window must be (low, high) with low < high, finite, and a width of at "
                    f"most {largest:.3g}; got {self.window}"
                )

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
    Draws from torch's random generator (``densenet.data.datasets.TransformedDataset`` seeds it)."""

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
    resampled = F.interpolate(values[None, None], size=size, mode="trilinear", align_corners=False)
    content = nibabel.Nifti1Image(resampled[0, 0].numpy(), affine).to_bytes()
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

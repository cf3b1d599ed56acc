"""Images in: opening and decoding files or bytes, the limits that protect memory (pixels, aspect
ratio), and ``ImageError``, whose ``reason`` says what is wrong in a form callers branch on
(the service's 415 or 400), while its message names the image for people."""

from __future__ import annotations

import enum
import errno
import io
import math
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Union

from PIL import Image, UnidentifiedImageError
from torch import Tensor

from densenet.errors import DenseNetError

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_ASPECT_RATIO",
    "MAX_PIXELS",
    "RASTER_FORMATS",
    "ImageError",
    "ImageInput",
    "Reason",
    "check_pixels",
    "describe",
    "find_images",
    "is_image_file",
    "open_image",
    "reduced_size",
    "walk_files",
]

ImageInput = Union[str, os.PathLike, bytes, Image.Image, Tensor]  # noqa: UP007

MAX_PIXELS = 100_000_000  # decoded images larger than this are refused (decompression bombs)
# Longer side / shorter side: beyond this, resizing the shorter side to 256 explodes in memory.
MAX_ASPECT_RATIO = 100
# The formats every opener accepts: raster formats only, those this Pillow reads (MPO: some
# cameras' JPEG). Never a decoder that runs an interpreter (EPS through Ghostscript), whatever
# the file's suffix says.
Image.init()
RASTER_FORMATS = tuple(
    f for f in ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM") if f in Image.OPEN
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class Reason(str, enum.Enum):
    """Why an image cannot be classified."""

    EMPTY = "empty"  # 0 bytes
    MISSING = "missing"  # no such file
    UNREADABLE = "unreadable"  # a directory, or no permission
    NOT_AN_IMAGE = "not_an_image"  # no image format this decoder accepts
    CORRUPT = "corrupt"  # a known format, but truncated or damaged
    TOO_MANY_PIXELS = "too_many_pixels"  # over MAX_PIXELS (decompression bomb)
    BAD_SHAPE = "bad_shape"  # too narrow (aspect ratio), or a tensor of the wrong shape or size


class ImageError(DenseNetError, ValueError):
    """An image that cannot be classified; the message names it and says why, ``reason`` says
    it for programs."""

    def __init__(self, message: str, reason: Reason = Reason.CORRUPT) -> None:
        super().__init__(message)
        self.reason = reason


def describe(image: ImageInput, index: int) -> str:
    """The name of an image in messages: its path, or its position and type."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"image {index} ({type(image).__name__})"


def open_image(
    source: str | os.PathLike | bytes,
    formats: Sequence[str] = RASTER_FORMATS,
    *,
    shorter_side: int | None = None,
    name: str | None = None,
) -> Image.Image:
    """Decode a file or bytes fully into an RGB-convertible PIL image, or raise ``ImageError``.
    ``formats``: the PIL format names to accept, a subset of ``RASTER_FORMATS``.
    ``shorter_side``: the size (pixels) the image will be resized to next; a JPEG is then decoded
    at the smallest of libjpeg's scales (1/2, 1/4, 1/8) that keeps its shorter side at least
    twice that (``reduced_size``), which is faster and, after the resize, within a few grey
    levels of a full decode (0.14 of 255 on average). ``name``: the image's name in errors
    (default: its path, or "uploaded image" for bytes)."""
    name = name or ("uploaded image" if isinstance(source, bytes) else str(source))
    try:
        if isinstance(source, bytes):
            if not source:
                raise ImageError(f"{name}: empty (0 bytes)", Reason.EMPTY)
            stream = io.BytesIO(source)
        else:
            status = os.stat(source)
            if stat.S_ISDIR(status.st_mode):
                raise IsADirectoryError(source)
            if not stat.S_ISREG(status.st_mode):
                raise ImageError(
                    f"{name}: not a regular file (a device, pipe or socket)", Reason.UNREADABLE
                )
            if status.st_size == 0:
                raise ImageError(f"{name}: empty file (0 bytes)", Reason.EMPTY)
            stream = open(source, "rb")  # noqa: SIM115 (closed below)
        with stream, warnings.catch_warnings():
            # the limit is MAX_PIXELS (check_pixels), not Pillow's lower warning threshold
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream, formats=formats)
            check_pixels(image, name)
            if shorter_side is not None and image.format in ("JPEG", "MPO"):
                image.draft(None, reduced_size(image.size, shorter_side))
            image.load()
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file", Reason.MISSING) from None
    except PermissionError:
        raise ImageError(f"{name}: cannot be read (permission denied)", Reason.UNREADABLE) from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory", Reason.UNREADABLE) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{name}: not an image (unrecognised format)", Reason.NOT_AN_IMAGE
        ) from None
    except Image.DecompressionBombError:
        raise ImageError(
            f"{name}: too many pixels (over the limit of {MAX_PIXELS:,})", Reason.TOO_MANY_PIXELS
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        if getattr(error, "errno", None) == errno.ELOOP:
            raise ImageError(f"{name}: a loop of symbolic links", Reason.UNREADABLE) from None
        raise ImageError(f"{name}: corrupt or truncated image ({error})", Reason.CORRUPT) from None
    return image


def reduced_size(size: tuple[int, int], shorter_side: int) -> tuple[int, int]:
    """The (width, height) to decode an image of ``size`` at before resizing its shorter side to
    ``shorter_side``: at least twice that (Pillow's ``reducing_gap=2``), never larger."""
    scale = min(1.0, 2 * shorter_side / min(size))
    return math.ceil(size[0] * scale), math.ceil(size[1] * scale)


def check_pixels(image: Image.Image, name: str) -> None:
    """Refuse an image over ``MAX_PIXELS`` or more elongated than ``MAX_ASPECT_RATIO`` to 1
    (checked on the header, before decoding). The network's smallest input is checked after
    preprocessing (``Preprocessing.check_input``), not here."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{name}: {width}x{height} pixels is over the limit of {MAX_PIXELS:,}",
            Reason.TOO_MANY_PIXELS,
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(
            f"{name}: {width}x{height} is wider than {MAX_ASPECT_RATIO}:1", Reason.BAD_SHAPE
        )


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has an image file's suffix (``IMAGE_SUFFIXES``)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def find_images(
    paths: Iterable[str | os.PathLike], keep: Callable[[Path], bool] = is_image_file
) -> list[str]:
    """Paths as given; a directory contributes the files under it that ``keep`` accepts
    (default: image files by suffix; ``walk_files``)."""
    found: list[str] = []
    for path in map(Path, paths):
        found += walk_files(path, keep) if path.is_dir() else [str(path)]
    return found


def walk_files(
    folder: str | os.PathLike, keep: Callable[[Path], bool] = is_image_file
) -> Iterator[str]:
    """The files under ``folder`` that ``keep`` accepts (default: image files by suffix), lazily,
    depth first, each folder's entries sorted by name, in the same order on every call;
    symbolic links to folders are not followed (no cycles)."""
    with os.scandir(folder) as entries:
        ordered = sorted(entries, key=lambda e: e.name)
    for entry in ordered:
        if entry.is_dir(follow_symlinks=False):
            yield from walk_files(entry.path, keep)
        elif keep(Path(entry.path)):
            yield entry.path

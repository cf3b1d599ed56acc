"""Images of a bulk run to tensors: the card's transform on the CPU (in DataLoader processes),
or JPEG bytes decoded on the GPU; the batches a DataLoader reads, a batch never spanning two
shards."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from densenet.data.card import Preprocessing
from densenet.data.images import ImageError, open_image
from densenet.tasks.bulk.inputs import chunks

JPEG_MAGIC = b"\xff\xd8\xff"


class Decoder:
    """A path or encoded bytes -> ((C, H, W) preprocessed tensor, None), or (None, error): the
    card's ``transform`` of the image, a JPEG decoded at a reduced scale first unless ``exact``
    (``densenet.data.images.open_image``'s ``shorter_side``: the transform's resize size)."""

    def __init__(self, pre: Preprocessing, exact: bool = False) -> None:
        self.transform = pre.transform()
        self.shorter_side = None if exact else pre.resize_size

    def __call__(
        self, source: str | bytes, name: str | None = None
    ) -> tuple[Tensor | None, str | None]:
        """``name``: the image's name in errors (default: its path, or a generic one for bytes)."""
        try:
            image = open_image(source, shorter_side=self.shorter_side, name=name)
            return self.transform(image), None
        except ImageError as error:
            return None, str(error)
        except (OSError, ValueError) as error:  # a decoded image the transform cannot convert
            return None, f"{name or (source if isinstance(source, str) else 'image')}: {error}"


class Images(Dataset):
    """``(shard, path)`` -> ``(shard, path, image, error)``: the image as ``decode`` gives it,
    or with ``raw`` the file's bytes as a uint8 tensor (decoded on the device later)."""

    def __init__(self, decode: Decoder, raw: bool = False) -> None:
        self.decode, self.raw = decode, raw

    def __getitem__(self, key: tuple[int, str]) -> tuple[int, str, Tensor | None, str | None]:
        shard, path = key
        if not self.raw:
            return (shard, path, *self.decode(path))
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            return shard, path, None, f"{path}: cannot be read ({error.strerror or error})"
        if not data:
            return shard, path, None, f"{path}: empty file (0 bytes)"
        return shard, path, torch.frombuffer(bytearray(data), dtype=torch.uint8), None


class Batches:
    """The batches of ``(shard, path)`` keys of the shards ``wanted(k)`` selects; a batch never
    spans two shards. Iterated lazily by the DataLoader, one shard's paths in memory."""

    def __init__(self, paths: Iterable[str], shard_size: int, batch_size: int, wanted) -> None:
        self.paths, self.shard_size, self.batch_size = paths, shard_size, batch_size
        self.wanted = wanted

    def __iter__(self) -> Iterator[list[tuple[int, str]]]:
        self.shards = 0
        for shard, chunk in enumerate(chunks(self.paths, self.shard_size)):
            self.shards = shard + 1
            if self.wanted(shard, chunk):
                for start in range(0, len(chunk), self.batch_size):
                    yield [(shard, p) for p in chunk[start : start + self.batch_size]]


def collate(items: list[tuple[int, str, Tensor | None, str | None]]):
    """-> (shard, paths, errors, images): images stacked (n_ok, 3, H, W), or a list of encoded
    byte tensors in device-decoding mode."""
    images = [image for _, _, image, _ in items if image is not None]
    if images and images[0].dim() == 3:
        images = torch.stack(images)
    return items[0][0], [p for _, p, _, _ in items], [e for _, _, _, e in items], images


class DeviceDecoder:
    """A batch's file bytes (``blobs``: one per row whose error is None, in order) ->
    ((n, 3, crop, crop) preprocessed images on ``device``, every row's error). JPEGs are decoded
    in one ``torchvision.io.decode_jpeg`` call on ``device`` and resized and cropped there; a file
    that decoder refuses (another format, a corrupt file) or with other channels than the model's
    is decoded from its bytes on the CPU (which converts or refuses it as for any file, naming
    its path), or gets its error. The pixels differ slightly from the CPU path's (another
    decoder, a tensor resize)."""

    def __init__(self, pre: Preprocessing, device: torch.device | str) -> None:
        from torchvision.io import ImageReadMode

        self.preprocess, self.decode = pre.tensor_transform(), Decoder(pre, exact=True)
        self.mode = ImageReadMode.RGB if pre.channels == 3 else ImageReadMode.UNCHANGED
        self.channels, self.device = pre.channels, device

    def __call__(
        self, blobs: list[Tensor], paths: list[str], errors: list[str | None]
    ) -> tuple[Tensor | None, list[str | None]]:
        rows = [row for row, error in enumerate(errors) if error is None]
        jpegs = [k for k, blob in enumerate(blobs) if bytes(blob[:3].tolist()) == JPEG_MAGIC]
        decoded = dict(zip(jpegs, self._on_device([blobs[k] for k in jpegs])))
        errors, good = list(errors), []
        for k, row in enumerate(rows):
            if decoded.get(k) is not None and len(decoded[k]) == self.channels:
                good.append(self.preprocess(decoded[k]))
                continue
            image, errors[row] = self.decode(blobs[k].numpy().tobytes(), name=paths[row])
            if image is not None:
                good.append(image.to(self.device))
        return (torch.stack(good) if good else None), errors

    def _on_device(self, blobs: list[Tensor]) -> list[Tensor | None]:
        """``blobs`` decoded on the device; one bad file fails them all, so then one by one,
        None for each that fails."""
        from torchvision.io import decode_jpeg

        try:
            return decode_jpeg(blobs, mode=self.mode, device=self.device) if blobs else []
        except RuntimeError:
            if len(blobs) == 1:
                return [None]
            return [image for blob in blobs for image in self._on_device([blob])]

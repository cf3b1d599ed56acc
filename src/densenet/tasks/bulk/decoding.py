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

    def __call__(self, source: str | bytes) -> tuple[Tensor | None, str | None]:
        try:
            return self.transform(open_image(source, shorter_side=self.shorter_side)), None
        except ImageError as error:
            return None, str(error)
        except (OSError, ValueError) as error:  # a decoded image the transform cannot convert
            return None, f"{source if isinstance(source, str) else 'image'}: {error}"


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


def decode_on_device(
    blobs: list[Tensor], paths: list[str], errors: list[str | None], pre: Preprocessing, device
) -> tuple[Tensor | None, list[str | None]]:
    """A batch's file bytes (``blobs``: one per row whose error is None, in order) ->
    ((n, 3, crop, crop) preprocessed images on ``device``, every row's error). JPEGs are decoded
    in one ``torchvision.io.decode_jpeg`` call on ``device`` and resized and cropped there; a file
    that decoder refuses (another format, a corrupt file) or with other channels than the model's
    is decoded on the CPU (which converts or refuses it as for any file), or gets its error.
    The pixels differ slightly from the CPU path's (another decoder, a tensor resize)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def on_device(blob_list: list[Tensor]) -> list[Tensor | None]:
        try:
            return decode_jpeg(blob_list, mode=mode, device=device) if blob_list else []
        except RuntimeError:  # one bad file fails them all: decode one by one
            if len(blob_list) == 1:
                return [None]
            return [image for blob in blob_list for image in on_device([blob])]

    preprocess = pre.tensor_transform()
    mode = ImageReadMode.RGB if pre.channels == 3 else ImageReadMode.UNCHANGED
    decode = Decoder(pre, exact=True)
    rows = [row for row, error in enumerate(errors) if error is None]
    jpegs = [k for k, blob in enumerate(blobs) if bytes(blob[:3].tolist()) == JPEG_MAGIC]
    decoded = dict(zip(jpegs, on_device([blobs[k] for k in jpegs])))
    errors, good = list(errors), []
    for k, row in enumerate(rows):
        if decoded.get(k) is not None and len(decoded[k]) == pre.channels:
            good.append(preprocess(decoded[k]))
            continue
        image, errors[row] = decode(paths[row])
        if image is not None:
            good.append(image.to(device))
    return (torch.stack(good) if good else None), errors

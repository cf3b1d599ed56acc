"""Tests for densenet.data.datasets and the training transforms: folders, named datasets, the batch
sampler's sharding and resume, per-sample seeded augmentation, unreadable images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densenet.data.datasets import (
    DataError,
    ImageFolderData,
    ModelInput,
    ShardedBatchSampler,
    TransformedDataset,
    collate,
    eval_dataset,
    load_splits,
    named_dataset,
    shard_indices,
)
from densenet.data.transforms import Lighting, eval_transform, train_transform, views_transform


def digits_folder(root: Path, n: int = 1797, size: int = 16, val_fraction: float = 0.25) -> Path:
    """scikit-learn's 8x8 handwritten digits as PNGs (upsampled to ``size``) in ``root/train``
    and ``root/val``, one sub-folder per digit; the last ``val_fraction`` is held out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:n] * (255 / 16)).astype(np.uint8)
    split = round(len(images) * (1 - val_fraction))
    for i, (image, label) in enumerate(zip(images, digits.target[:n])):
        folder = root / ("train" if i < split else "val") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").resize((size, size), Image.NEAREST).save(folder / f"{i}.png")
    return root


def fake_cifar10(root: Path, per_batch: int = 8, test: int = 16) -> Path:
    """A CIFAR-10 copy in torchvision's format (5 training batches and a test batch of random
    32x32 images) under ``root``; torchvision's checksum test must be patched to accept it."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        batch = {
            "data": rng.integers(0, 255, (n, 3072), np.uint8),
            "labels": [i % 10 for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": [f"c{i}" for i in range(10)]})
    )
    return root


@pytest.fixture
def cifar_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)
    return fake_cifar10(tmp_path / "data")


def test_named_dataset_splits_and_holdout(cifar_root):
    splits = load_splits("cifar10", cifar_root)
    assert (len(splits.train), len(splits.val), splits.test) == (40, 16, None)
    assert splits.classes == [f"c{i}" for i in range(10)] and splits.mean[0] == pytest.approx(
        0.4914
    )
    held = load_splits("cifar10", cifar_root, holdout=8, seed=1)
    assert (len(held.train), len(held.val), len(held.test)) == (32, 8, 16)
    assert sorted(held.train.indices + held.val.indices) == list(range(40))
    assert held.val.indices == load_splits("cifar10", cifar_root, holdout=8, seed=1).val.indices
    with pytest.raises(DataError, match="holdout 40 must be between 1 and 39"):
        load_splits("cifar10", cifar_root, holdout=40)


def test_folder_classes_in_sorted_order_and_unreadable_images_skipped(tmp_path, caplog):
    for name in ("n02", "n01"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), "red").save(tmp_path / name / "a.png")
    (tmp_path / "n02" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "n02" / "vector.jpg").write_text(
        "%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
    )
    data = ImageFolderData(tmp_path)
    assert data.classes == ["n01", "n02"]
    items = [data[i] for i in range(len(data))]
    assert sum(item is None for item in items) == 2
    assert "vector.jpg: not an image" in caplog.text  # refused by format, Ghostscript never run
    images, labels, skipped = collate(
        [TransformedDataset(data, train_transform("none", 8))[i] for i in range(len(data))]
    )
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [0, 1] and skipped == 2


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        ImageFolderData(tmp_path / "missing")
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderData(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no images"):
        ImageFolderData(tmp_path)


def test_a_folder_is_checked_against_what_the_model_takes(tmp_path):
    """Every file's kind, and a volume's channels from its header; a damaged volume is left to
    be skipped when read, and the channels found carry over to the next folder."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "1.npy", np.zeros((4, 4, 4), np.float32))
    (tmp_path / "a" / "0.npy").write_bytes(b"damaged")
    folder = ImageFolderData(tmp_path, ModelInput(volumes=True))
    assert folder.takes == ModelInput(True, 1, channels_of=str(tmp_path / "a" / "1.npy"))
    assert folder[0] is None and folder[1][0].shape == (1, 4, 4, 4)
    with pytest.raises(DataError, match="a/0.npy is a volume; the model takes images"):
        ImageFolderData(tmp_path, ModelInput())
    np.save(tmp_path / "b" / "1.npy", np.zeros((3, 4, 4, 4), np.float32))
    with pytest.raises(DataError, match=r"b/1.npy has 3 channel\(s\); the model takes 1 \(those"):
        ImageFolderData(tmp_path, ModelInput(volumes=True))
    three = [tmp_path / "b" / "1.npy"]
    with pytest.raises(DataError, match=r"b/1.npy has 3 channel\(s\); the model takes 1$"):
        ModelInput(volumes=True, channels=1).check(three)
    assert ModelInput(volumes=True).check(three).channels == 3
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "2.png")
    with pytest.raises(DataError, match="b/2.png is an image; the model takes volumes"):
        ModelInput(volumes=True, channels=3).check([*three, tmp_path / "b" / "2.png"])


def test_train_and_val_classes_must_match(tmp_path):
    for split, classes in (("train", ("cat", "dog")), ("val", ("cat", "fox"))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "x.png")
    with pytest.raises(DataError, match=r"only in .*train: dog; only in .*val: fox"):
        load_splits(str(tmp_path))
    with pytest.raises(DataError, match="no train/ and no val/"):
        load_splits(str(tmp_path / "train"))
    # eval takes a folder's val/ when it has train/ and val/
    _, classes = eval_dataset(str(tmp_path))
    assert classes == ["cat", "fox"]


def test_named_dataset_missing_names_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match=f"CIFAR-10 is not in {tmp_path}.*cifar-10-batches-py"):
        named_dataset("cifar10", "train", root=tmp_path, download=False)
    with pytest.raises(DataError, match="unknown dataset"):
        named_dataset("mnist", "train", root=tmp_path)


def test_sampler_shards_global_batches_like_accumulation():
    """Two processes see exactly the micro-batches that one process with accumulate=2 sees."""
    single = ShardedBatchSampler(40, 8, seed=3, accumulate=2)
    ranks = [ShardedBatchSampler(40, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        micro = list(single)
        per_rank = [list(r) for r in ranks]
        assert len(micro) == 10 and all(len(b) == 4 for b in micro)
        assert micro[0::2] == per_rank[0] and micro[1::2] == per_rank[1]
        flat = [i for batch in micro for _, i in batch]
        assert sorted(flat) == list(range(40))  # a permutation: every image once per epoch
        assert all(e == epoch for batch in micro for e, _ in batch)
    first, second = ([i for b in list(_epoch(single, e)) for _, i in b] for e in (0, 1))
    assert first != second  # reshuffled each epoch


def _epoch(sampler, epoch, start_step=0):
    sampler.set_epoch(epoch, start_step)
    return iter(sampler)


def test_sampler_resumes_mid_epoch_and_checks_sizes():
    sampler = ShardedBatchSampler(50, 10, seed=1)
    assert sampler.steps_per_epoch == 5  # the incomplete last batch is dropped
    full = list(_epoch(sampler, 2))
    assert list(_epoch(sampler, 2, start_step=3)) == full[3:]
    assert len(sampler) == 2
    with pytest.raises(DataError, match="does not split into 3"):
        ShardedBatchSampler(50, 10, world_size=3)
    with pytest.raises(DataError, match="fewer than one batch"):
        ShardedBatchSampler(5, 10)


def test_shard_indices_cover_everything_once():
    shards = [list(shard_indices(11, r, 3)) for r in range(3)]
    assert sum(shards, []) == list(range(11))


def test_augmentation_is_seeded_per_sample_and_leaves_global_rng_alone():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8))
    base = [(image, 0)] * 4
    data = TransformedDataset(base, train_transform("crop-flip", 32), seed=7)
    state = torch.get_rng_state()
    a, b = data[(0, 1)][0], data[(0, 1)][0]
    assert torch.equal(a, b)  # same (epoch, index): same augmentation
    assert torch.equal(torch.get_rng_state(), state)
    others = [data[(e, i)][0] for e, i in ((0, 2), (1, 1), (0, 3), (2, 1))]
    assert any(not torch.equal(a, other) for other in others)


def test_train_transforms_shapes_and_normalisation():
    image = Image.new("RGB", (40, 30), (128, 64, 32))
    for augment in ("none", "crop-flip", "imagenet"):
        assert train_transform(augment, 24)(image).shape == (3, 24, 24)
    x = train_transform("none", 8, mean=(0.5, 0.25, 0.125), std=(1.0, 1.0, 1.0))(image)
    assert torch.allclose(
        x[:, 0, 0], torch.tensor([128 / 255 - 0.5, 64 / 255 - 0.25, 32 / 255 - 0.125])
    )
    with pytest.raises(ValueError, match="augment must be one of"):
        train_transform("mixup")
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 255, (36, 40, 3), np.uint8))
    crops = views_transform("ten-crop", 36, 32)(noise)
    assert crops.shape == (10, 3, 32, 32)
    assert not torch.allclose(crops[0], crops[1])  # corners differ
    assert torch.allclose(crops[1].flip(-1), crops[5])  # the mirrors: top-right <-> top-left
    assert torch.allclose(crops[4].flip(-1), crops[9])  # center
    assert torch.equal(views_transform("five-crop", 36, 32)(noise), crops[:5])
    flipped = views_transform("hflip", 36, 32)(noise)
    assert torch.equal(flipped[0], eval_transform(36, 32)(noise))
    assert torch.equal(flipped[1], flipped[0].flip(-1))
    with pytest.raises(ValueError, match="views must be one of hflip, five-crop, ten-crop"):
        views_transform("twenty-crop")


def test_lighting_adds_one_colour_offset_per_image():
    torch.manual_seed(0)
    image = torch.rand(3, 5, 5)
    shifted = Lighting(0.1)(image)
    offset = shifted - image
    assert not torch.allclose(offset, torch.zeros_like(offset))
    assert torch.allclose(offset, offset[:, :1, :1].expand_as(offset))
    assert torch.equal(Lighting(0.0)(image), image)

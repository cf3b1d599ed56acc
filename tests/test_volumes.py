"""densenet.data.volumes: NIfTI and .npy volumes read with per-file errors, resampled and normalised,
class folders of volumes, and class activation maps written back aligned with their volume."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import densenet
from densenet import ModelCard
from densenet.cli import main
from densenet.data.datasets import (
    DataError,
    ImageFolderData,
    ModelInput,
    TransformedDataset,
    eval_dataset,
)
from densenet.data.images import ImageError, Reason
from densenet.data.volumes import VolumeAugment, VolumeTransform, read_volume, write_map
from densenet.infer.cam import explain
from densenet.infer.runner import Runner
from densenet.tasks.export import export
from densenet.weights.checkpoint import TrainCheckpoint, read_checkpoint, save_checkpoint

nibabel = pytest.importorskip("nibabel")
from nibabel.testing import data_path  # noqa: E402 (after the skip)

ANATOMICAL = f"{data_path}/anatomical.nii"  # 3D, with a non-trivial affine
EXAMPLE_4D = f"{data_path}/example4d.nii.gz"  # 4D: the fourth axis is the channels


def test_nifti_files_keep_their_voxels_and_affine():
    reference = nibabel.load(ANATOMICAL)
    volume = read_volume(ANATOMICAL)
    assert volume.data.shape == (1, *reference.shape) and volume.data.dtype == torch.float32
    np.testing.assert_array_equal(volume.data[0].numpy(), reference.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(volume.affine, reference.affine)
    four = nibabel.load(EXAMPLE_4D)
    data = read_volume(EXAMPLE_4D).data
    assert data.shape == (four.shape[3], *four.shape[:3])
    np.testing.assert_array_equal(data[1].numpy(), four.get_fdata(dtype=np.float32)[..., 1])


def test_npy_volumes_are_channels_first(tmp_path):
    array = np.arange(2 * 3 * 4 * 5, dtype=np.int16).reshape(2, 3, 4, 5)
    np.save(tmp_path / "four.npy", array)
    np.save(tmp_path / "three.npy", array[0])
    assert torch.equal(read_volume(tmp_path / "four.npy").data, torch.from_numpy(array).float())
    three = read_volume(tmp_path / "three.npy", channels=1)
    assert three.data.shape == (1, 3, 4, 5) and three.affine is None


def test_broken_volumes_get_one_line_errors_with_a_reason(tmp_path):
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "garbage.nii.gz").write_bytes(b"not a volume at all")
    (tmp_path / "notes.txt").write_text("text")
    np.save(tmp_path / "flat.npy", np.zeros((4, 4)))
    np.save(tmp_path / "nan.npy", np.full((2, 2, 2), np.nan))
    np.save(tmp_path / "text.npy", np.array([[["a"]]]))
    np.save(tmp_path / "two.npy", np.zeros((2, 3, 3, 3)))
    expected = {
        "missing.npy": Reason.MISSING, "empty.npy": Reason.EMPTY,
        "garbage.nii.gz": Reason.CORRUPT, "notes.txt": Reason.NOT_AN_IMAGE,
        "flat.npy": Reason.BAD_SHAPE, "nan.npy": Reason.CORRUPT, "text.npy": Reason.CORRUPT,
        "two.npy": Reason.BAD_SHAPE,
    }  # fmt: skip
    for name, reason in expected.items():
        with pytest.raises(ImageError) as raised:
            read_volume(tmp_path / name, channels=1)
        assert raised.value.reason == reason, name
        assert str(raised.value).startswith(str(tmp_path / name)) and "\n" not in str(raised.value)


def test_volume_bombs_are_refused_from_their_header(tmp_path, monkeypatch):
    """A header declaring more voxels than its file holds, a highly compressible volume over a
    (here lowered) size, and one larger than the memory available are refused before their
    voxels are read; a volume of noise of the same size is read."""
    monkeypatch.setattr(densenet.data.volumes, "MIN_SUSPECT_BYTES", 2**16)
    header = nibabel.Nifti1Header()
    header.set_data_shape((64, 64, 64))
    header.set_data_dtype(np.uint8)
    (tmp_path / "claims.nii.gz").write_bytes(gzip.compress(header.binaryblock + bytes(4)))
    (tmp_path / "claims.nii").write_bytes(header.binaryblock + bytes(4))
    ones = np.ones((40, 40, 40), np.uint8)
    nibabel.save(nibabel.Nifti1Image(ones, np.eye(4)), tmp_path / "ones.nii.gz")
    noise = np.random.default_rng(0).normal(size=(40, 40, 40)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(noise, np.eye(4)), tmp_path / "noise.nii.gz")
    for name, expected in [("claims.nii.gz", "would expand"), ("ones.nii.gz", "would expand"),
                           ("claims.nii", "header declares")]:  # fmt: skip
        with pytest.raises(ImageError, match=expected) as raised:
            read_volume(tmp_path / name)
        assert str(raised.value).startswith(str(tmp_path / name)) and "\n" not in str(raised.value)
    assert read_volume(tmp_path / "noise.nii.gz").data.shape == (1, 40, 40, 40)
    monkeypatch.setattr(densenet.data.volumes, "available_memory", lambda: 100_000)
    with pytest.raises(ImageError, match="of memory available") as raised:
        read_volume(tmp_path / "noise.nii.gz")
    assert raised.value.reason == Reason.TOO_MANY_PIXELS


def test_transform_windows_resamples_and_z_scores():
    ct = torch.linspace(-2000, 2000, 8 * 8 * 8).view(1, 8, 8, 8)
    windowed = VolumeTransform((4, 6, 6), window=(-1000.0, 400.0))(ct)
    assert windowed.shape == (1, 4, 6, 6)
    assert windowed.min() == 0 and windowed.max() == 1  # clipped to the window, scaled to [0, 1]
    scored = VolumeTransform((5, 5, 5))(torch.rand(2, 9, 7, 3) * 50 + 10)
    assert scored.shape == (2, 5, 5, 5)
    torch.testing.assert_close(scored.mean((1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(scored.std((1, 2, 3)), torch.ones(2), atol=1e-5, rtol=0)
    assert torch.equal(
        VolumeTransform((2, 2, 2))(torch.full((1, 3, 3, 3), 7.0)), torch.zeros(1, 2, 2, 2)
    )
    with pytest.raises(ValueError, match="low < high"):
        VolumeTransform((2, 2, 2), window=(400.0, -1000.0))


def test_class_folders_of_volumes(tmp_path):
    for label, name in enumerate(["lesion", "normal"]):
        (tmp_path / name).mkdir()
        for i in range(2):
            np.save(tmp_path / name / f"{i}.npy", np.full((6, 6, 6), label * 10.0 + i))
    (tmp_path / "normal" / "readme.txt").write_text("not a volume")
    folder = ImageFolderData(tmp_path)
    dataset = TransformedDataset(folder, VolumeTransform((4, 4, 4), window=(0.0, 20.0)))
    assert folder.classes == ["lesion", "normal"] and len(dataset) == 4
    x, label = dataset[3]
    assert x.shape == (1, 4, 4, 4) and label == 1 and torch.allclose(x, torch.tensor(11 / 20))


def test_class_activation_map_of_a_3d_model_is_written_aligned_with_the_nifti(tmp_path):
    torch.manual_seed(0)
    model = densenet.DenseNet(
        growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=2,
        in_channels=1, spatial_dims=3,
    ).eval()  # fmt: skip
    x = VolumeTransform((32, 32, 32))(read_volume(ANATOMICAL).data)[None]
    maps = explain(model, x)
    with torch.no_grad():
        torch.testing.assert_close(maps.logits, model(x), rtol=1e-4, atol=1e-5)
    assert maps.maps.shape == (1, 2, 4, 4, 4)
    out = write_map(maps.maps[0, 1], ANATOMICAL, tmp_path / "cam.nii.gz")
    written, source = nibabel.load(out), nibabel.load(ANATOMICAL)
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)
    constant = write_map(torch.full((4, 4, 4), 3.0), ANATOMICAL, tmp_path / "constant.nii")
    np.testing.assert_allclose(nibabel.load(constant).get_fdata(), 3.0, rtol=1e-6)
    np.save(tmp_path / "two.npy", np.zeros((2, 5, 6, 7), dtype=np.float32))  # (C, D, H, W)
    on_npy = nibabel.load(write_map(maps.maps[0, 0], tmp_path / "two.npy", tmp_path / "n.nii"))
    assert on_npy.shape == (5, 6, 7)
    np.testing.assert_array_equal(on_npy.affine, np.eye(4))


def test_volumes_are_scored_and_run_as_volumes_not_as_views():
    """A 5D batch is volumes for a 3D model (views of images only for a 2D one): accuracy and the
    Runner average over views only when there are some."""
    torch.manual_seed(0)
    model = densenet.DenseNet(
        growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3,
        in_channels=1, spatial_dims=3,
    ).eval()  # fmt: skip
    volumes, labels = torch.randn(4, 1, 16, 16, 16), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        expected = model(volumes).softmax(1)
    result = densenet.evaluate(model, [(volumes, labels)])
    assert result.images == 4
    nll = -expected[torch.arange(4), labels].log().mean().item()
    assert result.loss == pytest.approx(nll, rel=1e-5)
    runner = Runner(densenet.load(model), torch.device("cpu"))
    torch.testing.assert_close(runner.probabilities(volumes), expected, rtol=1e-4, atol=1e-6)
    views = torch.stack([volumes, volumes.flip(-1)], 1)  # (N, V, C, D, H, W)
    with torch.no_grad():
        mirrored = model(volumes.flip(-1)).softmax(1)
    torch.testing.assert_close(
        runner.probabilities(views), (expected + mirrored) / 2, rtol=1e-4, atol=1e-6
    )


def digit_volumes(root: Path, n: int = 1797, depth: int = 8, val_fraction: float = 0.25) -> Path:
    """scikit-learn's 8x8 handwritten digits as (depth, 8, 8) volumes in ``root/train`` and
    ``root/val``, one sub-folder per digit: each image times a Gaussian depth profile of random
    centre and width, plus unit noise, so the class is decided by the image alone. Training
    volumes are ``.npy``, held-out ones NIfTI (``.nii.gz``) with 2 mm voxels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    z = np.arange(depth)[:, None, None]
    split = round(n * (1 - val_fraction))
    for i, (image, label) in enumerate(zip(digits.images[:n], digits.target[:n])):
        centre, width = rng.uniform(2, depth - 3), rng.uniform(1, 3)
        profile = np.exp(-0.5 * ((z - centre) / width) ** 2)
        volume = (image[None] * profile + rng.normal(0, 1, (depth, 8, 8))).astype(np.float32)
        folder = root / ("train" if i < split else "val") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        if i < split:
            np.save(folder / f"{i}.npy", volume)
        else:
            nibabel.save(nibabel.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])),
                         folder / f"{i}.nii.gz")  # fmt: skip
    return root


SMALL_3D = '{"growth_rate": 8, "block_config": [2, 2, 2], "num_init_features": 16}'


@pytest.mark.slow
def test_a_3d_model_learns_digit_volumes_through_the_cli(tmp_path, capsys):
    """train, eval and predict --cam on volumes: a 3D DenseNet-BC learns digit volumes (>= 90%
    held out, chance 10%), eval reads its checkpoint's volume card, and the activation maps are
    written as NIfTI aligned with each volume and as a picture of three slices."""
    data = digit_volumes(tmp_path / "digits")
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fastest on 2 shared cores for so small a model
    try:
        assert main(["train", "--recipe", "cifar10", "--data", str(data), "--volume-size",
                     "8,8,8", "--epochs", "6", "--batch-size", "32", "--drop-rate", "0",
                     "--workers", "0", "--set", f"model_args={SMALL_3D}", "--out", str(out),
                     "--no-progress", "--json"]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    summary = json.loads(capsys.readouterr().out)
    assert summary["best_val_top1"] >= 90.0, summary
    card = read_checkpoint(out / "best.pth").card
    assert card.volume == VolumeTransform((8, 8, 8)) and card.in_channels == 1
    assert main(["eval", str(data), "--weights", str(out / "best.pth"), "--workers", "0",
                 "--json", "--no-progress"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 449 and result["top1"] == pytest.approx(summary["best_val_top1"])
    held_out = sorted((data / "val" / "3").glob("*.nii.gz"))[:2]
    cams = tmp_path / "cams"
    assert main(["predict", *map(str, held_out), ANATOMICAL, "--weights", str(out / "best.pth"),
                 "--cam", str(cams), "--json"]) == 0  # fmt: skip
    answers = json.loads(capsys.readouterr().out)
    assert [a["top"][0]["label"] for a in answers[:2]] == ["3", "3"]
    for answer, source in zip(answers, [*held_out, ANATOMICAL]):
        written, volume = nibabel.load(answer["cam"]), nibabel.load(source)
        assert written.shape == volume.shape[:3]
        np.testing.assert_array_equal(written.affine, volume.affine)
        assert Image.open(answer["cam_slices"]).size[1] == 192
    assert answers[0]["cam"] == str(cams / f"{held_out[0].name[:-7]}.cam.nii.gz")


def test_volume_runs_refuse_the_wrong_data_in_one_line(tmp_path, capsys):
    """Volumes without --volume-size, images with it, a folder mixing both, a window alone,
    another channel count, one 2-channel volume among 1-channel ones: each one line naming the
    file, before training; ``--window -1000,400`` is read as a value."""
    volumes, images, mixed = tmp_path / "volumes", tmp_path / "images", tmp_path / "mixed"
    for split in ("train", "val"):
        for label in ("a", "b"):
            for folder in (volumes, images, mixed):
                (folder / split / label).mkdir(parents=True)
            np.save(volumes / split / label / "0.npy", np.zeros((2, 4, 4, 4), np.float32))
            Image.new("L", (8, 8)).save(images / split / label / "0.png")
            Image.new("L", (8, 8)).save(mixed / split / label / "0.png")
            np.save(mixed / split / label / "1.npy", np.zeros((4, 4, 4), np.float32))
    np.save(volumes / "val" / "b" / "1.npy", np.zeros((4, 4, 4), np.float32))
    rows = ["file,x,y,split", *(f"{p.relative_to(mixed)},{i % 2},{i // 2 % 2},{p.parts[-3]}"
                                for i, p in enumerate(sorted(mixed.glob("*/*/*"))))]  # fmt: skip
    (mixed / "labels.csv").write_text("\n".join(rows) + "\n")
    base = ["train", "--recipe", "cifar10", "--workers", "0", "--out", str(tmp_path / "r")]
    cases = {
        "volumes/train/a/0.npy is a volume; a run without --volume-size (a 2D model) takes "
        "images": ["--data", str(volumes)],
        "images/train/a/0.png is an image; a run with --volume-size (a 3D model) takes volumes": [
            "--data", str(images), "--volume-size", "4,4,4",
        ],
        "mixed/train/a/1.npy is a volume": ["--data", str(mixed)],
        "mixed/train/a/0.png is an image": ["--data", str(mixed), "--volume-size", "4,4,4"],
        "mixed/train/a/1.npy is a volume; a run without": [
            "--data", str(mixed), "--labels", str(mixed / "labels.csv"),
        ],
        "window applies to volumes": ["--data", str(images), "--window", "-1000,400"],
        "0.npy has 2 channel(s); a run with --volume-size and --in-channels 1 (a 3D model) "
        "takes 1": [
            "--data", str(volumes), "--volume-size", "4,4,4", "--window", "-1000,400",
            "--in-channels", "1",
        ],
        "val/b/1.npy has 1 channel(s); a run with --volume-size (a 3D model) takes 2 (those of "
        f"{volumes / 'train' / 'a' / '0.npy'})": ["--data", str(volumes), "--volume-size", "4,4,4"],
        "three positive lengths": ["--data", str(volumes), "--volume-size", "4,4"],
    }  # fmt: skip
    for message, argv in cases.items():
        assert main(base + argv) == 2, message
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
    assert not (tmp_path / "r").exists()


def test_eval_and_calibrate_refuse_data_of_the_wrong_kind_when_they_open_it(tmp_path, capsys):
    """Volumes to an image model, images to a volume model, a folder mixing both, one 2-channel
    volume among 1-channel ones: eval and calibrate answer one line naming the file and what
    the model takes, before any work (nothing written)."""
    small = {"growth_rate": 4, "block_config": (2, 2), "num_init_features": 8, "bn_size": 2}
    for name, extra in (("rgb", {}), ("ct", {"spatial_dims": 3, "in_channels": 1})):
        args = {"num_classes": 2, **small, **extra}
        model = densenet.get_model("densenet_bc_100_k12", **args)
        card = ModelCard.for_model(model, ("a", "b")).replace(arch="densenet_bc_100_k12")
        if extra:
            card = card.replace(volume=VolumeTransform((8, 8, 8)))
        save_checkpoint(TrainCheckpoint(card, model.state_dict(), args), tmp_path / f"{name}.pth")
    files = {
        "volumes": {"a": (1, 4, 4, 4), "b": (4, 4, 4)}, "images": {"a": "png", "b": "png"},
        "mixed": {"a": "png", "b": (4, 4, 4)}, "channels": {"a": (4, 4, 4), "b": (2, 4, 4, 4)},
    }  # fmt: skip
    for folder, labels in files.items():
        for label, shape in labels.items():
            (tmp_path / folder / label).mkdir(parents=True)
            if shape == "png":
                Image.new("RGB", (8, 8)).save(tmp_path / folder / label / "0.png")
            else:
                np.save(tmp_path / folder / label / "0.npy", np.zeros(shape, np.float32))
    cases = [
        ("rgb", "volumes", "volumes/a/0.npy is a volume; the model takes images"),
        ("ct", "images", "images/a/0.png is an image; the model takes volumes"),
        ("rgb", "mixed", "mixed/b/0.npy is a volume; the model takes images"),
        ("ct", "mixed", "mixed/a/0.png is an image; the model takes volumes"),
        ("ct", "channels", "channels/b/0.npy has 2 channel(s); the model takes 1"),
    ]
    common = ["--workers", "0", "--no-progress"]
    for weights, folder, message in cases:
        model, data = str(tmp_path / f"{weights}.pth"), str(tmp_path / folder)
        for argv in (["eval", data, "--weights", model], ["calibrate", model, data]):
            assert main(argv + common) == 2, (argv, message)
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and message in err, err
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["ct.pth", "rgb.pth"]
    with pytest.raises(DataError, match="cifar10 holds images; the model takes volumes"):
        eval_dataset("cifar10", tmp_path, takes=ModelInput.of(card))


def test_volume_cards_round_trip_and_predict_refuses_images(tmp_path):
    model = densenet.DenseNet(
        growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=2,
        in_channels=1, spatial_dims=3,
    ).eval()  # fmt: skip
    card = ModelCard.for_model(model, ("no", "yes")).replace(
        volume=VolumeTransform((16, 16, 16), window=(-1000.0, 400.0))
    )
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card
    assert card.input_shape == (1, 16, 16, 16)
    assert ModelCard.for_model(model).volume == VolumeTransform((96, 96, 96))
    np.save(tmp_path / "scan.npy", np.random.default_rng(0).normal(size=(12, 12, 12)))
    Image.new("L", (16, 16)).save(tmp_path / "photo.png")
    classifier = densenet.Classifier(model, device="cpu", categories=("no", "yes"))
    scan, photo, picture = classifier.classify(
        [str(tmp_path / "scan.npy"), str(tmp_path / "photo.png"), Image.new("L", (16, 16))]
    )
    assert scan.error is None and sorted(scan.labels) == ["no", "yes"]
    assert photo.reason == Reason.NOT_AN_IMAGE and "not a volume" in photo.error, photo
    assert picture.reason == Reason.NOT_AN_IMAGE and "takes volumes" in picture.error, picture
    with torch.no_grad():
        x = VolumeTransform((96, 96, 96))(read_volume(tmp_path / "scan.npy").data)
        expected = model(x[None]).softmax(1)[0]
    assert scan.probabilities == pytest.approx(sorted(expected.tolist(), reverse=True), abs=1e-5)
    with pytest.raises(ValueError, match="this model takes volumes"):
        densenet.Classifier(model, device="cpu", tta="hflip")
    # an exported volume model keeps its card: the same answer from the ONNX file
    exported = export(model, tmp_path / "m.onnx", "onnx", card=classifier.card)
    (again,) = densenet.Classifier(exported, device="cpu").classify(str(tmp_path / "scan.npy"))
    assert again.labels == scan.labels
    assert again.probabilities == pytest.approx(scan.probabilities, abs=1e-5)


def test_augmented_volumes_shift_and_flip_within_bounds():
    x = torch.arange(8 * 8 * 8, dtype=torch.float32).view(1, 8, 8, 8)
    torch.manual_seed(0)
    seen = [VolumeAugment()(x) for _ in range(20)]
    assert all(v.shape == x.shape for v in seen)
    assert any(not torch.equal(v, x) for v in seen)
    # a shift of at most one voxel (1/8 of 8) along each axis, then maybe a mirror along W
    for v in seen:
        inner = v[0, 1:-1, 1:-1, 1:-1]
        candidates = [
            x[0, 1 + a : 7 + a, 1 + b : 7 + b, 1 + c : 7 + c]
            for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)
        ]  # fmt: skip
        assert any(torch.equal(inner, t) or torch.equal(inner, t.flip(-1)) for t in candidates)
    assert torch.equal(VolumeAugment(shift=0, flip=False)(x), x)


def test_a_labels_csv_of_volumes_trains_a_multi_label_3d_model(tmp_path, capsys):
    """A labels CSV may name volumes: multi-label training, evaluation and prediction run on
    them (one epoch of a tiny model: the path, not the accuracy), an unreadable one skipped."""
    rng = np.random.default_rng(0)
    rows = ["file,bright,striped,split"]
    for i in range(16):
        bright, striped = i % 2, (i // 2) % 2
        volume = rng.normal(size=(6, 6, 6)) + 3 * bright
        volume[:, ::2] += 2 * striped
        np.save(tmp_path / f"{i}.npy", volume.astype(np.float32))
        rows.append(f"{i}.npy,{bright},{striped},{'train' if i < 12 else 'val'}")
    (tmp_path / "99.npy").write_bytes(b"damaged")
    rows.append("99.npy,1,1,train")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--recipe", "cifar10+", "--data", str(tmp_path), "--labels",
                 str(tmp_path / "labels.csv"), "--volume-size", "8,8,8", "--epochs", "1",
                 "--batch-size", "4", "--workers", "0", "--out", str(out), "--no-progress",
                 "--set", 'model_args={"growth_rate": 4, "block_config": [1, 1], '
                 '"num_init_features": 8}', "--json"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert 0 <= summary["best_val_mean_auroc"] <= 1
    card = read_checkpoint(out / "best.pth").card
    assert card.multi_label and card.classes == ("bright", "striped") and card.volume is not None
    assert main(["eval", str(tmp_path), "--weights", str(out / "best.pth"), "--labels",
                 str(tmp_path / "labels.csv"), "--workers", "0", "--json",
                 "--no-progress"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["images"] == 4
    assert main(["predict", str(tmp_path / "0.npy"), "--weights", str(out / "best.pth"),
                 "--json"]) == 0  # fmt: skip
    (answer,) = json.loads(capsys.readouterr().out)
    assert {t["label"] for t in answer["top"]} == {"bright", "striped"} and "positive" in answer

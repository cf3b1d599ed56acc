"""densenet.volumes: NIfTI and .npy volumes read with per-file errors, resampled and normalised,
class folders of volumes, and class activation maps written back aligned with their volume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import densenet
from densenet.explain import explain
from densenet.images import ImageError, Reason
from densenet.runner import Runner
from densenet.volumes import VolumeFolder, VolumeTransform, read_volume, write_map

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
    dataset = VolumeFolder(tmp_path, VolumeTransform((4, 4, 4), window=(0.0, 20.0)), channels=1)
    assert dataset.classes == ["lesion", "normal"] and len(dataset) == 4
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

"""Tests for densenet.evaluate: top-1/top-5 counting, ten-crop averaging, skipped images, the
models and checkpoints ``densenet eval`` accepts, and class matching between model and data."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

import densenet
from densenet import evaluate
from densenet.cli import main
from densenet.weights.checkpoint import TrainCheckpoint, save_checkpoint
from densenet.weights.published import WeightsError

TINY = {"growth_rate": 4, "block_config": [2, 2], "num_init_features": 8}


class Logits(nn.Module):
    """A 'model' whose inputs are already its logits: (N, K, ...) -> (N, K * ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x.flatten(1)


def test_top1_top5_counts_and_skipped_images():
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5, 0],  # label 0: top-1 hit
            [0.0, 9, 8, 7, 6, 5, 4],  # label 5: in the top 5, not top-1
            [0.0, 9, 8, 7, 6, 5, 4],  # label 6: outside the top 5
            [1.0, 0, 0, 0, 0, 0, 0],  # label 0: hit
        ]
    )
    labels = torch.tensor([0, 5, 6, 0])
    loader = [
        (logits[:2], labels[:2], 1),
        (torch.empty(0), torch.empty(0, dtype=torch.long), 3),  # a batch of unreadable images
        (logits[2:], labels[2:]),
    ]
    model = Logits().train()
    result = evaluate(model, loader)
    assert (result.top1, result.top5) == (50.0, 75.0)
    assert (result.top1_error, result.top5_error) == (50.0, 25.0)
    assert (result.images, result.skipped) == (4, 4)
    expected = nn.functional.cross_entropy(logits, labels).item()
    assert result.loss == pytest.approx(expected)
    assert model.training  # mode restored
    assert set(result.to_dict()) >= {"top1_error", "top5_error", "images_per_second"}


def test_ten_crop_averages_softmax_over_crops():
    # crop 0 says class 0 weakly, crops 1 and 2 say class 1 strongly: the average says 1
    crops = torch.tensor([[[2.0, 0.0], [0.0, 5.0], [0.0, 5.0]]])  # (N=1, crops=3, K=2)
    result = evaluate(
        Logits(), [(crops[..., None, None], torch.tensor([1]))]
    )  # (N, crops, C, H, W)
    assert result.top1 == 100.0 and result.images == 1
    probs = crops[0].softmax(dim=1).mean(dim=0)
    assert result.loss == pytest.approx(-probs[1].log().item())


def _folder(root, classes, per_class=2, size=12):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (40 * i, 90, 200)).save(root / c / f"{i}.png")
    return root


def _checkpoint(path, classes):
    """A training checkpoint of a tiny densenet_bc_100_k12 with 12x12 preprocessing."""
    model = densenet.get_model("densenet_bc_100_k12", num_classes=len(classes), **TINY)
    pre = densenet.Preprocessing(12, 12, mean=(0.5,) * 3, std=(0.25,) * 3)
    card = densenet.ModelCard(tuple(classes), pre, arch="densenet_bc_100_k12")
    args = {"num_classes": len(classes), **TINY}
    save_checkpoint(TrainCheckpoint(card, model.state_dict(), model_args=args), path)
    return model


def test_eval_cli_uses_the_checkpoints_model_classes_and_transform(tmp_path, capsys):
    model = _checkpoint(tmp_path / "best.pth", ["a", "b", "c"])
    data = _folder(tmp_path / "val", ["a", "c"])  # a subset of the classes, matched by name
    assert main(["eval", str(data), "--weights", str(tmp_path / "best.pth"), "--json",
                 "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "densenet_bc_100_k12" and result["images"] == 4
    # the same numbers by hand: 12x12 images, mean 0.5 std 0.25, labels a -> 0, c -> 2
    from densenet.data.transforms import eval_transform

    transform = eval_transform(12, 12, (0.5,) * 3, (0.25,) * 3)
    images = [(transform(Image.open(p)), 0 if p.parent.name == "a" else 2)
              for p in sorted(data.rglob("*.png"))]  # fmt: skip
    batch = torch.stack([x for x, _ in images])
    labels = torch.tensor([y for _, y in images])
    with torch.no_grad():
        top1 = (model.eval()(batch).argmax(1) == labels).float().mean().item() * 100
    assert result["top1"] == pytest.approx(top1)
    assert main(["eval", str(data), "--weights", str(tmp_path / "best.pth"), "--json",
                 "--workers", "0", "--no-progress", "--ten-crop"]) == 0  # fmt: skip
    ten = json.loads(capsys.readouterr().out)
    assert (ten["crops"], ten["images"]) == (10, 4)
    assert main(["eval", str(data), "--weights", str(tmp_path / "best.pth"), "--json",
                 "--workers", "0", "--no-progress", "--tta", "ten-crop"]) == 0  # fmt: skip
    tta = json.loads(capsys.readouterr().out)
    same = ("top1", "top5", "loss", "ece", "brier", "crops", "tta")
    assert {k: tta[k] for k in same} == {k: ten[k] for k in same}
    assert main(["eval", str(data), "--weights", str(tmp_path / "best.pth"), "--json",
                 "--workers", "0", "--no-progress", "--tta", "hflip"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["crops"] == 2
    assert main(["eval", str(data), "--weights", str(tmp_path / "best.pth"), "--json",
                 "--workers", "0", "--no-progress", "--no-optimize"]) == 0  # fmt: skip
    eager = json.loads(capsys.readouterr().out)
    assert (eager["top1"], eager["top5"]) == (result["top1"], result["top5"])
    assert eager["loss"] == pytest.approx(result["loss"], rel=1e-5)

    with pytest.raises(WeightsError, match="checkpoint of densenet_bc_100_k12, not densenet121"):
        densenet.load("densenet121", weights=str(tmp_path / "best.pth"))
    unknown = _folder(tmp_path / "other", ["a", "zebra"])
    assert main(["eval", str(unknown), "--weights", str(tmp_path / "best.pth"),
                 "--workers", "0", "--no-progress"]) == 2  # fmt: skip
    assert "unknown to the model: zebra" in capsys.readouterr().err


def test_plain_state_dict_and_class_count_check(tmp_path, capsys):
    model = densenet.get_model("densenet_bc_100_k12", num_classes=5, **TINY)
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(WeightsError, match="does not fit"):  # not densenet_bc_100_k12's shapes
        densenet.load("densenet_bc_100_k12", weights=str(tmp_path / "plain.pth"))
    small = densenet.get_model("densenet_bc_100_k12", num_classes=5)
    torch.save(small.state_dict(), tmp_path / "small.pth")
    loaded = densenet.load("densenet_bc_100_k12", weights=str(tmp_path / "small.pth")).module
    assert loaded.num_classes == 5  # from the file's classifier, not a fresh 10-class one
    data = _folder(tmp_path / "val", ["x", "y"], per_class=1, size=32)
    assert main(["eval", str(data), "--model", "densenet_bc_100_k12", "--weights",
                 str(tmp_path / "small.pth"), "--workers", "0", "--no-progress"]) == 2  # fmt: skip
    assert "has 2 classes but the model has 5 outputs" in capsys.readouterr().err


def test_eval_missing_named_dataset_is_a_clear_error(tmp_path, capsys):
    code = main(["eval", "cifar100", "--weights", "none", "--model", "densenet_bc_100_k12",
                 "--data-root", str(tmp_path), "--no-download", "--no-progress"])  # fmt: skip
    assert code == 2
    assert f"CIFAR-100 is not in {tmp_path}" in capsys.readouterr().err


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "class_a").mkdir()
    code = main(["eval", str(tmp_path), "--model", "densenet_bc_100_k12", "--weights", "none",
                 "--no-progress"])  # fmt: skip
    assert code == 2
    assert "holds no images" in capsys.readouterr().err


def test_eval_takes_an_onnx_file_as_load_does(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from densenet.tasks.export import to_onnx

    model = _checkpoint(tmp_path / "best.pth", ["a", "b", "c"])
    card = densenet.load(weights=str(tmp_path / "best.pth")).card
    onnx_path = to_onnx(model.eval(), tmp_path / "model.onnx", card=card)
    data = _folder(tmp_path / "val", ["a", "c"])
    args = ["--json", "--workers", "0", "--no-progress"]
    assert main(["eval", str(data), "--weights", str(tmp_path / "best.pth"), *args]) == 0
    eager = json.loads(capsys.readouterr().out)
    assert main(["eval", str(data), "--model", str(onnx_path), *args]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert (exported["images"], exported["top1"]) == (eager["images"], eager["top1"])
    assert exported["loss"] == pytest.approx(eager["loss"], rel=1e-4)


def test_densenet_evaluate_stays_the_function_once_the_cli_is_imported():
    import densenet.cli  # noqa: F401  (imports the `densenet eval` code)

    assert callable(densenet.evaluate) and densenet.evaluate.__module__ == "densenet.tasks.accuracy"

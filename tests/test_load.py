"""``densenet.load`` of a user's own weights file: the architecture and the number of classes
come from the file (a torchvision state_dict of a fine-tuned densenet169 here)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import randomize_batchnorm

import densenet
from densenet.cli import main


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A torchvision densenet169(num_classes=5) state_dict named as a user names it."""
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.densenet169(num_classes=5)).eval()
    path = tmp_path_factory.mktemp("weights") / "my_finetuned.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_load_reads_the_architecture_and_classes_of_a_torchvision_weights_file(finetuned):
    reference, path = finetuned
    loaded = densenet.load(str(path))
    assert (loaded.card.arch, loaded.module.num_classes) == ("densenet169", 5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), reference(x), rtol=1e-4, atol=1e-5)


def test_predict_takes_the_weights_file_alone(finetuned, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    _, path = finetuned
    assert main(["predict", str(tmp_path / "red.png"), "--weights", str(path), "--json"]) == 0
    assert len(capsys.readouterr().out) > 0


def test_a_builder_keeps_the_head_of_a_weights_file(finetuned):
    reference, path = finetuned
    model = densenet.densenet169(weights=str(path)).eval()
    assert model.num_classes == 5
    torch.testing.assert_close(model.classifier.weight, reference.classifier.weight)

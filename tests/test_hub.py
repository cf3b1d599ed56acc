"""torch.hub entry points from the repository root."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

import densenet

REPO = str(Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("name", densenet.list_models())
def test_every_model_loads_through_torch_hub(name):
    with torch.device("meta"):
        model = torch.hub.load(REPO, name, source="local", trust_repo=True)
        reference = densenet.get_model(name)
    assert isinstance(model, torch.nn.Module) and model.config == reference.config


def test_pretrained_through_torch_hub(publish):
    torch.manual_seed(1)
    state = torchvision.models.densenet121().state_dict()
    publish("densenet121", state)
    model = torch.hub.load(REPO, "densenet121", source="local", pretrained=True)
    assert torch.equal(model.features.norm5.running_var, state["features.norm5.running_var"])
    again = torch.hub.load(REPO, "densenet121", source="local", weights="IMAGENET1K_V1")
    assert torch.equal(again.classifier.weight, state["classifier.weight"])

"""torch.hub entry points from the repository root."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

import densenet

REPO = str(Path(__file__).resolve().parents[1])


# parameters: torchvision's published counts (ImageNet models), the paper's Table 2 in millions
# rounded to 0.1 (CIFAR models, 10 classes); densenet264 has no published count
PUBLISHED_PARAMS = {
    "densenet121": 7_978_856, "densenet161": 28_681_000, "densenet169": 14_149_480,
    "densenet201": 20_013_928, "densenet_40_k12": 1.0e6, "densenet_100_k12": 7.0e6,
    "densenet_100_k24": 27.2e6, "densenet_bc_100_k12": 0.8e6, "densenet_bc_250_k24": 15.3e6,
    "densenet_bc_190_k40": 25.6e6,
}  # fmt: skip


@pytest.mark.parametrize("name", densenet.list_models("densenet*"))
def test_every_model_loads_through_torch_hub_with_the_published_size(name):
    with torch.device("meta"):
        model = torch.hub.load(REPO, name, source="local", trust_repo=True)
    assert isinstance(model, densenet.DenseNet) and model.arch == name
    params = sum(p.numel() for p in model.parameters())
    published = PUBLISHED_PARAMS.get(name)
    if isinstance(published, int):
        assert params == published
    elif published is not None:
        assert round(params / 1e5) == round(published / 1e5)


def test_pretrained_through_torch_hub(publish):
    torch.manual_seed(1)
    state = torchvision.models.densenet121().state_dict()
    publish("densenet121", state)
    model = torch.hub.load(REPO, "densenet121", source="local", pretrained=True)
    assert torch.equal(model.features.norm5.running_var, state["features.norm5.running_var"])
    again = torch.hub.load(REPO, "densenet121", source="local", weights="IMAGENET1K_V1")
    assert torch.equal(again.classifier.weight, state["classifier.weight"])


def test_builders_are_typed_keyword_only_functions_registered_by_name():
    """One builder per architecture, written as a function (not generated), keyword-only, with
    its configuration in its docstring; hubconf and ``densenet.X`` reach the same functions."""
    import inspect

    from densenet.nn import registry

    assert sorted(registry.BUILDERS) == sorted(densenet.list_models())
    for name, builder in registry.BUILDERS.items():
        assert builder.__code__.co_name == name and getattr(densenet, name) is builder
        parameters = inspect.signature(builder).parameters
        assert parameters["weights"].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters["weights"].default is None and name in builder.__doc__
    with pytest.raises(ValueError, match="no architecture"):
        registry.register_model(lambda: None)

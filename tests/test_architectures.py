"""The configuration table's arithmetic (the smallest input against a forward pass, parameters
and GFLOPs against the model counted on the meta device) and a new family plugging in."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import densenet
from densenet.architectures import (
    FAMILIES,
    Family,
    densenet_summary,
    list_models,
    min_input_size,
    model_info,
    rdnet_min_input_size,
    register_family,
)
from densenet.cli import main

QUICK = ("densenet121", "densenet_40_k12", "densenet_bc_100_k12")
# custom configurations: no bottleneck nor compression on the ImageNet stem, grey, no classifier
CUSTOM = [
    {"growth_rate": 4, "block_config": (2, 3), "num_init_features": 8, "bn_size": 0,
     "compression": 1.0, "num_classes": 5, "stem": "imagenet", "in_channels": 1},
    {"growth_rate": 6, "block_config": (1, 2, 1), "num_init_features": 5, "bn_size": 2,
     "compression": 0.7, "num_classes": 0, "stem": "cifar"},
]  # fmt: skip


def counted(config: dict, size: int) -> tuple[int, float]:
    """Parameters and GFLOPs of the model built on the meta device and run by FlopCounterMode."""
    with torch.device("meta"):
        model = densenet.DenseNet(**config).eval()
        x = torch.empty(1, config.get("in_channels", 3), size, size)
        with FlopCounterMode(display=False) as counter:
            model(x)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 1e9


@pytest.mark.parametrize(
    "name",
    [
        n if n in QUICK else pytest.param(n, marks=pytest.mark.slow)
        for n in list_models("densenet*")
    ],
)
def test_counts_equal_the_models_counted_on_the_meta_device(name):
    info = model_info(name)
    config = densenet.nn.registry.model_config(name)
    assert (info["params"], info["gflops"]) == counted(config, info["input_size"])
    assert info["name"] == name and info["num_classes"] == config["num_classes"]


@pytest.mark.parametrize("config", CUSTOM)
def test_counts_of_custom_configurations(config):
    summary = densenet_summary(config)
    assert (summary["params"], summary["gflops"]) == counted(config, summary["input_size"])


def runs(model: torch.nn.Module, height: int, width: int) -> bool:
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, height, width))
    except RuntimeError:
        return False
    return True


NARROW = {"growth_rate": 4, "num_init_features": 8}  # the same depth, a fraction of the work


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("densenet121", {}),
        ("densenet_40_k12", {}),
        ("densenet_bc_100_k12", {}),
        ("densenet161", NARROW),
        ("densenet121", {**NARROW, "stem_stride": (1, 1)}),  # a stem that keeps the size
        ("densenet121", {**NARROW, "stem_stride": (1, 2)}),  # the width's minimum is the larger
    ],
)
def test_min_input_size_is_the_smallest_forward_pass(name, kwargs):
    model = densenet.get_model(name, **kwargs).eval()
    side = model.min_input_size
    assert side == min_input_size(model.config)
    assert runs(model, side, side)
    assert not runs(model, side - 1, side - 1)


def test_rdnet_min_input_size_is_the_smallest_forward_pass():
    """The table's formula and the network's agree for a custom stem and a first transition."""
    config = dict(
        growth_rates=(8, 8),
        num_blocks=(1, 1),
        downsample=(True, True),
        se=(False, False),
        num_init_features=16,
        patch_size=2,
    )
    model = densenet.RDNet(**config).eval()
    side = model.min_input_size
    assert side == rdnet_min_input_size(model.config) == 4
    assert runs(model, side, side) and not runs(model, side - 1, side - 1)


def test_min_size_of_weights_and_cards_is_the_architectures():
    with torch.device("meta"):
        side = densenet.get_model("densenet121").min_input_size
    assert densenet.get_weights("densenet121").min_size == (side, side)
    assert densenet.Preprocessing().min_size == (side, side)
    cifar = densenet.get_model("densenet_bc_100_k12")
    side = cifar.min_input_size
    assert densenet.ModelCard.for_model(cifar).preprocessing.min_size == (side, side)


def test_a_family_plugs_into_list_models_and_info(monkeypatch, capsys):
    def summary(config):
        return {"params": config["width"], "gflops": 0.5, "input_size": 8, "num_classes": 2}

    monkeypatch.setitem(
        FAMILIES, "toy", Family("toy", {"toy_s": {"width": 3}}, summary, lambda config: 8)
    )
    assert list_models()[-1] == "toy_s"
    assert main(["info", "toy_s", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row == {"name": "toy_s", **summary({"width": 3}), "weights": []}
    with pytest.raises(ValueError, match=r"\['toy_s'\] are taken"):
        register_family(Family("copy", {"toy_s": {}}, summary, lambda config: 8))

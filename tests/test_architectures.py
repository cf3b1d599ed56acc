"""The configuration table's arithmetic: the smallest input against a forward pass."""

from __future__ import annotations

import pytest
import torch

import densenet
from densenet.architectures import min_input_size


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


def test_min_size_of_weights_and_cards_is_the_architectures():
    with torch.device("meta"):
        side = densenet.get_model("densenet121").min_input_size
    assert densenet.get_weights("densenet121").min_size == (side, side)
    assert densenet.Preprocessing().min_size == (side, side)
    cifar = densenet.get_model("densenet_bc_100_k12")
    side = cifar.min_input_size
    assert densenet.ModelCard.for_model(cifar).preprocessing.min_size == (side, side)

"""torch.hub entry points: ``torch.hub.load("<owner>/<repo>", "densenet121", pretrained=True)``
or ``torch.hub.load(path, "densenet121", source="local", weights="DEFAULT")``."""

import os
import sys

dependencies = ["torch", "torchvision", "PIL", "tqdm"]

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from densenet.registry import (  # noqa: E402
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet264,
    densenet_40_k12,
    densenet_100_k12,
    densenet_100_k24,
    densenet_bc_100_k12,
    densenet_bc_190_k40,
    densenet_bc_250_k24,
)

__all__ = [
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet264",
    "densenet_40_k12",
    "densenet_100_k12",
    "densenet_100_k24",
    "densenet_bc_100_k12",
    "densenet_bc_190_k40",
    "densenet_bc_250_k24",
]

"""densenet: Dense Convolutional Networks (Huang et al., CVPR 2017) for PyTorch.

Every DenseNet (ImageNet 121/161/169/201/264, the paper's CIFAR/SVHN models, any configuration),
RDNet (Kim et al., ECCV 2024: ``rdnet_tiny/small/base/large``), the official ImageNet weights,
the PyTorch Hub preprocessing, one loader (``densenet.load``) and a classifier.

The public names are imported from their modules when first used (torch with the first one),
so that ``import densenet`` and the command line's ``--help`` answer at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:  # what editors and type checkers see; at run time, _EXPORTS
    from .accuracy import EvalResult, evaluate
    from .backends import optimize
    from .explain import ActivationMaps, explain
    from .images import ImageError
    from .inference import InferenceDenseNet
    from .labels import imagenet_classes
    from .load import LoadedModel, load
    from .model import DenseNet, DenseNetFeatures
    from .predict import Classifier
    from .preprocessing import ModelCard, Preprocessing
    from .quantization import QuantizedModel, quantize, save_quantized
    from .rdnet import RDNet
    from .registry import (
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
        get_model,
        list_models,
        rdnet_base,
        rdnet_large,
        rdnet_small,
        rdnet_tiny,
    )
    from .runner import Runner
    from .transforms import eval_transform
    from .weights import Weights, WeightsError, get_weights, list_weights

_EXPORTS = {  # module: the public names it defines
    "accuracy": ("EvalResult", "evaluate"),
    "backends": ("optimize",),
    "explain": ("ActivationMaps", "explain"),
    "images": ("ImageError",),
    "inference": ("InferenceDenseNet",),
    "labels": ("imagenet_classes",),
    "load": ("LoadedModel", "load"),
    "model": ("DenseNet", "DenseNetFeatures"),
    "predict": ("Classifier",),
    "preprocessing": ("ModelCard", "Preprocessing"),
    "quantization": ("QuantizedModel", "quantize", "save_quantized"),
    "rdnet": ("RDNet",),
    "registry": (
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
        "get_model",
        "list_models",
        "rdnet_base",
        "rdnet_large",
        "rdnet_small",
        "rdnet_tiny",
    ),
    "runner": ("Runner",),
    "transforms": ("eval_transform",),
    "weights": ("Weights", "WeightsError", "get_weights", "list_weights"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["__version__", *_MODULE_OF]


class _Package(types.ModuleType):
    """The package: a public name is imported from its module when first read, a submodule
    (``densenet.registry``) when first read as an attribute; a submodule named like a public
    name (``densenet.load``, ``densenet.explain``) never replaces the function."""

    def __getattr__(self, name: str) -> Any:
        module = _MODULE_OF.get(name)
        if module is not None:
            value = getattr(importlib.import_module(f".{module}", __name__), name)
        elif not name.startswith("_") and importlib.util.find_spec(f".{name}", __name__):
            value = importlib.import_module(f".{name}", __name__)
        else:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        setattr(self, name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _MODULE_OF and isinstance(value, types.ModuleType):
            return  # the import system binding the submodule of the same name
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *__all__})


sys.modules[__name__].__class__ = _Package

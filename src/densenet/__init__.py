"""densenet: Dense Convolutional Networks (Huang et al., CVPR 2017) for PyTorch.

Every DenseNet (ImageNet 121/161/169/201/264, the paper's CIFAR/SVHN models, any configuration),
RDNet (Kim et al., ECCV 2024: ``rdnet_tiny/small/base/large``), the official ImageNet weights,
the PyTorch Hub preprocessing, one loader (``densenet.load``) and a classifier.

The public names are imported from their modules when first used (torch with the first one),
so that ``import densenet`` and the command line's ``--help`` answer at once.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from densenet._modules import MovedModules, submodules
from densenet.version import __version__

if TYPE_CHECKING:  # what editors and type checkers see; at run time, _EXPORTS
    from densenet.data.card import ModelCard, Preprocessing
    from densenet.data.images import ImageError
    from densenet.data.labels import imagenet_classes
    from densenet.data.transforms import eval_transform
    from densenet.infer.cam import ActivationMaps, explain
    from densenet.infer.form import InferenceDenseNet
    from densenet.infer.load import LoadedModel, load
    from densenet.infer.optimize import optimize
    from densenet.infer.quantization import QuantizedModel, quantize, save_quantized
    from densenet.infer.runner import Runner
    from densenet.nn.model import DenseNet, DenseNetFeatures
    from densenet.nn.rdnet import RDNet
    from densenet.nn.registry import (
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
    from densenet.tasks.accuracy import EvalResult, evaluate
    from densenet.tasks.predict import Classifier
    from densenet.weights.published import Weights, WeightsError, get_weights, list_weights

_EXPORTS = {  # module: the public names it defines
    "tasks.accuracy": ("EvalResult", "evaluate"),
    "infer.optimize": ("optimize",),
    "infer.cam": ("ActivationMaps", "explain"),
    "data.images": ("ImageError",),
    "infer.form": ("InferenceDenseNet",),
    "data.labels": ("imagenet_classes",),
    "infer.load": ("LoadedModel", "load"),
    "nn.model": ("DenseNet", "DenseNetFeatures"),
    "tasks.predict": ("Classifier",),
    "data.card": ("ModelCard", "Preprocessing"),
    "infer.quantization": ("QuantizedModel", "quantize", "save_quantized"),
    "nn.rdnet": ("RDNet",),
    "nn.registry": (
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
    "infer.runner": ("Runner",),
    "data.transforms": ("eval_transform",),
    "weights.published": ("Weights", "WeightsError", "get_weights", "list_weights"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["__version__", *_MODULE_OF]


class _Package(types.ModuleType):
    """The package: a public name is imported from its module when first read, a subpackage
    (``densenet.nn``) when first read as an attribute."""

    def __getattr__(self, name: str) -> Any:
        module = _MODULE_OF.get(name)
        if module is not None:
            value = getattr(importlib.import_module(f".{module}", __name__), name)
        else:
            value = _submodule(name)
        setattr(self, name, value)
        return value

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *__all__})


_submodule = submodules(__name__)
sys.modules[__name__].__class__ = _Package
sys.meta_path.insert(0, MovedModules())

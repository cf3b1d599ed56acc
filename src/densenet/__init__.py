"""densenet: Dense Convolutional Networks (Huang et al., CVPR 2017) for PyTorch.

Every DenseNet (ImageNet 121/161/169/201/264, the paper's CIFAR/SVHN models, any configuration),
RDNet (Kim et al., ECCV 2024: ``rdnet_tiny/small/base/large``), the official ImageNet weights,
the PyTorch Hub preprocessing, one loader (``densenet.load``) and a classifier.
"""

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
from .version import __version__
from .weights import Weights, WeightsError, get_weights, list_weights

__all__ = [
    "__version__",
    "ActivationMaps",
    "Classifier",
    "DenseNet",
    "DenseNetFeatures",
    "EvalResult",
    "ImageError",
    "InferenceDenseNet",
    "LoadedModel",
    "Runner",
    "ModelCard",
    "Preprocessing",
    "QuantizedModel",
    "RDNet",
    "Weights",
    "WeightsError",
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
    "eval_transform",
    "evaluate",
    "explain",
    "get_model",
    "get_weights",
    "imagenet_classes",
    "list_models",
    "list_weights",
    "load",
    "optimize",
    "quantize",
    "rdnet_base",
    "rdnet_large",
    "rdnet_small",
    "rdnet_tiny",
    "save_quantized",
]

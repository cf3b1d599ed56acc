"""Class activation maps (Zhou et al., CVPR 2016): where a DenseNet looks for a class.

A DenseNet ends in global average pooling and one linear classifier, so the logit of class c is
the spatial mean of ``cam_c(x, y) = sum_k w_ck * F_k(x, y) + b_c`` over the final feature map F
(after the last BN-ReLU): one forward pass, no gradients, exact. The bias ``b_c`` is a constant
per class; it is kept so that the map's mean is the logit, and so that the fast inference form
(``densenet.optimize``), whose classifier has the final BN-ReLU's scale and offset folded in
(``w' = w * s``, ``b' = b + w @ t``, on the clamp ``y`` with ``F = s * y + t``), gives the same
map: ``w' . y + b' == w . F + b``. An RDNet normalises the pooled vector (LayerNorm) before
its Linear; with that vector's statistics the normalisation is affine per image, so its map
(``RDNet.cam_features``) is exact the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet.errors import DenseNetError
from densenet.infer.form import InferenceOnly
from densenet.nn.model import DenseNet
from densenet.nn.network import Network

__all__ = ["ActivationMaps", "ExplainError", "explain", "grad_cam"]


class ExplainError(DenseNetError, TypeError):
    """A model whose class activation maps cannot be computed (no linear classifier, not a
    DenseNet)."""


@dataclass
class ActivationMaps:
    """The forward pass of a batch with its class activation maps.

    ``logits`` (N, num_classes); ``maps`` (N, num_classes, h, w) on the final feature map's
    grid (the input's size / 32 for the ImageNet models), ``maps.mean((2, 3)) == logits``; for
    a volume model (N, num_classes, d, h, w), for a signal model (N, num_classes, l).
    """

    logits: Tensor
    maps: Tensor

    def select(self, classes: Tensor, size: tuple[int, ...] | None = None) -> Tensor:
        """(N,) class indices -> (N, h, w) their maps (volumes (N, d, h, w)), or (N, *size)
        upsampled (linearly along each axis)."""
        chosen = self.maps[torch.arange(len(classes)), classes.to(self.maps.device)]
        if size is None:
            return chosen
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[chosen.dim() - 1]
        return F.interpolate(chosen[:, None], size=size, mode=mode, align_corners=False)[:, 0]


def _features_and_classifier(model: nn.Module, x: Tensor) -> tuple[Tensor, nn.Linear]:
    """The feature map the classifier is applied to (after global pooling), and that classifier."""
    if getattr(model, "num_classes", None) == 0 or not isinstance(
        getattr(model, "classifier", None), nn.Linear
    ):
        raise ExplainError(
            f"{type(model).__name__} has no linear classifier (num_classes=0 or another head); "
            "class activation maps need the global-pool + Linear head of a classifier"
        )
    classifier = model.classifier
    if isinstance(model, Network):
        return model.cam_features(x).to(classifier.weight.dtype), classifier
    if isinstance(model, InferenceOnly):
        return model.forward_features(x).to(classifier.weight.dtype), classifier
    raise ExplainError(
        f"class activation maps need a DenseNet, an RDNet or a densenet.optimize() form, got "
        f"{type(model).__name__} (an exported file has no feature map to read)"
    )


@torch.inference_mode()
def explain(model: nn.Module, x: Tensor) -> ActivationMaps:
    """Logits and every class's activation map of a preprocessed batch, in one forward pass.

    Args:
        model: a ``DenseNet`` with a classifier, or its ``densenet.optimize()`` form, in eval mode.
        x: (N, in_channels, H, W) preprocessed images ((N, C, D, H, W) volumes, (N, C, L)
            signals for a model of that many spatial axes).

    Returns float32 ``ActivationMaps`` (see the module's docstring for why they are exact).
    """
    features, classifier = _features_and_classifier(model, x)
    maps = torch.einsum("ck,nk...->nc...", classifier.weight, features)
    spatial = tuple(range(2, maps.dim()))
    maps = (maps + classifier.bias.view(1, -1, *(1 for _ in spatial))).float()
    return ActivationMaps(maps.mean(spatial), maps)


class _FinalFeatures(nn.Module):
    """A DenseNet whose final ReLU is a module (``act``), so that hooks see the feature map F."""

    def __init__(self, model: DenseNet) -> None:
        super().__init__()
        self.model, self.act = model, nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_head(self.act(self.model.features(x)))


def grad_cam(
    model: DenseNet, x: Tensor, classes: Tensor | None = None, layer: str | None = None
) -> Tensor:
    """Grad-CAM (Selvaraju et al., ICCV 2017) of an inner layer, computed by the ``grad-cam``
    package (``pip install grad-cam``, an optional extra: ``densenet-toolkit[gradcam]``).

    Args:
        model: an eager ``DenseNet`` (Grad-CAM needs gradients).
        x: (N, in_channels, H, W) preprocessed images ((N, C, D, H, W) volumes, (N, C, L)
            signals for a model of that many spatial axes).
        classes: (N,) the class of each image's map; default its top class.
        layer: a module name such as ``"features.denseblock3"``; default the final feature map
            (after the last BN-ReLU), where Grad-CAM is ``relu(cam - b) / (h * w)``: the class
            activation map up to scale and the bias, clipped at zero.

    Returns (N, H, W) maps scaled to [0, 1] (the package's form).
    """
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise ExplainError("Grad-CAM needs the grad-cam package: pip install grad-cam") from None
    if not isinstance(model, DenseNet):
        raise ExplainError(f"Grad-CAM needs an eager DenseNet, got {type(model).__name__}")
    net = _FinalFeatures(model).eval()
    target = net.act if layer is None else model.get_submodule(layer)
    targets = None if classes is None else [ClassifierOutputTarget(int(c)) for c in classes]
    with GradCAM(model=net, target_layers=[target]) as cam:
        return torch.from_numpy(cam(input_tensor=x, targets=targets))

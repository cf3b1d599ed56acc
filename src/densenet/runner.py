"""One way to run a loaded model: ``Runner``, under ``Classifier`` (and so the service), bulk
inference, ``densenet.ray`` and evaluation.

It takes what ``densenet.load`` returns (a DenseNet with its card, or an exported file's module),
puts it on the device in its inference form (``densenet.optimize``: precision and backend, and on
CUDA static batch sizes replayed as CUDA graphs), and gives its logits, the card's probabilities
(calibration, then softmax or sigmoids: ``ModelCard.probabilities``), pooled features and class
activation maps.
"""

from __future__ import annotations

import copy
import logging
import os

import torch
from torch import Tensor, nn

from .backends import optimize as optimize_model
from .dtypes import dtype_name
from .errors import DenseNetError
from .explain import ActivationMaps, explain
from .inference import BucketedModel
from .load import LoadedModel
from .model import DenseNet
from .quantization import quantize
from .runtime import compute_dtype
from .transforms import flatten_views

__all__ = ["Runner"]

log = logging.getLogger(__name__)


class Runner:
    """A loaded model, ready to run on ``device``.

    Args:
        loaded: what ``densenet.load`` returns; its module may be on any device.
        device: where the model runs; inputs are moved there.
        optimize: run a DenseNet in its inference form (``densenet.optimize``); False runs the
            module as given (float32). An exported file always runs as it was exported; a
            ``dtype`` that the module will not run in is an error.
        dtype: the inference form's precision: a ``torch.dtype``, a name that
            ``densenet.runtime.compute_dtype`` takes (``"auto"``, ``"bfloat16"``...), ``"int8"``
            (with ``calibration``), or None: float32 on CPU, bfloat16 on CUDA.
        max_batch: run the inference form only at batch sizes 1, 2, 4, ..., ``max_batch``
            (``BucketedModel``), each replayed as a CUDA graph on CUDA; None: as batches come.
        headless: drop the classifier: ``logits`` are then the (N, num_features) pooled
            features (embeddings).
        calibration: for ``dtype="int8"`` (CPU only): a folder of images to calibrate the
            post-training int8 quantization on (``densenet.quantize``).
        progress: show progress bars while the int8 quantization reads its images.

    Attributes: ``card``, ``device``, ``module`` (what runs), ``precision`` (its dtype's name).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device,
        *,
        optimize: bool = True,
        dtype: torch.dtype | str | None = None,
        max_batch: int | None = None,
        headless: bool = False,
        calibration: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        self.card, self.device = loaded.card, device
        module = loaded.module  # in eval mode (``load`` puts it there)
        # an exported file's from its card: volumes or images
        self.spatial_dims = getattr(module, "spatial_dims", len(self.card.input_shape) - 1)
        if headless:
            if not isinstance(module, DenseNet):
                raise TypeError(
                    f"pooled features need a DenseNet (an architecture, weights or a training "
                    f"checkpoint), not a {type(module).__name__}"
                )
            module = copy.deepcopy(module)
            module.reset_classifier(0)
        # a DenseNet and its inference forms take any float input; an exported module (a
        # float16 TorchScript or .pt2 file, placed by ``load``) takes its own weights' dtype
        self.input_dtype = None if isinstance(module, DenseNet) else _weights_dtype(module)
        self.precision = dtype_name(self.input_dtype or torch.float32)
        if not (optimize and isinstance(module, DenseNet)):  # runs as given
            _check_runs_in(dtype, self.precision, module)
            if isinstance(module, DenseNet):
                module = module.to(device)
        elif dtype == "int8":
            module = _int8(LoadedModel(module, self.card), device, calibration, progress)
            self.precision = "int8"
        else:
            if isinstance(dtype, str):
                dtype = compute_dtype(dtype, device)
            module = optimize_model(module.to(device), dtype=dtype)
            self.precision = dtype_name(module.dtype)
            if max_batch is not None:
                module = BucketedModel(module, max_batch, cuda_graphs=device.type == "cuda")
        self.module = module

    @property
    def model(self) -> nn.Module:
        """The model without the bucketing wrapper: a DenseNet, its inference form, or the
        exported module."""
        return self.module.model if isinstance(self.module, BucketedModel) else self.module

    def warm_up(self) -> None:
        """Run every batch size the model will see once (each bucket, else one image), so that
        compiling, autotuning and graph capture happen before the first real images."""
        shape = self.card.input_shape
        if isinstance(self.module, BucketedModel):
            self.module.warm_up(shape)
        else:
            self.logits(torch.zeros((1, *shape)))

    @torch.inference_mode()
    def logits(self, batch: Tensor) -> Tensor:
        """(N, C, H, W) preprocessed images -> (N, num_classes) float32 logits on the device
        (headless: (N, num_features) pooled features)."""
        return self.module(batch.to(self.device, self.input_dtype, non_blocking=True)).float()

    def probabilities(self, batch: Tensor) -> Tensor:
        """(N, C, H, W) preprocessed images, or (N, V, C, H, W) views of each -> (N,
        num_classes) probabilities on the device, as the card says (``ModelCard.probabilities``:
        its calibration, then a softmax, or each class's sigmoid for a multi-label model),
        averaged over the views."""
        images, views = flatten_views(batch, self.spatial_dims)
        logits = self.logits(images)
        return self.card.probabilities(logits).view(len(batch), views, -1).mean(1)

    def activation_maps(self, batch: Tensor) -> ActivationMaps:
        """(N, C, H, W) preprocessed images -> their logits and every class's activation map
        (``densenet.explain``), computed by the model that ``logits`` runs."""
        return explain(self.model, batch.to(self.device))


def _int8(
    loaded: LoadedModel,
    device: torch.device,
    calibration: str | os.PathLike | None,
    progress: bool,
) -> nn.Module:
    """``loaded``'s module quantized to int8 on the images in ``calibration``."""
    if device.type != "cpu":
        raise DenseNetError(f"int8 runs on the CPU (PyTorch's x86 int8 kernels), not on {device}")
    if loaded.card.volume is not None:
        raise DenseNetError("int8 is calibrated on images; this model takes volumes")
    if calibration is None:
        raise DenseNetError(
            "int8 needs calibration images: give a folder of a few hundred of your images "
            "(--calibration DIR), or quantize once with densenet quantize and load its file"
        )
    quantized = quantize(loaded, calibration, progress=progress)
    log.info("int8 against float32: %s", quantized.report)
    return quantized.module


def _check_runs_in(dtype: torch.dtype | str | None, precision: str, module: nn.Module) -> None:
    """Raise unless asking for ``dtype`` is met by a module that runs as given, in
    ``precision`` (``None`` and ``"auto"`` take what there is)."""
    asked = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype
    if asked in (None, "auto", precision):
        return
    how = (
        "optimize it (drop --no-optimize)"
        if isinstance(module, DenseNet)
        else "it runs in the precision it was exported in; export it again in that one"
    )
    raise DenseNetError(
        f"cannot run this {type(module).__name__} in {asked}, only {precision}: {how}"
    )


def _weights_dtype(module: object) -> torch.dtype | None:
    """The dtype of a module's first floating-point parameter or buffer (None: no such tensor,
    e.g. an ONNX Runtime session, which converts its inputs itself)."""
    if not isinstance(module, nn.Module):
        return None
    tensors = [*module.parameters(), *module.buffers()]
    return next((t.dtype for t in tensors if t.is_floating_point()), None)

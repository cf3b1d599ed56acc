"""One way to run a loaded model: ``Runner``, under ``Classifier`` (and so the service), bulk
inference, ``densenet.tasks.ray`` and evaluation.

It takes what ``densenet.load`` returns (a DenseNet with its card, or an exported file's module),
puts it on the device in its inference form (``densenet.optimize``: precision and backend, and on
CUDA static batch sizes replayed as CUDA graphs), and gives its logits, the card's probabilities
(calibration, then softmax or sigmoids: ``ModelCard.probabilities``), pooled features and class
activation maps. An output that is not finite (NaN or infinity: broken weights, or an overflow
in a low precision) is never returned: each batch's is checked once, and ``NonFiniteOutputError``
names the model.
"""

from __future__ import annotations

import copy
import functools
import logging
import os

import torch
from torch import Tensor, nn

from densenet.data.card import ModelCard
from densenet.data.transforms import flatten_views
from densenet.deprecation import renamed_keywords
from densenet.errors import DenseNetError
from densenet.infer.cam import ActivationMaps, explain
from densenet.infer.exported import OnnxModel, OpenVINOModel
from densenet.infer.form import BucketedModel
from densenet.infer.load import NETWORK_KINDS, LoadedModel
from densenet.infer.openvino import OpenVINODenseNet
from densenet.infer.optimize import optimize as optimize_model
from densenet.infer.precision import dtype_name
from densenet.infer.quantization import quantize
from densenet.nn.network import Network

__all__ = ["NonFiniteOutputError", "Runner", "count_weights"]

log = logging.getLogger(__name__)


class NonFiniteOutputError(DenseNetError):
    """The model gave NaN or infinite outputs: its weights are broken, or its precision overflows."""


@renamed_keywords(calibration="calibration_images")
class Runner:
    """A loaded model, ready to run on ``device``.

    Args:
        loaded: what ``densenet.load`` returns; its module may be on any device.
        device: where the model runs; inputs are moved there.
        optimize: run a DenseNet or RDNet in its inference form (``densenet.optimize``); False
            runs the module as given (float32). An exported file always runs as it was exported; a
            ``dtype`` that the module will not run in is an error.
        dtype: the inference form's precision: what ``densenet.infer.precision.resolve_dtype`` takes
            (None: float32 on CPU, bfloat16 on CUDA; ``"auto"``, ``"bfloat16"``, a
            ``torch.dtype``...; with backend ``"openvino"``, ``"auto"`` is OpenVINO's own
            default), or ``"int8"`` (with ``calibration_images``).
        backend: the engine of the inference form (``densenet.optimize``'s ``backend``, such
            as ``"openvino"``); None: the fastest measured for the device and precision.
        batch_size: the largest batch the model will see (with ``buckets``).
        buckets: run the inference form only at batch sizes 1, 2, 4, ..., ``batch_size``
            (``BucketedModel``, each replayed as a CUDA graph on CUDA), keeping shapes static;
            None: on CUDA (where static shapes and cheap launches pay), not on the CPU.
        max_batch: ``buckets=True`` up to ``max_batch`` (the older spelling).
        headless: drop the classifier: ``logits`` are then the (N, num_features) pooled
            features (embeddings).
        calibration_images: for ``dtype="int8"`` (CPU only): a folder of images to calibrate
            the post-training int8 quantization on (``densenet.quantize``); ``calibration=``
            is its deprecated spelling.
        progress: show progress bars while the int8 quantization reads its images.
        throughput: the model will see many images at a time (``densenet.optimize``'s
            ``throughput``: evaluation and bulk runs).

    Attributes: ``card``, ``device``, ``module`` (what runs), ``precision`` (its dtype's name),
    ``weights_count`` (``count_weights`` of the model as loaded, before any inference form).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device,
        *,
        optimize: bool = True,
        dtype: torch.dtype | str | None = None,
        backend: str | None = None,
        batch_size: int | None = None,
        buckets: bool | None = None,
        max_batch: int | None = None,
        headless: bool = False,
        calibration_images: str | os.PathLike | None = None,
        progress: bool = True,
        throughput: bool = False,
    ) -> None:
        self.card, self.device = loaded.card, device
        module, kind = loaded.module, loaded.kind  # in eval mode (``load`` puts it there)
        fast = optimize and kind in NETWORK_KINDS  # DenseNets and RDNets have inference forms
        if backend is not None:
            _check_backend(backend, fast, dtype, kind)
        self.spatial_dims = loaded.spatial_dims
        if headless:
            if kind not in NETWORK_KINDS:
                raise TypeError(
                    f"pooled features need a DenseNet or RDNet (an architecture, weights or a "
                    f"training checkpoint), not a {type(module).__name__}"
                )
            module = copy.deepcopy(module)
            module.reset_classifier(0)
        self.weights_count = count_weights(module)
        self.outputs = None if headless else self.card.num_classes  # per image, as the card says
        self.input_dtype = loaded.input_dtype
        self.precision = loaded.precision or dtype_name(self.input_dtype or torch.float32)
        if not fast:  # runs as given
            _check_runs_in(dtype, self.precision, module, kind)
            if kind in NETWORK_KINDS:  # as asked (--no-optimize)
                module = module.to(device)
        elif dtype == "int8":
            module = _int8(LoadedModel(module, self.card), device, calibration_images, progress)
            self.precision = "int8"
        else:
            self._densenet = module.to(device)
            module = optimize_model(
                self._densenet, dtype=dtype, backend=backend, throughput=throughput
            )
            self.precision = dtype_name(module.dtype)
            if max_batch is not None:
                batch_size, buckets = max_batch, True
            if batch_size is not None and (device.type == "cuda" if buckets is None else buckets):
                module = BucketedModel(module, batch_size, cuda_graphs=device.type == "cuda")
        self.module = module

    @property
    def model(self) -> nn.Module:
        """The model without the bucketing wrapper: a DenseNet, its inference form, or the
        exported module."""
        return self.module.model if isinstance(self.module, BucketedModel) else self.module

    def warm_up(self) -> None:
        """Run every batch size the model will see once (each bucket, else one image), so that
        compiling, autotuning and graph capture happen before the first real images; through
        ``logits``, so a model whose output is not finite fails here (``NonFiniteOutputError``)."""
        sizes = self.module.buckets if isinstance(self.module, BucketedModel) else (1,)
        for size in sizes:
            self.logits(torch.zeros((size, *self.card.input_shape)))

    @torch.inference_mode()
    def logits(self, batch: Tensor) -> Tensor:
        """(N, C, H, W) preprocessed images -> (N, num_classes) float32 logits on the device
        (headless: (N, num_features) pooled features); ``NonFiniteOutputError`` if any is not
        finite, ``DenseNetError`` if the model gives another number of outputs than its card has
        classes (a card that is not the model's)."""
        out = self.module(batch.to(self.device, self.input_dtype, non_blocking=True)).float()
        return self._checked(out)

    def probabilities(self, batch: Tensor) -> Tensor:
        """(N, C, H, W) preprocessed images, or (N, V, C, H, W) views of each -> (N,
        num_classes) probabilities on the device, as the card says (``ModelCard.probabilities``:
        its calibration, then a softmax, or each class's sigmoid for a multi-label model),
        averaged over the views."""
        images, views = flatten_views(batch, self.spatial_dims)
        probabilities = self.card.probabilities(self.logits(images))
        calibrate = "its calibration maps finite logits to non-finite ones; calibrate it again"
        return self._finite(probabilities, calibrate).view(len(batch), views, -1).mean(1)

    def activation_maps(self, batch: Tensor) -> ActivationMaps:
        """(N, C, H, W) preprocessed images -> their logits and every class's activation map
        (``densenet.explain``), computed by the model that ``logits`` runs (a map's mean is its
        logit, so finite logits mean finite maps), or for an OpenVINO form, which has no feature
        map to read, by the eager form in its precision."""
        maps = explain(self._explained, batch.to(self.device))
        self._checked(maps.logits)
        return maps

    @functools.cached_property
    def _explained(self) -> nn.Module:
        if isinstance(self.model, OpenVINODenseNet):
            return optimize_model(self._densenet, dtype=self.model.dtype, backend="eager")
        return self.model

    def _checked(self, logits: Tensor) -> Tensor:
        """``logits``, once they are one per class of the card and finite (``_finite``)."""
        if self.outputs is not None and logits.shape[-1] != self.outputs:
            raise DenseNetError(
                f"model {describe_model(self.card, self.model)} gives {logits.shape[-1]} "
                f"outputs per image but its card names {self.outputs} classes: the card does "
                "not belong to the model; export or train it again"
            )
        return self._finite(logits)

    def _finite(self, output: Tensor, fix: str | None = None) -> Tensor:
        """``output``, or ``NonFiniteOutputError`` naming the model and ``fix`` (default: of its
        weights or precision) when any value is NaN or infinite."""
        if bool(torch.isfinite(output).all()):
            return output
        if fix is None:
            fix = (
                "its weights hold NaN or infinity; train, fix or download them again"
                if self.precision == "float32"
                else f"its weights are broken, or it overflows in {self.precision}: run it in "
                "float32"
            )
        raise NonFiniteOutputError(
            f"model {describe_model(self.card, self.model)} produced non-finite output (NaN or "
            f"infinity) in {self.precision}: {fix}"
        )


def describe_model(card: ModelCard, module: object) -> str:
    """A model's name for messages: its architecture and weights as its card has them, or the
    file it runs (ONNX), or its type."""
    name = card.arch or getattr(module, "path", None) or type(module).__name__
    return f"{name} (weights {card.weights})" if card.weights else str(name)


def count_weights(module: nn.Module) -> int | None:
    """The number of a model's weights, whatever form runs it. A DenseNet: its parameters (the
    number torchvision and the paper give; BatchNorm running statistics are not weights). An
    exported module: every tensor it holds (parameters and buffers, floating or integer, with an
    int8 module's packed convolution and linear weights), since a traced or quantized graph keeps
    its weights as buffers or packed objects. None for a model run outside PyTorch (ONNX
    Runtime, OpenVINO)."""
    if isinstance(module, Network):
        return sum(p.numel() for p in module.parameters())
    if isinstance(module, (OnnxModel, OpenVINOModel)):
        return None
    held = sum(t.numel() for t in module.state_dict().values() if isinstance(t, Tensor))
    return held + sum(_packed_weights(m) for m in module.modules())


def _packed_weights(module: nn.Module) -> int:
    """The size of the weight and bias an int8 layer packs (``_packed_params``), which its
    ``state_dict`` leaves out once it is TorchScript; 0 for any other module."""
    script = getattr(module, "_c", None)
    if script is None or not script.hasattr("_packed_params"):
        return 0
    packed = script.getattr("_packed_params")
    if not hasattr(packed, "unpack"):  # a module holding the packed object, counted there
        return 0
    return sum(t.numel() for t in packed.unpack() if isinstance(t, Tensor))


def _int8(
    loaded: LoadedModel,
    device: torch.device,
    calibration_images: str | os.PathLike | None,
    progress: bool,
) -> nn.Module:
    """``loaded``'s module quantized to int8 on the images in ``calibration_images`` (NNCF when
    installed, else PyTorch's FX: ``densenet.quantize``)."""
    if device.type != "cpu":
        raise DenseNetError(
            f"int8 runs on the CPU (OpenVINO's or PyTorch's int8 kernels), not on {device}"
        )
    if loaded.card.volume is not None:
        raise DenseNetError("int8 is calibrated on images; this model takes volumes")
    if calibration_images is None:
        raise DenseNetError(
            "int8 needs calibration images: give a folder of a few hundred of your images "
            "(--calibration-images DIR), or quantize once with densenet quantize and load its file"
        )
    quantized = quantize(loaded, calibration_images, progress=progress)
    log.info("int8 against float32: %s", quantized.report)
    return quantized.module


def _check_backend(backend: str, fast: bool, dtype: torch.dtype | str | None, kind: str) -> None:
    """Raise unless ``backend`` can pick the engine: it applies to a DenseNet's optimized form
    (``fast``), not to int8."""
    if not fast:
        what = "the reference module" if kind in NETWORK_KINDS else "an exported file"
        raise DenseNetError(
            f"backend {backend!r} picks the engine of a DenseNet's optimized form, and "
            f"{what} runs as given: drop --backend (or --no-optimize)"
        )
    if dtype == "int8":
        raise DenseNetError(
            f"backend {backend!r} does not apply to int8, which runs its own quantized engine: "
            "drop --backend or --dtype int8"
        )


def _check_runs_in(
    dtype: torch.dtype | str | None, precision: str, module: nn.Module, kind: str
) -> None:
    """Raise unless asking for ``dtype`` is met by a module that runs as given, in
    ``precision`` (``None`` and ``"auto"`` take what there is)."""
    asked = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype
    if asked in (None, "auto", precision):
        return
    how = (
        "optimize it (drop --no-optimize)"
        if kind in NETWORK_KINDS
        else "it runs in the precision it was exported in; export it again in that one"
    )
    raise DenseNetError(
        f"cannot run this {type(module).__name__} in {asked}, only {precision}: {how}"
    )

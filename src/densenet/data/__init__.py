"""Inputs and what they mean: images and volumes (opening them within limits), transforms, the
model card (``ModelCard``: what a model needs and what its outputs mean, with its probability
calibration), ImageNet's labels, datasets, and the one atomic file writer and safe readers.

Imports only ``densenet.errors``, ``densenet.architectures`` and ``densenet.choices``."""

from densenet._modules import submodules

__getattr__ = submodules(__name__)

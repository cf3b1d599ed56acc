"""Trained parameters and where they come from: the published entries (torchvision's, RDNet's)
and ``parse_weights``, download, cache and hash checks, key conversion of foreign and old files,
reading a state once and fitting it to a network (``adapt``), and training checkpoints.

Imports only ``densenet.data`` and the base modules; ``published`` imports no torch (``densenet
info`` reads it)."""

from densenet._modules import submodules

__getattr__ = submodules(__name__)

"""The networks: DenseNet and its parts, RDNet, the memory-efficient blocks, the Triton kernels,
and the registry of typed builders (``densenet121(weights=...)``, ``get_model``).

Imports only ``densenet.weights``, ``densenet.data`` and the base modules."""

from densenet._modules import submodules

__getattr__ = submodules(__name__)

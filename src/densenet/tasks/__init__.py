"""What a user does with a model: predict, evaluate (with accuracy, calibration fitting and
multi-label metrics), explanation overlays, bulk runs (and on Ray), export, benchmarks, and the
GPU kernels' compile check (``python -m densenet.tasks.gpu_check``).

Imports only ``densenet.infer`` and the packages below it; the front ends (``train``, ``serve``,
``cli``) import tasks."""

from densenet._modules import submodules

__getattr__ = submodules(__name__)

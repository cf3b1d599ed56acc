"""Running a trained model: the one loader (``load(spec) -> LoadedModel``) and exported files
(ONNX, ``.pt2``, TorchScript, OpenVINO IR, checked before they are read); the inference form
(``optimize``) and its engines (eager, onednn, triton, openvino) with the table of which is
fastest where; precision decided once; int8; class activation maps; and the ``Runner``, the one
way tasks run a model.

Imports only ``densenet.nn``, ``densenet.weights``, ``densenet.data`` and the base modules."""

from densenet._modules import submodules

__getattr__ = submodules(__name__)

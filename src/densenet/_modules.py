"""How the package's modules are found: a package's submodule is imported when first read as an
attribute (``densenet.nn.registry`` after ``import densenet``), and the modules' names before the
packages by layer (``densenet.model`` is ``densenet.nn.model`` now) import the module at its new
home, with a DeprecationWarning. ``weights`` and ``data`` are packages now, and ``load`` and
``explain`` the public functions."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import warnings
from collections.abc import Callable
from types import ModuleType

__all__ = ["MOVED", "MovedModules", "submodules"]


def submodules(package: str) -> Callable[[str], ModuleType]:
    """A package's ``__getattr__`` (PEP 562): a submodule of ``package``, imported on first read."""

    def __getattr__(name: str) -> ModuleType:
        if name.startswith("_") or importlib.util.find_spec(f"{package}.{name}") is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return importlib.import_module(f"{package}.{name}")

    return __getattr__


MOVED = {
    "accuracy": "tasks.accuracy",
    "archives": "infer.archives",
    "backends": "infer.optimize",
    "benchmark": "tasks.bench",
    "bulk": "tasks.bulk",
    "calibration": "tasks.calibration",
    "checkpoint": "weights.checkpoint",
    "cpu": "infer.cpu",
    "dtypes": "infer.precision",
    "engines": "infer.engines",
    "evaluation": "tasks.evaluate",
    "export": "tasks.export",
    "exported": "infer.exported",
    "gpu": "infer.gpu",
    "gpu_check": "tasks.gpu_check",
    "images": "data.images",
    "inference": "infer.form",
    "io": "data.files",
    "kernels": "nn.kernels",
    "labels": "data.labels",
    "memory": "nn.memory",
    "model": "nn.model",
    "multilabel": "tasks.multilabel",
    "network": "nn.network",
    "openvino": "infer.openvino",
    "precision": "infer.precision",
    "predict": "tasks.predict",
    "preprocessing": "data.card",
    "published": "weights.published",
    "quantization": "infer.quantization",
    "ray": "tasks.ray",
    "rdnet": "nn.rdnet",
    "rdnet_inference": "infer.rdnet_form",
    "rdnet_memory": "nn.rdnet_memory",
    "registry": "nn.registry",
    "runner": "infer.runner",
    "runtime": "infer.runtime",
    "transforms": "data.transforms",
    "volumes": "data.volumes",
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``densenet.<old name>`` (and ``densenet.<old package>.<module>``) and loads it as the
    module at its new home (the same module object, so ``densenet.model.DenseNet is
    densenet.nn.model.DenseNet``). First on ``sys.meta_path``: otherwise a module under an old
    package's name would be found by path through the new package and run a second time."""

    def find_spec(
        self, fullname: str, path=None, target=None
    ) -> importlib.machinery.ModuleSpec | None:
        root, _, name = fullname.partition(".")
        old, _, inner = name.partition(".")  # densenet.kernels.conv: kernels, conv
        if root != "densenet" or old not in MOVED:
            return None
        home = ".".join(["densenet", MOVED[old], *([inner] if inner else [])])
        return importlib.machinery.ModuleSpec(fullname, self, loader_state=home)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} is {spec.loader_state} now; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(spec.loader_state)
        spec.loader_state = module.__spec__  # the import system sets __spec__: put it back after
        return module

    def exec_module(self, module: ModuleType) -> None:
        spec = module.__spec__
        module.__spec__ = spec.loader_state

"""torch.hub entry points: ``torch.hub.load("<owner>/<repo>", "densenet121", pretrained=True)``
or ``torch.hub.load(path, "densenet121", source="local", weights="DEFAULT")``. One entry point
per architecture of ``densenet.list_models()``."""

import os
import sys

dependencies = ["torch", "torchvision", "PIL", "tqdm", "safetensors"]

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from densenet.nn import registry  # noqa: E402

globals().update({name: getattr(registry, name) for name in registry.list_models()})

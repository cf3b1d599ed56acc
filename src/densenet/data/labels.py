"""ImageNet-1k class names, in the index order of the official weights."""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names; index i is the name of logit i."""
    text = files(__package__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return text.splitlines()

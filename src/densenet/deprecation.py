"""Old spellings of keyword arguments, still accepted with a ``DeprecationWarning``."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", bound=Callable)


def renamed_keywords(**renames: str) -> Callable[[T], T]:
    """Decorate a function, or a class (its ``__init__``), so that each old keyword of
    ``renames`` (``old="new"``) is taken as the new one, with a ``DeprecationWarning``; the two
    at once are a ``TypeError``."""

    def decorate(target: T) -> T:
        function = target.__init__ if isinstance(target, type) else target
        name = target.__qualname__

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{name}() got {old}= and {new}=; give {new}= only")
                message = f"{name}(): {old}= is deprecated; use {new}= (same meaning)"
                warnings.warn(message, DeprecationWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        if isinstance(target, type):
            target.__init__ = wrapper
            return target
        return wrapper

    return decorate

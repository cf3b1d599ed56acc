"""The package's version: one source, the distribution's metadata (pyproject.toml's
``version``), read from the installed package; a plain checkout that is not installed reports
``0+unknown``."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["DISTRIBUTION", "__version__"]

DISTRIBUTION = "densenet-toolkit"  # the name on PyPI; the import name is densenet

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:
    __version__ = "0+unknown"

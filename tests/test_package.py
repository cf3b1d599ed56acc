"""The package's entrance: public names imported when first used, and the names the command line
offers (densenet.choices) equal to the tables that implement them."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import densenet
from densenet import choices
from densenet.tasks import bench as benchmark
from densenet.tasks import export
from densenet.train import config

FIRST_USE = """
import json, sys
import densenet
light = "torch" not in sys.modules
import densenet.infer.cam, densenet.infer.load  # the modules of two public functions
print(json.dumps([light, callable(densenet.load), callable(densenet.explain),
                  type(densenet.nn.registry).__name__]))
"""


def test_public_names_are_their_modules_and_what_type_checkers_see():
    for module, names in densenet._EXPORTS.items():
        for name in names:
            assert getattr(densenet, name) is getattr(
                importlib.import_module(f"densenet.{module}"), name
            )
    tree = ast.parse(Path(densenet.__file__).read_text())
    checked = next(node for node in tree.body if isinstance(node, ast.If))  # if TYPE_CHECKING:
    seen = {alias.name for node in checked.body for alias in node.names}
    assert seen == set(densenet.__all__) - {"__version__"}


@pytest.mark.slow  # a subprocess that imports torch
def test_import_is_light_and_submodules_do_not_replace_functions():
    env = {**os.environ, "PYTHONPATH": str(Path(densenet.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", FIRST_USE], capture_output=True, text=True, check=True, env=env
    )
    assert json.loads(done.stdout) == [True, True, True, "module"]


def test_command_line_names_are_the_implementations():
    assert tuple(export.EXPORTERS) == choices.EXPORT_FORMATS
    assert tuple(benchmark.ENGINES) == choices.BENCH_ENGINES
    assert tuple(config.RECIPES) == choices.RECIPES

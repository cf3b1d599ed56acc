"""The package's layout is its architecture: packages by layer, each module placed in its
package's import-linter contract, short modules and functions, a docstring per package that says
what lives there and what it may import, and the modules' old names still importable."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import densenet
from densenet._modules import MOVED

tomllib = pytest.importorskip("tomllib")  # Python 3.11 on

PACKAGE = Path(densenet.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))
CONTRACTS = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())["tool"][
    "importlinter"
]["contracts"]


def _name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(
        ".__init__"
    )


def _rows(container: str) -> set[str]:
    (contract,) = [c for c in CONTRACTS if c["containers"] == [container]]
    return {name.strip() for row in contract["layers"] for name in row.split("|")}


def test_at_most_12_modules_beside_the_packages():
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= 12, top


@pytest.mark.parametrize(
    "package", sorted(name for name in _rows("densenet") if (PACKAGE / name).is_dir())
)
def test_each_package_says_what_lives_there_and_what_it_may_import(package):
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert doc and "import" in doc.lower(), f"densenet.{package}: no docstring naming its imports"


@pytest.mark.parametrize("container", [c["containers"][0] for c in CONTRACTS])
def test_every_module_has_its_row_in_its_packages_contract(container):
    folder = PACKAGE.parent.joinpath(*container.split("."))
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    modules |= {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    modules -= {"__main__", "_modules"}  # the entry points, not layers
    assert modules == _rows(container)


def _is_kernel(node: ast.AST) -> bool:
    return any("jit" in ast.unparse(d) for d in getattr(node, "decorator_list", []))


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_modules_under_500_lines_and_functions_at_most_60(path):
    text = path.read_text()
    assert text.count("\n") <= 500, f"{_name(path)}: {text.count(chr(10))} lines"
    long = {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > 60
        and not _is_kernel(node)
    }
    assert not long, f"functions over 60 lines in {_name(path)}: {long}"


@pytest.mark.parametrize(
    ("old", "home"),
    [*((f"densenet.{old}", f"densenet.{new}") for old, new in sorted(MOVED.items()))]
    + [("densenet.kernels.conv", "densenet.nn.kernels.conv")],  # a module of a moved package
)
def test_an_old_module_name_is_the_module_at_its_new_home(old, home):
    with pytest.warns(DeprecationWarning, match=home):
        module = importlib.import_module(old)
    new = importlib.import_module(home)
    assert module is new and new.__spec__.name == home


@pytest.mark.slow  # a subprocess that imports torch
def test_old_names_keep_the_public_functions_and_warn_once_each():
    script = (
        "import warnings; warnings.simplefilter('error')\n"
        "import densenet\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    from densenet.model import DenseNet\n"
        "    import densenet.registry\n"
        "assert DenseNet is densenet.DenseNet and densenet.registry.get_model is densenet.get_model\n"
        "assert callable(densenet.load) and callable(densenet.explain)\n"
        "print(sorted(str(w.message).split()[0] for w in seen))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "['densenet.model', 'densenet.registry']"


ALIGNED_TABLES = {"engines", "published", "conv", "training", "pool"}  # the kernels' argument rows


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_the_formatter_formats_all_but_aligned_tables(path):
    skipped = path.read_text().count("# fmt: skip")
    assert not skipped or path.stem in ALIGNED_TABLES, f"{_name(path)}: {skipped} fmt: skip"

"""``densenet.load`` of a user's own weights file: the architecture and the number of classes
come from the file (a torchvision state_dict of a fine-tuned densenet169 here); and the walk of a
``weights`` argument down the layers."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import TINY, randomize_batchnorm

import densenet
from densenet.cli import main
from densenet.weights.checkpoint import TrainCheckpoint, save_checkpoint
from densenet.weights.published import Weights, WeightsFile

try:
    import tomllib
except ImportError:  # Python 3.10: import-linter's tomli
    import tomli as tomllib

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A torchvision densenet169(num_classes=5) state_dict named as a user names it."""
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.densenet169(num_classes=5)).eval()
    path = tmp_path_factory.mktemp("weights") / "my_finetuned.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_load_reads_the_architecture_and_classes_of_a_torchvision_weights_file(finetuned):
    reference, path = finetuned
    loaded = densenet.load(str(path))
    assert (loaded.card.arch, loaded.module.num_classes) == ("densenet169", 5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), reference(x), rtol=1e-4, atol=1e-5)


def test_predict_takes_the_weights_file_alone(finetuned, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    _, path = finetuned
    assert main(["predict", str(tmp_path / "red.png"), "--weights", str(path), "--json"]) == 0
    assert len(capsys.readouterr().out) > 0


def test_a_builder_keeps_the_head_of_a_weights_file(finetuned):
    reference, path = finetuned
    model = densenet.densenet169(weights=str(path)).eval()
    assert model.num_classes == 5
    torch.testing.assert_close(model.classifier.weight, reference.classifier.weight)


# --- the walk of ``weights`` through the package ------------------------------------------------


def _layer_keys() -> dict[str, tuple[int, int]]:
    """Each module's place in the import-linter contracts of pyproject.toml: (row of its package
    in the ``packages`` contract, row of the module in its package's contract); lower is higher."""
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    rows = {c["containers"][0]: [r.split(" | ") for r in c["layers"]] for c in contracts}
    keys = {}
    for i, row in enumerate(rows.pop("densenet")):
        for package in row:
            keys[f"densenet.{package}"] = (i, 0)
            for j, inner in enumerate(rows.get(f"densenet.{package}", [])):
                keys.update({f"densenet.{package}.{m}": (i, j) for m in inner})
    return keys


def _names_file(value, weights_path: Path) -> bool:
    """Whether ``value`` is a str or path naming the weights file."""
    return isinstance(value, (str, os.PathLike)) and os.path.abspath(value) == str(weights_path)


def _is_tracked_kind(value, weights_path: Path) -> bool:
    """What ``weights`` becomes: a parsed spec, a training checkpoint, a file's content or state
    dict (a mapping holding a tensor), or the weights file's path."""
    if isinstance(value, (Weights, WeightsFile, TrainCheckpoint)):
        return True
    if isinstance(value, Mapping):
        holds = [value, value.get("model")]  # a state dict, or a checkpoint's content
        return any(
            isinstance(v, torch.Tensor) for m in holds if isinstance(m, Mapping) for v in m.values()
        )
    return _names_file(value, weights_path)


def walk(weights_path: Path, spec, weights) -> tuple[list[str], int]:
    """The modules that ``densenet.load(spec, weights=weights)`` passes the weights through, and
    how many steps of that walk go back up a layer (see ``test_weights_walk_down_the_layers``)."""
    weights_path = weights_path.resolve()
    tracked: dict[int, object] = {id(weights): weights}
    seq: list[str] = []

    def track(value) -> None:
        for item in value if isinstance(value, tuple) else (value,):
            if _is_tracked_kind(item, weights_path) and id(item) not in tracked:
                tracked[id(item)] = item
                fields = getattr(item, "__dataclass_fields__", {})
                track(tuple(getattr(item, name) for name in fields))

    def tracer(frame, event, arg):
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("densenet."):
            return None
        if event == "call":
            code = frame.f_code
            names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
            values = [frame.f_locals.get(n) for n in names if n != "self"]
            if not any(id(v) in tracked or _names_file(v, weights_path) for v in values):
                return None
            seq.append(module)
        elif event == "return":  # a constructor's value is its ``self``
            track(frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else arg)
        return tracer

    previous = sys.gettrace()  # coverage's, if it runs
    sys.settrace(tracer)
    try:
        densenet.load(spec, weights=weights)
    finally:
        sys.settrace(previous)
    merged = [m for i, m in enumerate(seq) if i == 0 or seq[i - 1] != m]
    keys = _layer_keys()

    def key(module: str) -> tuple[int, int]:  # a module in a subpackage: the subpackage's
        while module not in keys:
            module = module.rpartition(".")[0]
        return keys[module]

    ups = sum(key(b) < key(a) for a, b in zip(merged, merged[1:]))
    return merged, ups


@pytest.fixture
def weights_files(tmp_path, publish):
    """The four kinds of ``weights`` of densenet_bc_100_k12 (spec, weights, file): a plain
    state_dict file, with and without the architecture; a training checkpoint; published."""
    arch = "densenet_bc_100_k12"
    mine = tmp_path / "mine.pth"
    torch.save(densenet.densenet_bc_100_k12(num_classes=7).state_dict(), mine)
    checkpoint = tmp_path / "best.pth"
    card = densenet.ModelCard(("a", "b"), densenet.Preprocessing(32, 32), arch=arch)
    model = densenet.densenet_bc_100_k12(num_classes=2, **TINY)
    save_checkpoint(
        TrainCheckpoint(card, model.state_dict(), {"num_classes": 2, **TINY}), checkpoint
    )
    published = publish(arch, densenet.densenet_bc_100_k12(num_classes=1000).state_dict())
    return {
        "file": (arch, str(mine), mine),
        "file alone": (None, str(mine), mine),
        "checkpoint": (arch, str(checkpoint), checkpoint),
        "checkpoint alone": (None, str(checkpoint), checkpoint),
        "published": (arch, "DEFAULT", published),
    }


@pytest.mark.parametrize(
    "case", ["file", "file alone", "checkpoint", "checkpoint alone", "published"]
)
def test_weights_walk_down_the_layers(weights_files, case):
    """``densenet.load`` hands ``weights`` down the layers once: at most 10 module visits and at
    most 3 steps back up a layer.

    Counted: each call of a function of a ``densenet.*`` module one of whose arguments (other
    than ``self``: a method asking its own object passes nothing on) is the ``weights`` argument,
    a str or path naming the weights file, or what a counted call returned (a counted
    constructor: built), if it is a parsed spec (``Weights``, ``WeightsFile``, and their fields),
    a training checkpoint, or a file's content or state dict (a mapping holding tensors); the
    network and card built from them are not followed. The walk is the modules of these calls,
    consecutive repeats merged; a step back up goes to a module of a higher package, or of a
    higher row in its package, in the import-linter contracts of pyproject.toml."""
    spec, weights, path = weights_files[case]
    modules, ups = walk(path, spec, weights)
    print(case, len(modules), ups, " -> ".join(m.removeprefix("densenet.") for m in modules))
    assert len(modules) <= 10 and ups <= 3, modules

"""Model archives from strangers (``densenet.infer.archives``): a ``.pt2`` or TorchScript file that
could run code is refused before torch reads it, with one line naming the member; damaged
exports are one line naming the file."""

from __future__ import annotations

import io
import json
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from PIL import Image

import densenet
from densenet.cli import main
from densenet.errors import DenseNetError
from densenet.infer.archives import UnsafeArchiveError
from densenet.tasks.export import to_exported, to_torchscript


class _WritesAFile:
    """Unpickling this creates ``path``: the stand-in for any code a pickle can run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _replace(archive: Path, replace: dict[str, bytes], add: dict[str, bytes] | None = None) -> Path:
    """Rewrite ``archive`` with the members whose names end with a key of ``replace`` given
    that key's content, and the members of ``add`` (named inside the top folder) appended."""
    with zipfile.ZipFile(archive) as source:
        members = {name: source.read(name) for name in source.namelist()}
    top = next(iter(members)).split("/")[0]
    for name in members:
        for suffix, content in replace.items():
            if name.endswith(suffix):
                members[name] = content
    for name, content in (add or {}).items():
        members[f"{top}/{name}"] = content
    with zipfile.ZipFile(archive, "w") as target:
        for name, content in members.items():
            target.writestr(name, content)
    return archive


def _program(path: Path) -> dict:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if "/models/" in n and n.endswith(".json"))
        return json.loads(archive.read(name))


def _torch_save(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of a tiny model's .pt2 (dynamic sizes, so with guards and shape expressions)
    and TorchScript exports."""
    folder = tmp_path_factory.mktemp("exports")
    model = tiny_model(num_classes=3).eval()
    to_exported(model, folder / "m.pt2")
    to_torchscript(model, folder / "m.pt")
    return {suffix: (folder / f"m{suffix}").read_bytes() for suffix in (".pt2", ".pt")}


def _copy(exports, tmp_path: Path, suffix: str) -> Path:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(exports[suffix])
    return path


def _refused(path: Path, *words: str) -> str:
    with pytest.raises(UnsafeArchiveError) as refusal:
        densenet.load(path)
    message = str(refusal.value)
    assert len(message.splitlines()) == 1 and str(path) in message
    for word in words:
        assert word in message
    return message


def test_own_exports_load(exports, tmp_path):
    for suffix in (".pt2", ".pt"):
        loaded = densenet.load(_copy(exports, tmp_path, suffix))
        assert loaded.module(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_pt2_sample_inputs_pickle_is_refused_unrun(exports, tmp_path):
    marker = tmp_path / "written"
    evil = pickle.dumps(_WritesAFile(marker), protocol=2)
    path = _replace(_copy(exports, tmp_path, ".pt2"), {"data/sample_inputs/model.pt": evil})
    _refused(path, "data/sample_inputs/model.pt", "pickled code")
    assert not marker.exists()


def test_pt2_cli_predict_refuses_and_runs_nothing(exports, tmp_path, capsys):
    image_file = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image_file)
    marker = tmp_path / "written"
    evil = _torch_save({"x": _WritesAFile(marker)})
    path = _replace(_copy(exports, tmp_path, ".pt2"), {"data/sample_inputs/model.pt": evil})
    assert main(["predict", str(image_file), "--model", str(path)]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_pt2_pickled_weight_is_refused_unrun(exports, tmp_path):
    marker = tmp_path / "written"
    path = _copy(exports, tmp_path, ".pt2")
    with zipfile.ZipFile(path) as archive:
        config_name = next(n for n in archive.namelist() if n.endswith("weights_config.json"))
        config = json.loads(archive.read(config_name))
    key, entry = next(iter(config["config"].items()))
    entry["use_pickle"] = True
    _replace(path, {config_name: json.dumps(config).encode(),
                    f"data/weights/{entry['path_name']}": pickle.dumps(_WritesAFile(marker), protocol=2)})  # fmt: skip
    _refused(path, entry["path_name"])
    assert not marker.exists()


def test_pt2_custom_objects_are_refused(exports, tmp_path):
    path = _copy(exports, tmp_path, ".pt2")
    config = {"config": {"obj": {"path_name": "opaque_obj_0", "use_pickle": True}}}
    _replace(path, {"data/constants/model_constants_config.json": json.dumps(config).encode()})
    _refused(path, "opaque_obj_0")


@pytest.mark.parametrize(
    "field, value",
    [
        ("guards_code", ["__import__('os').system('true')"]),
        ("guards_code", ["L['x'].size()[0] == 1\n__import__('os')"]),
        ("guards_code", ["L['x'].size()[0] == 1 or print(\"x\")"]),
        ("guards_code", ["L['x'].__class__.size()[0] == 1"]),
        ("range_constraints", {"__import__('os')": {"min_val": 0, "max_val": None}}),
    ],
)
def test_pt2_code_in_program_fields_is_refused(exports, tmp_path, field, value):
    path = _copy(exports, tmp_path, ".pt2")
    program = _program(path)
    program[field] = value
    _replace(path, {"models/model.json": json.dumps(program).encode()})
    _refused(path, "models/model.json")


def test_pt2_shape_expression_code_is_refused(exports, tmp_path):
    path = _copy(exports, tmp_path, ".pt2")
    text = json.dumps(_program(path))
    evil = "__import__('os').system('true')"
    assert "Symbol('s0', positive=True, integer=True)" in text
    text = text.replace("Symbol('s0', positive=True, integer=True)", evil, 1)
    _replace(path, {"models/model.json": text.encode()})
    _refused(path, "shape expression")


def test_pt2_unlisted_operator_is_refused(exports, tmp_path):
    path = _copy(exports, tmp_path, ".pt2")
    text = json.dumps(_program(path)).replace(
        "torch.ops.aten.relu.default", "torch.ops.aten.from_file.default", 1
    )
    _replace(path, {"models/model.json": text.encode()})
    _refused(path, "torch.ops.aten.from_file.default")


def test_pt2_foreign_member_is_refused(exports, tmp_path):
    path = _replace(_copy(exports, tmp_path, ".pt2"), {}, {"data/aotinductor/model.so": b"\x7fELF"})
    _refused(path, "data/aotinductor/model.so")


def _script_source(path: Path) -> tuple[str, str]:
    with zipfile.ZipFile(path) as archive:
        name = next(
            n for n in archive.namelist() if n.endswith("code/__torch__/densenet/nn/model.py")
        )
        return name, archive.read(name).decode()


_BODY = "    spatial_dims = self.spatial_dims\n"  # a line of the program's forward_head


@pytest.mark.parametrize(
    "old, new, named",
    [
        ("torch.eq(", "torch.from_file(", "torch.from_file"),
        ("torch.eq(", "ops.aten.from_file(", "ops.aten.from_file"),
        ("torch.eq(", "getattr(torch, 'eq')(", "torch"),
        (_BODY, f"{_BODY}    _alias = ops.aten\n    _alias.from_file('x', True, 8)\n", "ops.aten"),
        (_BODY, f"{_BODY}    _alias = torch.ops\n    _alias.aten.from_file('x')\n", "torch.ops"),
    ],
)
def test_torchscript_unlisted_operator_is_refused(exports, tmp_path, old, new, named):
    path = _copy(exports, tmp_path, ".pt")
    name, source = _script_source(path)
    assert old in source
    _replace(path, {name: source.replace(old, new, 1).encode()})
    _refused(path, named)


def test_a_member_twice_is_refused(exports, tmp_path):
    """TorchScript reads a name's first copy and zipfile its last: a harmless last copy must
    not vouch for the first."""
    path = _copy(exports, tmp_path, ".pt")
    name, source = _script_source(path)
    with zipfile.ZipFile(path) as archive:
        members = [(n, archive.read(n)) for n in archive.namelist()]
    with zipfile.ZipFile(path, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns of the duplicate name
        archive.writestr(name, source.replace("torch.eq(", "torch.from_file(", 1))
        for member, content in members:
            archive.writestr(member, content)
    _refused(path, "appears twice")


def test_torchscript_foreign_member_is_refused(exports, tmp_path):
    path = _replace(_copy(exports, tmp_path, ".pt"), {}, {"bytecode.pkl": b"\x80\x02N."})
    _refused(path, "bytecode.pkl")


def test_int8_torchscript_passes_the_audit(tmp_path):
    from densenet.data.card import ModelCard
    from densenet.infer.quantization import QuantizedModel, quantize_module, save_quantized

    model = tiny_model(num_classes=3).eval()
    module = quantize_module(model, [torch.randn(2, 3, 32, 32)])
    path = save_quantized(QuantizedModel(module, ModelCard.for_model(model)), tmp_path / "q.pt")
    assert densenet.load(path).module(torch.randn(1, 3, 32, 32)).shape == (1, 3)


# Damaged exports: one line naming the file


def _one_line(path: Path) -> str:
    with pytest.raises(DenseNetError) as problem:
        densenet.load(path)
    message = str(problem.value)
    assert len(message.splitlines()) == 1 and str(path) in message
    return message


def test_torchscript_with_junk_data_pickle(exports, tmp_path):
    path = _replace(_copy(exports, tmp_path, ".pt"), {"/data.pkl": b"junk"})
    assert "TorchScript" in _one_line(path)


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
@pytest.mark.parametrize(
    "card", [b"[]", b"{not json", json.dumps({"card": {"classes": 5}}).encode()]
)
def test_damaged_metadata(exports, tmp_path, suffix, card):
    path = _replace(_copy(exports, tmp_path, suffix), {"extra/densenet.json": card})
    assert "densenet" in _one_line(path)


def test_torch_save_zip_with_a_card(exports, tmp_path):
    path = tmp_path / "saved.pt"
    torch.save(tiny_model().state_dict(), path)
    with zipfile.ZipFile(io.BytesIO(exports[".pt"])) as archive:
        card = next(archive.read(n) for n in archive.namelist() if n.endswith("densenet.json"))
    _replace(path, {}, {"extra/densenet.json": card})
    _one_line(path)

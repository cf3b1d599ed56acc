"""Model archives from strangers: what a ``.pt2`` (``torch.export``) or TorchScript zip may hold,
checked before torch reads it.

Both formats can run code when read as torch reads them: a ``.pt2`` archive holds pickles that
``torch.export.load`` unpickles without restriction when the restricted reader refuses them,
shape expressions that it evaluates (``sympy.sympify``), guard expressions that it compiles
(``exec``) and a graph that may call any operator; a TorchScript archive holds programs (its
``code/`` folder) that run when loaded and called. ``check_exported`` and ``check_torchscript``
allow only what a DenseNet export needs: members of the format's own layout, pickles that
``torch.load(weights_only=True)`` reads, expressions over shape symbols, and operators from one
list (``OPERATORS``); anything else is refused with ``UnsafeArchiveError`` naming the member.
"""

from __future__ import annotations

import ast
import io
import json
import pickle
import re
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from densenet.errors import DenseNetError, first_line

__all__ = ["OPERATORS", "UnsafeArchiveError", "check_exported", "check_torchscript"]


class UnsafeArchiveError(DenseNetError, ValueError):
    """A model archive holding something that could run code when read; it was not read."""


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# The operators a DenseNet or RDNet export calls (any form, dtype, dimension and int8), by
# ``namespace::name`` without the overload. A graph or program naming any other is refused.
OPERATORS = frozenset(
    f"{namespace}::{name}"
    for namespace, names in {
        "aten": """_assert_tensor_metadata _convolution adaptive_avg_pool1d adaptive_avg_pool2d
            adaptive_avg_pool3d adaptive_max_pool2d adaptive_max_pool3d add add_ addmm alias
            amax append avg_pool1d avg_pool2d avg_pool3d batch_norm cat clamp clamp_ clamp_min
            clamp_min_ clone contiguous conv1d conv2d conv3d convolution copy_ dequantize detach
            device dim div dropout dropout_ empty empty_like eq expand feature_dropout flatten
            floordiv format ge gelu gt hardsigmoid hardtanh Int is_grad_enabled layer_norm le len linear lt
            matmul max_pool1d max_pool2d max_pool3d maximum mean minimum mm mul
            native_batch_norm _native_batch_norm_legit_no_training ne neg new_empty new_zeros
            pad permute pixel_shuffle pixel_unshuffle quantize_per_tensor relu relu_ reshape
            select sigmoid size slice softmax squeeze stack sub sum sym_numel sym_size
            sym_storage_offset sym_stride t to _to_copy transpose unsqueeze view zeros
            zeros_like __contains__ __getitem__ __is__ __isnot__ __not__""",
        "quantized": """add add_relu batch_norm2d batch_norm2d_relu batch_norm3d
            batch_norm3d_relu cat conv2d conv2d_prepack conv2d_relu conv2d_unpack conv3d
            conv3d_prepack conv3d_relu linear linear_prepack linear_prepack_fp16 linear_relu
            linear_unpack linear_unpack_fp16""",
        "prim": """device dtype isinstance layout ListConstruct ListUnpack max min NumToTensor
            RaiseException shape TupleConstruct TupleUnpack unchecked_cast Uninitialized""",
        "_operator": "add eq floordiv ge getitem gt le lt mod mul ne neg sub truediv",
        "torch": "sym_float sym_int sym_max sym_min sym_not",
    }.items()
    for name in names.split()
)

# The names a TorchScript program may call besides operators and its own functions
_SCRIPT_BUILTINS = _names(
    "abs all annotate any bool enumerate float getattr hasattr int isinstance len list max min "
    "print range round str sum tuple unchecked_cast uninitialized zip"
)
# sympy functions that torch's shape expressions use
_SHAPE_FUNCTIONS = _names(
    """Add And Eq Float Ge Gt Integer Le Lt Mul Ne Not Or Pow Rational Symbol oo CeilDiv
    CeilToInt CleanDiv FloatPow FloatTrueDiv FloorDiv FloorToInt Identity IntTrueDiv
    IsNonOverlappingAndDenseIndicator LShift Max Min Mod ModularIndexing PowByNatural PythonMod
    RShift RoundDecimal RoundToInt ToFloat TruncToFloat TruncToInt Where"""
)
# The members of each format's layout that are read as they are: files, then folders. A
# TorchScript archive's ``.pkl`` files are read by TorchScript's own unpickler.
_EXPORT_FILES = _names("archive_format archive_version byteorder")
_EXPORT_FOLDERS = _names(".data extra")
_SCRIPT_FILES = _names("data.pkl constants.pkl traced_inputs.pkl version byteorder")
_SCRIPT_FOLDERS = _names(".data constants data extra traced_inputs")
_SYMBOL = re.compile(r"[a-z]+\d+")
_MEMBER_SIZE_LIMIT = 64 * 2**20  # bytes of one JSON, program or pickle member read to check it


def check_exported(path: Path) -> None:
    """Refuse a ``.pt2`` archive unless every member is part of the format's layout, every
    pickle in it passes ``torch.load(weights_only=True)``, and its programs use only shape
    symbols, guards over input sizes and ``OPERATORS``."""
    with _open(path) as archive:
        pickled: list[str] = []  # payloads that the configs mark ``use_pickle``
        for name, member in _members(archive):
            top = member.split("/", 1)[0]
            if member in _EXPORT_FILES or top in _EXPORT_FOLDERS:
                continue
            if top == "models" and member.endswith(".json"):
                _check_program(path, name, _json(archive, path, name))
            elif member.startswith(("data/weights/", "data/constants/")):
                if member.endswith("_config.json"):
                    pickled += _check_payloads(path, name, _json(archive, path, name))
                elif member.endswith(".pt"):  # a legacy layout: one torch.save file
                    _check_pickle(archive, path, name)
            elif member.startswith("data/sample_inputs/"):
                _check_pickle(archive, path, name)
            else:
                _refuse(path, name, "is not part of a torch.export archive")
        for name in pickled:
            _check_pickle(archive, path, name)


def check_torchscript(path: Path) -> None:
    """Refuse a TorchScript archive unless every member is part of the format's layout and its
    programs (``code/``) call only ``OPERATORS``, TorchScript's builtins and their own
    functions. Its ``.pkl`` members are read by TorchScript's own unpickler, which builds
    tensors and TorchScript objects only."""
    with _open(path) as archive:
        for name, member in _members(archive):
            top = member.split("/", 1)[0]
            if member.startswith("code/") and member.endswith(".py"):
                _check_script(path, name, _read(archive, path, name).decode("utf-8", "replace"))
            elif not (
                member in _SCRIPT_FILES
                or top in _SCRIPT_FOLDERS
                or (top == "code" and member.endswith(".debug_pkl"))
            ):
                _refuse(path, name, "is not part of a TorchScript archive")


def _open(path: Path) -> zipfile.ZipFile:
    """The archive, once no member name appears twice (readers disagree on which copy counts:
    TorchScript takes the first, Python's zipfile the last)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise UnsafeArchiveError(
            f"{path} is not a readable archive ({first_line(error)})"
        ) from None
    twice = [name for name, count in Counter(archive.namelist()).items() if count > 1]
    if twice:
        archive.close()
        _refuse(path, twice[0], "appears twice in the archive")
    return archive


def _members(archive: zipfile.ZipFile) -> Iterator[tuple[str, str]]:
    """Each member's full name and its name inside the archive's one top folder."""
    for name in archive.namelist():
        if name.endswith("/"):
            continue
        _, _, member = name.partition("/")
        yield name, member


def _refuse(path: Path, name: str, why: str) -> None:
    member = name.split("/", 1)[-1]  # the top folder is named after the file it was written as
    raise UnsafeArchiveError(
        f"{path}: {member} {why}; refused without reading the model (it could run code). Load "
        "only files written by densenet export or torch from a trusted source"
    )


def _read(archive: zipfile.ZipFile, path: Path, name: str) -> bytes:
    if name not in archive.NameToInfo:
        _refuse(path, name, "is named by the archive but missing from it")
    if archive.getinfo(name).file_size > _MEMBER_SIZE_LIMIT:
        _refuse(path, name, f"is larger than {_MEMBER_SIZE_LIMIT // 2**20} MiB")
    return archive.read(name)


def _json(archive: zipfile.ZipFile, path: Path, name: str) -> Any:
    try:
        return json.loads(_read(archive, path, name))
    except (ValueError, UnicodeDecodeError) as error:
        _refuse(path, name, f"is not valid JSON ({first_line(error)})")


def _check_pickle(archive: zipfile.ZipFile, path: Path, name: str) -> None:
    """A ``torch.save`` member must be readable without executing code."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore", UserWarning)
            torch.load(
                io.BytesIO(_read(archive, path, name)), map_location="cpu", weights_only=True
            )
    except pickle.UnpicklingError as error:
        _refuse(path, name, f"holds pickled code ({first_line(error)[:120]})")
    except Exception as error:  # torch raises many types for a damaged file
        _refuse(path, name, f"is not a readable torch file ({first_line(error)[:120]})")


def _check_payloads(path: Path, name: str, config: Any) -> list[str]:
    """A weights/constants config: tensors only, no opaque Python objects. Returns the members
    it marks as pickled tensors (``use_pickle``), which must pass the restricted reader."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        _refuse(path, name, "is not a payload configuration")
    folder, pickled = name.rsplit("/", 1)[0], []
    for key, entry in entries.items():
        file = entry.get("path_name", "") if isinstance(entry, dict) else ""
        if not isinstance(file, str) or not re.fullmatch(r"(weight|tensor)_\d+", file):
            _refuse(path, name, f"stores {key!r} as {file!r}, an object rather than a tensor")
        if entry.get("use_pickle"):
            pickled.append(f"{folder}/{file}")
    return pickled


def _check_program(path: Path, name: str, program: Any) -> None:
    """An exported program's JSON: operators from ``OPERATORS``, shape expressions over symbols,
    guards over input sizes, no custom objects."""
    for node in _objects(program):
        target = node.get("target")
        is_node = isinstance(target, str) and "inputs" in node and "outputs" in node
        if is_node and _exported_operator(target) not in OPERATORS:
            _refuse(path, name, f"calls {target}, an operator a DenseNet does not use")
        if "expr_str" in node and not _is_shape_expression(node["expr_str"]):
            _refuse(path, name, f"holds the shape expression {str(node['expr_str'])[:80]!r}")
        guards = node.get("guards_code") or []
        if not all(_is_guard(guard) for guard in (guards if isinstance(guards, list) else [0])):
            _refuse(path, name, "holds a guard that is not a condition on input sizes")
        symbols = node.get("range_constraints") or {}
        if not all(isinstance(k, str) and _SYMBOL.fullmatch(k) for k in symbols):
            _refuse(path, name, "names shape symbols that are not symbols")
        if any("custom_obj" in key and value for key, value in node.items()):
            _refuse(path, name, "holds custom objects")


def _objects(value: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object in a document, depth first."""
    if isinstance(value, dict):
        yield value
        value = list(value.values())
    if isinstance(value, list):
        for inner in value:
            yield from _objects(inner)


def _exported_operator(target: str) -> str:
    """``torch.ops.aten.conv2d.default`` -> ``aten::conv2d``; ``_operator.add`` ->
    ``_operator::add``; ``torch.sym_max`` -> ``torch::sym_max``."""
    parts = target.split(".")
    if parts[:2] == ["torch", "ops"] and len(parts) == 5:
        return f"{parts[2]}::{parts[3]}"
    if len(parts) == 2:
        return f"{parts[0]}::{parts[1]}"
    return target


def _is_shape_expression(text: Any) -> bool:
    """A sympy expression over shape symbols (``Symbol('s0', positive=True)``), numbers and
    the functions torch writes (``_SHAPE_FUNCTIONS``): what ``sympy.sympify`` may evaluate."""
    return _every_node(text, _shape_node)


def _shape_node(node: ast.AST) -> bool:
    if isinstance(node, ast.Call):
        callee = node.func
        if not (isinstance(callee, ast.Name) and callee.id in _SHAPE_FUNCTIONS):
            return False
        flags = all(isinstance(k.value, ast.Constant) for k in node.keywords)
        return not node.keywords or (callee.id == "Symbol" and flags)
    if isinstance(node, ast.Name):
        return bool(_SYMBOL.fullmatch(node.id)) or node.id in _SHAPE_FUNCTIONS
    if isinstance(node, ast.Constant):
        value = node.value
        return isinstance(value, (int, float)) or (
            isinstance(value, str) and bool(_SYMBOL.fullmatch(value))
        )
    return isinstance(node, (*_ARITHMETIC, ast.keyword))


def _is_guard(text: Any) -> bool:
    """A condition on the inputs' sizes (``L['x'].size()[3] // 2 != 1``,
    ``torch.sym_max(1, ...) > 1``): what ``ExportedProgram.module()`` compiles into its guard
    function, pasted into Python source (so no double quotes, backslashes or line ends)."""
    plain = isinstance(text, str) and not re.search(r"[^\w \[\]'().,+\-*/%<>=!]", text)
    return plain and _every_node(text, _guard_node)


def _guard_node(node: ast.AST) -> bool:
    if isinstance(node, ast.Call):
        callee = node.func
        size = isinstance(callee, ast.Attribute) and callee.attr in ("size", "stride")
        return not node.keywords and (size or _is_sym_function(callee))
    if isinstance(node, ast.Attribute):
        return node.attr in ("size", "stride") or _is_sym_function(node)
    if isinstance(node, ast.Subscript):  # L['x'] (an input by name), then [3] (a dimension)
        key = node.slice
        on_input = isinstance(node.value, ast.Name) and node.value.id == "L"
        return isinstance(key, ast.Constant) and (
            isinstance(key.value, int) or (on_input and isinstance(key.value, str))
        )
    if isinstance(node, ast.Name):
        return node.id in ("L", "torch")
    if isinstance(node, ast.Constant):
        return not isinstance(node.value, str) or bool(re.fullmatch(r"\w+", node.value))
    return isinstance(node, _ARITHMETIC)


def _is_sym_function(node: ast.expr) -> bool:
    """``torch.sym_max`` and the other symbolic-size functions in ``OPERATORS``."""
    return (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and f"{node.value.id}::{node.attr}" in OPERATORS
    )


_ARITHMETIC = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Compare,
    ast.Load,
    ast.operator,
    ast.unaryop,
    ast.boolop,
    ast.cmpop,
)


def _every_node(text: Any, allowed: Callable[[ast.AST], bool]) -> bool:
    """Whether ``text`` parses as one Python expression whose every node is ``allowed``."""
    if not isinstance(text, str) or len(text) > 10_000:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return all(allowed(node) for node in ast.walk(tree))


def _check_script(path: Path, name: str, source: str) -> None:
    """A TorchScript program (Python syntax): it may call ``OPERATORS`` by their full names
    (``torch.conv2d``, ``ops.quantized.conv2d``), builtins, methods, and the functions and
    classes of the archive (``__torch__.``); ``torch`` and ``ops`` appear only at the root of
    such a name, never as values (``_0 = ops.aten`` would reach any operator)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        _refuse(path, name, "is not a TorchScript program")
    defined = {  # the program's functions, classes, arguments and variables
        getattr(n, "name", None) or getattr(n, "arg", None) or getattr(n, "id", None)
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.arg))
        or (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
    }
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            modules.append(getattr(node, "module", None) or "__torch__")
            if not all(m.split(".")[0] == "__torch__" for m in modules):
                _refuse(path, name, "imports a Python module")
        elif isinstance(node, ast.Attribute) and id(node) not in inner:  # a whole dotted name
            chain = _chain(node) or [""]
            if chain[0] in ("torch", "ops", "math") and not _script_operator(chain):
                what = ".".join(chain)
                _refuse(path, name, f"calls {what}, an operator a DenseNet does not use")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            callee = node.func.id
            if callee not in _SCRIPT_BUILTINS and callee not in defined:
                _refuse(path, name, f"calls {callee}, which TorchScript does not define")
        elif isinstance(node, ast.Name) and node.id in ("torch", "ops") and id(node) not in inner:
            _refuse(path, name, f"uses the module {node.id} as a value")


def _chain(node: ast.Attribute) -> list[str] | None:
    """``torch.ops.aten.conv2d`` -> ``["torch", "ops", "aten", "conv2d"]``; None when the chain
    is not rooted at a name."""
    parts = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute):
        parts.append(current.attr)
        current = current.value
    return [current.id, *reversed(parts)] if isinstance(current, ast.Name) else None


def _script_operator(chain: list[str]) -> bool:
    """Whether a TorchScript dotted name is an allowed operator: ``torch.X`` is ``aten::X``,
    ``ops.NS.X`` and ``torch.ops.NS.X`` are ``NS::X``; ``math.X`` is arithmetic."""
    if chain[0] == "math":
        return len(chain) == 2
    if chain[:2] == ["torch", "ops"]:
        chain = chain[1:]
    if chain[0] == "ops":
        return len(chain) == 3 and f"{chain[1]}::{chain[2]}" in OPERATORS
    return len(chain) == 2 and f"aten::{chain[1]}" in OPERATORS

"""Files on disk: one atomic write (temporary file in the same folder, fsync, rename, fsync of the
folder) used for every file the package writes, the safe reader of torch files, and the one
checked reader of CSV files (labels, manifests)."""

from __future__ import annotations

import csv
import os
import pickle
import re
import stat
import tempfile
import zipfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from densenet.errors import DenseNetError, first_line

__all__ = [
    "temporary_of",
    "text_table",
    "atomic_write",
    "check_not_input",
    "check_output_file",
    "check_regular_file",
    "csv_rows",
    "read_torch_file",
    "write_json",
    "write_text",
]


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.\w+\.tmp(?P<suffix>.*)")


def temporary_of(name: str) -> str | None:
    """The file name that an interrupted ``atomic_write`` was writing, when ``name`` is one of
    its temporary files (``.<name>.<random>.tmp<suffix>``, or ``.tmp`` alone as earlier
    versions wrote), else None."""
    match = _TEMPORARY.fullmatch(name)
    if match is None or match["suffix"] not in ("", Path(match["name"]).suffix):
        return None
    return match["name"]


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells (the first is the header) as left-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def settings_differences(
    before: Mapping[str, Any], now: Mapping[str, Any], ignore: Collection[str] = ()
) -> list[str]:
    """What differs between the settings a resumed run wrote (``before``) and this run's:
    ``"key: <before> there, <now> now"`` for each key outside ``ignore``, in key order."""
    return [
        f"{key}: {before.get(key)!r} there, {now.get(key)!r} now"
        for key in sorted(set(before) | set(now))
        if key not in ignore and before.get(key) != now.get(key)
    ]


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(temporary path)``, flush the file to disk and rename it over ``path``:
    ``path`` holds either its previous content or the complete new one, even after a crash. The
    file gets the usual permissions (0666 less the umask). Returns ``path`` as a ``Path``.
    ``path`` must be a regular file or not exist (``check_regular_file``); an ``OSError`` of
    its folder (missing, not writable) names ``path``, not the temporary file."""
    path = check_regular_file(path)
    try:  # ".<name>.<random>.tmp<suffix>": hidden, and formats that check the suffix accept it
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}"
        )
    except OSError as error:
        raise type(error)(error.errno, error.strerror, str(path)) from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    try:  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:  # a file system without directory fsync
        pass
    return path


def check_regular_file(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if it is a regular file or does not exist; raises ``DenseNetError``
    for a symbolic link, a folder, a device, a pipe or a socket, which a write by renaming would
    replace."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(mode):
        kinds = {stat.S_IFLNK: "a symbolic link", stat.S_IFDIR: "a folder"}
        kind = kinds.get(stat.S_IFMT(mode), "a device, pipe or socket")
        raise DenseNetError(
            f"{path} is {kind}, not a regular file; refusing to replace it. Write to a regular "
            "file path"
        )
    return path


def check_output_file(
    path: str | os.PathLike, what: str = "output file", inputs: Iterable[str | os.PathLike] = ()
) -> Path:
    """``path`` as a ``Path`` if ``atomic_write`` can write it and it is not an input: a regular
    file or nothing (``check_regular_file``) in an existing, writable folder, neither one of
    the ``inputs`` files nor inside one of the ``inputs`` folders (``check_not_input``); else
    ``DenseNetError`` naming ``what`` and ``path``. Call it before the work whose result goes
    there."""
    if str(path).endswith(("/", os.sep)):
        raise DenseNetError(f"{what} {path} names a folder; give a file name")
    try:
        path = check_regular_file(path)
    except DenseNetError as error:
        raise DenseNetError(f"{what} {error}") from None
    folder = path.parent
    if not folder.is_dir():
        raise DenseNetError(f"{what} {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DenseNetError(f"{what} {path}: the folder {folder} is not writable")
    return check_not_input(path, what, inputs)


def check_not_input(
    path: str | os.PathLike, what: str, inputs: Iterable[str | os.PathLike | None]
) -> Path:
    """``path`` as a ``Path`` unless writing it would replace an input: one of the ``inputs``
    files, or a file inside one of the ``inputs`` folders (symbolic links resolved; entries that
    are None or name no file, such as an architecture, ignored). A new file beside the data is
    fine."""
    path = Path(path)
    target = path.resolve()
    for source in inputs:
        if source is None or not os.path.exists(source):
            continue
        source = Path(source).resolve()
        if target == source or (
            source.is_dir() and target.is_relative_to(source) and target.exists()
        ):
            where = "is the input" if target == source else "would replace a file of the input"
            raise DenseNetError(
                f"{what} {path} {where} {source}; write it elsewhere, the input stays untouched"
            )
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write`` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """``atomic_write`` of ``data`` as indented JSON."""
    import json

    return write_text(path, json.dumps(data, indent=2) + "\n")


def read_torch_file(
    path: str | os.PathLike, what: str, error: type[Exception] = DenseNetError
) -> Any:
    """The content of a .pth/.pt/.safetensors file, read without executing pickled code
    (``torch.load(weights_only=True)``, on the CPU). Raises ``error`` naming ``what`` and
    ``path`` for a missing, truncated, foreign or unsafe file."""
    import torch  # here, so that the module's other helpers load without torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load_safetensors

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    unreadable = f"{what} {path} is truncated or corrupt"
    try:
        if path.suffix == ".safetensors":
            return load_safetensors(str(path))
        _check_expansion(path, what, error)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as problem:
        # torch words it "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y whose module
        # x is blocked"
        found = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(problem), re.IGNORECASE)
        if found is None:
            raise error(f"{unreadable} (unreadable pickle data)") from None
        raise error(
            f"{what} {path} needs code execution to load (it pickles {found.group(1)}, "
            "not only tensors); refused. Re-save it as a plain state_dict"
        ) from None
    except (
        SafetensorError,
        RuntimeError,
        EOFError,
        OSError,
        zipfile.BadZipFile,
        ValueError,
        KeyError,
    ) as problem:
        raise error(f"{unreadable} ({first_line(problem)[:160]})") from None


# torch stores a file's tensors uncompressed in its zip archive: one that would expand far beyond
# its own size (a compressed storage) is refused before anything is read into memory
MAX_EXPANSION = 4
MIN_SUSPECT_BYTES = 256 * 2**20


def _check_expansion(path: Path, what: str, error: type[Exception]) -> None:
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        unpacked = sum(entry.file_size for entry in archive.infolist())
    if unpacked > MIN_SUSPECT_BYTES and unpacked > MAX_EXPANSION * path.stat().st_size:
        raise error(
            f"{what} {path} would expand from {path.stat().st_size:,} to {unpacked:,} bytes "
            "(compressed tensors); refused. Re-save it with torch.save"
        )


def csv_rows(
    path: str | os.PathLike,
    what: str,
    error: type[Exception],
    required: Sequence[str] = (),
) -> Iterator[dict[str, str]]:
    """The rows of a UTF-8 CSV file (a byte-order mark is skipped, blank lines too) as dicts by
    the header's column names, read lazily. ``error(message)``, naming ``what`` and the line, for
    a file that cannot be read, a header without the ``required`` columns or with a name twice,
    and a row with fewer or more fields than the header."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            twice = sorted({name for name in header if header.count(name) > 1})
            if twice:
                raise error(
                    f"{what} {path}: column(s) {', '.join(twice)} appear twice in the header"
                )
            missing = [name for name in required if name not in header]
            if missing:
                raise error(
                    f"{what} {path} has no {', '.join(repr(m) for m in missing)} column "
                    f"(header: {', '.join(header) or 'none'})"
                )
            for values in reader:
                if not values:
                    continue
                if len(values) != len(header):
                    raise error(
                        f"{what} {path}: line {reader.line_num} has {len(values)} fields, the "
                        f"header {len(header)}"
                    )
                yield dict(zip(header, values))
    except (OSError, UnicodeDecodeError, csv.Error) as problem:
        raise error(f"{what} {path} cannot be read: {problem}") from None

"""Files on disk: the atomic write refuses to replace anything but a regular file."""

from __future__ import annotations

import importlib
import os
import re

import pytest

from densenet.cli import main
from densenet.data.files import atomic_write, check_output_file, csv_rows, write_text
from densenet.errors import DenseNetError


def test_atomic_write_replaces_a_regular_file(tmp_path):
    path = tmp_path / "out.txt"
    write_text(path, "old")
    write_text(path, "new")
    assert path.read_text() == "new"


@pytest.mark.parametrize("kind", ["symbolic link", "folder", "pipe"])
def test_atomic_write_refuses_anything_but_a_regular_file(tmp_path, kind):
    target = tmp_path / "target.txt"
    target.write_text("kept")
    path = tmp_path / "out"
    {
        "symbolic link": lambda: path.symlink_to(target),
        "folder": path.mkdir,
        "pipe": lambda: os.mkfifo(path),
    }[kind]()
    with pytest.raises(DenseNetError, match="not a regular file; refusing to replace it"):
        write_text(path, "new")
    assert target.read_text() == "kept" and os.path.lexists(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "target.txt"]  # no temporary left


def test_an_output_file_in_a_missing_or_unwritable_folder_is_one_error(tmp_path, monkeypatch):
    """Named by its own path, up front or when atomic_write fails, not by the hidden temporary
    file it would create."""
    with pytest.raises(DenseNetError, match=r"--out .*nodir/y.pth: the folder .*nodir does not"):
        check_output_file(tmp_path / "nodir" / "y.pth", "--out")
    with pytest.raises(FileNotFoundError) as refusal:
        write_text(tmp_path / "nodir" / "y.txt", "text")
    assert refusal.value.filename == str(tmp_path / "nodir" / "y.txt")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a user, not root
    with pytest.raises(DenseNetError, match=f"the folder {tmp_path} is not writable"):
        check_output_file(tmp_path / "y.txt")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_device_before_exporting(capsys, monkeypatch):
    monkeypatch.setattr(
        importlib.import_module("densenet.infer.load"),
        "load",
        lambda *a, **k: pytest.fail("loaded a model"),
    )
    argv = ["export", "--weights", "none", "--format", "onnx", "--out", os.devnull]
    assert main(argv) == 2
    assert f"{os.devnull} is a device, pipe or socket" in capsys.readouterr().err
    with pytest.raises(DenseNetError):
        atomic_write(os.devnull, lambda tmp: None)


class CsvError(ValueError):
    pass


@pytest.mark.parametrize(
    "text, message",
    [
        ("path,label\na.png,1\nb.png\n", "line 3 has 1 fields, the header 2"),
        ("path,label\na.png,1,extra\n", "line 2 has 3 fields, the header 2"),
        ("path,label,label\na.png,1,0\n", "column(s) label appear twice in the header"),
        ("file,label\na.png,1\n", "has no 'path' column (header: file, label)"),
        ("", "has no 'path' column (header: none)"),
    ],
)
def test_csv_rows_refuse_ragged_rows_and_bad_headers(tmp_path, text, message):
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    with pytest.raises(CsvError, match=re.escape(message)):
        list(csv_rows(path, "manifest", CsvError, required=("path",)))


def test_csv_rows_skip_a_byte_order_mark_and_blank_lines(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_bytes("\ufeffpath,label\r\na.png,1\r\n\r\nb.png,0\r\n".encode())
    rows = list(csv_rows(path, "manifest", CsvError, required=("path",)))
    assert rows == [{"path": "a.png", "label": "1"}, {"path": "b.png", "label": "0"}]
    (tmp_path / "latin1.csv").write_bytes(b"path\n\xe9.png\n")
    with pytest.raises(CsvError, match="cannot be read"):
        list(csv_rows(tmp_path / "latin1.csv", "manifest", CsvError))


def test_a_torch_file_that_would_expand_far_beyond_its_size_is_refused(tmp_path):
    """A 300 KB zip holding a 300 MiB compressed storage: refused before it is read."""
    import zipfile

    from densenet.data.files import read_torch_file

    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/0", b"\0" * (300 * 2**20))
    with pytest.raises(DenseNetError, match="would expand from .* to 314,572,800 bytes"):
        read_torch_file(path, "weights file")


def test_the_temporary_files_of_an_interrupted_write_are_recognised(tmp_path, monkeypatch):
    """``temporary_of`` names the file a killed ``atomic_write`` was writing, and nothing else."""
    from densenet.data.files import temporary_of

    kept: list[str] = []

    def killed(tmp: str) -> None:
        kept.append(os.path.basename(tmp))
        raise KeyboardInterrupt

    for name in ("part-000003.parquet", "last.pth", "settings"):
        with pytest.raises(KeyboardInterrupt):
            atomic_write(tmp_path / name, killed)
    assert [temporary_of(name) for name in kept] == ["part-000003.parquet", "last.pth", "settings"]
    for name in ("part-000003.parquet", ".hidden", ".a.b.tmp.c", ".x.tmp", "a.tmp.parquet"):
        assert temporary_of(name) is None

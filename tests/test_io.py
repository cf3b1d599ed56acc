"""Files on disk: the atomic write refuses to replace anything but a regular file."""

from __future__ import annotations

import os

import pytest

from densenet.cli import main
from densenet.errors import DenseNetError
from densenet.io import atomic_write, write_text


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


def test_export_refuses_a_device_before_exporting(capsys, monkeypatch):
    monkeypatch.setattr("densenet.cli.export.load", lambda *a, **k: pytest.fail("loaded a model"))
    argv = ["export", "--weights", "none", "--format", "onnx", "--out", os.devnull]
    assert main(argv) == 2
    assert f"{os.devnull} is a device, pipe or socket" in capsys.readouterr().err
    with pytest.raises(DenseNetError):
        atomic_write(os.devnull, lambda tmp: None)

"""densenet.infer.runtime: the device each process runs on."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from densenet.infer import runtime


def test_a_torchrun_process_runs_on_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert runtime.local_device("cuda") == torch.device("cuda", 2) and current == [
        torch.device("cuda", 2)
    ]
    assert runtime.local_device("cuda:1") == torch.device("cuda", 1)  # an explicit index stays
    assert runtime.local_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert runtime.local_device("auto") == torch.device("cuda")


def test_a_process_given_its_rank_runs_on_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert runtime.local_device("cuda", rank=3) == torch.device("cuda", 1)
    assert runtime.local_device("cuda:0", rank=3) == torch.device("cuda", 0)


def test_torchrun_ranks_are_read_in_one_place(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert runtime.torchrun_ranks() == runtime.Ranks(0, 1, 0)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.torchrun_ranks() == (5, 8, 1)
    src = Path(runtime.__file__).parent
    readers = {
        str(path.relative_to(src))
        for path in src.rglob("*.py")
        if re.search(r"""["'](RANK|WORLD_SIZE|LOCAL_RANK)["']""", path.read_text())
    }
    assert readers == {"runtime.py"}

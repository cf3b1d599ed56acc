"""densenet.runtime: the device each process runs on."""

from __future__ import annotations

import torch

from densenet import runtime


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

"""Shared fixtures: small models, an isolated torch.hub cache, a local HTTP file server."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import os
import re
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

import densenet
import densenet.infer.engines
from densenet import DenseNet
from densenet.weights import published

TINY = {"growth_rate": 4, "block_config": (2, 2), "num_init_features": 8}
# a four-stage RDNet of a few thousand parameters (squeeze-excitation in the last two stages)
RDNET_SMALL = {"growth_rates": (8, 8, 8, 16), "num_blocks": (1, 2, 1, 1), "num_init_features": 16,
         "downsample": (False, True, False, True), "se": (False, False, True, True),
         "num_classes": 5}  # fmt: skip

# OpenVINO's converter sends usage telemetry from a forked process unless it runs in CI (its
# opt-in checker reads CI=true); without a network that process waits on DNS and the test
# process, which joins it at exit, never ends. Subprocesses of the tests inherit the setting.
os.environ["CI"] = "true"

# Triton kernels run on a GPU, or on the CPU under Triton's interpreter, which must be switched
# on before triton is first imported (and importing densenet imports torch, which imports it):
# without a GPU, a kernel test file runs itself again in a subprocess with TRITON_INTERPRET=1.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KERNELS_RUN_HERE = TRITON_INTERPRETED or torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() and not TRITON_INTERPRETED else "cpu"
needs_kernels = pytest.mark.skipif(
    not KERNELS_RUN_HERE, reason="run by test_kernels_under_the_interpreter"
)


def run_under_the_interpreter(test_file: str) -> None:
    """Run ``test_file`` in a subprocess under Triton's interpreter; it must pass and skip none
    of the tests marked ``needs_kernels``."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", test_file, "-o", "addopts=", "-q", "-rs"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
    assert "run by test_kernels_under_the_interpreter" not in done.stdout  # none skipped there


def tiny_model(**kwargs) -> DenseNet:
    """A two-block ImageNet-stem DenseNet-BC with a few thousand parameters."""
    return DenseNet(**{**TINY, **kwargs})


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=generator, dtype=m.weight.dtype) + 0.5
            m.bias.data = torch.randn(n, generator=generator, dtype=m.bias.dtype) * 0.1
            m.running_mean.data = (
                torch.randn(n, generator=generator, dtype=m.running_mean.dtype) * 0.1
            )
            m.running_var.data = torch.rand(n, generator=generator, dtype=m.running_var.dtype) + 0.5
    return model


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with every parameter moved off its initial value (an RDNet's layer scale 1e-6
    would hide its blocks), in float64 and eval mode."""
    generator = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


SHIPPED_ENGINE_TABLE = densenet.infer.engines.ENGINE_TABLE  # for the tests of the table itself


@pytest.fixture(autouse=True)
def engines_without_openvino(monkeypatch):
    """The default engine from the table without its openvino rows, so that a test's model runs
    in PyTorch on every CPU: where openvino is the default, each model would be converted by
    OpenVINO first (about 2 s) and cached in the home folder. tests/test_engines.py puts the
    table as shipped back (``SHIPPED_ENGINE_TABLE``)."""
    rows = tuple(row for row in SHIPPED_ENGINE_TABLE if row.engine != "openvino")
    monkeypatch.setattr(densenet.infer.engines, "ENGINE_TABLE", rows)


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 comparisons at 1e-5 and tighter hold on a GPU only without TF32 (cuDNN's default
    for convolutions): every test runs with it off."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory):
    """A randomly initialised densenet121 (non-trivial BatchNorm) saved as a local file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "densenet121-random.pth"
    torch.save(randomize_batchnorm(densenet.densenet121()).state_dict(), path)
    return path


def legacy(state: dict) -> dict:
    """The original files' key spelling: denselayerM.norm.1.weight instead of norm1.weight."""
    return {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in state.items()
    }


def save_published_like(directory: Path, arch: str, state: dict) -> Path:
    """Save ``state`` in the old key format under a name carrying its SHA-256 prefix."""
    tmp = directory / "tmp.pth"
    torch.save(legacy(state), tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = directory / f"{arch}-{digest[:8]}.pth"
    tmp.rename(path)
    return path


@pytest.fixture
def publish(torch_home, monkeypatch):
    """``publish(arch, state)``: put ``state`` in the cache as ``arch``'s published weights (a file
    named with its own SHA-256 prefix, the registry entry pointed at it); returns its path."""

    def cache(arch: str, state: dict) -> Path:
        path = save_published_like(torch_home, arch, state)
        default = published.get_weights("densenet121")
        entry = dataclasses.replace(default, arch=arch, file_name=path.name)
        monkeypatch.setitem(published.WEIGHTS, arch, {entry.name: entry, "DEFAULT": entry})
        return path

    return cache


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch.hub cache; returns its checkpoint folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


class _Handler(http.server.SimpleHTTPRequestHandler):
    truncate = False  # announce the full length, send half

    def log_message(self, *args) -> None:
        pass

    def copyfile(self, source, outputfile) -> None:
        data = source.read()
        outputfile.write(data[: len(data) // 2] if self.truncate else data)


@pytest.fixture
def file_server(tmp_path):
    """Serve a folder on 127.0.0.1; yields (folder, base_url, server). ``server.truncate = True``
    makes it cut every body in half."""
    root = tmp_path / "served"
    root.mkdir()
    handler = type("Handler", (_Handler,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=root))
    server.handler = handler
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/", server
    server.shutdown()
    server.server_close()

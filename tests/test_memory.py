"""The memory-efficient dense block (densenet.nn.memory): exact gradients and running statistics
against the plain model, no convolution recomputed, less saved memory, DDP, torch.compile."""

from __future__ import annotations

import copy
import os
import socket
from collections import Counter

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import randomize_batchnorm
from torch.utils._python_dispatch import TorchDispatchMode

from densenet import DenseNet

TINY = {"growth_rate": 4, "block_config": (2, 3), "num_init_features": 8, "num_classes": 5}
CONFIGS = {
    # name: (model kwargs, input shape)
    "imagenet": ({}, (3, 3, 32, 32)),
    "cifar": ({"bn_size": 0, "compression": 1.0, "stem": "cifar"}, (3, 3, 12, 12)),
    "cifar_bc": ({"stem": "cifar"}, (3, 3, 12, 12)),
}
# volumes and signals: the same block with 3 and 1 spatial axes
CONFIGS_ND = {
    "volume": ({"spatial_dims": 3}, (2, 3, 9, 9, 9)),
    "thin_volume": ({"spatial_dims": 3, "stem_stride": (1, 2, 2)}, (2, 3, 3, 10, 10)),
    "cifar_bc_volume": ({"spatial_dims": 3, "stem": "cifar"}, (2, 3, 4, 4, 4)),
    "signal": ({"spatial_dims": 1}, (3, 3, 24)),
    "cifar_signal": ({"spatial_dims": 1, "bn_size": 0, "stem": "cifar"}, (3, 3, 10)),
}
CONFIGS.update(CONFIGS_ND)


def pair(config: str, dtype=torch.float64, **kwargs) -> tuple[DenseNet, DenseNet]:
    """A plain model and a memory-efficient copy with the same (randomised) state."""
    torch.manual_seed(0)
    plain = randomize_batchnorm(DenseNet(**TINY, **CONFIGS[config][0], **kwargs)).to(dtype)
    efficient = copy.deepcopy(plain)
    efficient.set_memory_efficient(True)
    return plain, efficient


def inputs(config: str, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(CONFIGS[config][1], generator=torch.Generator().manual_seed(1), dtype=dtype)


def set_mode(model: DenseNet, mode: str) -> None:
    """train, eval, or frozen_bn (training, dropout on, every BatchNorm on running statistics)."""
    model.train(mode != "eval")
    if mode == "frozen_bn":
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def run(model: DenseNet, x: torch.Tensor, seed: int = 2):
    """Output, input gradient and parameter gradients of a non-trivial loss, dropout seeded."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype)).square().sum().backward()
    module = getattr(model, "_orig_mod", model)  # the module under torch.compile
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def assert_same_run(got, expected, tol: float = 1e-8) -> None:
    assert rel(got[0], expected[0]) < tol
    assert rel(got[1], expected[1]) < tol
    assert got[2].keys() == expected[2].keys()
    for name, g in expected[2].items():
        assert rel(got[2][name], g) < tol, name


@pytest.mark.parametrize("config", [c for c in CONFIGS if c not in CONFIGS_ND])
@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
@pytest.mark.parametrize("mode", ["train", "eval", "frozen_bn"])
def test_gradients_equal_plain_float64(config, drop_rate, mode):
    plain, efficient = pair(config, drop_rate=drop_rate)
    for model in (plain, efficient):
        set_mode(model, mode)
    x = inputs(config)
    expected, got = run(plain, x), run(efficient, x)
    assert_same_run(got, expected)
    # the memory-efficient path really ran: its block output is one autograd node
    block = efficient.features.denseblock1
    channels = block.denselayer1.norm1.num_features
    out = block(torch.randn(2, channels, 4, 4, dtype=torch.float64))
    assert type(out.grad_fn).__name__ == "_DenseBlockFunctionBackward"


@pytest.mark.parametrize("config", list(CONFIGS_ND))
@pytest.mark.parametrize("mode", ["train", "frozen_bn"])
def test_volume_and_signal_gradients_equal_plain_float64(config, mode):
    plain, efficient = pair(config, drop_rate=0.2)
    for model in (plain, efficient):
        set_mode(model, mode)
    assert_same_run(run(efficient, inputs(config)), run(plain, inputs(config)), tol=1e-10)
    block = efficient.features.denseblock1
    x = torch.randn(2, block.denselayer1.norm1.num_features, *(4,) * efficient.spatial_dims)
    assert type(block(x.double()).grad_fn).__name__ == "_DenseBlockFunctionBackward"


def test_channels_last_3d_gradients_equal_plain():
    plain, efficient = pair("volume")
    plain.to(memory_format=torch.channels_last_3d)
    efficient.to(memory_format=torch.channels_last_3d)
    x = inputs("volume").contiguous(memory_format=torch.channels_last_3d)
    assert_same_run(run(efficient, x), run(plain, x), tol=1e-10)


def test_triton_mode_refuses_volumes():
    model = DenseNet(**TINY, spatial_dims=3, memory_efficient="triton")
    with pytest.raises(ValueError, match="2D dense blocks only"):
        model(torch.randn(2, 3, 9, 9, 9))


def test_channels_last_gradients_equal_plain():
    plain, efficient = pair("imagenet")
    plain.to(memory_format=torch.channels_last)
    efficient.to(memory_format=torch.channels_last)
    x = inputs("imagenet").contiguous(memory_format=torch.channels_last)
    assert_same_run(run(efficient, x), run(plain, x))


@pytest.mark.parametrize(
    ("config", "momentum"), [("cifar_bc", 0.1), ("cifar_bc", None), ("cifar_bc_volume", 0.1),
                             ("signal", None)],
)  # fmt: skip
def test_running_statistics_equal_after_steps(config, momentum):
    plain, efficient = pair(config, drop_rate=0.2)
    for model in (plain, efficient):
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = momentum
    x = inputs(config)
    for model in (plain, efficient):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(3):
            torch.manual_seed(step)
            model(x + step).square().mean().backward()
            opt.step()
            opt.zero_grad()
    expected, got = plain.state_dict(), efficient.state_dict()
    for name, value in expected.items():
        if name.endswith("num_batches_tracked"):
            assert got[name].item() == value.item() == 3, name
        else:
            assert rel(got[name], value) < 1e-10, name
    # the statistics moved, so a missing update would be caught too
    key = "features.denseblock2.denselayer3.norm1.running_var"
    assert rel(expected[key], pair(config)[0].state_dict()[key]) > 1e-3


def test_eval_model_updates_no_running_statistics():
    _, efficient = pair("imagenet")
    efficient.eval()
    before = copy.deepcopy(efficient.state_dict())
    run(efficient, inputs("imagenet"))
    for name, value in efficient.state_dict().items():
        assert torch.equal(value, before[name]), name


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("config", ["imagenet", "cifar", "volume", "cifar_signal"])
def test_no_convolution_recomputed_no_prefix_copied(config):
    counts = []
    for model in pair(config, dtype=torch.float32):
        with _CountOps() as mode:
            model(inputs(config, torch.float32)).sum().backward()
        counts.append(mode.counts)
    plain, efficient = counts
    assert efficient["convolution"] == plain["convolution"] > 0
    assert efficient["convolution_backward"] == plain["convolution_backward"] > 0
    # the layers read their prefix in place: the only copies are each block's input gradient
    assert efficient["clone"] == len(TINY["block_config"])


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of unique non-parameter storages saved for backward by one forward pass."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    return sum(seen.values())


def test_saves_less_for_backward():
    # deep blocks show the quadratic term the memory-efficient block removes
    kwargs = {"growth_rate": 8, "block_config": (12,), "num_init_features": 16, "stem": "cifar"}
    plain = DenseNet(**kwargs)
    efficient = DenseNet(**kwargs, memory_efficient=True)
    x = torch.randn(2, 3, 16, 16)
    assert saved_bytes(efficient, x) < 0.35 * saved_bytes(plain, x)


def saved_storages(model: torch.nn.Module, x: torch.Tensor, shape: tuple[int, ...]) -> int:
    """How many distinct storages of tensors of ``shape`` autograd saves in one forward pass."""
    seen = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape) == shape:
            seen.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return len(seen)


@pytest.mark.parametrize("config", ["imagenet", "volume", "signal"])
def test_the_stem_keeps_no_bn_relu_output(config):
    """The ImageNet stem keeps its convolution's output (the BatchNorm's input) but not its
    BN-ReLU output (the max-pool's input), in 1D, 2D and 3D."""
    plain, efficient = pair(config, dtype=torch.float32)
    x = inputs(config, torch.float32)
    with torch.no_grad():
        stem = tuple(efficient.features.conv0(x).shape)
    assert saved_storages(plain, x, stem) == 2  # the BatchNorm's input and the ReLU's output
    assert saved_storages(efficient, x, stem) == 1


def test_autocast_bfloat16_close_to_plain():
    plain, efficient = pair("imagenet", dtype=torch.float32)
    x = inputs("imagenet", torch.float32)
    runs = []
    for model in (plain, efficient):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs.append(run(model, x))
    expected, got = runs
    assert got[0].dtype == expected[0].dtype
    assert rel(got[0], expected[0]) < 2e-2
    all_got = torch.cat([g.flatten() for g in got[2].values()])
    all_expected = torch.cat([g.flatten() for g in expected[2].values()])
    assert rel(all_got, all_expected) < 5e-2
    assert all(g.dtype == torch.float32 for g in got[2].values())


def test_unknown_memory_efficient_mode_raises():
    with pytest.raises(ValueError, match='False, True or "triton"'):
        DenseNet(**TINY, memory_efficient="Triton")


def test_batch_of_one_value_per_channel_raises_like_batchnorm():
    _, efficient = pair("cifar")
    block = efficient.features.denseblock2
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        block(torch.randn(1, block.denselayer1.norm1.num_features, 1, 1))


def test_double_backward_is_refused():
    _, efficient = pair("cifar")
    x = inputs("cifar").requires_grad_()
    (grad,) = torch.autograd.grad(efficient(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_torchscript_of_eval_model_still_works():
    _, efficient = pair("imagenet", dtype=torch.float32)
    efficient.eval()
    x = inputs("imagenet", torch.float32)
    scripted = torch.jit.script(efficient)
    with torch.no_grad():
        assert torch.allclose(scripted(x), efficient(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_runs_and_matches():
    # aot_eager traces the autograd function (forward and backward) like inductor does, without
    # the minute of C++ compilation; benchmarks/bench_memory.py --compile runs inductor.
    plain, efficient = pair("cifar_bc", dtype=torch.float32, drop_rate=0.2)
    compiled = torch.compile(efficient, backend="aot_eager", fullgraph=True)
    x = inputs("cifar_bc", torch.float32)
    expected, got = run(plain, x), run(compiled, x)
    assert_same_run(got, expected, tol=1e-5)
    for name, value in plain.state_dict().items():
        assert rel(efficient.state_dict()[name], value) < 1e-5, name


# --- DDP: 2 CPU processes, gloo --------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        torch.set_num_threads(1)
        x, y = _global_batch()
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        results = {}
        for mode in ("train", "eval"):
            for name, model in zip(("plain", "efficient"), pair("cifar_bc", drop_rate=0.2)):
                set_mode(model, mode)
                ddp = DistributedDataParallel(model)
                torch.manual_seed(10 + rank)
                _sgd_step(ddp, x[shard], y[shard])
                results[f"{mode}/{name}"] = copy.deepcopy(model.state_dict())
        synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(pair("cifar_bc")[1])
        try:
            synced(x[shard])
            results["syncbn"] = "no error"
        except NotImplementedError as error:
            results["syncbn"] = str(error)
        torch.save(results, os.path.join(folder, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(4, 3, 12, 12, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3])


def _sgd_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.slow
def test_ddp_step_equals_plain(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    # the single-process plain step on the global batch: equal to DDP in eval mode (BatchNorm on
    # running statistics, no dropout), where a mean loss over 2 halves averages to the global one
    single, _ = pair("cifar_bc", drop_rate=0.2)
    single.eval()
    _sgd_step(single, *_global_batch())
    before = pair("cifar_bc")[0].state_dict()
    for results in ranks:
        for mode in ("train", "eval"):
            plain, efficient = results[f"{mode}/plain"], results[f"{mode}/efficient"]
            for name, value in plain.items():
                assert rel(efficient[name], value) < 1e-10, (mode, name)
        for name, value in single.state_dict().items():
            assert rel(results["eval/efficient"][name], value) < 1e-10, name
        moved = results["train/efficient"]["features.conv0.weight"]
        assert rel(moved, before["features.conv0.weight"]) > 1e-4
        assert "SyncBatchNorm" in results["syncbn"]
    # DDP kept the replicas' parameters equal (gradients averaged over processes)
    for name, value in ranks[0]["train/efficient"].items():
        if "running" not in name:
            assert rel(ranks[1]["train/efficient"][name], value) < 1e-12, name

"""densenet.nn.kernels: each Triton kernel against a float64 torch reference, the triton backend
against the eager model, the space-to-depth stem, and the bucketed wrapper.

Without a GPU the kernels run on the CPU under the Triton interpreter, which must be switched on
before triton is first imported (importing densenet already imports it): in a plain test run,
``test_kernels_under_the_interpreter`` runs this file again in a subprocess with
``TRITON_INTERPRET=1``, where the kernel tests run.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    KERNEL_DEVICE,
    KERNELS_RUN_HERE,
    needs_kernels,
    randomize_batchnorm,
    run_under_the_interpreter,
    tiny_model,
)

import densenet
import densenet.infer.engines
from densenet import DenseNet, optimize
from densenet.infer.form import BucketedModel, SpaceToDepthConv

kernels = pytest.importorskip("densenet.nn.kernels")
gpu = pytest.importorskip("densenet.infer.gpu")

DEVICE = KERNEL_DEVICE


@pytest.mark.slow
@pytest.mark.skipif(KERNELS_RUN_HERE, reason="the kernel tests run in this process")
def test_kernels_under_the_interpreter():
    run_under_the_interpreter(__file__)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def buffer(n: int, c: int, h: int, w: int) -> torch.Tensor:
    """A random float32 (n, c, h, w) channels_last block buffer."""
    x = torch.randn(n, c, h, w, device=DEVICE)
    return x.contiguous(memory_format=torch.channels_last)


def clamp_bounds(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel bounds with every case: from below, from above, both equal (a constant)."""
    low = torch.randn(k, device=DEVICE) * 0.5
    high = torch.full((k,), float("inf"), device=DEVICE)
    high[::3], low[::3] = low[::3] + 0.3, float("-inf")
    high[1::5] = low[1::5] = 0.0
    return low, high


@needs_kernels
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize(
    "n, buffer_channels, k, c_out, size",
    [(1, 37, 21, 20, (7, 9)), (2, 45, 45, 7, (13, 11)), (3, 19, 3, 33, (5, 4))],
)
def test_pointwise_conv_matches_torch(pool, n, buffer_channels, k, c_out, size):
    """clamp (-> 2x2 average pool) -> 1x1 conv + bias (-> ReLU) on a buffer prefix, written into a
    slice of another buffer at an odd channel offset."""
    x = buffer(n, buffer_channels, *size)[:, :k]
    low, high = clamp_bounds(k)
    weight = torch.randn(k, c_out, device=DEVICE)
    bias = torch.randn(c_out, device=DEVICE)
    h, w = (size[0] // 2, size[1] // 2) if pool else size
    target = buffer(n, c_out + 8, h, w)
    untouched = target.clone()
    kernels.pointwise_conv(
        x, weight, bias, low, high, target[:, 3 : 3 + c_out], pool=pool, relu=not pool
    )
    ref = torch.clamp(x.double(), low.double().view(1, -1, 1, 1), high.double().view(1, -1, 1, 1))
    if pool:
        ref = F.avg_pool2d(ref, 2)
    ref = F.conv2d(ref, weight.double().t()[:, :, None, None], bias.double())
    ref = ref if pool else ref.relu()
    assert rel_error(target[:, 3 : 3 + c_out], ref) < 1e-6
    assert torch.equal(target[:, :3], untouched[:, :3])
    assert torch.equal(target[:, 3 + c_out :], untouched[:, 3 + c_out :])


@needs_kernels
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize(
    "n, c, c_out, size, offset",
    [(1, 20, 4, (7, 9), 5), (2, 3, 17, (13, 11), 1), (3, 33, 5, (1, 2), 0)],
)
def test_conv3x3_matches_torch(affine, n, c, c_out, size, offset):
    """The implicit-GEMM 3x3 convolution (padding 1), optionally after a BN-ReLU, written into a
    buffer slice at channel ``offset``; the rest of the buffer stays as it was."""
    x = buffer(n, c + 2, *size)[:, 2:]  # an input view at an odd offset too
    weight = torch.randn(c_out, c, 3, 3, device=DEVICE)
    scale, shift = (
        (torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE)) if affine else (None, None)
    )
    target = buffer(n, offset + c_out + 3, *size)
    untouched = target.clone()
    gemm_weight = weight.permute(2, 3, 1, 0).reshape(9 * c, c_out).contiguous()
    kernels.conv3x3(x, gemm_weight, target[:, offset : offset + c_out], scale, shift)
    inp = x.double()
    if affine:
        inp = (inp * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)).relu()
    ref = F.conv2d(inp, weight.double(), padding=1)
    assert rel_error(target[:, offset : offset + c_out], ref) < 1e-6
    outside = torch.ones(target.shape[1], dtype=torch.bool)
    outside[offset : offset + c_out] = False
    assert torch.equal(target[:, outside], untouched[:, outside])


def every_tile(groups: dict[str, list[tuple]]) -> list[tuple]:
    """The tiles of every group (aligned or not, on tensor cores or not) of a kernel."""
    return [tile for group in groups.values() for tile in group]


def force_tile(monkeypatch, kernel, tile: tuple[int, int, int, int, int]) -> None:
    """Make an autotuned kernel launch with one production tile (BLOCK_M, BLOCK_N, BLOCK_K,
    warps, stages) instead of the interpreter's small one."""
    import triton

    m, n, k, warps, stages = tile
    config = triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps)
    config.num_stages = stages
    monkeypatch.setattr(kernel, "configs", [config])
    monkeypatch.setattr(kernel, "cache", {})


@needs_kernels
@pytest.mark.parametrize("pool", [False, True], ids=["bottleneck", "transition"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tile", every_tile(kernels.conv.POINTWISE_TILES), ids=str)
def test_pointwise_conv_with_every_production_tile(monkeypatch, tile, dtype, pool):
    """Each tile the GPU can pick, on a problem with several K steps, two N tiles, two or more
    M tiles and masked rows, columns and channels, as the bottleneck (ReLU after) and as the
    transition (2x2 average pool first); float16 as the GPU runs it (float32 accumulation)."""
    force_tile(monkeypatch, kernels.conv._pointwise_kernel, tile)
    k, c_out = 2 * tile[2] + 5, tile[1] + 9
    side = 2 * (tile[0] // 8 + 3)  # rows: 2 x (side / 2)^2 > BLOCK_M after pooling
    x = buffer(2, k + 3, side, side)[:, :k].to(dtype)
    low, high = clamp_bounds(k)
    weight, bias = torch.randn(k, c_out, device=DEVICE), torch.randn(c_out, device=DEVICE)
    out_side = side // 2 if pool else side
    out = buffer(2, c_out, out_side, out_side).to(dtype)
    kernels.pointwise_conv(x, weight.to(dtype), bias, low, high, out, pool=pool, relu=not pool)
    assert kernels.conv._pointwise_kernel.best_config.kwargs["BLOCK_N"] == tile[1]
    ref = torch.clamp(x.double(), low.double().view(1, -1, 1, 1), high.double().view(1, -1, 1, 1))
    if pool:
        ref = F.avg_pool2d(ref, 2)
    ref = F.conv2d(ref, weight.to(dtype).double().t()[:, :, None, None], bias.double())
    ref = ref if pool else ref.relu()
    assert rel_error(out, ref) < (1e-6 if dtype == torch.float32 else 2e-3)


@needs_kernels
@pytest.mark.parametrize("affine", [False, True], ids=["folded", "bn-relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tile", every_tile(kernels.conv.GROWTH_TILES), ids=str)
def test_conv3x3_with_every_production_tile(monkeypatch, tile, dtype, affine):
    """Each tile, with two or more M tiles, masked channels and both forms: the input as it is
    (the BN-ReLU folded before it) and with the BN-ReLU applied on load."""
    force_tile(monkeypatch, kernels.conv._conv3x3_kernel, tile)
    c, c_out = tile[2] + 7, tile[1] + 5
    x = buffer(2, c, 6, 7).to(dtype)  # 84 rows > BLOCK_M
    weight = torch.randn(c_out, c, 3, 3, device=DEVICE).to(dtype)
    out = buffer(2, c_out, 6, 7).to(dtype)
    scale, shift = (torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE))
    kernels.conv3x3(
        x, weight.permute(2, 3, 1, 0).reshape(9 * c, c_out).contiguous(), out,
        *((scale, shift) if affine else ()),
    )  # fmt: skip
    assert kernels.conv._conv3x3_kernel.best_config.kwargs["BLOCK_K"] == tile[2]
    act = x.double()
    if affine:
        act = (act * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)).relu()
    ref = F.conv2d(act, weight.double(), padding=1)
    assert rel_error(out, ref) < (1e-6 if dtype == torch.float32 else 2e-3)


@needs_kernels
@pytest.mark.parametrize("stride", [(2, 2), (1, 2)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stem_relu_max_pool_writes_into_the_buffer(stride, dtype):
    """The stem's ReLU and 3x3 max-pool (padding 1) in one pass, into the first channels of a
    wider buffer, with masked edges (odd sizes, more pixels and channels than one tile)."""
    from densenet.nn.kernels.pool import relu_max_pool

    x = buffer(2, 70, 17, 15).to(dtype)
    h, w = (17 - 1) // stride[0] + 1, (15 - 1) // stride[1] + 1
    out = buffer(2, 70 + 24, h, w).to(dtype)
    before = out.clone()
    relu_max_pool(x, out[:, :70], stride)
    expected = F.max_pool2d(x.float().relu(), 3, stride, padding=1).to(dtype)
    assert torch.equal(out[:, :70], expected)
    assert torch.equal(out[:, 70:], before[:, 70:])
    with pytest.raises(ValueError, match="do not fit"):
        relu_max_pool(x, out[:, :70, :-1], stride)


def test_autotuning_is_keyed_by_a_power_of_two_bucket_of_pixel_rows():
    """A new batch size whose bucket was seen is neither tuned nor compiled again (the pixel
    counts are not specialised)."""
    from densenet.nn.kernels import training

    m_bucket = kernels.conv.m_bucket
    assert [m_bucket(m) for m in (1, 2, 3, 1000, 1024, 1025)] == [1, 2, 4, 1024, 1024, 2048]
    tuned = (kernels.conv._pointwise_kernel, kernels.conv._conv3x3_kernel, training._forward_kernel)
    for kernel in tuned:
        assert "M_BUCKET" in kernel.keys and "M" not in kernel.keys, kernel.keys


@needs_kernels
def test_kernels_reject_shapes_that_do_not_fit():
    x = buffer(1, 8, 4, 4)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.conv3x3(x, torch.randn(9 * 7, 4), buffer(1, 4, 4, 4))
    with pytest.raises(ValueError, match="channels_last"):
        low, high = clamp_bounds(8)
        kernels.pointwise_conv(
            x.contiguous(), torch.randn(8, 4), torch.zeros(4), low, high, buffer(1, 4, 4, 4)
        )


@pytest.mark.parametrize("size", [(37, 45), (8, 8), (1, 1), (2, 3), (224, 223)])
def test_space_to_depth_stem_is_exact(size):
    """The 7x7 stride-2 convolution and its 4x4 space-to-depth form agree to float64 rounding,
    output size included, for odd and even sizes, with and without bias, channels_last or not,
    with the 12 space-to-depth channels as they are or padded with zeros to 16."""
    torch.manual_seed(0)
    for bias, multiple, layout in itertools.product(
        (True, False), (1, 16), (torch.contiguous_format, torch.channels_last)
    ):
        conv = torch.nn.Conv2d(3, 5, 7, stride=2, padding=3, bias=bias).double()
        x = torch.randn(2, 3, *size, dtype=torch.float64).contiguous(memory_format=layout)
        stem = SpaceToDepthConv(conv, channel_multiple=multiple)
        assert stem.weight.shape[1] == (12 if multiple == 1 else 16)
        ref, out = conv(x), stem(x)
        assert out.shape == ref.shape
        assert torch.allclose(out, ref, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="7x7 stride-2"):
        SpaceToDepthConv(torch.nn.Conv2d(3, 5, 3, padding=1))


@needs_kernels
@pytest.mark.parametrize(
    "config, size",
    [
        ({"growth_rate": 4, "block_config": (2, 3), "num_init_features": 8}, (37, 45)),
        (
            {"growth_rate": 5, "block_config": (2, 2), "num_init_features": 7, "stem": "cifar"},
            (7, 9),
        ),
        ({"growth_rate": 3, "block_config": (3, 1), "bn_size": 0, "stem": "cifar"}, (13, 11)),
        (
            {
                "growth_rate": 6,
                "block_config": (1, 2),
                "bn_size": 2,
                "compression": 0.7,
                "num_classes": 0,
            },
            (29, 31),
        ),
    ],
)
@pytest.mark.parametrize("growth_conv", ["triton", "cudnn"])
def test_triton_backend_matches_eager_model(config, size, growth_conv):
    torch.manual_seed(0)
    model = randomize_batchnorm(DenseNet(**config)).eval().to(DEVICE)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.weight.data[::4] *= -1  # clamps from above too
    fast = optimize(model, dtype=torch.float32, backend="triton")
    assert isinstance(fast, gpu.TritonDenseNet)
    if growth_conv != "triton":
        fast = gpu.TritonDenseNet(
            optimize(model, dtype=torch.float32, backend="eager"), growth_conv
        )
    x = torch.randn(2, 3, *size, device=DEVICE)
    with torch.inference_mode():
        out, ref = fast(x), model(x)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert rel_error(out, ref) < 1e-5


@needs_kernels
@pytest.mark.parametrize("name, size", [("densenet121", (33, 35)), ("densenet_bc_100_k12", (9, 7))])
def test_triton_backend_matches_registry_models(name, size):
    """Full widths (prefixes up to 1024 channels, several reduction steps per tile)."""
    torch.manual_seed(0)
    model = randomize_batchnorm(densenet.get_model(name)).eval().to(DEVICE)
    x = torch.randn(1, 3, *size, device=DEVICE)
    with torch.inference_mode():
        out, ref = optimize(model, dtype=torch.float32, backend="triton")(x), model(x)
    assert rel_error(out, ref) < 1e-5


@needs_kernels
def test_triton_backend_keeps_metadata_and_refuses_training():
    model = tiny_model(num_classes=3, arch="tiny").eval().to(DEVICE)
    fast = optimize(model, backend="triton")
    assert fast.arch == "tiny" and fast.num_classes == 3 and fast.config == model.config
    with pytest.raises(RuntimeError, match="inference-only"):
        fast.train()


@needs_kernels
def test_triton_backend_gives_the_eager_models_activation_maps():
    torch.manual_seed(0)
    model = randomize_batchnorm(tiny_model(num_classes=3)).eval().to(DEVICE)
    x = torch.randn(2, 3, 32, 36, device=DEVICE)
    ref = densenet.explain(model, x)
    out = densenet.explain(optimize(model, dtype=torch.float32, backend="triton"), x)
    assert out.maps.shape == ref.maps.shape
    assert rel_error(out.maps, ref.maps) < 1e-5 and rel_error(out.logits, ref.logits) < 1e-5


# operators that launch no kernel (views, allocations) when counting a forward's launches
_NO_KERNEL = {"empty", "empty_strided", "slice", "view", "permute", "as_strided", "unflatten",
              "t", "alias", "detach", "_unsafe_view", "reshape", "flatten", "unsqueeze"}  # fmt: skip


@pytest.mark.parametrize(("growth_conv", "expected"), [("triton", 129), ("cudnn", 187)])
def test_densenet121_launches_per_forward(monkeypatch, growth_conv, expected):
    """The batch-1 latency goal's kernel count (< 200), as far as a CPU can count it: each
    Triton launch (recorded, not run) and each torch operator that launches a kernel in the
    triton form's forward. With Triton 3x3 growth convolutions: two per dense layer, one per
    transition, 6 for the stem (dtype conversion, padding, space-to-depth copy and zero
    channels, convolution, ReLU + max-pool) and 4 for the head (clamp, pool, classifier, dtype
    conversion): 129; with cuDNN's 3x3s and their copies into the buffer, 187, plus whatever
    cuDNN itself launches (an H200 counted 246 kernels in all, before the stem's fusion)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.autotuner import Autotuner

    launches: list[str] = []

    class CountOperators(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in _NO_KERNEL:
                launches.append(name)
            return func(*args, **(kwargs or {}))

    def record(tuner, *args, **kwargs):
        launches.append(tuner.fn.__name__)

    monkeypatch.setattr(densenet.infer.optimize, "_triton_usable", lambda device: True)
    fast = optimize(densenet.densenet121(num_classes=10).eval(), dtype=torch.float32,
                    backend="triton", growth_conv=growth_conv)  # fmt: skip
    monkeypatch.setattr(Autotuner, "run", record)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode(), CountOperators():
        fast(x)
    assert launches.count("_pointwise_kernel") == 58 + 3  # bottlenecks, transitions
    assert launches.count("_conv3x3_kernel") == (58 if growth_conv == "triton" else 0)
    assert len(launches) == expected, launches


def test_triton_backend_without_cuda_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA.*TRITON_INTERPRET=1"):
        optimize(tiny_model().eval(), backend="triton")
    assert not isinstance(optimize(tiny_model().eval()), gpu.TritonDenseNet)  # CPU default


@pytest.mark.parametrize(
    "device, dtype, compile_, expected",
    [
        # the triton kernels as they are now have not run on a GPU, so CUDA runs the eager
        # form (measured on an H200) by default, whatever the precision (tests/test_engines.py)
        ("cuda", torch.bfloat16, False, "eager"),
        ("cuda", torch.float16, False, "eager"),
        ("cuda", torch.float32, False, "eager"),
        ("cuda", torch.bfloat16, True, "inductor"),
        ("cpu", torch.float32, False, "eager"),  # on a CPU without AVX2 (else onednn)
        ("cpu", torch.bfloat16, False, "eager"),
    ],
)
def test_default_backend_follows_the_device_and_precision(
    monkeypatch, device, dtype, compile_, expected
):
    import densenet.infer.optimize

    monkeypatch.setattr(densenet.infer.engines, "cpu_kind", lambda: "DEFAULT")
    assert densenet.infer.optimize._backend(None, compile_, torch.device(device), dtype) == expected


def test_a_triton_row_applies_only_to_channel_counts_of_multiples_of_16(monkeypatch):
    """Other models run the kernels' smaller tiles (tests/test_gpu_check.py), never timed
    against cuDNN: should a GPU run put triton in the engine table, the paper's k = 12 models
    still run the eager form (cuDNN) on CUDA by default."""
    from densenet.infer.engines import EngineRow
    from densenet.infer.optimize import _backend, channels_aligned

    assert channels_aligned(densenet.densenet121()) and channels_aligned(densenet.densenet161())
    assert not channels_aligned(densenet.get_model("densenet_bc_100_k12"))
    row = EngineRow("cuda", "any", torch.bfloat16, "triton", "a GPU run, batch 1 and 256")
    monkeypatch.setattr(densenet.infer.engines, "ENGINE_TABLE", (row,))
    monkeypatch.setattr(densenet.infer.optimize, "_triton_usable", lambda device: True)
    cuda = torch.device("cuda")
    assert _backend(None, False, cuda, torch.bfloat16, aligned=True) == "triton"
    assert _backend(None, False, cuda, torch.bfloat16, aligned=False) == "eager"


@pytest.mark.parametrize("max_batch", [4, 6])
def test_bucketed_model_pads_splits_and_drops_padding(max_batch):
    model = randomize_batchnorm(tiny_model()).eval()
    seen: list[int] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    bucketed = BucketedModel(model, max_batch=max_batch)
    assert bucketed.buckets == ((1, 2, 4) if max_batch == 4 else (1, 2, 4, 6))
    x = torch.randn(2 * max_batch + 3, 3, 32, 32)
    with torch.inference_mode():
        ref = torch.cat([model(row[None]) for row in x])
        seen.clear()
        out = bucketed(x)
    assert seen == [max_batch, max_batch, 4]  # two full chunks, then 3 padded to 4
    assert out.shape == ref.shape and rel_error(out, ref) < 1e-6
    seen.clear()
    bucketed.warm_up((3, 32, 32))
    assert seen == list(bucketed.buckets)
    with pytest.raises(ValueError, match="max_batch"):
        BucketedModel(model, max_batch=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_bucketed_model_replays_cuda_graphs():
    model = randomize_batchnorm(tiny_model()).eval().cuda()
    fast = optimize(model, dtype=torch.float32)
    bucketed = BucketedModel(fast, max_batch=4, cuda_graphs=True)
    bucketed.warm_up((3, 32, 32))
    assert len(bucketed._graphs) == 3
    x = torch.randn(3, 3, 32, 32, device="cuda")
    with torch.inference_mode():
        assert rel_error(bucketed(x), model(x)) < 1e-4

"""densenet.optimize: same outputs as the eager model for every architecture, input layout, batch
and spatial size; eval-only; metadata kept; the benchmark's checks and its command line."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from conftest import randomize_batchnorm, tiny_model
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import densenet
import densenet.infer.cpu
import densenet.infer.optimize
from densenet import InferenceDenseNet, optimize
from densenet.cli import main
from densenet.infer.form import InferenceOnly
from densenet.tasks.bench import COMPILED_REFERENCE, ENGINES, format_table, run_benchmark
from densenet.tasks.bench_engines import Engine


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def check_same(model: densenet.DenseNet, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Optimize ``model`` (in eval mode) and assert its float32 output on ``x`` matches."""
    model = randomize_batchnorm(model).eval()
    fast = optimize(model, **kwargs)
    with torch.inference_mode():
        ref, out = model(x), fast(x)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert rel_error(out, ref) < 1e-5
    return out


@pytest.mark.parametrize(
    "name",
    [
        name
        if name in ("densenet121", "densenet_bc_100_k12")
        else pytest.param(name, marks=pytest.mark.slow)
        for name in densenet.list_models("densenet*")
    ],
)
def test_every_registry_model_matches(name):
    size = (33, 35) if densenet.nn.registry.model_config(name)["stem"] == "imagenet" else (7, 5)
    torch.manual_seed(0)
    check_same(densenet.get_model(name), torch.randn(2, 3, *size))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels_last", [None, False])
def test_layouts_and_batches(batch, channels_last):
    x = torch.randn(batch, 3, 40, 40)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        check_same(tiny_model(), inp, channels_last=channels_last)


@pytest.mark.parametrize("size", [(29, 29), (31, 45), (64, 37)])
def test_odd_spatial_sizes(size):
    check_same(tiny_model(), torch.randn(2, 3, *size))
    check_same(tiny_model(stem="cifar"), torch.randn(2, 3, size[0] // 4, size[1] // 4))


@pytest.mark.parametrize(
    "config",
    [
        {"bn_size": 0},  # no bottleneck: a single BN-ReLU-Conv3x3 per layer
        {"bn_size": 2, "compression": 0.7, "drop_rate": 0.2},
        {"num_classes": 0},  # pooled features out
        {"in_channels": 1, "block_config": (1, 3, 2), "stem": "cifar"},
    ],
)
def test_custom_configurations(config):
    model = tiny_model(**config)
    x = torch.randn(2, model.config["in_channels"], 20, 20)
    out = check_same(model, x)
    assert out.shape[1] == (model.num_classes or model.num_features)


def test_negative_and_zero_batchnorm_scales():
    """relu(s * x + t) becomes a clamp from below (s > 0), from above (s < 0) or a constant
    (s == 0): every case, in the prefix, a transition and before the classifier."""
    model = randomize_batchnorm(tiny_model()).eval()
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.weight.data[::3] *= -1
        norm.weight.data[1::5] = 0
    fast = optimize(model)
    clamps = [m for m in fast.modules() if type(m).__name__ == "PrefixClamp"]
    assert clamps and all(c.high is not None for c in clamps)
    x = torch.randn(3, 3, 36, 36)
    with torch.inference_mode():
        assert rel_error(fast(x), model(x)) < 1e-5


class OpLog(TorchDispatchMode):
    """Records the name of every aten operator run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_folds_and_buffer_are_in_place():
    """The eager model concatenates and normalises; the fast form runs no BatchNorm and no
    concatenation: one copy of the block input into its buffer, one per layer into its slice,
    and exactly the model's convolutions."""
    model = randomize_batchnorm(tiny_model()).eval()  # blocks of 2 layers
    fast = optimize(model, backend="eager")
    assert isinstance(fast, InferenceDenseNet)
    assert not any(t.requires_grad for t in [*fast.parameters(), *fast.buffers()])
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode(), OpLog() as slow_log:
        model(x)
    with torch.inference_mode(), OpLog() as fast_log:
        fast(x)
    assert "cat" in slow_log.ops and "batch_norm" in slow_log.ops
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert fast_log.ops.count("conv2d") == convs == slow_log.ops.count("conv2d")
    assert "cat" not in fast_log.ops and "batch_norm" not in fast_log.ops
    assert fast_log.ops.count("copy_") == 2 * (1 + 2)  # per block: its input, then 2 layers


def test_reduced_precision_within_1e2():
    model = randomize_batchnorm(tiny_model()).eval()
    x = torch.randn(2, 3, 40, 40)
    fast = optimize(model, dtype=torch.bfloat16)
    assert fast.dtype == torch.bfloat16
    with torch.inference_mode():
        out, ref = fast(x), model(x)
    assert out.dtype == torch.float32
    assert rel_error(out, ref) < 1e-2


def test_refuses_training_mode():
    model = tiny_model()
    with pytest.raises(RuntimeError, match=r"eval mode.*model\.eval\(\)"):
        optimize(model.train())
    fast = optimize(model.eval())
    with pytest.raises(RuntimeError, match="inference-only"):
        fast.train()
    with pytest.raises(TypeError, match="DenseNet"):
        optimize(torch.nn.Linear(2, 2).eval())
    with pytest.raises(ValueError, match="compile"):
        optimize(model, compile="fastest")


def test_weights_are_copied_and_source_untouched():
    model = randomize_batchnorm(tiny_model()).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        before = model(x)
        fast = optimize(model)
        first = fast(x)
        assert torch.equal(model(x), before)
        model.features.conv0.weight.mul_(2)
        assert torch.equal(fast(x), first)


def test_keeps_metadata_and_predict_output():
    model = randomize_batchnorm(tiny_model(num_classes=3, arch="tiny")).eval()
    fast = optimize(model)
    assert fast.arch == "tiny" and fast.config == model.config and fast.num_classes == 3
    images = torch.rand(4, 3, 40, 40)
    categories = ["cat", "dog", "fish"]
    slow = densenet.Classifier(model, device="cpu", categories=categories, optimize=False)
    quick = densenet.Classifier(model, device="cpu", categories=categories)
    assert isinstance(quick.model, InferenceOnly) and slow.model is model
    for a, b in zip(slow.predict(images, topk=3), quick.predict(images, topk=3)):
        assert [label for label, _ in a] == [label for label, _ in b]
        assert [p for _, p in a] == pytest.approx([p for _, p in b], rel=1e-5)


@pytest.mark.parametrize("flags, optimized", [([], True), (["--no-optimize"], False)])
def test_predict_optimizes_unless_told_not_to(tmp_path, monkeypatch, flags, optimized):
    import densenet.infer.runner

    models = []
    original = densenet.infer.runner.Runner.logits

    def spy(self, batch):
        models.append(self.module)
        return original(self, batch)

    monkeypatch.setattr(densenet.infer.runner.Runner, "logits", spy)
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 40), "orange").save(image)
    args = ["predict", str(image), "--model", "densenet_40_k12", "--weights", "none"]
    assert main([*args, "--device", "cpu", *flags]) == 0
    assert isinstance(models[0], InferenceOnly) is optimized


@pytest.mark.slow
def test_compile_matches():
    model = randomize_batchnorm(tiny_model(block_config=(1, 1))).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="slower.*backend='onednn'"):  # on the CPU
        fast = optimize(model, compile=True)
    with torch.inference_mode():
        assert rel_error(fast(x), model(x)) < 1e-5


@pytest.mark.slow
def test_inductor_backend_keeps_batch_static():
    """A new batch size compiles a new static graph: three sizes, three graphs. (Dynamo's
    default marks the batch dynamic at the second size, and then needs no third graph.)"""
    model = randomize_batchnorm(tiny_model(block_config=(1,), num_init_features=4)).eval()
    with pytest.warns(UserWarning, match="slower"):
        fast = optimize(model, backend="inductor")
    torch._dynamo.reset()
    stats = torch._dynamo.utils.counters["stats"]
    before = stats["unique_graphs"]
    with torch.inference_mode():
        for batch in (1, 2, 3):
            x = torch.randn(batch, 3, 16, 16)
            assert rel_error(fast(x), model(x)) < 1e-5
    assert stats["unique_graphs"] - before == 3


def test_backend_choices(monkeypatch):
    model = randomize_batchnorm(tiny_model()).eval()
    # the CPU default follows the CPU's kind (the engine table, tests/test_engines.py): the
    # onednn form where it measured faster (AVX2, AVX-512 with BF16 or AMX), else eager
    monkeypatch.setattr(densenet.infer.engines, "cpu_kind", lambda: "DEFAULT")
    assert isinstance(optimize(model), InferenceDenseNet)
    assert isinstance(optimize(model, dtype=torch.float64), InferenceDenseNet)
    for kind in ("AVX2", "AVX512_BF16", "AMX"):
        monkeypatch.setattr(densenet.infer.engines, "cpu_kind", lambda k=kind: k)
        assert isinstance(optimize(model), densenet.infer.cpu.OneDNNDenseNet)
    monkeypatch.setattr(densenet.infer.optimize, "onednn_bfloat16", lambda: False)  # AVX2-only
    assert isinstance(optimize(model, dtype=torch.bfloat16), InferenceDenseNet)
    assert isinstance(optimize(model, channels_last=False), InferenceDenseNet)
    assert isinstance(optimize(model, dtype=torch.float64), InferenceDenseNet)
    assert isinstance(optimize(model, backend="eager"), InferenceDenseNet)
    with pytest.raises(ValueError, match="backend must be one of"):
        optimize(model, backend="tensorrt")
    with pytest.raises(ValueError, match="backend='inductor' only"):
        optimize(model, backend="eager", compile=True)


def test_benchmark_flags_wrong_outputs_and_takes_both_ratios(monkeypatch):
    wrong = Engine("wrong", lambda model, x, dtype: lambda inp: model(inp) * 1.01)
    monkeypatch.setitem(ENGINES, "wrong", wrong)
    # an uncompiled stand-in for torch.compile(torchvision), which takes a minute on this CPU
    monkeypatch.setitem(ENGINES, COMPILED_REFERENCE, ENGINES["torchvision eager CL"])
    model = randomize_batchnorm(tiny_model(growth_rate=8))
    engines = ["densenet.optimize", COMPILED_REFERENCE, "wrong", "densenet.optimize triton"]
    said: list[str] = []
    results = run_benchmark(
        [model], [2], image_size=32, rounds=2, repeats=1, engines=engines, progress=said.append
    )
    by_engine = {r.engine: r for r in results}
    # the baseline is added; the CUDA-only engine is left out on the CPU
    assert list(by_engine) == [
        "torchvision eager",
        "densenet.optimize",
        COMPILED_REFERENCE,
        "wrong",
    ]
    base, compiled = by_engine["torchvision eager"], by_engine[COMPILED_REFERENCE]
    for r in (base, compiled, by_engine["densenet.optimize"]):
        assert len(r.times_ms) == 2 and r.ms == statistics.median(r.times_ms)
        assert r.speedup == pytest.approx(base.ms / r.ms)
        assert r.vs_compiled == pytest.approx(compiled.ms / r.ms)
        assert r.images_per_s == pytest.approx(2e3 / r.ms)
    assert by_engine["densenet.optimize"].rel_error < 1e-5
    assert by_engine["wrong"].ms is None and "wrong output" in by_engine["wrong"].note
    table = format_table(results).splitlines()
    assert "vs baseline" in table[0] and "vs tv compile" in table[0]
    assert table[-1].split()[2] == "wrong"
    # what will run is said first; the rows as soon as they are measured
    assert said[0].startswith("1 model(s) x 1 batch size(s) x 4 engines (torchvision eager, ")
    assert said[-1] == format_table(results)


def test_benchmark_rejects_unknown_engines():
    with pytest.raises(ValueError, match=r"unknown engines \['nonsense'\]"):
        run_benchmark([tiny_model()], [1], engines=["densenet.optimize", "nonsense"])


def spy_engine(calls: list):
    """An engine running the model eagerly that records (stage, batch, TF32 flags) per call."""

    def build(model, x, dtype):
        calls.append(("build", None, torch.backends.cudnn.allow_tf32))

        def run(inp):
            flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            calls.append(("run", inp.shape[0], flags))
            return model(inp)

        return run

    return Engine("spy", build)


def test_benchmark_shapes_vary_and_float32_without_tf32(monkeypatch):
    """With shapes_vary the engine runs batches of 1 and 64 before the measured one; float32
    engines are built, checked, warmed up and timed with TF32 off, and the flags restored."""
    calls: list = []
    monkeypatch.setitem(ENGINES, "spy", spy_engine(calls))
    model = randomize_batchnorm(tiny_model())
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        run_benchmark(
            [model], [3], image_size=32, rounds=1, repeats=2, engines=["spy"], shapes_vary=True
        )
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert [batch for stage, batch, _ in calls if stage == "run"][:4] == [1, 64, 3, 3]
    assert len(calls) == 9  # build; 1, 64, 3 at setup; check; 2 warm-up; 2 timed
    assert all(flags in (False, (False, False)) for _, _, flags in calls)


def test_bench_command_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--models", "densenet121", "--batch-sizes", "1", "--image-size", "32"]
    argv += ["--engines", "densenet.optimize", "--rounds", "1", "--repeats", "2", "--quiet"]
    assert main([*argv, "--output", str(out)]) == 0
    machine_line, *table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["model", "batch", "engine"]
    report = json.loads(out.read_text())
    assert report["machine"]["torch"] == torch.__version__
    assert report["machine"]["cpu_kind"] in machine_line  # the CPU kind and flags come first
    engines = [r["engine"] for r in report["results"]]
    assert engines == ["torchvision eager", "densenet.optimize"]
    assert all(len(r["times_ms"]) == 2 and r["rel_error"] < 1e-5 for r in report["results"])
    assert main(["bench", "--engines", "nonsense", "--quiet"]) == 2


def test_reset_classifier_leaves_the_config_of_an_inference_form_made_before():
    model = densenet.DenseNet(
        growth_rate=4, block_config=(1, 1), num_init_features=8, num_classes=3
    )
    fast = densenet.optimize(model.eval())
    model.reset_classifier(7)
    assert (model.config["num_classes"], fast.config["num_classes"]) == (7, 3)
    assert fast.num_classes == fast.config["num_classes"] == fast.classifier.out_features

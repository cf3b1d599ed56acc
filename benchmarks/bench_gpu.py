"""GPU check of densenet's fast paths, side by side with torchvision in one process: exactness
(float32, TF32 off), bfloat16 error, batch-256 throughput against torchvision eager and compiled
with the time to first result at a new batch size, batch-1 latency as a CUDA graph with the
kernel count, the default form after varied batch sizes, and a bf16 training step (plain and
memory-efficient) with its peak memory.

Run on a GPU machine from the project root:  PYTHONPATH=src python benchmarks/bench_gpu.py
JSON lines go to $OUT/gpu_check.jsonl (default /tmp) and a summary table is printed at the end.
Sections run in order and are skipped when BUDGET_S (default 420 s) is nearly spent; compiling
densenet121 costs 15-45 s each time, and the triton backend's first float32 call about 70 s.
"""

import inspect
import json
import os
import time
import traceback

import torch
import torch.nn.functional as F
from torchvision import models as tvm

import densenet

T0 = time.time()
BUDGET = float(os.environ.get("BUDGET_S", "420"))
OUT = os.environ.get("OUT", "/tmp")
DEV = "cuda"
BF = torch.bfloat16
CL = torch.channels_last
torch.backends.cudnn.benchmark = True
ROWS = []
BACKENDS = (
    ["eager", "inductor", "triton"]
    if "backend" in inspect.signature(densenet.optimize).parameters
    else [None]
)


def log(**row):
    row["t"] = round(time.time() - T0, 1)
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(OUT, "gpu_check.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def left():
    return BUDGET - (time.time() - T0)


def bench(fn, iters=10, warm=3):
    """Median milliseconds of fn() by CUDA events."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model


def pair(name="densenet121"):
    torch.manual_seed(0)
    tv = randomize_bn(getattr(tvm, name)()).eval().to(DEV)
    ours = getattr(densenet, name)().eval().to(DEV)
    ours.load_state_dict(tv.state_dict())
    return tv, ours


def fast(model, backend, **kw):
    return (
        densenet.optimize(model, **kw)
        if backend is None
        else densenet.optimize(model, backend=backend, **kw)
    )


def relerr(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def section(fn, need=60):
    if left() < need:
        log(section=fn.__name__, skipped="budget")
        return
    try:
        fn()
    except Exception as e:  # a failed section is a finding, not the end of the check
        log(section=fn.__name__, error=repr(e)[:400], tb=traceback.format_exc()[-1200:])
    torch.cuda.empty_cache()


def exactness():
    """float32 with TF32 off: every backend against the eager model."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        for name, size in (
            ("densenet121", 224),
            ("densenet_bc_100_k12", 32),
            ("densenet_40_k12", 35),
        ):
            torch.manual_seed(0)
            model = randomize_bn(densenet.get_model(name)).eval().to(DEV)
            x = torch.randn(3, 3, size, size + 4, device=DEV)
            with torch.inference_mode():
                ref = model(x)
                for backend in BACKENDS:
                    try:
                        y = fast(model, backend, dtype=torch.float32)(x)
                        log(section="exact", model=name, backend=backend, rel_err=relerr(y, ref))
                    except Exception as e:
                        log(section="exact", model=name, backend=backend, error=repr(e)[:300])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def bf16_error():
    """bf16 channels_last, every backend, against the float32 eager model (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        _, ours = pair()
        x = torch.randn(8, 3, 224, 224, device=DEV)
        with torch.inference_mode():
            ref = ours(x)
            for backend in BACKENDS:
                try:
                    y = fast(ours, backend)(x.to(BF).to(memory_format=CL))
                    log(
                        section="bf16", model="densenet121", backend=backend, rel_err=relerr(y, ref)
                    )
                except Exception as e:
                    log(section="bf16", model="densenet121", backend=backend, error=repr(e)[:300])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def throughput():
    """batch 256 bf16: torchvision eager and compiled, optimize per backend, then compiled."""
    tv, ours = pair()
    x = torch.randn(256, 3, 224, 224, device=DEV).to(BF).to(memory_format=CL)
    tvb = tv.to(memory_format=CL).to(BF)
    with torch.inference_mode():
        base = bench(lambda: tvb(x))
        log(section="b256", impl="torchvision eager", ms=base, ips=256e3 / base)
        tvc = torch.compile(tvb)
        tvc(x)
        comp = bench(lambda: tvc(x))
        log(section="b256", impl="torch.compile(torchvision)", ms=comp, ips=256e3 / comp)
        # every backend; the inductor one compiled too, the triton one with its own 3x3 too
        variants = {"inductor": ({"compile": True},), "triton": ({"growth_conv": "triton"},)}
        for backend in BACKENDS:
            for options in ({}, *variants.get(backend, ())):
                if left() < 70:
                    return
                label = " ".join(f"{k}={v}" for k, v in options.items())
                try:
                    t = time.time()
                    f = fast(ours, backend, **options)
                    f(x)
                    torch.cuda.synchronize()
                    setup = time.time() - t
                    ms = bench(lambda f=f: f(x))
                    log(
                        section="b256",
                        impl=f"optimize backend={backend} {label}",
                        ms=ms,
                        ips=256e3 / ms,
                        vs_tv_eager=base / ms,
                        vs_tv_compiled=comp / ms,
                        setup_s=setup,
                    )
                    t = time.time()  # a batch size this form has not seen: time to first result
                    f(x[:48])
                    torch.cuda.synchronize()
                    log(
                        section="new_batch",
                        impl=f"optimize backend={backend} {label}",
                        first_result_s=time.time() - t,
                    )
                except Exception as e:
                    log(
                        section="b256",
                        impl=f"optimize backend={backend} {label}",
                        error=repr(e)[:300],
                    )


def tensorrt():
    """TensorRT (torch-tensorrt's dynamo path) on torchvision's densenet121 in bf16 at batch 256
    and 1, beside torchvision eager: the GPU peer an engine of the table must beat."""
    try:
        import torch_tensorrt
    except ImportError as e:
        log(section="tensorrt", impl="torch_tensorrt", error=f"not installed: {e}")
        return
    reference, _ = pair()  # float32
    model, _ = pair()
    model = model.to(memory_format=CL).to(BF)
    for batch in (256, 1):
        x = torch.randn(batch, 3, 224, 224, device=DEV).to(BF).to(memory_format=CL)
        with torch.inference_mode():
            base = bench(lambda x=x: model(x))
            t = time.time()
            trt = torch_tensorrt.compile(
                model, ir="dynamo", inputs=[x], enabled_precisions={BF}, min_block_size=1
            )
            trt(x)
            torch.cuda.synchronize()
            setup = time.time() - t
            ms = bench(lambda x=x, trt=trt: trt(x))
            error = relerr(trt(x).float(), reference(x.float()))
        log(
            section=f"b{batch}", impl="torch_tensorrt bf16", ms=ms, ips=batch * 1e3 / ms,
            vs_tv_eager=base / ms, setup_s=setup, rel_error=error,
        )  # fmt: skip


def shapes_vary():
    """The default optimize() after the same process ran batch 1 and 64 through it."""
    _, ours = pair()
    f = densenet.optimize(ours)
    with torch.inference_mode():
        for b in (1, 64):
            f(torch.randn(b, 3, 224, 224, device=DEV).to(BF).to(memory_format=CL))
        x = torch.randn(256, 3, 224, 224, device=DEV).to(BF).to(memory_format=CL)
        f(x)
        ms = bench(lambda: f(x))
    log(
        section="shapes_vary",
        impl="optimize() after batch 1 and 64",
        ms=ms,
        ips=256e3 / ms,
    )


def latency():
    """batch 1, replayed as a CUDA graph; kernels per forward from the profiler."""
    tv, ours = pair()
    x = torch.randn(1, 3, 224, 224, device=DEV).to(BF).to(memory_format=CL)

    def graphed(m):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                m(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            m(x)
        return g.replay

    def kernels(m):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m(x)
            torch.cuda.synchronize()
        return sum(
            e.count for e in prof.key_averages() if (getattr(e, "device_time_total", 0) or 0) > 0
        )

    with torch.inference_mode():
        tvb = tv.to(memory_format=CL).to(BF)
        log(
            section="b1",
            impl="torchvision eager, CUDA graph",
            ms=bench(graphed(tvb), iters=50, warm=5),
            kernels=kernels(tvb),
        )
        for backend in BACKENDS:
            try:
                f = fast(ours, backend)
                log(
                    section="b1",
                    impl=f"optimize backend={backend}, CUDA graph",
                    ms=bench(graphed(f), iters=50, warm=5),
                    kernels=kernels(f),
                )
            except Exception as e:
                log(section="b1", impl=f"optimize backend={backend}", error=repr(e)[:300])


def training():
    """batch 128, autocast bf16, SGD: throughput and peak memory, plain and memory-efficient."""
    impls = ["torchvision", "densenet", "densenet memory_efficient"]
    try:
        densenet.densenet121(memory_efficient="triton")
        impls.append("densenet memory_efficient=triton")
    except (TypeError, ValueError):
        pass
    for impl in impls:
        torch.manual_seed(0)
        mode = "triton" if impl.endswith("triton") else impl.endswith("efficient")
        m = (
            tvm.densenet121()
            if impl == "torchvision"
            else densenet.densenet121(memory_efficient=mode)
        )
        m = m.to(DEV).to(memory_format=CL).train()
        opt = torch.optim.SGD(
            m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
        )
        x = torch.randn(128, 3, 224, 224, device=DEV).to(memory_format=CL)
        y = torch.randint(0, 1000, (128,), device=DEV)

        def step(m=m, opt=opt, x=x, y=y):
            with torch.autocast(DEV, dtype=BF):
                loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        torch.cuda.reset_peak_memory_stats()
        ms = bench(step, iters=8, warm=3)
        log(
            section="train",
            impl=impl,
            ms=ms,
            ips=128e3 / ms,
            peak_gib=torch.cuda.max_memory_allocated() / 2**30,
        )
        del m, opt, step
        torch.cuda.empty_cache()


log(torch=torch.__version__, device=torch.cuda.get_device_name(), backends=BACKENDS)
section(exactness, 40)
section(bf16_error, 40)
section(throughput, 120)
section(tensorrt, 90)
section(latency, 40)
section(shapes_vary, 90)
section(training, 40)
print("\nsummary")
for r in ROWS:
    if "section" in r and ("impl" in r or "backend" in r):
        what = r.get("impl") or f"{r.get('model')} backend={r.get('backend')}"
        figures = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in r.items()
            if k not in ("section", "impl", "model", "backend", "t")
        )
        print(f"{r['section']:12s} {what:50s} {figures}")

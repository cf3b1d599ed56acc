"""Memory-efficient training benchmark: activation memory saved for backward and training-step
speed of densenet's dense blocks against torchvision's DenseNet (an RDNet: timm's), in one run.

Implementations (same weights, same input, same step: forward, cross-entropy, backward, SGD with
momentum): torchvision plain, torchvision ``memory_efficient=True`` (checkpointing), densenet plain,
densenet ``memory_efficient=True``; on CUDA also densenet ``memory_efficient="triton"`` (the
bottleneck's BN-ReLU-Conv1x1 as fused Triton kernels); with ``--compile`` also torchvision and
densenet memory-efficient under ``torch.compile``. For an RDNet (``--arch rdnet_tiny``): timm
plain, timm with ``set_grad_checkpointing()``, densenet plain, densenet ``memory_efficient=True``
(``densenet.nn.rdnet_memory``).

Figures, each a ratio against the reference (torchvision plain; an RDNet: timm plain) in the same
run:
- saved: bytes of the unique non-parameter storages that autograd saves for backward (seen by
  ``torch.autograd.graph.saved_tensors_hooks``) in one forward pass;
- step: time of a training step (CUDA events on GPU), implementations interleaved round by
  round; the ratio is the median over rounds of the ratio to torchvision's step in that round;
- peak (GPU only): ``torch.cuda.max_memory_allocated`` over a step, parameters and optimizer
  state included.
Before timing, every implementation's loss and gradients are checked against the reference
(float64, CPU, 2 images of 64x64; the Triton path runs there as the eager one, its kernels are
checked by tests/test_kernels_training.py).

CPU:  python benchmarks/bench_memory.py --batch 8
      python benchmarks/bench_memory.py --arch rdnet_tiny --batch 4
H100: python benchmarks/bench_memory.py --device cuda --batch 128 --compile --json out.json
(on CUDA: bf16 autocast and channels_last by default).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

import densenet


def build(arch: str, compile_: bool, triton: bool) -> dict[str, nn.Module]:
    """The implementations to compare, the reference first, all with the weights of one randomly
    initialised model."""
    torch.manual_seed(0)
    ours = densenet.get_model(arch)
    state = ours.state_dict()
    if arch.startswith("rdnet"):
        import timm

        checkpointed = timm.create_model(arch)
        checkpointed.set_grad_checkpointing()
        models = {"timm": timm.create_model(arch), "timm grad_checkpointing": checkpointed}
    else:
        models = {
            "torchvision": getattr(torchvision.models, arch)(),
            "torchvision memory_efficient": getattr(torchvision.models, arch)(
                memory_efficient=True
            ),
        }
    models["densenet"] = ours
    models["densenet memory_efficient"] = densenet.get_model(arch, memory_efficient=True)
    if triton and not arch.startswith("rdnet"):
        models["densenet memory_efficient triton"] = densenet.get_model(
            arch, memory_efficient="triton"
        )
    if compile_:
        models[f"{next(iter(models))} compiled"] = copy.deepcopy(models[next(iter(models))])
        models["densenet memory_efficient compiled"] = densenet.get_model(
            arch, memory_efficient=True
        )
    for model in models.values():
        model.load_state_dict(state)
    return models


def saved_bytes(model: nn.Module, x: Tensor, autocast: Callable[[], object]) -> int:
    """Bytes of the unique non-parameter storages saved for backward by one forward pass."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        out = model(x)
    out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


class Step:
    """One training step of ``model``: forward, cross-entropy, backward, SGD with momentum."""

    def __init__(self, model: nn.Module, autocast: Callable[[], object]) -> None:
        self.model = model
        self.autocast = autocast
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        with self.autocast():
            loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def check(models: dict[str, nn.Module], x: Tensor, y: Tensor, tol: float = 1e-6) -> None:
    """Loss and gradients of every implementation against the first (the reference), from the
    same state,
    in float64 on the CPU (the implementations' algorithms, whatever the timed precision).

    Float64 because a randomly initialised densenet121 is ill-conditioned: in float32,
    torchvision's own gradients are about 5e-3 from the float64 ones (batch 2, 224x224), and bf16
    moves them by tens of percents. The error is that of all gradients together.
    """
    x, y = x.detach().cpu().double(), y.cpu()
    ref = None
    for name, model in models.items():
        model = copy.deepcopy(model).cpu().double()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        if ref is None:
            ref = (loss, grad)
            continue
        error = max(
            ((loss - ref[0]).abs() / ref[0]).item(),
            ((grad - ref[1]).norm() / ref[1].norm()).item(),
        )
        if error > tol:
            raise SystemExit(f"{name}: relative error {error:.2e} against {next(iter(models))}")


def time_steps(steps: dict[str, Step], x: Tensor, y: Tensor, rounds: int) -> dict[str, list[float]]:
    """Seconds per step, per round; implementations interleaved round by round."""
    cuda = x.is_cuda
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                step(x, y)
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                step(x, y)
                times[name].append(time.perf_counter() - t0)
    return times


def peak_memory(step: Step, x: Tensor, y: Tensor) -> int:
    """Peak bytes allocated on the GPU over one (warm) step."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(x, y)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="densenet121")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None, help="default: 8 (CPU), 128 (CUDA)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=None, help="default: 1 (CPU), 5 (CUDA)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile variants")
    parser.add_argument("--no-bf16", action="store_true", help="CUDA: float32, no autocast")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    batch = args.batch or (128 if cuda else 8)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    bf16 = cuda and not args.no_bf16
    fmt = torch.channels_last if cuda else torch.contiguous_format

    def autocast():
        return torch.autocast(args.device, dtype=torch.bfloat16, enabled=bf16)

    models = build(args.arch, args.compile, triton=cuda)
    reference = next(iter(models))
    for name, model in models.items():
        model.to(args.device, memory_format=fmt).train()
        if name.endswith("compiled"):
            models[name] = torch.compile(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, args.size, args.size, generator=g)
    x = x.to(args.device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), generator=g).to(args.device)

    eager = {n: m for n, m in models.items() if not n.endswith("compiled")}
    check(eager, x[:2, :, :64, :64], y[:2])
    saved = {name: saved_bytes(model, x, autocast) for name, model in eager.items()}
    steps = {name: Step(model, autocast) for name, model in models.items()}
    for _ in range(warmup):
        for step in steps.values():
            step(x, y)
    peak = {name: peak_memory(step, x, y) for name, step in steps.items()} if cuda else {}
    times = time_steps(steps, x, y, args.rounds)
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    # the ratio to the reference step of the same round: steadier than a ratio of medians when
    # the machine's load changes during the run
    paired = {
        name: statistics.median(t / r for t, r in zip(ts, times[reference], strict=True))
        for name, ts in times.items()
    }

    where = torch.cuda.get_device_name() if cuda else "cpu"
    rows = []
    for name in models:
        row = {
            "implementation": name,
            "step_s": seconds[name],
            "images_per_s": batch / seconds[name],
            "step_ratio": paired[name],
            "step_ratio_of_medians": seconds[name] / seconds[reference],
        }
        if name in saved:
            row["saved_MiB"] = saved[name] / 2**20
            row["saved_ratio"] = saved[name] / saved[reference]
        if name in peak:
            row["peak_GiB"] = peak[name] / 2**30
        rows.append(row)
    meta = {
        "arch": args.arch, "device": where, "batch": batch, "size": args.size, "bf16": bf16,
        "channels_last": cuda, "rounds": args.rounds, "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"{args.arch}, {where}, batch {batch}, {args.size}x{args.size}, bf16 {bf16}")
    header = f"{'implementation':36} {'saved MiB':>9} {'saved x':>7} {'step s':>8} {'step x':>6}"
    header += f" {'img/s':>8}" + (f" {'peak GiB':>8}" if cuda else "")
    print(header)
    for r in rows:
        line = f"{r['implementation']:36} "
        line += f"{r['saved_MiB']:9.1f} {r['saved_ratio']:7.3f} " if "saved_MiB" in r else " " * 18
        line += f"{r['step_s']:8.3f} {r['step_ratio']:6.2f} {r['images_per_s']:8.1f}"
        line += f" {r['peak_GiB']:8.2f}" if "peak_GiB" in r else ""
        print(line)


if __name__ == "__main__":
    main()

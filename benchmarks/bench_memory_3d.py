"""Memory-efficient training of a 3D DenseNet: activation memory saved for backward and
training-step time of densenet121 (``spatial_dims=3``) plain and ``memory_efficient=True``, and of
MONAI's DenseNet121 (same configuration) when ``monai`` is installed, in one run.

Figures, each a ratio against densenet plain in the same run (as ``bench_memory.py``): saved bytes
of one forward pass, and the median over interleaved rounds of the step-time ratio. Before
timing, the memory-efficient model's loss and gradients are checked against plain in float64 on
2 volumes of 32^3 (to 1e-5: there the last block's BatchNorm sees 2 values per channel, and a
1e-12 change of the stem's weights moves plain's own gradients by ~1e-7; tests/test_memory.py
checks 1e-10 on well-conditioned models).

CPU: python benchmarks/bench_memory_3d.py --batch 4 --size 96 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics

import torch
from bench_memory import Step, check, saved_bytes, time_steps

import densenet

REFERENCE = "densenet"


def build(in_channels: int, num_classes: int) -> dict[str, torch.nn.Module]:
    """densenet121 3D plain, memory-efficient, and MONAI's DenseNet121 if importable."""
    torch.manual_seed(0)
    kwargs = {"spatial_dims": 3, "in_channels": in_channels, "num_classes": num_classes}
    plain = densenet.densenet121(**kwargs)
    efficient = densenet.densenet121(**kwargs, memory_efficient=True)
    efficient.load_state_dict(plain.state_dict())
    models = {"densenet": plain, "densenet memory_efficient": efficient}
    with contextlib.suppress(ImportError):
        from monai.networks.nets import DenseNet121

        models["monai"] = DenseNet121(
            spatial_dims=3, in_channels=in_channels, out_channels=num_classes
        )
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=96, help="volume edge, voxels")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    models = build(1, 2)
    small = torch.randn(2, 1, 32, 32, 32)
    check(
        {k: v for k, v in models.items() if k.startswith("densenet")},
        small, torch.tensor([0, 1]), tol=1e-5,
    )  # fmt: skip
    x = torch.randn(args.batch, 1, *(args.size,) * 3)
    y = torch.randint(0, 2, (args.batch,))
    nothing = contextlib.nullcontext
    saved = {name: saved_bytes(m, x, nothing) for name, m in models.items()}
    steps = {name: Step(m, nothing) for name, m in models.items()}
    time_steps(steps, x, y, 1)  # warm-up
    times = time_steps(steps, x, y, args.rounds)
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"densenet121 3D, batch {args.batch} x 1 x {args.size}^3, float32, {args.rounds} rounds")
    print(f"{'implementation':28} {'saved MiB':>10} {'saved x':>8} {'step s':>8} {'step x':>7}")
    for name in models:
        ratio = statistics.median(t / r for t, r in zip(times[name], times[REFERENCE]))
        print(
            f"{name:28} {saved[name] / 2**20:10.0f} {saved[name] / saved[REFERENCE]:8.3f} "
            f"{statistics.median(times[name]):8.2f} {ratio:7.3f}"
        )


if __name__ == "__main__":
    main()

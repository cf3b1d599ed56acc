"""RDNet inference forms side by side in one process: timm's eager rdnet_tiny (the reference),
``densenet.optimize`` (the eager form), its openvino engine, bfloat16, and OpenVINO converting
the eager RDNet directly; each checked against float64 first, timed in alternating blocks.

python benchmarks/bench_rdnet_inference.py --rounds 5 --bf16 --direct   # OMP_NUM_THREADS=1
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import densenet
from densenet.infer.openvino import CompiledModule, compile_for_cpu, require_openvino
from densenet.tasks.bench import randomize_batchnorm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="rdnet_tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="add optimize(dtype=bfloat16)")
    parser.add_argument("--direct", action="store_true", help="add OpenVINO of the eager RDNet")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = randomize_batchnorm(densenet.get_model(args.arch)).eval()
    reference = timm.create_model(args.arch).eval()
    reference.load_state_dict(model.state_dict())
    forms = {
        "timm eager": reference,
        "optimize eager": densenet.optimize(model),
        "optimize openvino": densenet.optimize(model, backend="openvino"),
    }
    if args.bf16:
        forms["optimize bfloat16"] = densenet.optimize(model, dtype="bfloat16")
    if args.direct:
        ov = require_openvino("--direct")
        direct = ov.convert_model(model, example_input=torch.randn(2, 3, 224, 224))
        forms["openvino of eager RDNet"] = CompiledModule(
            compile_for_cpu(ov, direct, torch.float32), "RDNet"
        )
    print(f"{args.arch}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    for batch in (1, 16):
        x = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            exact = model.double()(x.double())
            model.float()
            for name, form in forms.items():
                error = (form(x).double() - exact).abs().max() / exact.abs().max()
                print(f"batch {batch:2d} {name:26s} relative error {error.item():.1e}")
            times: dict[str, list[float]] = {name: [] for name in forms}
            for _ in range(args.rounds):
                for name, form in forms.items():
                    for _ in range(5 if batch == 1 else 1):
                        start = time.perf_counter()
                        form(x)
                        times[name].append(time.perf_counter() - start)
        base = statistics.median(times["timm eager"])
        for name, ts in times.items():
            median = statistics.median(ts)
            print(f"batch {batch:2d} {name:26s} {median * 1e3:8.1f} ms {base / median:5.2f}x timm")


if __name__ == "__main__":
    main()

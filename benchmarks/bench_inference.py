"""Inference benchmark of densenet.optimize (each backend: eager, inductor, triton; on CUDA also
replayed as CUDA graphs) against torchvision (eager and compiled), timm, ONNX Runtime and
OpenVINO: the same as ``densenet bench``; run with ``--help`` for the options. Every row gives
its ratio to torchvision eager and to torch.compile(torchvision); float32 runs with TF32 off.

    python benchmarks/bench_inference.py --batch-sizes 1 16 --output cpu.json
    python benchmarks/bench_inference.py --device cuda --batch-sizes 1 256 --output h100.json
"""

import sys

from densenet.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

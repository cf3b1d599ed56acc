"""What a CPU can prove about the Triton kernels before they meet a GPU.

``python -m densenet.tasks.gpu_check [--arch sm90 sm80] [--json]`` finds every distinct launch of the
kernels (by running the triton inference form of densenet121 and of two k = 12 models in
bfloat16 and float16, and a memory-efficient training step of densenet121 and of a k = 12
DenseNet-BC with ``memory_efficient="triton"`` under bfloat16 autocast and in float32, IEEE and
TF32, on the CPU under Triton's interpreter with the launches recorded, not executed), then
compiles each launch as Triton's JIT would, with each configuration its autotuner can reach
(after its pruning by dtype, precision and channel alignment), for the GPU architectures asked
(``triton.compile`` with a ``GPUTarget``; no GPU needed) and reads back from the cubin:
registers, spilled bytes (``cuobjdump -res-usage``: stack frame and local memory), shared memory
(the compiled metadata) and the tensor-core instructions it uses (``nvdisasm``: ``HGMMA`` on
sm90, ``HMMA`` on sm80). A row fails when it does not compile, needs more shared memory than the
architecture has, spills, or is a 16-bit or TF32 GEMM without tensor-core instructions.

It cannot tell speed: that needs a GPU.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ARCHS", "CompiledLaunch", "Launch", "check", "reachable", "record_launches"]

# shared memory a block may use (bytes) and the tensor-core instruction of each target
ARCHS = {
    "sm90": {"capability": 90, "shared": 227 * 1024, "mma": "HGMMA"},
    "sm80": {"capability": 80, "shared": 163 * 1024, "mma": "HMMA"},
}
_TORCH_TO_TRITON = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


@dataclass(frozen=True)
class Launch:
    """One distinct launch of an autotuned kernel: the pointer dtypes and constexpr values of
    its arguments, and which integer arguments are multiples of 16 (``aligned``: Triton's JIT
    compiles those as known to be, and so can vectorise the loads they address; never the pixel
    counts, which the kernels do not specialise)."""

    kernel: str
    signature: tuple[tuple[str, str], ...]  # (argument, "*bf16" | "i32" | "constexpr")
    constants: tuple[tuple[str, Any], ...]
    aligned: tuple[str, ...] = ()

    @property
    def dtype(self) -> str:
        """The GEMM operands' dtype: the first pointer's that is not float32, else fp32."""
        kinds = [t[1:] for _, t in self.signature if t.startswith("*")]
        return next((k for k in kinds if k not in ("fp32", "fp64")), kinds[0])


@dataclass(frozen=True)
class CompiledLaunch:
    """A launch compiled with one configuration for one architecture."""

    kernel: str
    dtype: str
    variant: str  # the launch's constexprs, e.g. POOL=True RELU=False, PRECISION=tf32
    arch: str
    tile: str  # BLOCK_M x BLOCK_N (x BLOCK_K), warps, stages
    registers: int
    spilled: int  # bytes per thread of stack frame and local memory
    shared: int  # bytes
    mma: int  # tensor-core instructions
    error: str | None = None
    gemm: bool = True  # the kernel multiplies matrices (a pooling kernel does not)

    @property
    def problems(self) -> list[str]:
        if self.error:
            return [self.error]
        found = []
        if self.shared > ARCHS[self.arch]["shared"]:
            found.append(f"shared memory {self.shared // 1024} KB > {self.arch}'s")
        if self.spilled:
            found.append(f"spills {self.spilled} B")
        tensor_cores = self.dtype in ("bf16", "fp16") or "PRECISION=tf32" in self.variant
        if self.gemm and tensor_cores and not self.mma:
            found.append(f"no {ARCHS[self.arch]['mma']}")
        return found


# ---- recording (under TRITON_INTERPRET=1) ---------------------------------------------------


def _triton_type(value: Any) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def record_launches() -> list[Launch]:
    """The distinct launches of the triton inference form (bfloat16, float16; with the Triton 3x3
    growth convolution) of densenet121 and of two k = 12 models, whose channel counts are not
    all multiples of 16 (a DenseNet-BC, and a DenseNet without bottleneck, whose 3x3 applies the
    BN-ReLU), and of a memory-efficient training step (bfloat16 autocast, float32) of
    densenet121 and of the DenseNet-BC, recorded under Triton's interpreter
    (``TRITON_INTERPRET=1`` must be set before triton is imported) without running the
    kernels."""
    from triton.runtime.autotuner import Autotuner

    seen: dict[Launch, None] = {}

    def record(self: Autotuner, *args: Any, **kwargs: Any) -> None:
        seen.setdefault(_launch(self, args, kwargs))

    original = Autotuner.run
    Autotuner.run = record  # type: ignore[method-assign]
    try:
        _run_inference_forms()
        _run_training_steps()
    finally:
        Autotuner.run = original  # type: ignore[method-assign]
    return list(seen)


def _launch(tuner: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Launch:
    """The launch of ``tuner``'s kernel with these arguments."""
    from densenet.nn.kernels.conv import PIXEL_ARGUMENTS

    names = tuner.fn.arg_names
    values = dict(zip(names, args)) | kwargs
    tuned = set(tuner.configs[0].kwargs)
    constexprs = {n for n in names if n in tuned or n not in values or _is_constexpr(tuner, n)}
    signature = tuple(
        (n, "constexpr" if n in constexprs else _triton_type(values[n])) for n in names
    )
    constants = tuple((n, values[n]) for n in names if n in values and _is_constexpr(tuner, n))
    aligned = tuple(
        n
        for n, kind in signature
        if kind in ("i32", "i64") and n not in PIXEL_ARGUMENTS and values[n] % 16 == 0
    )
    return Launch(tuner.fn.__name__, signature, constants, aligned)


def _run_inference_forms() -> None:
    """The triton inference form of densenet121 and of the two k = 12 models, in bfloat16 and
    float16, on one batch."""
    import torch

    from densenet.infer.optimize import optimize
    from densenet.nn.model import DenseNet
    from densenet.nn.registry import densenet121

    torch.manual_seed(0)
    model = densenet121(num_classes=10).eval()
    plain = DenseNet(12, (2, 2), 16, bn_size=0, stem="cifar").eval()  # BN-ReLU in the 3x3
    bc = DenseNet(12, (2, 2), 24, stem="cifar").eval()
    x = torch.randn(2, 3, 64, 64)
    for dtype in (torch.bfloat16, torch.float16):
        for net in (model, plain, bc):
            with torch.no_grad():
                optimize(net, dtype=dtype, backend="triton", growth_conv="triton")(x)


def _run_training_steps() -> None:
    """A memory-efficient training step of densenet121 and of the k = 12 DenseNet-BC in float32
    (IEEE and TF32) and under bfloat16 autocast."""
    import torch

    from densenet.nn.model import DenseNet
    from densenet.nn.registry import densenet121

    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    for model in (
        densenet121(num_classes=10, memory_efficient="triton"),
        DenseNet(12, (2, 2), 24, stem="cifar", memory_efficient="triton"),
    ):
        model = model.train().to(memory_format=torch.channels_last)
        for tf32 in (False, True):  # float32 GEMMs: IEEE, or TF32 where torch allows it
            torch.backends.cuda.matmul.allow_tf32 = tf32
            model(x).float().sum().backward()
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().sum()
        loss.backward()


def _is_constexpr(tuner: Any, name: str) -> bool:
    """Whether the kernel's argument ``name`` is annotated ``tl.constexpr``."""
    parameter = inspect.signature(tuner.fn.fn).parameters[name]
    return "constexpr" in str(parameter.annotation)


# ---- compiling (for a GPU that is not here) -------------------------------------------------


def _kernels() -> dict[str, Any]:
    """Every autotuned kernel of ``densenet.nn.kernels`` by name."""
    from triton.runtime.autotuner import Autotuner

    from densenet.nn.kernels import conv, pool, training

    return {
        value.fn.__name__: value
        for module in (conv, pool, training)
        for value in vars(module).values()
        if isinstance(value, Autotuner)
    }


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _compile(job: tuple[Launch, int, str]) -> CompiledLaunch:
    """Compile ``launch`` with its autotuner's configuration number ``index`` for ``arch``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launch, index, arch = job
    tuner = _kernels()[launch.kernel]
    config = tuner.configs[index]
    block = config.kwargs
    tile = f"{'x'.join(map(str, block.values()))} w{config.num_warps} s{config.num_stages}"
    constants = dict(launch.constants) | block
    variant = " ".join(f"{k}={v}" for k, v in launch.constants if (k, v) != ("PRECISION", "ieee"))
    fn = tuner.fn
    # as the JIT specialises: every pointer 16-byte aligned (the buffers' channel offsets are
    # multiples of 8), and the integers that are multiples of 16
    pointers = [n for n, t in launch.signature if t.startswith("*")]
    attrs = {
        (fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in [*pointers, *launch.aligned]
    }
    row = {
        "kernel": launch.kernel,
        "dtype": launch.dtype,
        "variant": variant,
        "arch": arch,
        "tile": tile,
        "gemm": "tl.dot(" in fn.src,
    }
    try:
        compiled = triton.compile(
            ASTSource(fn=fn, signature=dict(launch.signature), constexprs=constants, attrs=attrs),
            target=GPUTarget("cuda", ARCHS[arch]["capability"], 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
    except Exception as error:  # a compile error is a finding, reported in its row
        message = str(error).strip().splitlines()
        reason = f"does not compile: {message[-1] if message else error}"
        return CompiledLaunch(**row, registers=0, spilled=0, shared=0, mma=0, error=reason)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", cubin.name], capture_output=True, text=True
        ).stdout
        code = subprocess.run(
            [_tool("nvdisasm"), "-c", cubin.name], capture_output=True, text=True
        ).stdout
    fields = _resource_usage(usage)
    return CompiledLaunch(
        **row,
        registers=fields.get("REG", 0),
        spilled=fields.get("STACK", 0) + fields.get("LOCAL", 0),
        shared=compiled.metadata.shared,
        mma=code.count(ARCHS[arch]["mma"]),
    )


def _resource_usage(text: str) -> dict[str, int]:
    """``REG:255 STACK:528 SHARED:1024 LOCAL:0 ...`` of ``cuobjdump -res-usage`` as a dict."""
    fields: dict[str, int] = {}
    for word in text.split():
        name, _, value = word.partition(":")
        if value.isdigit():
            fields[name] = int(value)
    return fields


def reachable(launch: Launch) -> list[int]:
    """The indices of the configurations the autotuner can pick for ``launch``: those its
    ``early_config_prune`` keeps for the launch's pointer dtypes and constexprs (all, without
    one)."""
    import torch

    tuner = _kernels()[launch.kernel]
    configs = tuner.configs
    prune = getattr(tuner, "early_config_prune", None)
    if prune is None:
        return list(range(len(configs)))
    torch_dtypes = {v: getattr(torch, k) for k, v in _TORCH_TO_TRITON.items()}
    args = {
        n: torch.empty(0, dtype=torch_dtypes[t[1:]]) for n, t in launch.signature if t[0] == "*"
    }
    kept = prune(configs, args, **dict(launch.constants))
    return [i for i, config in enumerate(configs) if any(config is k for k in kept)]


def _jobs(launches: Sequence[Launch], archs: Sequence[str]) -> Iterator[tuple[Launch, int, str]]:
    for launch in launches:
        for index in reachable(launch):
            for arch in archs:
                yield launch, index, arch


def launches_in_subprocess() -> list[Launch]:
    """``record_launches`` in a fresh interpreter with ``TRITON_INTERPRET=1``."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "densenet.tasks.gpu_check", "--record"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"recording the kernel launches failed:\n{done.stderr[-3000:]}")
    return [
        Launch(
            r["kernel"],
            tuple(map(tuple, r["signature"])),
            tuple(map(tuple, r["constants"])),
            tuple(r["aligned"]),
        )
        for r in json.loads(done.stdout)
    ]


def check(
    archs: Sequence[str] = tuple(ARCHS),
    workers: int | None = None,
    launches: Sequence[Launch] | None = None,
) -> list[CompiledLaunch]:
    """Every launch (default: every recorded one) compiled with every configuration it can reach
    for every architecture in ``archs``, in ``workers`` processes (default: the CPUs)."""
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        raise ValueError(f"unknown architecture(s) {', '.join(unknown)}; use {', '.join(ARCHS)}")
    jobs = list(_jobs(launches_in_subprocess() if launches is None else launches, archs))
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        return list(pool.map(_compile, jobs))


def _table(rows: Sequence[CompiledLaunch]) -> str:
    """One line per compiled launch: what was compiled, then what it uses and its problems."""
    compiled = ["kernel", "dtype", "variant", "arch", "tile"]
    lines = [[*compiled, "regs", "spill B", "shared KB", "mma", "problems"]]
    for r in rows:
        used = (r.registers, r.spilled, f"{r.shared / 1024:.0f}", r.mma)
        problems = "; ".join(r.problems) or "ok"
        lines.append([r.kernel, r.dtype, r.variant, r.arch, r.tile, *map(str, used), problems])
    from densenet.data.files import text_table

    return text_table(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m densenet.tasks.gpu_check", description=__doc__)
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--workers", type=int, help="compiling processes (default: the CPUs)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--record", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.record:
        print(json.dumps([asdict(launch) for launch in record_launches()]))
        return 0
    rows = check(args.arch, args.workers)
    if args.json:
        print(json.dumps([asdict(r) | {"problems": r.problems} for r in rows], indent=2))
    else:
        print(_table(rows))
    failed = sum(bool(r.problems) for r in rows)
    print(f"{len(rows)} compiled, {failed} with problems", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

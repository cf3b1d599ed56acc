"""densenet.tasks.gpu_check: the launches recorded under the interpreter, a launch compiled for sm90
and sm80 on the CPU with registers, shared memory and tensor-core instructions read back, and
the problems it reports."""

from __future__ import annotations

import pytest

from densenet.tasks.gpu_check import (
    CompiledLaunch,
    _kernels,
    _resource_usage,
    check,
    launches_in_subprocess,
    reachable,
)

pytest.importorskip("triton")


def row(**changes) -> CompiledLaunch:
    fields = dict(kernel="_pointwise_kernel", dtype="bf16", variant="POOL=False RELU=True",
                  arch="sm90", tile="128x128x64 w8 s3", registers=168, spilled=0,
                  shared=96 * 1024, mma=4)  # fmt: skip
    return CompiledLaunch(**{**fields, **changes})


def test_problems_are_over_shared_memory_spills_no_tensor_cores_and_compile_errors():
    assert row().problems == []
    assert row(shared=228 * 1024).problems == ["shared memory 228 KB > sm90's"]
    assert row(arch="sm80", shared=164 * 1024, mma=2).problems == ["shared memory 164 KB > sm80's"]
    assert row(spilled=424).problems == ["spills 424 B"]
    assert row(mma=0).problems == ["no HGMMA"]
    assert row(mma=0, gemm=False).problems == []  # a pooling kernel multiplies nothing
    assert row(dtype="fp32", mma=0).problems == []  # float32 without TF32 uses FMA
    assert row(error="does not compile: x").problems == ["does not compile: x"]


def test_resource_usage_is_read_from_cuobjdump():
    text = " Function _k:\n  REG:255 STACK:528 SHARED:1024 LOCAL:16 CONSTANT[0]:640 TEXTURE:0"
    fields = _resource_usage(text)
    assert (fields["REG"], fields["STACK"], fields["LOCAL"], fields["SHARED"]) == (
        255,
        528,
        16,
        1024,
    )


@pytest.mark.slow
def test_every_launch_compiles_clean_with_every_reachable_config():
    """Every launch (densenet121 and two k = 12 models, whose channel counts are not all
    multiples of 16, in bfloat16 and float16; a training step of densenet121 and of a k = 12
    DenseNet-BC under bfloat16 autocast and in float32), compiled for sm90 and sm80 with every
    configuration its autotuner can pick: within shared memory, no spill, tensor-core
    instructions in every 16-bit GEMM; the unaligned launches pick from the smaller tiles kept
    for them."""
    from densenet.nn.kernels import conv

    launches = launches_in_subprocess()
    assert {launch.kernel for launch in launches} == set(_kernels())
    dtypes = {(launch.kernel, launch.dtype) for launch in launches}
    assert ("_pointwise_kernel", "bf16") in dtypes and ("_conv3x3_kernel", "fp16") in dtypes
    assert ("_forward_kernel", "fp32") in dtypes and ("_input_grad_kernel", "bf16") in dtypes
    alignments = {(launch.kernel, dict(launch.constants).get("ALIGNED")) for launch in launches}
    for kernel in ("_pointwise_kernel", "_conv3x3_kernel"):
        assert {(kernel, True), (kernel, False)} <= alignments
    for launch in launches:
        if dict(launch.constants).get("ALIGNED") is False:
            tiles = conv.POINTWISE_TILES if "pointwise" in launch.kernel else conv.GROWTH_TILES
            assert len(reachable(launch)) == len(tiles["unaligned"])
    rows = check(launches=launches)
    assert len(rows) == 2 * sum(len(reachable(launch)) for launch in launches)
    problems = [f"{r.kernel} {r.dtype} {r.variant} {r.arch} {r.tile}: {r.problems}"
                for r in rows if r.problems]  # fmt: skip
    assert not problems, "\n".join(problems)
    assert all(r.mma > 0 for r in rows if r.dtype in ("bf16", "fp16") and r.gemm)

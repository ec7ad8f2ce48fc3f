"""Every kernel at every autotune config compiles for sm_80 and sm_90a on this CPU-only
machine, without register spills and with tensor-core instructions in the PTX.

Runs `peft-ops compile` in a subprocess: the compile needs the real JIT functions, which the
Triton interpreter (set for the other tests) replaces.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from peft_ops.compile_report import SHARED_LIMIT_BYTES, format_table

pytestmark = pytest.mark.compile


@pytest.fixture(scope="module")
def compile_rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "peft_ops.compile_report", "--json"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.stdout.strip(), out.stderr[-3000:]
    return json.loads(out.stdout[out.stdout.index("["):])


def test_compile_report(compile_rows, capsys):
    with capsys.disabled():  # the registers / shared-memory table, in the test output
        print("\n" + format_table(compile_rows))
    builds = {r["kernel"] for r in compile_rows}  # "lora_forward [bf16]", …
    for kernel in ("lora_shrink", "lora_forward", "lora_backward_dy", "lora_backward_dx"):
        for variant in ("bf16", "bf16+fp32 A,B", "fp32"):
            assert f"{kernel} [{variant}]" in builds
    def kernel_and_variant(name):  # without the dX kernel's launch role, which differs by target
        return re.sub(r", (dX\+dW|dX|dW)\]$", "]", name)

    for target in ("sm80", "sm90"):
        assert {kernel_and_variant(r["kernel"]) for r in compile_rows if r["target"] == target} == \
            {kernel_and_variant(b) for b in builds}


def test_no_spills(compile_rows):
    spilling = [(r["kernel"], r["target"], r["config"], r["spill_bytes"]) for r in compile_rows if r["spill_bytes"]]
    assert not spilling


def test_tensor_cores_used(compile_rows):
    for r in compile_rows:
        if r["needs_tensor_cores"]:
            assert r["wgmma"] or r["mma_sync"], (r["kernel"], r["target"], r["config"])
    # on sm_90 the large GEMM tiles use warpgroup MMA
    assert all(r["wgmma"] for r in compile_rows if r["target"] == "sm90" and r["kernel"].startswith("lora_forward"))
    # the NF4 training GEMM decodes W in registers and still feeds wgmma on sm_90a
    assert all(r["wgmma"] for r in compile_rows if r["target"] == "sm90" and r["kernel"].startswith("nf4_matmul"))


def test_nf4_kernels_are_covered(compile_rows):
    builds = {r["kernel"] for r in compile_rows}
    for kernel in ("nf4_matmul", "nf4_gemv", "nf4_backward_dx"):
        for variant in ("bf16", "bf16+fp32 A,B", "fp32"):
            for fmt in ("aligned", "odd K"):
                assert f"{kernel} [{variant}, {fmt}]" in builds
    assert {"nf4_dequantize [bf16]", "nf4_dequantize [fp32]"} <= builds


def test_shared_memory_fits(compile_rows):
    for r in compile_rows:
        assert r["shared_bytes"] <= SHARED_LIMIT_BYTES[r["target"]], r


def test_adapter_kernels_are_covered(compile_rows):
    builds = {r["kernel"] for r in compile_rows}
    for variant in ("bf16, m≤64", "bf16, m≤128", "bf16, m≤256", "fp32, m≤64", "fp32, m≤128"):
        assert f"bottleneck_adapter_forward [{variant}]" in builds
        assert f"bottleneck_adapter_backward_dh [{variant}]" in builds
        assert any(b.startswith(f"bottleneck_adapter_backward_dx [{variant}, ") for b in builds), variant
    # where one dX launch spilled (sm_80, m ≤ 256) the table splits it in two, both built
    sm80 = {r["kernel"] for r in compile_rows if r["target"] == "sm80"}
    assert {"bottleneck_adapter_backward_dx [bf16, m≤256, dX]", "bottleneck_adapter_backward_dx [bf16, m≤256, dW]"} \
        <= sm80
    # the 64-row tiles on sm_90 reach warpgroup MMA
    assert any(r["wgmma"] for r in compile_rows
               if r["target"] == "sm90" and r["kernel"].startswith("bottleneck_adapter_forward"))

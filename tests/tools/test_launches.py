"""Launches per op call: planned for an H200 on meta tensors (nothing runs), and counted where
the op really runs (here: the kernels in the interpreter), the two agreeing.

The planned sequences are the facts the kernel rebuilds change: a one-line edit of the
expected list when a launch goes away."""

import pathlib
import re

import pytest
import torch

import peft_ops
from peft_ops.tools import launches
from peft_ops.tools.roofline import OpShape

SHRINK, FORWARD, G, RANK, DX = "_lora_shrink_kernel", "_lora_forward_kernel", "_lora_backward_g_kernel", \
    "_lora_backward_rank_kernel", "_lora_backward_dx_kernel"
# g = dY·B, the dX GEMM, the rank pass (dA, dB final, in the adapters' dtype): no PyTorch tail
LORA_BACKWARD = [G, DX, RANK]
# sm_90a: the persistent TMA dX GEMM runs the rank pass's items as extra programs
TMA_BACKWARD = [G, "_lora_backward_dx_tma_kernel"]
DEQUANTIZE = "_nf4_dequantize_kernel"
BOTTLENECK_BACKWARD = ["_bottleneck_backward_dh_kernel", "_bottleneck_backward_dx_kernel", "_bottleneck_finish_kernel"]
BOTTLENECK_TWO_PASS = ["_bottleneck_down_kernel", "_bottleneck_up_kernel"]
EXPECTED = {
    ("lora", 8192, 4096, 4096, 16): ([SHRINK, "_lora_forward_tma_kernel"], TMA_BACKWARD),
    # training sizes: W decoded into the workspace, then the dense LoRA kernels (again in the
    # backward: the decoded weight is never saved)
    ("qlora", 8192, 4096, 4096, 16): ([SHRINK, DEQUANTIZE, "_lora_forward_tma_kernel"], [DEQUANTIZE, *TMA_BACKWARD]),
    # decode: one GEMV launch (no split-K partials, no PyTorch tail), the shrink before it (K split
    # over programs at decode sizes, their partials summed by the last: still one launch)
    ("qlora", 1, 4096, 4096, 16): (["_lora_shrink_split_kernel", "_nf4_decode_gemv_kernel"],
                                   [x.replace(DX, "_nf4_backward_dx_kernel") for x in LORA_BACKWARD]),
    ("nf4", 1, 4096, 14336, 0): (["_nf4_decode_gemv_kernel"], ["_nf4_backward_dx_kernel"]),
    ("nf4", 8192, 4096, 14336, 0): ([DEQUANTIZE, "aten.mm.default"], [DEQUANTIZE, "aten.mm.default"]),
    # dh, dX with its row slices' partials, the finishing kernel (sums, scales, casts): no PyTorch tail
    ("bottleneck", 8192, 4096, 4096, 64): (["_bottleneck_forward_kernel"], BOTTLENECK_BACKWARD),
    # m = 256: the two-pass forward (h and act(h) by 64-wide bottleneck blocks, then y by column
    # blocks over row slices); m = 128 on sm_90a: two passes below 8192 rows, one kernel from there
    ("bottleneck", 4096, 4096, 4096, 256): (BOTTLENECK_TWO_PASS, BOTTLENECK_BACKWARD),
    ("bottleneck", 4096, 4096, 4096, 128): (BOTTLENECK_TWO_PASS, BOTTLENECK_BACKWARD),
    ("bottleneck", 8192, 4096, 4096, 128): (["_bottleneck_forward_kernel"], BOTTLENECK_BACKWARD),
}


@pytest.mark.parametrize("call", list(EXPECTED), ids=lambda c: f"{c[0]}-M{c[1]}-r{c[4]}")
@pytest.mark.parametrize("options", [{}, {"dropout_p": 0.1, "bias": True}], ids=["plain", "dropout+bias"])
def test_planned_launches_per_call(call, options):
    op, M, K, N, r = call
    if op == "nf4" and "dropout_p" in options:
        options = {"bias": True}
    planned = launches.op_launches(OpShape(op, M, K, N, r), "sm90", 132, **options)
    forward, backward = EXPECTED[call]
    if options.get("bias"):  # the dense base layer's bias rides in its GEMM (addmm's C)
        forward = [name.replace("aten.mm", "aten.addmm") for name in forward]
    assert [str(x) for x in planned["forward"]] == forward
    assert [str(x) for x in planned["backward"]] == backward


@pytest.mark.parametrize("target", ["sm80", "sm90"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_lora_backward_budget_with_trainable_bias(dropout_p, target):
    """Forward ≤ 2 launches, backward ≤ 3 with every gradient wanted (x, A, B and the bias: its
    sum over M rides on the rank pass's reads of dY), at a long sequence and a wide layer
    (M = 32768, 14336 outputs, r = 64) as at the headline shape: no row chunks, no partials.
    On sm_90a the backward is 2: the persistent dX GEMM runs the rank items as extra programs."""
    for M, N, r in ((8192, 4096, 16), (32768, 14336, 64)):
        meta = dict(device="meta", dtype=torch.bfloat16)
        x = torch.empty(M, 4096, **meta).requires_grad_()
        W, b = torch.empty(N, 4096, **meta), torch.empty(N, **meta).requires_grad_()
        A, B = torch.empty(r, 4096, **meta).requires_grad_(), torch.empty(N, r, **meta).requires_grad_()
        out = []
        forward = launches.plan(lambda: out.append(peft_ops.lora_linear(x, W, A, B, 2.0, b, dropout_p)), target)
        backward = launches.plan(lambda: out[0].backward(torch.empty(M, N, **meta)), target)
        tma = "_tma" if target == "sm90" else ""
        assert [str(x) for x in forward] == [SHRINK, FORWARD.replace("_kernel", f"{tma}_kernel")]
        if tma:
            assert [str(x) for x in backward] == TMA_BACKWARD
            rank = backward[1]
            block_c = rank.args["RANK_BLOCK_C"]
            dx_programs, items = rank.args["num_programs"], (-(-4096 // block_c) + -(-N // block_c)) * -(-r // 64)
            assert dx_programs == 132 and rank.grid == (dx_programs + items,)
        else:
            assert [str(x) for x in backward] == [G, DX, RANK]
            rank = backward[2]
        assert rank.args["COMPUTE_DA"] and rank.args["COMPUTE_DB"] and rank.args["COMPUTE_DBIAS"]
        assert rank.args["HAS_DROPOUT"] == (dropout_p > 0)


@pytest.mark.parametrize("op", ["lora", "qlora"])
def test_backward_scratch_is_g_alone(op):
    """Bytes the backward allocates beyond the gradients it returns, at M = 8192, d = 4096,
    r = 16: g = dY·B [M, r] fp32 alone (512 KiB) — no per-M-block partials. The backward before
    the rank pass held ⌈M/64⌉·(N + K)·r·4 = 64 MiB of fp32 partials; the bound is 1/8 of that."""
    M, K, N, r = 8192, 4096, 4096, 16
    forward, grad_out = launches.op_call(OpShape(op, M, K, N, r), dropout_p=0.1)
    out = []
    launches.plan(lambda: out.append(forward()))
    recorder = launches.planned_recorder(lambda: out[0].backward(grad_out))
    returned = {(M, K): "dx", (r, K): "dA", (N, r): "dB"}
    scratch = [t for t in recorder.allocated if tuple(t.shape) not in returned]
    scratch_bytes = sum(t.numel() * t.element_size() for t in scratch)
    partials_before = -(-M // 64) * (N + K) * r * 4
    assert partials_before == 64 * 2**20
    assert scratch_bytes == M * r * 4 <= partials_before / 8
    assert sorted(returned.values()) == sorted(returned[tuple(t.shape)] for t in recorder.allocated
                                               if tuple(t.shape) in returned)


@pytest.mark.parametrize("target", ["sm80", "sm90"])
@pytest.mark.parametrize("m", [64, 128, 256])
def test_adapter_backward_is_three_launches(target, m):
    """dh, dX with the partials, the finishing kernel — also where the dX kernel's launch runs
    its roles as sets of programs with tiles of their own (sm_90 m ≥ 128, sm_80 any m: one
    program doing both spilled or took tiles too small for the dX GEMM): dX's programs, then
    dW_down's partials', then dW_up's, one program per column block and row slice each."""
    planned = launches.op_launches(OpShape("bottleneck", 8192, 4096, 4096, m), target, 108 if target == "sm80" else 132,
                                   dropout_p=0.1)
    assert [str(x) for x in planned["backward"]] == [
        "_bottleneck_backward_dh_kernel", "_bottleneck_backward_dx_kernel", "_bottleneck_finish_kernel"]
    dx = planned["backward"][1]
    split = m >= 128 or target == "sm80"
    assert dx.args["SPLIT"] is split and dx.args["COMPUTE_DX"] and dx.args["COMPUTE_DW"]
    if split:  # the dX programs, then the partials' two roles, each over their own tiles
        dx_programs = dx.args["dx_programs"]
        assert dx_programs == -(-4096 // dx.args["BLOCK_D"]) * -(-8192 // dx.args["rows_per_slice"])
        partials = -(-4096 // dx.args["DW_BLOCK_D"]) * -(-8192 // dx.args["dw_rows_per_slice"])
        assert dx.grid == (dx_programs + 2 * partials,)


def test_the_plan_records_grid_and_arguments():
    (shrink, forward), _ = launches.op_launches(OpShape("lora", 300, 128, 96, 8), "sm90", 132).values()
    assert shrink.kind == "triton" and shrink.args["M"] == 300 and shrink.args["K"] == 128
    assert shrink.args["X"].device.type == "meta" and shrink.args["HAS_DROPOUT"] is False
    assert callable(forward.grid) and forward.grid({"BLOCK_M": 64, "BLOCK_N": 32}) == (5 * 3,)


def test_counted_launches_equal_the_plan(device):
    """The same call run for real (the interpreter on a CPU, natively on a GPU) launches what
    the plan says, in the same order."""
    M, K, N, r = 70, 48, 40, 8  # ≥ 64 rows: a plan for a GPU takes the fused GEMMs, as the interpreter does
    s = OpShape("lora", M, K, N, r)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=gen).to(device).requires_grad_()
    W = torch.randn(N, K, generator=gen).to(device)
    A = torch.randn(r, K, generator=gen).to(device).requires_grad_()
    B = torch.randn(N, r, generator=gen).to(device).requires_grad_()
    with peft_ops.use_backend("triton"):
        peft_ops.lora_linear(x, W, A, B, 2.0).backward(torch.ones(M, N, device=device))  # warm-up (autotuning)
        x.grad = A.grad = B.grad = None
        outputs, grad_out = [], torch.ones(M, N, device=device)
        forward = launches.count(lambda: outputs.append(peft_ops.lora_linear(x, W, A, B, 2.0)), device.type)
        backward = launches.count(lambda: outputs[0].backward(grad_out), device.type)
    planned = launches.op_launches(s, "sm80", 108, dtype=torch.float32)  # the pointer GEMMs, as the interpreter
    assert [str(x) for x in forward] == [str(x) for x in planned["forward"]]
    assert [str(x) for x in backward] == [str(x) for x in planned["backward"]]


def test_every_kernel_launch_goes_through_the_hook():
    """`kernel[grid](...)` directly would escape the launch counter and the planner."""
    kernels = pathlib.Path(__file__).resolve().parents[2] / "kernels"
    for path in kernels.glob("*.py"):
        assert not re.search(r"_kernel\[[^\]]*\]\(", path.read_text()), path.name


def test_plan_refuses_an_unknown_target():
    with pytest.raises(ValueError, match="target"):
        launches.plan(lambda: None, "sm75")

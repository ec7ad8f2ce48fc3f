"""Half precision, tight: every kernel against its PyTorch path, which takes the same steps
and rounds at the same points (fp32 accumulation; each output, and each tensor-core operand
made from an fp32 intermediate, rounded once). The float64 comparisons elsewhere bound the
error by the rounding analysis (2 roundings of the |inputs| scale); this one bounds the
*difference* of the two paths at 2 units of roundoff at most and 0.25 rms
(``testing.PATH_AGREEMENT``), where a misplaced rounding moves the result by a unit or more
on average.

The sensitivity tests prove the bound can fail: results computed in PyTorch with the known
bug classes — an fp16/bf16 accumulator rounded every K-block, rank-r products of fp32
adapters not kept in fp32, a dropped scaling — are rejected by the same check. The bugs are
injected into the PyTorch path, so the kernels carry no test-only code.

In the interpreter fp32 → bf16 conversions round to nearest as on a GPU (conftest).
"""

import pytest
import torch

import peft_ops.ops.paths as paths
from peft_ops.tools import launches
from peft_ops.tools.accuracy import (
    BottleneckCase,
    LoraCase,
    QLoraCase,
    assert_paths_agree,
    run_bottleneck_case,
    run_lora_case,
    run_qlora_case,
)

from conftest import DEVICE, lora_ops

HALF = [torch.float16, torch.bfloat16]
HALF_IDS = ["fp16", "bf16"]

# Reductions several K-blocks long in every kernel (the interpreter's tiles are 32 wide), so a
# rounding per block has room to add up.
CASES = {
    "lora_linear": lambda dt: LoraCase(M=33, K=160, N=144, r=16, dtype=dt),
    "lora_linear_fp32_adapters": lambda dt: LoraCase(M=27, K=150, N=70, r=8, dtype=dt,
                                                     adapter_dtype=torch.float32),
    "qlora_linear_gemm": lambda dt: QLoraCase(M=40, K=160, N=96, r=16, dtype=dt),
    "qlora_linear_decode": lambda dt: QLoraCase(M=3, K=160, N=96, r=8, dtype=dt),
    "nf4_linear": lambda dt: QLoraCase(M=40, K=128, N=80, r=1, dtype=dt, lora=False, train_base=True),
    "bottleneck_adapter": lambda dt: BottleneckCase(M=33, d=160, m=40, dtype=dt, activation="gelu"),
}


def results(case, path: str) -> dict:
    if isinstance(case, QLoraCase):
        compared = run_qlora_case(case, path, device=DEVICE)
    elif isinstance(case, BottleneckCase):
        compared = run_bottleneck_case(case, path, device=DEVICE)
    else:
        compared = run_lora_case(case, lora_ops(path), device=DEVICE)
    return {c.name: c.actual for c in compared}


def disagreements(got: dict, expected: dict) -> list[str]:
    failed = []
    for name in expected:
        try:
            assert_paths_agree(got[name], expected[name], name)
        except AssertionError as err:
            failed.append(str(err))
    return failed


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("op", CASES)
def test_kernels_round_where_the_pytorch_path_does(op, dtype):
    case = CASES[op](dtype)
    expected = results(case, "torch")
    with launches.KernelsRan() as ran:
        got = results(case, "triton")
    assert ran.names, "no kernel ran"
    assert not disagreements(got, expected)


# --------------------------------------------------------------------------------------
# The check rejects each bug class (computed in PyTorch).
# --------------------------------------------------------------------------------------

def _mm_rounding_every_block(a: torch.Tensor, b: torch.Tensor, block: int = 32) -> torch.Tensor:
    """a·b with the accumulator rounded to a's half-precision dtype after every K-block."""
    if a.dtype not in HALF:
        return torch.mm(a.float(), b.float())
    acc = torch.zeros(a.shape[0], b.shape[1], device=a.device)
    for k0 in range(0, a.shape[1], block):
        acc = (acc + torch.mm(a[:, k0:k0 + block].float(), b[k0:k0 + block].float())).to(a.dtype).float()
    return acc


def accumulate_in_input_dtype(monkeypatch):
    monkeypatch.setattr(paths, "mm32", _mm_rounding_every_block)


def rank_products_in_input_dtype(monkeypatch):
    monkeypatch.setattr(paths, "rank_dtype", lambda dtype, adapter_dtype: dtype)


def drop_scaling(monkeypatch):
    lora_forward = paths.TorchLoraOps.forward
    adapter_forward = paths.TorchBottleneckOps.forward
    monkeypatch.setattr(paths.TorchLoraOps, "forward",
                        staticmethod(lambda x, w, xa, B, scaling, bias: lora_forward(x, w, xa, B, 1.0, bias)))
    monkeypatch.setattr(paths.TorchBottleneckOps, "forward",
                        staticmethod(lambda *a, **kw: adapter_forward(*a[:6], 1.0, *a[7:], **kw)))


# bug → (inject, the ops it applies to, the tensors that must be rejected)
BUGS = {
    "accumulate_in_input_dtype": (accumulate_in_input_dtype, list(CASES), {"y", "dx"}),
    "rank_products_in_input_dtype": (rank_products_in_input_dtype, ["lora_linear_fp32_adapters"], {"dA", "dB"}),
    "dropped_scaling": (drop_scaling, [op for op in CASES if op != "nf4_linear"], {"y"}),
}
BUG_RUNS = [(bug, op) for bug, (_, ops, _) in BUGS.items() for op in ops]


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("bug, op", BUG_RUNS, ids=[f"{bug}-{op}" for bug, op in BUG_RUNS])
def test_the_check_rejects_a_misplaced_rounding(bug, op, dtype, monkeypatch):
    inject, _, must_fail = BUGS[bug]
    case = CASES[op](dtype)
    expected = results(case, "torch")
    inject(monkeypatch)
    buggy = results(case, "torch")
    failed = {message.split(":")[0] for message in disagreements(buggy, expected)}
    assert must_fail <= failed, f"{bug} passed the check on {sorted(must_fail - failed)}"

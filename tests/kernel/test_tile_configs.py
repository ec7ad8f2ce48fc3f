"""Production tiles in the interpreter. Everywhere else on CPU each kernel runs the
interpreter's one small config; here every autotuned kernel also runs the largest tile of its
sm_90 half-precision family and of its fp32 family (and NF4's "general" family), and the
fixed tiles (NF4's dX row block, the adapter's backward) run at their GPU sizes — each at a
small odd shape, so most of the tile is masked off. Results are checked against float64 and,
in half precision, against the PyTorch path's roundings. (On a GPU,
tests/reliability/test_gpu.py runs every config of every family.)
"""

import pytest
import torch

from peft_ops.kernels import bottleneck as bottleneck_kernels
from peft_ops.kernels import common
from peft_ops.kernels import embedding as embedding_kernels  # noqa: F401  (registers its tuned kernel)
from peft_ops.kernels import lora as lora_kernels
from peft_ops.kernels import nf4 as nf4_kernels
from peft_ops.tools.accuracy import QLoraCase
from peft_ops.tools.launches import KernelsRan

from helpers.tile_cases import KERNELS, bottleneck_case, gemm_for, largest, run_checked

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="interpreter-sized (GPU: tests/reliability/test_gpu.py)")


def test_every_tuned_kernel_is_covered():
    assert set(common.tuned_kernels()) == set(KERNELS)


RUNS = [(kernel, family) for kernel, (_, families) in KERNELS.items() for family in families]


@pytest.mark.parametrize("kernel, family", RUNS, ids=[f"{k.strip('_')}-{f}" for k, f in RUNS])
def test_largest_production_tile(kernel, family, monkeypatch):
    case_of, _ = KERNELS[kernel]
    if "_tma_" in kernel:  # the persistent TMA GEMMs run where sm_90a's would
        monkeypatch.setattr(lora_kernels, "TMA_TARGETS", {"interpreter"})
    monkeypatch.setenv("PEFT_OPS_GEMM", gemm_for(kernel))
    if kernel == "_bottleneck_forward_kernel":  # the one-kernel forward also where the interpreter takes two passes
        monkeypatch.setitem(bottleneck_kernels.FORWARD_TWO_PASS_ROWS, "interpreter", {})
    config = largest(common.tile_families(kernel, "sm90")[family])
    with common.forced_config(kernel, config), KernelsRan() as ran:
        run_checked(case_of(family))
    assert kernel in ran.names, f"{kernel} did not run for {family}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_nf4_backward_at_production_row_blocks(dtype, monkeypatch):
    """The QLoRA dX kernel's fixed M-block (64 on sm_80 and sm_90) instead of the interpreter's 32."""
    monkeypatch.setitem(nf4_kernels.DX_BLOCK_M, "interpreter", nf4_kernels.DX_BLOCK_M["sm90"])
    with KernelsRan() as ran:
        run_checked(QLoraCase(M=77, K=64, N=36, r=8, dtype=dtype, dropout_p=0.25))
    assert "_nf4_backward_dx_kernel" in ran.names


@pytest.mark.parametrize("target", ["sm80", "sm90"])
@pytest.mark.parametrize("family", ["half/b64", "half/b128", "half/b256", "fp32/b128"])
def test_adapter_backward_at_production_tiles(family, target, monkeypatch):
    """The adapter dX kernel's fixed tiles (one role per program, or the dX and dW roles as two
    sets of programs of one launch: sm_90 half/b128 and half/b256, sm_80 half/b256) at their GPU
    sizes."""
    monkeypatch.setitem(bottleneck_kernels.BACKWARD_DX_TILES, "interpreter",
                        dict(bottleneck_kernels.BACKWARD_DX_TILES[target]))
    with KernelsRan() as ran:
        run_checked(bottleneck_case(family))
    assert "_bottleneck_backward_dx_kernel" in ran.names


@pytest.mark.parametrize("target", ["sm80", "sm90"])
@pytest.mark.parametrize("family", ["half/b128", "half/b256", "fp32/b128"])
def test_adapter_two_pass_forward_at_production_tiles(family, target, monkeypatch):
    """The two-pass forward's up kernel at its fixed GPU tiles (a column block of d over a row
    slice, W_up's columns loaded once), after the down kernel."""
    monkeypatch.setitem(bottleneck_kernels.UP_TILES, "interpreter", dict(bottleneck_kernels.UP_TILES[target]))
    with KernelsRan() as ran:
        run_checked(bottleneck_case(family))
    assert {"_bottleneck_down_kernel", "_bottleneck_up_kernel"} <= set(ran.names)
    assert "_bottleneck_forward_kernel" not in ran.names


def test_the_split_k_rules_know_the_gemv_tiles():
    """The split-K rule counts column tiles before the autotuner picks a config: every GPU config
    of the split-K GEMV is GEMV_BLOCK_N_FOR_SPLIT wide, and the word GEMV's one config per target
    is DECODE_GEMV_BLOCK_N wide (and the scratch holds tiles up to 128)."""
    for target in ("sm80", "sm90"):
        for configs in nf4_kernels.GEMV_CONFIGS[target].values():
            assert {c.kwargs["BLOCK_N"] for c in configs} == {nf4_kernels.GEMV_BLOCK_N_FOR_SPLIT}
    for target, block_n in nf4_kernels.DECODE_GEMV_BLOCK_N.items():
        table = nf4_kernels.DECODE_GEMV_CONFIGS[target]  # per family on a GPU, one list in the interpreter
        for configs in table.values() if isinstance(table, dict) else [table]:
            assert {c.kwargs["BLOCK_N"] for c in configs} == {block_n} and block_n <= 128

"""Property-based tests (hypothesis) that reach every kernel: each op × fp32/fp16/bf16 × path
(kernels — interpreted here — and the PyTorch path) is its own pytest case, so no combination
is left to chance; hypothesis draws only what varies inside one: shapes, ranks, strides,
scalings, dropout, biases and NF4 blocksizes. Every kernel-path example proves that kernels
ran (the harness fails on a silent fallback) and is checked against float64.

Examples are bounded and derandomized, so CI runs the same ones every time; shapes stay
small (the interpreter runs each tile in numpy) but odd, so every mask and tail is exercised.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_ops.kernels.bottleneck import max_bottleneck
from peft_ops.tools.accuracy import (
    BottleneckCase,
    LoraCase,
    QLoraCase,
    run_bottleneck_case,
    run_lora_case,
    run_qlora_case,
)

from conftest import DEVICE, lora_ops

SETTINGS = settings(max_examples=4, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
PATHS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

dims = st.integers(1, 96)
scalings = st.floats(-4.0, 4.0, allow_nan=False).filter(lambda s: abs(s) > 1e-3)
dropouts = st.sampled_from([0.0, 0.1, 0.5])


def check(results, case, path):
    for result in results:
        result.check(f"{path} {case}", case.tolerance(result.name))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@SETTINGS
@given(M=dims, K=dims, N=dims, r=st.integers(1, 80), scaling=scalings, dropout_p=dropouts, bias=st.booleans(),
       transposed=st.booleans(), fp32_adapters=st.booleans())
def test_lora_linear(dtype, path, M, K, N, r, scaling, dropout_p, bias, transposed, fp32_adapters):
    case = LoraCase(M, K, N, r, dtype, dropout_p=dropout_p, bias=bias, scaling=scaling, x_transposed=transposed,
                    adapter_dtype=torch.float32 if fp32_adapters and dtype != torch.float32 else None)
    check(run_lora_case(case, lora_ops(path), device=DEVICE), case, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@SETTINGS
@given(M=st.one_of(st.integers(1, 16), dims), K=st.integers(2, 96), N=dims, r=st.integers(1, 32),
       scaling=scalings, dropout_p=dropouts, blocksize=st.sampled_from([32, 64, 128]), double_quant=st.booleans(),
       transposed=st.booleans())
def test_qlora_linear(dtype, path, M, K, N, r, scaling, dropout_p, blocksize, double_quant, transposed):
    """M ≤ 16 half the time: the decode GEMV; beyond, the dequant-GEMM."""
    case = QLoraCase(M, K, N, r, dtype, dropout_p=dropout_p, scaling=scaling, blocksize=blocksize,
                     double_quant=double_quant, x_transposed=transposed)
    check(run_qlora_case(case, path, device=DEVICE), case, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@SETTINGS
@given(M=st.one_of(st.integers(1, 16), dims), K=st.integers(2, 96), N=dims,
       blocksize=st.sampled_from([32, 64, 128]), double_quant=st.booleans(), bias=st.booleans(),
       transposed=st.booleans())
def test_nf4_linear(dtype, path, M, K, N, blocksize, double_quant, bias, transposed):
    case = QLoraCase(M, K, N, 1, dtype, blocksize=blocksize, double_quant=double_quant, lora=False, bias=bias,
                     train_base=bias, x_transposed=transposed)
    check(run_qlora_case(case, path, device=DEVICE), case, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@SETTINGS
@given(M=dims, d=dims, m=st.integers(1, 256), activation=st.sampled_from(["relu", "gelu", "gelu_tanh", "silu"]),
       scaling=scalings, dropout_p=dropouts, bias=st.booleans(), transposed=st.booleans())
def test_bottleneck_adapter(dtype, path, M, d, m, activation, scaling, dropout_p, bias, transposed):
    """m up to each dtype's widest kernel tile (past it the op runs the PyTorch path by design:
    test_adapter_op's own test)."""
    case = BottleneckCase(M, d, min(m, max_bottleneck(dtype)), dtype, activation, dropout_p=dropout_p, bias=bias,
                       scaling=scaling, x_transposed=transposed)
    check(run_bottleneck_case(case, path, device=DEVICE), case, path)

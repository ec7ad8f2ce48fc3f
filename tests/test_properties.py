"""Property-based tests (hypothesis): random shapes (1 … 300 per dimension), ranks, dtypes,
strides, scalings and dropout for every op, against the float64 references, on the kernels
(interpreted) and the PyTorch path. Examples are bounded and derandomized, so CI runs the
same ones every time and stays within its time."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_ops.testing import AdapterCase, LoraCase, QLoraCase, run_adapter_case, run_lora_case, run_qlora_case

from conftest import DEVICE, lora_ops

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
dims = st.integers(1, 300)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
scalings = st.floats(-4.0, 4.0, allow_nan=False).filter(lambda s: abs(s) > 1e-3)
dropouts = st.sampled_from([0.0, 0.0, 0.1, 0.5])
paths = st.sampled_from(["triton", "torch"])


def check(results, case, where):
    for result in results:
        result.check(f"{where} {case}", case.tolerance(result.name))


@SETTINGS
@given(M=dims, K=dims, N=dims, r=st.integers(1, 64), dtype=dtypes, scaling=scalings, dropout_p=dropouts,
       bias=st.booleans(), transposed=st.booleans(), fp32_adapters=st.booleans(), path=paths)
def test_lora_linear(M, K, N, r, dtype, scaling, dropout_p, bias, transposed, fp32_adapters, path):
    case = LoraCase(M, K, N, r, dtype, dropout_p=dropout_p, bias=bias, scaling=scaling, x_transposed=transposed,
                    adapter_dtype=torch.float32 if fp32_adapters and dtype != torch.float32 else None)
    check(run_lora_case(case, lora_ops(path), device=DEVICE), case, path)


@SETTINGS
@given(M=dims, K=st.integers(2, 300), N=dims, r=st.integers(1, 32), dtype=dtypes, scaling=scalings,
       dropout_p=dropouts, blocksize=st.sampled_from([32, 64, 128]), double_quant=st.booleans(), lora=st.booleans(),
       transposed=st.booleans(), path=paths)
def test_qlora_and_nf4_linear(M, K, N, r, dtype, scaling, dropout_p, blocksize, double_quant, lora, transposed,
                              path):
    case = QLoraCase(M, K, N, r, dtype, dropout_p=dropout_p if lora else 0.0, scaling=scaling, blocksize=blocksize,
                     double_quant=double_quant, lora=lora, x_transposed=transposed)
    check(run_qlora_case(case, path, device=DEVICE), case, path)


@SETTINGS
@given(M=dims, d=dims, m=st.integers(1, 300), dtype=dtypes, activation=st.sampled_from(["relu", "gelu",
       "gelu_tanh", "silu"]), scaling=scalings, dropout_p=dropouts, bias=st.booleans(), transposed=st.booleans(),
       path=paths)
def test_bottleneck_adapter(M, d, m, dtype, activation, scaling, dropout_p, bias, transposed, path):
    case = AdapterCase(M, d, m, dtype, activation, dropout_p=dropout_p, bias=bias, scaling=scaling,
                       x_transposed=transposed)
    check(run_adapter_case(case, path, device=DEVICE), case, path)


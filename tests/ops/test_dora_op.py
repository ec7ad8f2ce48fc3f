"""dora_linear and qdora_linear against PEFT's DoRA formula in float64: forward and every
gradient, both paths (Triton kernels — interpreted on CPU — and the PyTorch path), fp32 / fp16 /
bf16; the column norm against the materialized matrix's; saved bytes; bad input."""

import pytest
import torch

import peft_ops
from peft_ops import reference
from peft_ops.nf4 import quantize
from peft_ops.ops.dora import DoraLinearFunction, squared_row_norms
from peft_ops.ops.paths import KernelDoraOps, KernelQDoraOps, TorchDoraOps, TorchQDoraOps
from peft_ops.tools.accuracy import (
    FP32_ACCUMULATION,
    UNIT_ROUNDOFF,
    DoraCase,
    kernels_must_run,
    make_dora_inputs,
    run_dora_case,
    saved_activation_bytes,
)

PATHS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# (M, K=in, N=out, r): odd sizes, ranks 1 … 64, and r = 80 (two rank chunks in the kernels).
SHAPES = [
    (1, 3, 5, 1),
    (33, 127, 64, 16),
    (70, 64, 33, 64),
    (20, 48, 40, 80),
]


def check_case(case: DoraCase, path: str, device) -> None:
    for result in run_dora_case(case, path, device=device):
        expected_dtype = {"dA": case.adapter_dtype or case.dtype, "dB": case.adapter_dtype or case.dtype,
                          "dm": case.adapter_dtype or case.dtype}.get(result.name, case.dtype)
        assert result.actual.dtype == expected_dtype, result.name
        result.check(f"{path} {case.label()}", case.tolerance(result.name))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}".format(*s))
def test_forward_and_gradients(shape, dtype, path, device):
    M, K, N, r = shape
    check_case(DoraCase(M, K, N, r, dtype), path, device)


VARIANTS = {
    "dropout": dict(dropout_p=0.3),
    "no_bias": dict(bias=False),
    "3d_input": dict(leading=(3,)),
    "train_base": dict(train_base=True),  # dW and db too
    "train_base_dropout": dict(train_base=True, dropout_p=0.3),  # dW = dYᵀ·x + (dY⊙(c − 1))ᵀ·xd
    "fp32_adapters": dict(adapter_dtype=torch.float32),
    "fp32_adapters_dropout": dict(adapter_dtype=torch.float32, dropout_p=0.2),
    "x_transposed": dict(x_transposed=True),
    "dropout_3d_no_bias": dict(dropout_p=0.5, leading=(2,), bias=False),
    # GPT-2's Conv1D: W passed as the .t() of its [in, out] storage; the norms and dW through strides
    "weight_stored_kn": dict(weight_kn=True, train_base=True, dropout_p=0.3),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants(variant, path, device):
    check_case(DoraCase(M=29, K=50, N=36, r=8, dtype=torch.bfloat16, **VARIANTS[variant]), path, device)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cublas_path(dtype, dropout_p, device):
    """The cuBLAS GEMM path: the LoRA term from the expand kernel, torch.addmm for x·Wᵀ, the
    DoRA scale and bias after it."""
    check_case(DoraCase(M=40, K=64, N=48, r=8, dtype=dtype, dropout_p=dropout_p, gemm="cublas"), "triton", device)


# QDoRA: the NF4 base on both kernel paths ("fused": the NF4 GEMM / decode GEMV; "dequant": W
# decoded into a buffer, then the dense DoRA kernels), decode sizes (M ≤ 16) and training sizes.
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 64, 40, 8), (3, 128, 33, 16), (24, 64, 40, 4)],
                         ids=lambda s: "M{}_K{}_N{}_r{}".format(*s))
def test_qdora(shape, dtype, path, device):
    M, K, N, r = shape
    check_case(DoraCase(M, K, N, r, dtype, nf4=True), path, device)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("nf4_path", ["fused", "dequant"])
def test_qdora_kernel_paths(nf4_path, dropout_p, device):
    # fused: the decode GEMV (the dequant-GEMM at training sizes is test_qdora's); dequant: a
    # training size (the buffer and the dense kernels)
    check_case(DoraCase(4 if nf4_path == "fused" else 40, 128, 40, 8, torch.bfloat16, dropout_p=dropout_p, nf4=True,
                        nf4_path=nf4_path, adapter_dtype=torch.float32), "triton", device)


@pytest.mark.parametrize(("regime", "split_k"), [("gemm", None), ("decode", None), ("decode", 1), ("decode", 2)],
                         ids=["nf4_gemm", "word_gemv", "gemv", "gemv_split2"])
def test_nf4_kernels_write_pre_and_the_scaled_output_from_one_accumulator(regime, split_k, device):
    """QDoRA's fused forward, each NF4 kernel with DORA: pre bit-equal to the plain kernel's
    output (no bias), y = acc⊙c + b from the same fp32 accumulator, rounded once."""
    from peft_ops.backend import kernel_modules
    from peft_ops.nf4 import code_tables

    nf4 = kernel_modules().nf4
    M, K, N, r = (20 if regime == "gemm" else 5), 128, 48, 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=gen).to(device=device, dtype=torch.bfloat16)
    qw = quantize((torch.randn(N, K, generator=gen) * K ** -0.5).to(device=device, dtype=torch.bfloat16)).tensors()
    xa = torch.randn(M, r, generator=gen).to(device)
    lora_B = (torch.randn(N, r, generator=gen) * r ** -0.5).to(device=device, dtype=torch.bfloat16)
    bias = torch.randn(N, generator=gen).to(device=device, dtype=torch.bfloat16)
    col_scale = (0.5 + torch.rand(N, generator=gen)).to(device)
    tables = code_tables(device)
    with kernels_must_run("triton"):
        y, pre = nf4.dora_forward(x, qw, xa, lora_B, 0.75, bias, col_scale, regime, split_k, tables=tables)
        plain = nf4.forward(x, qw, xa, lora_B, 0.75, None, regime, split_k, tables=tables)
        acc = nf4.forward(x, qw, xa, lora_B, 0.75, None, regime, split_k, tables=tables, out_dtype=torch.float32)
    assert pre.dtype == y.dtype == torch.bfloat16
    assert torch.equal(pre, plain)
    scaled = acc.double() * col_scale.double()
    expected = scaled + bias.double()
    error = (y.double() - expected).abs() / (scaled.abs() + bias.double().abs())
    assert error.max() <= UNIT_ROUNDOFF[torch.bfloat16] + FP32_ACCUMULATION


# The column norm ‖W_n + s·B_n·A‖ from ‖W_n‖² + 2s·B_n·(A·W_nᵀ) + s²·B_n·(A·Aᵀ)·B_nᵀ, against the
# float64 norm of the materialized matrix. Every input is exact in its dtype and the sums are fp32,
# so the norm is good to fp32 accumulation whatever the dtype — except A·Wᵀ of an NF4 weight with
# fp32 adapters, which the decode GEMV forms from A as hi + lo, two rows in x's dtype: lo's
# rounding leaves u² of A (u of x's dtype), where hi alone would leave u.
# Error: |norm − exact| / √(‖W‖² + 2|s|·|B|·|A|·|W|ᵀ + s²·|B|·|A|·|A|ᵀ·|B|ᵀ), the norm of the terms' magnitudes.
def _norm_scale(weight, lora_A, lora_B, scaling):
    w, a, b = weight.double().abs(), lora_A.double().abs(), lora_B.double().abs()
    return (w.square().sum(1) + 2 * abs(scaling) * (b * (a @ w.t()).t()).sum(1)
            + scaling**2 * ((b @ (a @ a.t())) * b).sum(1)).sqrt()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32], ids=["adapters_x_dtype", "fp32_adapters"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(200, 40, 16), (96, 33, 80), (7, 3, 1)], ids=lambda s: "K{}_N{}_r{}".format(*s))
def test_norm_against_the_materialized_matrix(shape, dtype, adapter_dtype, path, device):
    K, N, r = shape
    case = DoraCase(M=1, K=K, N=N, r=r, dtype=dtype, adapter_dtype=adapter_dtype, scaling=-1.3)
    inp = make_dora_inputs(case, device)
    weight, A, B, m = inp["weight"], inp["lora_A"], inp["lora_B"], inp["magnitude"]
    ops = KernelDoraOps() if path == "triton" else TorchDoraOps
    with kernels_must_run(path):
        norm, col_scale = ops.norm(weight, A, B, m, case.scaling, squared_row_norms(weight))
    exact = reference.dora_weight_norm(weight.double(), A.double(), B.double(), case.scaling)
    scale = _norm_scale(weight, A, B, case.scaling)
    assert norm.dtype == col_scale.dtype == torch.float32
    assert ((norm.double() - exact).abs() / scale).max() <= FP32_ACCUMULATION
    assert ((col_scale.double() - m.double() / exact).abs() * exact / m.double().abs()).max() <= 2 * FP32_ACCUMULATION
    # NF4: the same against the norm of the weight decoded to x's dtype (what the GEMMs take)
    qweight = quantize(weight)
    decoded = reference.nf4_dequantize(qweight, dtype)
    qops = KernelQDoraOps() if path == "triton" else TorchQDoraOps
    with kernels_must_run(path):
        qnorm, _ = qops.norm(qweight.tensors(), A, B, m, case.scaling, squared_row_norms(qweight, dtype), dtype)
    exact = reference.dora_weight_norm(decoded.double(), A.double(), B.double(), case.scaling)
    split_A = path == "triton" and adapter_dtype == torch.float32 and dtype != torch.float32
    tol = UNIT_ROUNDOFF[dtype] ** 2 + FP32_ACCUMULATION if split_A else FP32_ACCUMULATION
    assert ((qnorm.double() - exact).abs() / _norm_scale(decoded, A, B, case.scaling)).max() <= tol


def test_norm_is_detached_and_matches_peft_initialization(device):
    """With B = 0 (PEFT's initialization) c = m/‖W‖; PEFT initializes m = ‖W‖, so the layer
    starts as the base layer: y equals x·Wᵀ + b."""
    case = DoraCase(M=9, K=40, N=24, r=4, dtype=torch.float32)
    inp = make_dora_inputs(case, device)
    B = torch.zeros_like(inp["lora_B"])
    m = inp["weight"].double().norm(dim=1).float()
    for path in PATHS:
        with peft_ops.use_backend(path):
            y = peft_ops.dora_linear(inp["x"], inp["weight"], inp["lora_A"], B, m, 0.5, inp["bias"])
        expected = torch.nn.functional.linear(inp["x"].double(), inp["weight"].double(), inp["bias"].double())
        assert ((y.double() - expected).abs().max() / expected.abs().max()) < 1e-6


# Saved for backward: x itself + xa (M×r fp32) + pre (M×N in x's dtype) + two fp32 [N] vectors
# (+ the bit-packed keep mask with dropout). PEFT's DoRA layer saves x, the dropped-out x,
# W + s·B·A and its upcast copy, measured in tests/peft/test_dora_peft.py.
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_saved_bytes_at_most_x_plus_xa_plus_one_output(dropout_p, path, device):
    M, K, N, r = 64, 96, 80, 8
    case = DoraCase(M=M, K=K, N=N, r=r, dtype=torch.bfloat16, dropout_p=dropout_p)
    inp = make_dora_inputs(case, device)
    x = inp["x"].requires_grad_(True)
    A, B, m = (inp[k].requires_grad_(True) for k in ("lora_A", "lora_B", "magnitude"))
    ops = KernelDoraOps() if path == "triton" else TorchDoraOps
    params = [inp["weight"], A, B, m, inp["bias"], x]
    sq = squared_row_norms(inp["weight"])
    saved, tensors, y = saved_activation_bytes(
        lambda: DoraLinearFunction.apply(x, inp["weight"], A, B, m, inp["bias"], 0.5, dropout_p, sq, ops), params)
    budget = M * r * 4 + M * N * 2 + 2 * N * 4 + (M * 3 * 4 if dropout_p > 0 else 0)  # K = 96: 3 words per row
    assert saved == budget, [tuple(t.shape) for t in tensors]
    y.sum().backward()


def test_kernels_are_deterministic(device):
    """Two runs, bit for bit: the dY pass and the norm sum their slices in a fixed order."""
    case = DoraCase(M=70, K=96, N=40, r=8, dtype=torch.float32)
    runs = []
    for _ in range(2):
        results = run_dora_case(case, "triton", device)
        runs.append([r.actual.clone() for r in results])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


BAD = [
    (lambda i: dict(magnitude=i["magnitude"][:-1]), ValueError, "magnitude must be"),
    (lambda i: dict(magnitude=i["magnitude"][None]), ValueError, "magnitude"),
    (lambda i: dict(magnitude=i["magnitude"].to(torch.float16)), TypeError, "magnitude has dtype"),
    (lambda i: dict(magnitude=i["magnitude"].long()), TypeError, "magnitude"),
    (lambda i: dict(magnitude="m"), TypeError, "magnitude"),
    (lambda i: dict(weight_sq_norm=torch.ones(i["weight"].shape[0], dtype=torch.float64)), TypeError,
     "weight_sq_norm must be float32"),
    (lambda i: dict(weight_sq_norm=torch.ones(3)), ValueError, "weight_sq_norm must be"),
    (lambda i: dict(lora_B=i["lora_B"][:, :-1]), ValueError, "lora_B"),
    (lambda i: dict(scaling=float("nan")), ValueError, "scaling"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_is_refused_before_anything_runs(case, device):
    make, error, match = BAD[case]
    inp = make_dora_inputs(DoraCase(M=5, K=16, N=12, r=4, dtype=torch.bfloat16), device)
    args = dict(x=inp["x"], weight=inp["weight"], lora_A=inp["lora_A"], lora_B=inp["lora_B"],
                magnitude=inp["magnitude"], scaling=0.5, bias=inp["bias"])
    args.update(make(args))
    with pytest.raises(error, match=match):
        peft_ops.dora_linear(**args)
    qargs = {k: v for k, v in args.items() if k != "weight"}
    with pytest.raises(error, match=match):
        peft_ops.qdora_linear(qweight=quantize(inp["weight"]), **qargs)


def test_reference_backend_and_autocast(device):
    """The reference backend runs the reference; under autocast the op runs in the autocast dtype
    with the magnitude kept as given."""
    inp = make_dora_inputs(DoraCase(M=6, K=32, N=16, r=4, dtype=torch.float32), device)
    args = (inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], inp["magnitude"], 0.5, inp["bias"])
    with peft_ops.use_backend("reference"):
        assert torch.equal(peft_ops.dora_linear(*args), reference.dora_linear(*args))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with peft_ops.use_backend("torch"):
            y = peft_ops.dora_linear(*args)
    assert y.dtype == torch.bfloat16
    expected = reference.dora_linear(*(t.double() if isinstance(t, torch.Tensor) else t for t in args))
    assert ((y.double() - expected).abs().max() / expected.abs().max()) < 3 * UNIT_ROUNDOFF[torch.bfloat16]


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter: forces the sm_90a kernels' choice here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tma_gemms_with_a_weight_stored_kn(dtype, monkeypatch, device):
    """DoRA over W stored [K, N] (GPT-2's Conv1D) on sm_90a's persistent TMA GEMMs: the forward's
    scale epilogue and dX in their W_KN layout, every gradient against float64 (dropout on: the
    correction GEMM too)."""
    from peft_ops.kernels import lora as lora_kernels
    from peft_ops.tools.launches import KernelsRan

    monkeypatch.setattr(lora_kernels, "TMA_TARGETS", {"interpreter"})
    with KernelsRan() as ran:
        check_case(DoraCase(M=37, K=72, N=40, r=8, dtype=dtype, dropout_p=0.2, train_base=True, weight_kn=True),
                   "triton", device)
    assert {"_lora_forward_tma_kernel", "_lora_backward_dx_tma_kernel"} <= set(ran.names)

"""lora_linear against a float64 reference: forward and every gradient, both paths (Triton
kernels — interpreted on CPU — and the PyTorch path), fp32 / fp16 / bf16."""

import pytest
import torch

import peft_ops
from peft_ops import reference
from peft_ops.ops.autograd import eager_seed, torch_keep_mask
from peft_ops.ops.lora import LoraLinearFunction
from peft_ops.tools.accuracy import (
    LoraCase,
    assert_close,
    expected_keep_mask,
    make_lora_inputs,
    run_lora_case,
    saved_activation_bytes,
)

from conftest import DEVICE, lora_ops

PATHS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# (M, K=in, N=out, r): odd sizes, ranks 1 … 64, and r = 80 (two rank chunks in the kernels).
SHAPES = [
    (1, 3, 5, 1),
    (3, 33, 17, 8),
    (33, 127, 64, 16),
    (127, 64, 257, 64),
    (257, 40, 33, 8),
    (20, 48, 40, 80),
]


def check_case(case: LoraCase, path: str, device) -> None:
    for result in run_lora_case(case, lora_ops(path), device=device):
        expected_dtype = (case.adapter_dtype or case.dtype) if result.name in ("dA", "dB") else case.dtype
        assert result.actual.dtype == expected_dtype, result.name
        result.check(f"{path} {case.label()}", case.tolerance(result.name))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}".format(*s))
def test_forward_and_gradients(shape, dtype, path, device):
    M, K, N, r = shape
    check_case(LoraCase(M, K, N, r, dtype), path, device)


def test_the_decode_shrink_splits_k(device):
    """At M ≤ 16 the shrink splits K over programs and the tile's last one sums their partials
    (in the interpreter's 32-column tiles, K = 130 is 4 slices): outputs and every gradient
    against float64 with dropout and two rank chunks (r = 80); the same bits again (the sum's
    order is fixed), and the reusable counters left at zero for the next call."""
    from peft_ops.kernels import lora as lora_kernels
    from peft_ops.ops import workspace

    assert lora_kernels.shrink_split_k(16, 130) == 4 and lora_kernels.shrink_split_k(17, 130) == 1
    check_case(LoraCase(M=16, K=130, N=40, r=80, dtype=torch.float32, dropout_p=0.3), "triton", device)
    x = torch.randn(3, 130, generator=torch.Generator().manual_seed(3)).to(device, torch.bfloat16)
    lora_A = torch.randn(24, 130, generator=torch.Generator().manual_seed(4)).to(device, torch.bfloat16)
    first, _ = lora_kernels.shrink(x, lora_A, 0.0, 0, scratch=workspace.split_k_scratch)
    again, _ = lora_kernels.shrink(x, lora_A, 0.0, 0, scratch=workspace.split_k_scratch)
    assert torch.equal(first, again)
    assert not workspace.split_k_scratch(x.device, 0, 1)[1].any()
    expected = x.double() @ lora_A.double().t()
    assert ((first.double() - expected).abs().max() / expected.abs().max()).item() < 1e-6  # fp32 sums of bf16 products


@pytest.mark.parametrize("fp32", [False, True], ids=["half", "fp32"])
def test_the_decode_shrink_at_its_gpu_tile(fp32, monkeypatch, device):
    """The split shrink at the tile a GPU runs (128 columns; 64 for fp32 rank operands), K = 300
    in 2 / 4 slices, the last one partial: outputs and gradients against float64, dropout on."""
    from peft_ops.kernels import lora as lora_kernels

    monkeypatch.setitem(lora_kernels.SHRINK_SPLIT_TILE, "interpreter", lora_kernels.SHRINK_SPLIT_TILE["sm90"])
    assert lora_kernels.shrink_split_k(5, 300, fp32) == (4 if fp32 else 2)
    check_case(LoraCase(M=5, K=300, N=24, r=16, dtype=torch.float32 if fp32 else torch.bfloat16, dropout_p=0.2),
               "triton", device)


VARIANTS = {
    "dropout": dict(dropout_p=0.3),
    "no_bias": dict(bias=False),
    "3d_input": dict(leading=(3,)),
    "train_base": dict(train_base=True),  # dW and db too
    "dropout_3d_no_bias": dict(dropout_p=0.5, leading=(2,), bias=False),
    # GPT-2's Conv1D: W [out, in] passed as the .t() of its [in, out] storage, dW through the view
    "weight_stored_kn": dict(weight_kn=True, train_base=True, dropout_p=0.2),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants(variant, dtype, path, device):
    check_case(LoraCase(M=37, K=70, N=45, r=8, dtype=dtype, **VARIANTS[variant]), path, device)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp32_adapters_on_half_precision_base(dtype, path, device):
    """PEFT keeps adapters in fp32 on a bf16/fp16 base: allowed, gradients come back in fp32."""
    case = LoraCase(M=29, K=50, N=36, r=16, dtype=dtype, adapter_dtype=torch.float32, dropout_p=0.2)
    check_case(case, path, device)


def _grads_of(fn, tensors, grad_out):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    y = fn(*leaves)
    y.backward(grad_out)
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_non_contiguous_inputs(dtype, path, device):
    """x as a transposed view (inner stride ≠ 1), a 3-D permuted view (reshape must copy),
    and a transposed weight all give the reference's results."""
    inp = make_lora_inputs(LoraCase(M=24, K=40, N=30, r=8, dtype=dtype), device)
    W, A, B, b = inp["weight"], inp["lora_A"], inp["lora_B"], inp["bias"]
    xs = {
        "transposed": inp["x"].t().contiguous().t(),  # strides (1, 24)
        "permuted_3d": inp["x"].view(4, 6, 40).transpose(0, 1).contiguous().transpose(0, 1),
        "column_slice": torch.cat([inp["x"], inp["x"]], dim=1)[:, ::2],  # stride 2 along K
    }
    W_t = W.t().contiguous().t()
    ops = lora_ops(path)
    for name, x in xs.items():
        assert not x.is_contiguous(), name
        x = x.detach().requires_grad_()
        y = LoraLinearFunction.apply(x, W_t, A.clone().requires_grad_(), B.clone().requires_grad_(), b, 0.5, 0.0, ops)
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        y.backward(grad_out)
        xr = x.detach().double().requires_grad_()
        yr = reference.lora_linear(xr, W.double(), A.double(), B.double(), 0.5, b.double())
        yr.backward(grad_out.double())
        assert_close(y, yr, dtype, f"{name} y")
        assert_close(x.grad, xr.grad, dtype, f"{name} dx")
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("path", PATHS)
def test_non_contiguous_bias(path, device):
    inp = make_lora_inputs(LoraCase(M=10, K=24, N=18, r=4, dtype=torch.float32), device)
    bias = torch.randn(18, 3, generator=torch.Generator().manual_seed(2)).to(device)[:, 1]  # stride 3
    assert bias.stride() == (3,)
    y = LoraLinearFunction.apply(inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], bias, 0.5, 0.0,
                                 lora_ops(path))
    expected = reference.lora_linear(*(inp[k].double() for k in ("x", "weight", "lora_A", "lora_B")), 0.5,
                                     bias.double())
    assert_close(y, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grads", ["all", "dA only", "dB only"])
def test_backward_is_three_kernels_at_most(dtype, grads, device):
    """The backward launches g = dY·B, the dX GEMM and the rank pass (dA and dB written once,
    final, in the adapters' dtype) — nothing else: no partials to sum, no casts. In the
    interpreter a rank-pass program sums 150 rows in 5 steps and dA / dB span several programs."""
    from peft_ops.tools.launches import KernelsRan

    inp = make_lora_inputs(LoraCase(M=150, K=70, N=66, r=8, dtype=dtype, dropout_p=0.3), device)
    x = inp["x"].requires_grad_(grads == "all")
    lora_A = inp["lora_A"].requires_grad_(grads != "dB only")
    lora_B = inp["lora_B"].requires_grad_(grads != "dA only")
    torch.manual_seed(3)
    y = peft_ops.lora_linear(x, inp["weight"], lora_A, lora_B, 0.7, dropout_p=0.3)
    with KernelsRan() as ran:
        y.backward(inp["grad_out"])
    expected = {"all": ["_lora_backward_g_kernel", "_lora_backward_dx_kernel", "_lora_backward_rank_kernel"],
                "dA only": ["_lora_backward_g_kernel", "_lora_backward_rank_kernel"],
                "dB only": ["_lora_backward_rank_kernel"]}[grads]
    assert ran.names == expected  # the whole count on a GPU is tests/tools/test_launches.py's
    mask = expected_keep_mask(3, 150, 70, 0.3, "triton", device)
    ref = {k: inp[k].detach().double().requires_grad_(t.requires_grad)
           for k, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B))}
    y_ref = reference.lora_linear(ref["x"], inp["weight"].double(), ref["lora_A"], ref["lora_B"], 0.7, None, 0.3,
                                  dropout_mask=mask)
    y_ref.backward(inp["grad_out"].double())
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        assert (t.grad is not None) == t.requires_grad, name
        if t.grad is not None:
            assert t.grad.dtype == t.dtype
            assert_close(t.grad, ref[name].grad, dtype, f"d{name}")


def test_fp32_dot_precision_follows_pytorch():
    """TF32 only where the user allowed it, through either of PyTorch's switches; the new
    switch must not make the legacy read (which then raises) break every launch."""
    from peft_ops.kernels.common import fp32_dot_precision

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert fp32_dot_precision() == "tf32"
        inp = make_lora_inputs(LoraCase(M=5, K=16, N=8, r=2, dtype=torch.bfloat16), DEVICE)
        y = peft_ops.lora_linear(inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], 1.0)
        expected = reference.lora_linear(*(inp[k].double() for k in ("x", "weight", "lora_A", "lora_B")), 1.0)
        assert_close(y, expected, torch.bfloat16, "bf16 with TF32 allowed")  # bf16 dots: TF32 does not apply
        matmul.fp32_precision = "ieee"
        assert fp32_dot_precision() == "tf32x3"
    finally:
        matmul.fp32_precision = before
    assert fp32_dot_precision() == ("tf32" if matmul.allow_tf32 else "tf32x3")


@pytest.mark.parametrize("path", PATHS)
def test_double_backward_raises(path, device):
    inp = make_lora_inputs(LoraCase(M=6, K=16, N=8, r=2, dtype=torch.float32), device)
    x = inp["x"].requires_grad_()
    y = LoraLinearFunction.apply(x, inp["weight"], inp["lora_A"], inp["lora_B"], None, 1.0, 0.0, lora_ops(path))
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        dx.sum().backward()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("needs", ["x", "lora_A", "lora_B", "x+lora_B", "lora_A+lora_B"])
def test_gradients_only_where_required(needs, path, device):
    """Each subset of (x, A, B) requiring grad takes its own kernel variant; the others get none."""
    dtype = torch.float32
    inp = make_lora_inputs(LoraCase(M=21, K=34, N=19, r=4, dtype=dtype), device)
    wanted = needs.split("+")
    t = {k: inp[k].clone().requires_grad_(k in wanted) for k in ("x", "lora_A", "lora_B")}
    y = LoraLinearFunction.apply(t["x"], inp["weight"], t["lora_A"], t["lora_B"], inp["bias"], 1.5, 0.0,
                                 lora_ops(path))
    y.backward(inp["grad_out"])
    r = {k: inp[k].double().requires_grad_(k in wanted) for k in ("x", "lora_A", "lora_B")}
    yr = reference.lora_linear(r["x"], inp["weight"].double(), r["lora_A"], r["lora_B"], 1.5, inp["bias"].double())
    yr.backward(inp["grad_out"].double())
    for k in ("x", "lora_A", "lora_B"):
        if k in wanted:
            assert_close(t[k].grad, r[k].grad, dtype, f"d{k}")
        else:
            assert t[k].grad is None


@pytest.mark.parametrize("path", PATHS)
def test_empty_batch(path, device):
    inp = make_lora_inputs(LoraCase(M=0, K=16, N=8, r=4, dtype=torch.float32), device)
    x = inp["x"].requires_grad_()
    A = inp["lora_A"].requires_grad_()
    y = LoraLinearFunction.apply(x, inp["weight"], A, inp["lora_B"], inp["bias"], 1.0, 0.1, lora_ops(path))
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16)
    assert torch.equal(A.grad, torch.zeros_like(A))


def test_public_function_dispatches_and_matches(device):
    """peft_ops.lora_linear (auto backend) on 3-D input equals the reference."""
    inp = make_lora_inputs(LoraCase(M=9, K=20, N=12, r=4, dtype=torch.float32, leading=(2,)), device)
    y = peft_ops.lora_linear(inp["x"], inp["weight"], inp["lora_A"], inp["lora_B"], 2.0, inp["bias"])
    yr = reference.lora_linear(*(inp[k].double() for k in ("x", "weight", "lora_A", "lora_B")), 2.0,
                               inp["bias"].double())
    assert y.shape == (2, 9, 12)
    assert_close(y, yr, torch.float32)


# ---------------------------------------------------------------------------------------
# Dropout: one mask per seed, regenerated in the backward, reproducible (the mask itself
# against an independent generator: tests/kernel/test_dropout_mask.py).
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_dropout_reproducible_under_manual_seed(path, device):
    inp = make_lora_inputs(LoraCase(M=31, K=44, N=20, r=8, dtype=torch.float32), device)
    tensors = [inp[k] for k in ("x", "weight", "lora_A", "lora_B", "bias")]
    tensors[0].requires_grad_()
    tensors[2].requires_grad_()

    def run(seed):
        torch.manual_seed(seed)
        return _grads_of(lambda x, W, A, B, b: LoraLinearFunction.apply(x, W, A, B, b, 1.0, 0.4, lora_ops(path)),
                         tensors, inp["grad_out"])

    (y1, g1), (y2, g2), (y3, _) = run(7), run(7), run(8)
    assert torch.equal(y1, y2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2) if a is not None)
    assert not torch.equal(y1, y3)


@pytest.mark.parametrize("path", PATHS)
def test_forward_mask_equals_backward_mask(path, device):
    """Replaying the seed's mask in the reference reproduces y and every gradient (covered for
    all dtypes by test_variants); here also with a mask that differs per call: two calls in a
    row draw two seeds, and each backward uses its own forward's mask."""
    case = LoraCase(M=26, K=36, N=22, r=8, dtype=torch.float32, dropout_p=0.5)
    inp = make_lora_inputs(case, device)
    ops = lora_ops(path)
    torch.manual_seed(3)
    seeds = [eager_seed(), eager_seed()]
    torch.manual_seed(3)
    xs = [inp["x"].clone().requires_grad_() for _ in range(2)]
    ys = [LoraLinearFunction.apply(x, inp["weight"], inp["lora_A"], inp["lora_B"], None, 1.0, 0.5, ops) for x in xs]
    (ys[0] + 2 * ys[1]).backward(inp["grad_out"])  # backward runs after both forwards
    for i, (x, y, seed) in enumerate(zip(xs, ys, seeds)):
        if path == "triton":  # the independent generator, not the kernels' own mask
            mask = reference.dropout_keep_mask(seed, case.K, 0.5, range(case.M), range(case.K)).to(device)
        else:
            mask = torch_keep_mask(seed, case.M, case.K, 0.5, device)
        xr = inp["x"].double().requires_grad_()
        yr = reference.lora_linear(xr, inp["weight"].double(), inp["lora_A"].double(), inp["lora_B"].double(),
                                   1.0, None, 0.5, dropout_mask=mask)
        (yr * (1 + i)).backward(inp["grad_out"].double())
        assert_close(y, yr, torch.float32, f"call {i} y")
        assert_close(x.grad, xr.grad, torch.float32, f"call {i} dx")
    assert seeds[0] != seeds[1]


# ---------------------------------------------------------------------------------------
# Saved activations: x itself (no copy) + x·Aᵀ (M×r fp32), and with dropout the bit-packed
# keep mask (x/16 bytes for a bf16 x; PEFT keeps 4·x with dropout).
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_saved_bytes_at_most_x_plus_xa(dropout_p, path, device):
    M, K, N, r, dtype = 64, 96, 80, 16, torch.bfloat16
    inp = make_lora_inputs(LoraCase(M, K, N, r, dtype, leading=(2,)), device)
    x = inp["x"].requires_grad_()
    A = inp["lora_A"].requires_grad_()
    B = inp["lora_B"].requires_grad_()
    params = [inp["weight"], A, B, inp["bias"]]
    tokens = 2 * M
    x_bytes = x.numel() * x.element_size()
    floor = x_bytes + tokens * r * 4 + (tokens * 3 * 4 if dropout_p > 0 else 0)  # K = 96: 3 words per row

    ours, saved, y = saved_activation_bytes(
        lambda: LoraLinearFunction.apply(x, inp["weight"], A, B, inp["bias"], 0.5, dropout_p, lora_ops(path)), params)
    assert any(t.data_ptr() == x.data_ptr() for t in saved), "x must be saved as is, not copied"
    assert ours == floor, (ours, floor)  # exactly x + xa (+ mask bits): no dropped copy of x
    if dropout_p > 0:
        assert ours <= x_bytes * (1 + 1 / 16) + tokens * r * 4
    y.sum().backward()  # and that suffices for the backward



# ---------------------------------------------------------------------------------------
# bf16 under the interpreter
# ---------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only")
def test_bf16_tests_detect_a_wrong_dot(monkeypatch, device):
    """The interpreter's raw bf16 tl.dot is wrong; the kernels widen bf16 tiles to fp32 there
    (exact). With the widening switched off the same bf16 test must fail: it can detect a
    wrong bf16 product."""
    from peft_ops.kernels import common, lora

    case = LoraCase(M=33, K=64, N=48, r=8, dtype=torch.bfloat16)
    check_case(case, "triton", device)  # passes as shipped

    real_flags = common.dot_flags
    monkeypatch.setattr(lora, "dot_flags", lambda *args: {**real_flags(*args), "WIDEN_BF16_DOT": False})
    with pytest.raises(AssertionError, match="exceed tolerance"):
        check_case(case, "triton", device)



# ---------------------------------------------------------------------------------------
# The persistent TMA GEMMs of sm_90a, run in the interpreter
# ---------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter: forces the sm_90a kernels' choice here")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(70, 96, 72, 8, 0.2), (5, 64, 40, 16, 0.0), (130, 32, 200, 80, 0.0),
                                   (130, 32, 200, 80, 0.2)],
                         ids=lambda s: "M{}_K{}_N{}_r{}_p{}".format(*s))
def test_tma_gemms(shape, dtype, monkeypatch):
    """Forward and dX through tensor descriptors, persistent programs looping over several
    tiles each (3 programs), edges zero-filled and clipped by the copy engine, bias, with and
    without dropout (without it, dX loads its first rank chunk before the main loop), one rank
    chunk and several (r = 80 > 64)."""
    from peft_ops.kernels import lora as kernels
    from peft_ops.tools.launches import KernelsRan

    monkeypatch.setattr(kernels, "TMA_TARGETS", {"interpreter"})
    M, K, N, r, dropout_p = shape
    case = LoraCase(M, K, N, r, dtype, dropout_p=dropout_p)
    with KernelsRan() as ran:
        check_case(case, "triton", DEVICE)
    assert {"_lora_forward_tma_kernel", "_lora_backward_dx_tma_kernel"} <= set(ran.names)
    # the rank pass ran as extra programs of the dX launch
    assert not {"_lora_forward_kernel", "_lora_backward_dx_kernel", "_lora_backward_rank_kernel"} & set(ran.names)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter: forces the sm_90a kernels' choice here")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32], ids=["adapters_x_dtype", "fp32_adapters"])
def test_tma_gemms_read_a_weight_stored_kn(dtype, adapter_dtype, monkeypatch):
    """W stored [K, N] (a Conv1D weight passed as its transpose): the descriptors address its
    storage as [K, N] tiles (W_KN), forward and dX, every gradient against float64, dW
    through the view."""
    from peft_ops.kernels import lora as kernels
    from peft_ops.tools.launches import KernelsRan

    monkeypatch.setattr(kernels, "TMA_TARGETS", {"interpreter"})
    seen = []
    original = kernels.launch

    def spy(kernel, grid, *args, **kwargs):
        if "W_KN" in kwargs:
            seen.append(kwargs["W_KN"])
        return original(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(kernels, "launch", spy)
    for dropout_p in (0.0, 0.2):
        case = LoraCase(70, 72, 40, 8, dtype, dropout_p=dropout_p, adapter_dtype=adapter_dtype, weight_kn=True,
                        train_base=True)
        with KernelsRan() as ran:
            check_case(case, "triton", DEVICE)
        assert {"_lora_forward_tma_kernel", "_lora_backward_dx_tma_kernel"} <= set(ran.names)
    assert seen == [True] * 4


@pytest.mark.parametrize("op", ["lora", "dora"])
@pytest.mark.parametrize("gemm", ["triton", "cublas"])
def test_weight_stored_kn_is_read_in_place_on_an_h200_plan(op, gemm, monkeypatch):
    """Planned for an H200 at GPT-2 medium's c_attn (in 1024 → out 3072, M = 2048, r = 16,
    dropout on): with W stored [K, N] the fused path's two GEMMs are the persistent TMA kernels
    in their W_KN layout, cuBLAS takes the view as a transposed operand, and nothing the size of
    W is allocated in the forward or the backward — no transposed copy."""
    from peft_ops.tools import launches

    monkeypatch.setenv("PEFT_OPS_GEMM", gemm)
    M, K, N, r = 2048, 1024, 3072, 16
    meta = dict(device="meta", dtype=torch.bfloat16)
    x = torch.empty(M, K, **meta).requires_grad_()
    weight = torch.empty(K, N, **meta).t()  # Conv1D's [in, out] storage
    A, B = torch.empty(r, K, **meta).requires_grad_(), torch.empty(N, r, **meta).requires_grad_()
    if op == "dora":
        m, sq = torch.empty(N, **meta).requires_grad_(), torch.empty(N, device="meta", dtype=torch.float32)
        forward = lambda: peft_ops.dora_linear(x, weight, A, B, m, 2.0, None, 0.1, weight_sq_norm=sq)  # noqa: E731
    else:
        forward = lambda: peft_ops.lora_linear(x, weight, A, B, 2.0, None, 0.1)  # noqa: E731
    out = []
    phases = [launches.planned_recorder(lambda: out.append(forward())),
              launches.planned_recorder(lambda: out[0].backward(torch.empty(M, N, **meta)))]
    for recorder in phases:
        assert not [tuple(t.shape) for t in recorder.allocated if t.numel() == N * K]
    gemms = [launch for recorder in phases for launch in recorder.launches
             if str(launch) in ("_lora_forward_tma_kernel", "_lora_backward_dx_tma_kernel")]
    if gemm == "triton":
        assert [str(g) for g in gemms] == ["_lora_forward_tma_kernel", "_lora_backward_dx_tma_kernel"]
        assert all(g.args["W_KN"] for g in gemms)
    else:
        assert not gemms


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter: forces the sm_90a kernels' choice here")
@pytest.mark.parametrize("grads", ["all", "x only", "A and B only", "dA only"])
def test_tma_dx_with_and_without_rank_items(grads, monkeypatch):
    """The persistent dX launch runs the rank items when dA or dB is wanted beside dX, runs
    alone when only dX is (frozen adapters), and the rank pass is its own launch when dX is
    not wanted: every gradient against float64 in each case."""
    from peft_ops.kernels import lora as kernels
    from peft_ops.tools.launches import KernelsRan

    monkeypatch.setattr(kernels, "TMA_TARGETS", {"interpreter"})
    dtype = torch.bfloat16
    inp = make_lora_inputs(LoraCase(M=75, K=72, N=48, r=8, dtype=dtype, dropout_p=0.0), DEVICE)
    x = inp["x"].requires_grad_(grads in ("all", "x only"))
    lora_A = inp["lora_A"].requires_grad_(grads in ("all", "A and B only", "dA only"))
    lora_B = inp["lora_B"].requires_grad_(grads in ("all", "A and B only"))
    y = peft_ops.lora_linear(x, inp["weight"], lora_A, lora_B, 0.7)
    with KernelsRan() as ran:
        y.backward(inp["grad_out"])
    expected = {"all": ["_lora_backward_g_kernel", "_lora_backward_dx_tma_kernel"],
                "x only": ["_lora_backward_g_kernel", "_lora_backward_dx_tma_kernel"],
                "A and B only": ["_lora_backward_g_kernel", "_lora_backward_rank_kernel"],
                "dA only": ["_lora_backward_g_kernel", "_lora_backward_rank_kernel"]}[grads]
    assert ran.names == expected
    ref = {k: inp[k].detach().double().requires_grad_(t.requires_grad)
           for k, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B))}
    reference.lora_linear(ref["x"], inp["weight"].double(), ref["lora_A"], ref["lora_B"], 0.7).backward(
        inp["grad_out"].double())
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        assert (t.grad is not None) == t.requires_grad, name
        if t.grad is not None:
            assert_close(t.grad, ref[name].grad, dtype, f"d{name}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter: forces the sm_90a kernels' choice here")
def test_operands_tma_cannot_address_take_the_pointer_gemms(monkeypatch):
    """A row of 33 bf16 values (66 bytes) or a strided x breaks the descriptors' 16-byte rule:
    those calls take the pointer-based GEMMs, with the same numbers."""
    from peft_ops.kernels import lora as kernels
    from peft_ops.tools.launches import KernelsRan

    monkeypatch.setattr(kernels, "TMA_TARGETS", {"interpreter"})
    for case in (LoraCase(9, 33, 16, 4, torch.bfloat16), LoraCase(9, 32, 16, 4, torch.bfloat16, x_transposed=True)):
        with KernelsRan() as ran:
            check_case(case, "triton", DEVICE)
        assert "_lora_forward_kernel" in ran.names and "_lora_forward_tma_kernel" not in ran.names, case.label()


# ---------------------------------------------------------------------------------------
# The cuBLAS implementation: torch.addmm (CPU BLAS here) around the memory-bound LoRA kernels
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(3, 33, 17, 8), (127, 64, 257, 64), (20, 48, 40, 80), (5, 24, 30, 5)],
                         ids=lambda s: "M{}_K{}_N{}_r{}".format(*s))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_cublas_path(shape, dtype, dropout_p, device):
    """The same Function on the cuBLAS implementation: forward and every gradient against float64,
    with dropout, a trainable bias and adapters of x's dtype or fp32."""
    from peft_ops.tools.launches import KernelsRan

    M, K, N, r = shape
    for adapter_dtype in (None, torch.float32):
        # W stored [K, N] (Conv1D) once: cuBLAS takes the view as a transposed operand
        case = LoraCase(M, K, N, r, dtype, dropout_p=dropout_p, adapter_dtype=adapter_dtype, train_base=True,
                        weight_kn=adapter_dtype is None)
        with KernelsRan() as ran:
            check_case(case, "cublas", device)
        assert {"_lora_expand_kernel", "_lora_dx_term_kernel"} <= set(ran.names)
        assert not {"_lora_forward_kernel", "_lora_forward_tma_kernel"} & set(ran.names)


@pytest.mark.parametrize("path", ["triton", "cublas"])
def test_lora_gemm_choice_by_shape_launches(path, monkeypatch):
    """Planned for an H200: the fused path is 2 + 2 launches (the persistent dX GEMM runs the
    rank pass as extra programs), the cuBLAS path 3 + 4 (the addmms; its LoRA pieces are one
    kernel per phase, the rank pass its own launch)."""
    from peft_ops.tools import launches
    from peft_ops.tools.roofline import OpShape

    monkeypatch.setenv("PEFT_OPS_GEMM", path)
    planned = launches.op_launches(OpShape("lora", 8192, 4096, 4096, 16), "sm90", 132, dropout_p=0.1, bias=True)
    forward, backward = ([str(x) for x in planned[p]] for p in ("forward", "backward"))
    if path == "cublas":
        assert forward == ["_lora_shrink_kernel", "_lora_expand_kernel", "aten.addmm.default"]
        assert backward == ["_lora_backward_g_kernel", "_lora_dx_term_kernel", "aten.addmm.out",
                            "_lora_backward_rank_kernel"]
    else:
        assert forward == ["_lora_shrink_kernel", "_lora_forward_tma_kernel"]
        assert backward == ["_lora_backward_g_kernel", "_lora_backward_dx_tma_kernel"]

"""lora_embedding: y = E[ids] + s·(A[:, ids])ᵀ·Bᵀ against float64 on both paths — repeated
ids (the deterministic scatter-add), padding_idx, fp32 adapters on a half-precision table,
int32 / 3-D / empty ids — its launches on an H200 plan, and bad input."""

import pytest
import torch

import peft_ops
from peft_ops import reference
from peft_ops.ops.embedding import LoraEmbeddingFunction
from peft_ops.ops.paths import eager_ops
from peft_ops.tools import check as check_cli
from peft_ops.tools.accuracy import assert_close, run_embedding_case, tolerance

from conftest import DEVICE

PATHS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def inputs(V=50, D=40, r=8, dtype=torch.float32, adapter_dtype=None, shape=(3, 23), seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    ids = torch.randint(0, V, shape, generator=gen)
    if ids.numel() > 8:
        ids.view(-1)[:6] = 7  # one id six times: its column of dA sums six rows
        ids.view(-1)[8] = 0
    return dict(ids=ids.to(device),
                weight=torch.randn(V, D, generator=gen).to(device=device, dtype=dtype),
                lora_A=(torch.randn(r, V, generator=gen) * 0.5).to(device=device, dtype=adapter_dtype),
                lora_B=(torch.randn(D, r, generator=gen) * r ** -0.5).to(device=device, dtype=adapter_dtype),
                grad_out=torch.randn(*shape, D, generator=gen).to(device=device, dtype=dtype))


def reference_with_scale(inp, scaling, padding_idx):
    """{name: (float64 value, float64 value on |inputs|)} for y, dA, dB."""
    out = {}
    for kind, f in (("value", lambda t: t), ("scale", torch.abs)):
        A = f(inp["lora_A"].double()).requires_grad_()
        B = f(inp["lora_B"].double()).requires_grad_()
        y = reference.lora_embedding(inp["ids"], f(inp["weight"].double()), A, B, abs(scaling) if kind == "scale"
                                     else scaling, padding_idx)
        y.backward(f(inp["grad_out"].double()))
        out[kind] = {"y": y.detach(), "dA": A.grad, "dB": B.grad}
    return {k: (out["value"][k], out["scale"][k]) for k in out["value"]}


def check(inp, path, scaling=1.5, padding_idx=None, dtype=torch.float32, adapter_dtype=None):
    A = inp["lora_A"].clone().requires_grad_()
    B = inp["lora_B"].clone().requires_grad_()
    with peft_ops.use_backend(path):
        y = peft_ops.lora_embedding(inp["ids"], inp["weight"], A, B, scaling, padding_idx)
    y.backward(inp["grad_out"])
    assert y.dtype == inp["weight"].dtype and A.grad.dtype == A.dtype and B.grad.dtype == B.dtype
    refs = reference_with_scale(inp, scaling, padding_idx)
    for name, actual in (("y", y), ("dA", A.grad), ("dB", B.grad)):
        expected, scale = refs[name]
        assert_close(actual, expected, dtype, f"{path} {name}", tol=tolerance(dtype, adapter_dtype, name),
                     scale=scale)
    return y.detach(), A.grad, B.grad


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("r", [1, 8, 80])
def test_forward_and_gradients(r, dtype, path):
    check(inputs(r=r, dtype=dtype), path, dtype=dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", check_cli.embedding_cases(quick=False), ids=lambda c: f"{c.label()} {c.dtype}")
def test_check_cases(case, path):
    """`peft-ops check`'s embedding rows, through the shared harness."""
    for result in run_embedding_case(case, path, device=DEVICE):
        result.check(f"{path} {case.label()}", case.tolerance(result.name))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp32_adapters_on_a_half_precision_table(dtype, path):
    """PEFT's fp32 adapters: y in the table's dtype, dA and dB fp32-accurate."""
    check(inputs(dtype=dtype, adapter_dtype=torch.float32), path, dtype=dtype, adapter_dtype=torch.float32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("padding_idx", [0, -50, 7])
def test_padding_idx_gets_no_gradient(padding_idx, path):
    """F.embedding's rule: the padding row's column of A gets exactly zero (7 is the id repeated
    six times), every other column its sum; a negative index counts from the end."""
    inp = inputs()
    _, dA, _ = check(inp, path, padding_idx=padding_idx)
    assert torch.count_nonzero(dA[:, padding_idx % 50]) == 0


@pytest.mark.parametrize("path", PATHS)
def test_int32_ids_any_shape_and_none(path):
    check(inputs(shape=(2, 3, 5)) | {"ids": inputs(shape=(2, 3, 5))["ids"].int()}, path)
    inp = inputs(shape=(0,))
    A, B = inp["lora_A"].clone().requires_grad_(), inp["lora_B"].clone().requires_grad_()
    with peft_ops.use_backend(path):
        y = peft_ops.lora_embedding(inp["ids"], inp["weight"], A, B, 2.0)
    y.sum().backward()
    assert y.shape == (0, 40) and torch.count_nonzero(A.grad) == 0 and torch.count_nonzero(B.grad) == 0


def test_repeated_ids_sum_in_a_fixed_order():
    """The kernels' scatter-add: bit-identical gradients across calls, every token of an id
    counted (an id that appears 200 times among 256 tokens)."""
    inp = inputs(V=20, shape=(256,))
    inp["ids"][:200] = 3
    grads = [check(inp, "triton")[1:] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_launches_on_an_h200_plan():
    """Forward: the gather and the fused lookup (2 launches). Backward: g, the dB pass, dA's
    zero-fill, the sort and the segment sums — no float atomics, nothing sized V·D."""
    from peft_ops.tools import launches

    M, V, D, r = 8192, 128256, 4096, 16
    meta = dict(device="meta", dtype=torch.bfloat16)
    ids = torch.empty(M, device="meta", dtype=torch.int64)
    weight = torch.empty(V, D, **meta)
    A, B = torch.empty(r, V, **meta).requires_grad_(), torch.empty(D, r, **meta).requires_grad_()
    out = []
    forward = launches.planned_recorder(lambda: out.append(
        LoraEmbeddingFunction.apply(ids, weight, A, B, 2.0, None, eager_ops("embedding", "triton"))))
    backward = launches.planned_recorder(lambda: out[0].backward(torch.empty(M, D, **meta)))
    assert [str(x) for x in forward.launches] == ["_lora_embedding_gather_kernel", "_lora_embedding_forward_kernel"]
    names = [str(x) for x in backward.launches]
    assert [n for n in names if n.startswith("_")] == ["_lora_backward_g_kernel", "_lora_backward_rank_kernel",
                                                       "_lora_embedding_dA_kernel"]
    assert not [t for t in forward.allocated + backward.allocated if t.numel() == V * D]


BAD = [
    (dict(ids=torch.tensor([[1, 50]])), ValueError, "ids"),
    (dict(ids=torch.tensor([-1])), ValueError, "ids"),
    (dict(ids=torch.tensor([1.0])), TypeError, "ids"),
    (dict(lora_A=torch.zeros(8, 49)), ValueError, "lora_A"),
    (dict(lora_B=torch.zeros(41, 8)), ValueError, "lora_B"),
    (dict(lora_B=torch.zeros(40, 8, dtype=torch.float16)), TypeError, "lora_B"),
    (dict(padding_idx=50), ValueError, "padding_idx"),
    (dict(padding_idx=1.0), TypeError, "padding_idx"),
    (dict(scaling=float("nan")), ValueError, "scaling"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_names_the_argument(case):
    fields, error, name = BAD[case]
    inp = inputs(device="cpu")
    args = dict(ids=inp["ids"], weight=inp["weight"], lora_A=inp["lora_A"], lora_B=inp["lora_B"], scaling=1.0,
                padding_idx=None) | fields
    with pytest.raises(error, match=name):
        peft_ops.lora_embedding(**args)

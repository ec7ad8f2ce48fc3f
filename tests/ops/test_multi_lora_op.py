"""multi_lora_linear: K adapters in one batch, each row its own adapter (−1: none), on both
paths — the grouped Triton kernels (in the interpreter here) and the PyTorch path:

- every output and gradient equals K separate single-adapter ``lora_linear`` calls on each
  adapter's rows on the same path (dropout on, the same masks: the seeds are drawn in adapter
  order, and the kernels' mask of a row is by its position inside its adapter's rows), for K in
  {1, 2, 5}, ranks {4, 8, 16}, uneven segments (one adapter with 1 row, one with none);
- against the float64 reference per dtype (tolerances from measured errors);
- an NF4 base equals ``qlora_linear`` per segment; saved activations are x + Σ_k n_k·r_k;
- determinism, and bad input named before anything runs.
"""

import contextlib

import pytest
import torch

import peft_ops
from peft_ops import reference
from peft_ops.ops.multi_lora import adapter_segments

IN, OUT = 24, 20
# measured worst relative errors against float64 (outputs and every gradient, 5 seeds, adapters in
# x's dtype, fp32 and mixed): fp32 1.9e-7, bf16 5.1e-3 on either path (the kernels in the interpreter)
TOL = {torch.float32: 1e-6, torch.bfloat16: 2e-2}


def relative(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def make(count, dtype=torch.float32, seed=0, ranks=(4, 8, 16, 4, 8)):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(OUT, IN, generator=gen) / 4).to(dtype)
    bias = torch.randn(OUT, generator=gen).to(dtype)
    lora_As = [(torch.randn(ranks[k], IN, generator=gen) / 4).to(dtype) for k in range(count)]
    lora_Bs = [(torch.randn(OUT, ranks[k], generator=gen) / 4).to(dtype) for k in range(count)]
    scalings = [0.5, 2.0, 1.0, 0.25, 1.5][:count]
    return weight, bias, lora_As, lora_Bs, scalings


IDS = {  # uneven: K=5 has adapter 3 with no row and adapter 4 with one; −1 rows get the base alone
    1: [0, -1, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    2: [1, 0, 1, 1, -1, 0, 0, 1, 1, 1, 0, 1, 1, -1, 0, 1, 1, 1],
    5: [0, 1, 2, 2, -1, 0, 1, 1, 2, 0, 4, 2, 0, 1, 0, -1, 2, 2],
}


def leaf(t):
    return t.detach().clone().requires_grad_()


PATHS = ["kernels", "torch"]


def on_path(path):
    """The block runs the grouped kernels (the default backend: the interpreter here) or the PyTorch path."""
    return contextlib.nullcontext() if path == "kernels" else peft_ops.use_backend("torch")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("count", [1, 2, 5])
def test_equals_separate_single_adapter_runs_with_dropout(count, path):
    weight, bias, lora_As, lora_Bs, scalings = make(count)
    dropout_ps = [0.1, 0.0, 0.3, 0.2, 0.5][:count]
    ids = torch.tensor(IDS[count]).view(3, 6)  # x [3, 6, IN]: ids in x's leading shape
    x = torch.randn(3, 6, IN, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(3, 6, OUT, generator=torch.Generator().manual_seed(2))

    params = [leaf(t) for t in (x, bias, *lora_As, *lora_Bs)]
    torch.manual_seed(7)
    with on_path(path):
        y = peft_ops.multi_lora_linear(params[0], weight, params[2:2 + count], params[2 + count:], scalings, ids,
                                       params[1], dropout_ps)
        got = torch.autograd.grad(y, params, grad)

    singles = [leaf(t) for t in (x, bias, *lora_As, *lora_Bs)]
    x2d, flat = singles[0].reshape(-1, IN), ids.reshape(-1)
    torch.manual_seed(7)  # the same seeds, drawn in adapter order by the segments that have rows
    expected = torch.nn.functional.linear(x2d, weight, singles[1])
    with on_path(path):  # lora_linear on the same path draws its masks as the multi op does
        for k in range(count):
            rows = (flat == k).nonzero().reshape(-1)
            if len(rows):
                part = peft_ops.lora_linear(x2d[rows], weight, singles[2 + k], singles[2 + count + k], scalings[k],
                                            singles[1], dropout_ps[k])
                expected = expected.index_put((rows,), part)
    want = torch.autograd.grad(expected.view(3, 6, OUT), singles, grad, allow_unused=True)
    assert relative(y, expected.view(3, 6, OUT)) <= TOL[torch.float32]
    for index, (a, b) in enumerate(zip(got, want)):
        b = torch.zeros_like(a) if b is None else b
        assert a.shape == b.shape
        assert relative(a, b) <= TOL[torch.float32] or a.abs().max() == b.abs().max() == 0, index
    if count == 5:  # the adapter without rows gets exact zeros
        assert torch.equal(got[2 + 3], torch.zeros_like(lora_As[3])) and torch.equal(got[2 + 5 + 3],
                                                                                      torch.zeros_like(lora_Bs[3]))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adapter_dtype", ["same", "fp32", "mixed"])
def test_against_float64(dtype, adapter_dtype, path):
    weight, bias, lora_As, lora_Bs, scalings = make(5, dtype)
    if adapter_dtype == "fp32":
        lora_As, lora_Bs = [a.float() for a in lora_As], [b.float() for b in lora_Bs]
    elif adapter_dtype == "mixed":  # adapters 1 and 2 fp32, the others in x's dtype
        lora_As[1:3], lora_Bs[1:3] = [a.float() for a in lora_As[1:3]], [b.float() for b in lora_Bs[1:3]]
    ids = torch.tensor(IDS[5])
    x = torch.randn(18, IN, generator=torch.Generator().manual_seed(3)).to(dtype)
    grad = torch.randn(18, OUT, generator=torch.Generator().manual_seed(4)).to(dtype)
    params = [leaf(t) for t in (x, weight, bias, *lora_As, *lora_Bs)]
    with on_path(path):
        y = peft_ops.multi_lora_linear(params[0], params[1], params[3:8], params[8:], scalings, ids, params[2])
        got = torch.autograd.grad(y, params, grad)
    exact = [leaf(t.double()) for t in (x, weight, bias, *lora_As, *lora_Bs)]
    y64 = reference.multi_lora_linear(exact[0], exact[1], exact[3:8], exact[8:], scalings, ids, exact[2])
    want = torch.autograd.grad(y64, exact, grad.double())
    assert y.dtype == dtype and relative(y, y64) <= TOL[dtype]
    for index, (a, b) in enumerate(zip(got, want)):
        if index == 3 + 3 or index == 8 + 3:  # adapter 3 has no rows
            assert torch.equal(a, torch.zeros_like(a))
            continue
        assert a.dtype == params[index].dtype
        assert relative(a, b) <= TOL[dtype], (index, relative(a, b))


@pytest.mark.parametrize("path", PATHS)
def test_nf4_base_equals_qlora_per_segment(path):
    torch.manual_seed(0)
    qweight = peft_ops.nf4.quantize(torch.randn(OUT * 4, IN * 4) / 4)
    _, _, lora_As, lora_Bs, scalings = make(2)
    lora_As = [torch.randn(r, IN * 4) / 4 for r in (4, 8)]
    lora_Bs = [torch.randn(OUT * 4, r) / 4 for r in (4, 8)]
    ids = torch.tensor([1, 0, -1, 1, 1, 0, 0, 1])
    x = torch.randn(8, IN * 4)
    with on_path(path):
        y = peft_ops.multi_lora_linear(x, qweight, lora_As, lora_Bs, scalings, ids)
    with peft_ops.use_backend("torch"):
        for k in range(2):
            rows = (ids == k).nonzero().reshape(-1)
            part = peft_ops.qlora_linear(x[rows], qweight, lora_As[k], lora_Bs[k], scalings[k])
            assert relative(y[rows], part) <= TOL[torch.float32]
        assert relative(y[2], peft_ops.nf4_linear(x[2:3], qweight)[0]) <= TOL[torch.float32]


@pytest.mark.parametrize("path", PATHS)
def test_nf4_base_is_decoded_in_the_backward_only_for_dx(path, monkeypatch):
    """The backward reads the base weight only for dX: with x not needing a gradient an NF4 base
    is not decoded again (a transient out × in buffer and a pass over it), and the adapters'
    gradients are those of a run where x needs one."""
    import peft_ops.ops.multi_lora as op

    decoded = []
    real = op.dequantize
    monkeypatch.setattr(op, "dequantize", lambda *a, **k: decoded.append(1) or real(*a, **k))
    torch.manual_seed(1)
    qweight = peft_ops.nf4.quantize(torch.randn(OUT * 4, IN * 4) / 4)
    ids = torch.tensor([1, 0, -1, 1, 1, 0, 0, 1])
    x = torch.randn(8, IN * 4)
    dy = torch.randn(8, OUT * 4)
    grads = {}
    for x_grad in (False, True):
        lora_As = [leaf(torch.randn(r, IN * 4, generator=torch.Generator().manual_seed(r)) / 4) for r in (4, 8)]
        lora_Bs = [leaf(torch.randn(OUT * 4, r, generator=torch.Generator().manual_seed(9 + r)) / 4) for r in (4, 8)]
        xin = leaf(x) if x_grad else x
        with on_path(path):
            y = peft_ops.multi_lora_linear(xin, qweight, lora_As, lora_Bs, [0.5, 2.0], ids)
            assert len(decoded) == 1  # the forward's decode
            y.backward(dy)
        assert len(decoded) == 1 + x_grad  # the backward's only for dX
        assert (xin.grad is not None) == x_grad
        grads[x_grad] = [t.grad for t in (*lora_As, *lora_Bs)]
        decoded.clear()
    for without, with_dx in zip(grads[False], grads[True]):
        assert torch.equal(without, with_dx)


@pytest.mark.parametrize("path", PATHS)
def test_saved_activations_are_x_and_each_rows_own_rank(path):
    weight, bias, lora_As, lora_Bs, scalings = make(5)
    params = [leaf(t) for t in (*lora_As, *lora_Bs)]
    x = torch.randn(18, IN)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), on_path(path):
        peft_ops.multi_lora_linear(x, weight, params[:5], params[5:], scalings, torch.tensor(IDS[5]), bias)
    ids = torch.tensor(IDS[5])
    counts = [(ids == k).sum().item() for k in range(5)]
    activations = [t for t in saved if not any(t is p for p in (*params, weight))]
    assert activations[0] is x  # x itself, no copy
    xa_bytes = sum(t.numel() * t.element_size() for t in activations[2:] if t.is_floating_point())
    assert xa_bytes == sum(n * a.shape[0] * 4 for n, a in zip(counts, lora_As))  # fp32 xa of each row's rank
    assert activations[1].numel() == 18 and activations[1].dtype == torch.int64  # the row order
    tables = [t for t in activations[2:] if not t.is_floating_point()]
    # the kernels' table: 11 int64 per adapter, 3 per row tile (16 rows in the interpreter: one per
    # adapter with rows, one for the rows without an adapter)
    assert [t.numel() for t in tables] == ([11 * 5 + 3 * 5] if path == "kernels" else [])


@pytest.mark.parametrize("path", PATHS)
def test_deterministic_and_segments(path):
    weight, bias, lora_As, lora_Bs, scalings = make(5)
    ids = torch.tensor(IDS[5])
    x = torch.randn(18, IN)
    with on_path(path):
        torch.manual_seed(3)
        first = peft_ops.multi_lora_linear(x, weight, lora_As, lora_Bs, scalings, ids, bias, [0.2] * 5)
        torch.manual_seed(3)
        again = peft_ops.multi_lora_linear(x, weight, lora_As, lora_Bs, scalings, ids, bias, [0.2] * 5)
    assert torch.equal(first, again)
    segments = adapter_segments(ids, 5)
    assert segments.offsets == (2, 7, 11, 17, 17, 18)
    assert segments.rows(4).tolist() == [10] and segments.count(3) == 0


@pytest.mark.parametrize("change, exc, words", [
    (dict(adapter_ids=torch.tensor([0] * 17 + [5])), ValueError, "adapter_ids must lie in -1 … 4"),
    (dict(adapter_ids=torch.tensor([0] * 17 + [-2])), ValueError, "adapter_ids"),
    (dict(adapter_ids=torch.zeros(18)), TypeError, "adapter_ids"),
    (dict(adapter_ids=torch.zeros(17, dtype=torch.long)), ValueError, "adapter_ids"),
    (dict(adapter_ids=torch.zeros(18, dtype=torch.long, device="meta")), ValueError, "adapter_ids"),
    (dict(scalings=[1.0] * 4), ValueError, "scalings"),
    (dict(dropout_ps=[0.1] * 4 + [1.0]), ValueError, "dropout_ps[4]"),
    (dict(lora_Bs="b"), TypeError, "lora_Bs"),
    (dict(lora_As=[]), ValueError, "lora_As"),
])
def test_bad_input_is_named(change, exc, words):
    weight, bias, lora_As, lora_Bs, scalings = make(5)
    args = dict(x=torch.randn(18, IN), weight=weight, lora_As=lora_As, lora_Bs=lora_Bs, scalings=scalings,
                adapter_ids=torch.tensor(IDS[5]), bias=bias, dropout_ps=None) | change
    with pytest.raises(exc) as raised:
        peft_ops.multi_lora_linear(**args)
    assert words in str(raised.value), str(raised.value)


def test_a_wrong_adapter_shape_names_its_index():
    weight, bias, lora_As, lora_Bs, scalings = make(5)
    lora_Bs[2] = torch.randn(OUT, 3)
    with pytest.raises(ValueError, match=r"lora_Bs\[2\] must be"):
        peft_ops.multi_lora_linear(torch.randn(18, IN), weight, lora_As, lora_Bs, scalings, torch.tensor(IDS[5]))


def test_reference_takes_adapters_of_mixed_dtypes_and_the_op_autocasts():
    weight, bias, lora_As, lora_Bs, scalings = make(2, torch.bfloat16)
    lora_As[1], lora_Bs[1] = lora_As[1].float(), lora_Bs[1].float()  # one adapter fp32, one bf16
    x = torch.randn(18, IN).bfloat16()
    ids = torch.tensor(IDS[2])
    y = peft_ops.multi_lora_linear(x, weight, lora_As, lora_Bs, scalings, ids, bias)
    exact = reference.multi_lora_linear(x.double(), weight.double(), [a.double() for a in lora_As],
                                        [b.double() for b in lora_Bs], scalings, ids, bias.double())
    assert relative(y, exact) <= TOL[torch.bfloat16]
    assert reference.multi_lora_linear(x, weight, lora_As, lora_Bs, scalings, ids, bias).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 x and weight computed in bf16, as F.linear
        cast = peft_ops.multi_lora_linear(x.float(), weight.float(), lora_As, lora_Bs, scalings, ids, bias.float())
    assert cast.dtype == torch.bfloat16 and relative(cast, exact) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype, in_features, out_features, ranks", [
    (torch.float32, 24, 20, (24, 8)),  # fp32 rank chunks are 16 wide: rank 24 takes two
    (torch.bfloat16, 32, 48, (8, 16)),  # every rank and feature count a multiple of 8: the aligned variant
])
def test_kernels_long_segments_rank_chunks_and_dropout(dtype, in_features, out_features, ranks):
    """Segments over several row tiles (16 rows in the interpreter), a rank past one chunk, the
    aligned layout: the grouped kernels equal lora_linear's kernels on each adapter's rows, with
    the same dropout masks."""
    gen = torch.Generator().manual_seed(5)
    weight = (torch.randn(out_features, in_features, generator=gen) / 4).to(dtype)
    lora_As = [(torch.randn(r, in_features, generator=gen) / 4).to(dtype) for r in ranks]
    lora_Bs = [(torch.randn(out_features, r, generator=gen) / 4).to(dtype) for r in ranks]
    ids = torch.tensor([0] * 30 + [1] * 17 + [-1] * 6)[torch.randperm(53, generator=gen)]
    x = torch.randn(53, in_features, generator=gen).to(dtype)
    grad = torch.randn(53, out_features, generator=gen).to(dtype)
    params = [leaf(t) for t in (x, *lora_As, *lora_Bs)]
    torch.manual_seed(11)
    y = peft_ops.multi_lora_linear(params[0], weight, params[1:3], params[3:], [2.0, 0.5], ids, None, [0.25, 0.1])
    got = torch.autograd.grad(y, params, grad)
    singles = [leaf(t) for t in (x, *lora_As, *lora_Bs)]
    torch.manual_seed(11)
    expected = torch.nn.functional.linear(singles[0], weight)
    for k, (scaling, p) in enumerate(((2.0, 0.25), (0.5, 0.1))):
        rows = (ids == k).nonzero().reshape(-1)
        part = peft_ops.lora_linear(singles[0][rows], weight, singles[1 + k], singles[3 + k], scaling, None, p)
        expected = expected.index_put((rows,), part)
    want = torch.autograd.grad(expected, singles, grad)
    # measured worst over 5 seeds: fp32 1.8e-7; bf16 6.5e-3 (the outputs' last bf16 unit: the base
    # products run over other row sets)
    tol = TOL[torch.float32] if dtype == torch.float32 else 1e-2
    assert relative(y, expected) <= tol
    for index, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and relative(a, b) <= tol, (index, relative(a, b))


def test_kernels_rows_without_adapters():
    """Every row with id −1: the base and bias alone, zero adapter gradients (no tile has an adapter)."""
    weight, bias, lora_As, lora_Bs, scalings = make(2)
    params = [leaf(t) for t in (torch.randn(7, IN), *lora_As, *lora_Bs)]
    y = peft_ops.multi_lora_linear(params[0], weight, params[1:3], params[3:], scalings, torch.full((7,), -1), bias,
                                   [0.5, 0.5])
    assert relative(y, torch.nn.functional.linear(params[0], weight, bias)) <= TOL[torch.float32]
    grads = torch.autograd.grad(y, params, torch.ones_like(y))
    assert relative(grads[0], torch.ones(7, OUT) @ weight) <= TOL[torch.float32]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_kernel_launches_do_not_grow_with_the_adapters(dropout_p):
    """Planned for an H200 (sm_90a, bf16, d = 4096, r = 16): the same launches for 1, 2 and 8
    adapters — forward: the table copy, the factors' concatenation (none for one adapter), the
    shrink, the expand and cuBLAS; backward: the concatenation, g, the dX term, cuBLAS, the
    rank pass."""
    from peft_ops.tools import launches

    found = {}
    for adapters, rows in ((1, 512), (2, 256), (8, 64)):
        phases = launches.call_launches(*launches.multi_lora_call(adapters, rows, 4096, 16, dropout_p=dropout_p))
        found[adapters] = {phase: [str(launch) for launch in seq] for phase, seq in phases.items()}
    assert found[2] == found[8]
    assert found[8]["forward"] == ["aten._to_copy.default", "aten.cat.default", "_multi_lora_shrink_kernel",
                                   "_multi_lora_expand_kernel", "aten.addmm_.default"]
    assert found[8]["backward"] == ["aten.cat.default", "_multi_lora_backward_g_kernel", "_multi_lora_dx_term_kernel",
                                    "aten.addmm_.default", "_multi_lora_backward_rank_kernel"]
    assert found[1]["forward"] == [name for name in found[8]["forward"] if name != "aten.cat.default"]


@pytest.mark.parametrize("path", PATHS)
def test_an_empty_batch(path):
    """No rows (x [2, 0, in]): an empty output of the right shape, zero gradients, on both paths."""
    weight, bias, lora_As, lora_Bs, scalings = make(2)
    params = [leaf(t) for t in (torch.randn(2, 0, IN), *lora_As, *lora_Bs)]
    with on_path(path):
        y = peft_ops.multi_lora_linear(params[0], weight, params[1:3], params[3:], scalings,
                                       torch.zeros(2, 0, dtype=torch.long), bias, [0.1, 0.1])
        assert y.shape == (2, 0, OUT)
        grads = torch.autograd.grad(y, params, torch.ones_like(y))
    assert grads[0].shape == (2, 0, IN)
    assert all(torch.equal(g, torch.zeros_like(p)) for g, p in zip(grads[1:], params[1:]))
    exact = reference.multi_lora_linear(params[0], weight, lora_As, lora_Bs, scalings,
                                        torch.zeros(2, 0, dtype=torch.long), bias)
    assert exact.shape == (2, 0, OUT)

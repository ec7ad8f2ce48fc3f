"""Many LoRA adapters in one batch: ``multi_lora_linear``, each row (token) with its own adapter.

The base product runs once for every row; the adapters' terms run per segment of rows that
share an adapter (rows grouped once by a stable sort of their ids), so the LoRA work is that of
one adapter per row — no pass over all of x per adapter — and the base weight is read once for
all K adapters. Adapters may have different ranks, scalings and dropout rates; a row with id −1
gets no adapter.

On the Triton backend the LoRA terms run as grouped kernels (``peft_ops.kernels.multi_lora``):
each kernel's programs cover every segment at once, so the launches per call do not grow with
K. On the PyTorch path each segment's shrink and expand are two small GEMMs over its rows (fp32
accumulation, the rank operands rounded as the LoRA kernels round them), gathered with
``index_select`` and written back with ``index_add_`` into rows no other segment touches, so
the result does not depend on the order of the adds (deterministic, no atomics on shared
rows). On both, the big products (x·Wᵀ, dY·W, dYᵀ·x) are one ``addmm`` / ``mm`` each in x's
dtype (cuBLAS on a GPU, fp32 accumulation), the LoRA terms and the bias passed as their C: each
LoRA term is rounded to x's dtype before that sum, as on the LoRA op's cuBLAS path.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch.autograd.function import once_differentiable

from .. import reference
from ..backend import kernel_modules, resolve
from ..nf4 import NF4Weight, dequantize
from . import checks
from .autograd import (
    autocast_dtype,
    call_without_autocast,
    eager_seed,
    mm32,
    pack_keep_bits,
    torch_keep_mask,
    unpack_keep_bits,
)
from .lora import check_bias
from .paths import rank_dtype


class AdapterSegments(NamedTuple):
    """Rows grouped by adapter: ``order`` [M] int64, the row indices sorted by adapter id (stable;
    rows with id −1 first), and ``offsets`` (K + 1 ints): adapter k's rows are
    ``order[offsets[k]:offsets[k + 1]]``."""

    order: torch.Tensor
    offsets: tuple[int, ...]

    def rows(self, k: int) -> torch.Tensor:
        return self.order[self.offsets[k]: self.offsets[k + 1]]

    def count(self, k: int) -> int:
        return self.offsets[k + 1] - self.offsets[k]


def adapter_segments(adapter_ids: torch.Tensor, num_adapters: int) -> AdapterSegments:
    """Group rows by adapter id (ids in −1 … num_adapters − 1, any shape: flattened). One stable
    sort and one bincount where the ids are; the segment sizes come to the host once (they size
    the launches) — no device sync at all for ids on the CPU, whose order stays there until the
    op copies it to x's device (the kernels' with their table: one copy)."""
    checks.tensor("adapter_ids", adapter_ids)
    if adapter_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_ids must be an int32 or int64 tensor, got {adapter_ids.dtype}")
    num_adapters = checks.positive_int("num_adapters", num_adapters)
    ids = adapter_ids.reshape(-1).long()
    if ids.numel():
        low, high = torch.stack(torch.aminmax(ids)).tolist()
        if low < -1 or high >= num_adapters:
            raise ValueError(f"adapter_ids must lie in -1 … {num_adapters - 1} (-1: no adapter), got values from "
                             f"{low} to {high}")
    counts = torch.bincount(ids + 1, minlength=num_adapters + 1).tolist()
    offsets, total = [], counts[0]
    for count in counts[1:]:
        offsets.append(total)
        total += count
    offsets.append(total)
    order = torch.argsort(ids, stable=True)
    return AdapterSegments(order, tuple(offsets))


def sample_adapter_ids(sample_adapters: Sequence[str], adapters: Sequence[str], x: torch.Tensor) -> torch.Tensor:
    """Per-row adapter ids for a mixed batch: sample i (x's first dimension) runs
    ``sample_adapters[i]``, id = its index in `adapters` (−1 when absent: the base alone), repeated
    over x's other leading dimensions. Built on the CPU, so the rows group with no device sync."""
    index = {name: k for k, name in enumerate(adapters)}
    per_sample = torch.tensor([index.get(name, -1) for name in sample_adapters])
    return per_sample.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])


def check_multi_lora_args(x, weight, lora_As, lora_Bs, scalings, adapter_ids, bias, dropout_ps):
    """Validate every argument; returns (segments, scalings, dropout_ps) with floats."""
    checks.tensor("x", x, min_ndim=1)
    checks.float_dtype("x", x)
    if isinstance(weight, NF4Weight):
        out_features, in_features = weight.out_features, weight.in_features
        base = {"weight": weight.packed}
    else:
        checks.tensor("weight", weight, ndim=2)
        checks.same_dtype("weight", weight, "x", x)
        out_features, in_features = weight.shape
        base = {"weight": weight}
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight expects "
                         f"in_features={in_features}")
    check_bias(bias, out_features, x)
    for name, value in (("lora_As", lora_As), ("lora_Bs", lora_Bs), ("scalings", scalings)):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple, got {type(value).__name__}")
    count = len(lora_As)
    if count == 0:
        raise ValueError("lora_As must hold at least one adapter")
    if dropout_ps is None:
        dropout_ps = [0.0] * count
    elif not isinstance(dropout_ps, (list, tuple)):
        raise TypeError(f"dropout_ps must be a list or tuple (or None), got {type(dropout_ps).__name__}")
    for name, value in (("lora_Bs", lora_Bs), ("scalings", scalings), ("dropout_ps", dropout_ps)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries, lora_As {count}: one per adapter")
    for k, (lora_A, lora_B) in enumerate(zip(lora_As, lora_Bs)):
        checks.adapter_factors(lora_A, lora_B, in_features, out_features, x.dtype,
                               factors=(f"lora_As[{k}]", f"lora_Bs[{k}]"))
    scalings = [checks.real_number(f"scalings[{k}]", s) for k, s in enumerate(scalings)]
    dropout_ps = [checks.probability(f"dropout_ps[{k}]", p) for k, p in enumerate(dropout_ps)]
    checks.tensor("adapter_ids", adapter_ids)
    if adapter_ids.shape != x.shape[:-1] and tuple(adapter_ids.shape) != (x.numel() // max(1, x.shape[-1]),):
        raise ValueError(f"adapter_ids must give one id per row of x: shape {tuple(x.shape[:-1])}, got "
                         f"{tuple(adapter_ids.shape)}")
    ids_device = {"adapter_ids": adapter_ids} if adapter_ids.device.type != "cpu" else {}  # CPU ids: no sync
    checks.same_device({"x": x, **base, "bias": bias, **ids_device,
                        **{f"lora_As[{k}]": a for k, a in enumerate(lora_As)},
                        **{f"lora_Bs[{k}]": b for k, b in enumerate(lora_Bs)}})
    return adapter_segments(adapter_ids, count), scalings, dropout_ps


def dense_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """The base weight [out, in] for this call: itself, or an NF4 weight decoded (transient)."""
    return dequantize(weight, dtype) if isinstance(weight, NF4Weight) else weight


def factor_dtype(factors: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype the grouped kernels take the adapters' factors in: theirs when they share one,
    else fp32 (adapters are in x's dtype or fp32: the wider one)."""
    dtypes = {f.dtype for f in factors}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def flat_factors(lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor], dtype: torch.dtype):
    """(A, B): the adapters' factors concatenated flat, each row-major (the grouped kernels'
    layout), in `dtype`. One launch (one concatenation, A's then B's, split into two views), none
    for a single adapter already in `dtype`."""
    if len(lora_As) == 1 and lora_As[0].dtype == lora_Bs[0].dtype == dtype:
        return lora_As[0].reshape(-1), lora_Bs[0].reshape(-1)
    flat = torch.cat([f.reshape(-1).to(dtype) for f in (*lora_As, *lora_Bs)])
    return flat.split([sum(a.numel() for a in lora_As), sum(b.numel() for b in lora_Bs)])


def split_flat(flat: torch.Tensor | None, factors: Sequence[torch.Tensor], needed: Sequence[bool]) -> list:
    """Views of a flat gradient laid out as `flat_factors` (each cast to its factor's dtype), None
    where not needed."""
    if flat is None:
        return [None] * len(factors)
    parts = torch.split(flat, [f.numel() for f in factors])
    return [part.view(f.shape).to(f.dtype) if need else None for part, f, need in zip(parts, factors, needed)]


class MultiLoraLinearFunction(torch.autograd.Function):
    """y_m = x_m·Wᵀ + b + s_k·(drop_k(x_m)·A_kᵀ)·B_kᵀ for row m of adapter k (no term for id −1),
    drop_k(x) = x⊙keep/(1 − p_k).

    Forward, per segment S_k (its rows gathered):
              xa_k = drop_k(x_{S_k})·A_kᵀ        [n_k, r_k], fp32
              y    = x·Wᵀ + b;  y_{S_k} += s_k·xa_k·B_kᵀ
    Backward, with g_k = dY_{S_k}·B_k [n_k, r_k]:
              dX   = dY·W;  dX_{S_k} += s_k/(1 − p_k)·(g_k·A_k)⊙keep
              dA_k = s_k/(1 − p_k)·g_kᵀ·(x_{S_k}⊙keep)
              dB_k = s_k·dY_{S_k}ᵀ·xa_k
              dW   = dYᵀ·x (when W requires grad),  db = Σ_m dY_m
    Saved: x itself (no copy), every xa_k (Σ_k n_k·r_k fp32: each row its own rank; one flat
    tensor on the kernels, with their table: 11 int64 per adapter, 3 per 64-row tile, the row
    order inside it for ids on the CPU), the row order (M int64), and with dropout the keep mask bit-packed
    (x/16 bytes in bf16: each segment's on the PyTorch path, one by sorted position on the kernels).
    The factors are concatenated again in the backward rather than saved (parameter-sized).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, segments, scalings, dropout_ps, kernels, *factors):
        count = len(scalings)
        lora_As, lora_Bs = factors[:count], factors[count:]
        x2d = x.reshape(-1, x.shape[-1])
        dense = dense_weight(weight, x.dtype)
        dense_saved = (weight,) if isinstance(weight, torch.Tensor) else ()
        ctx.weight = weight if isinstance(weight, NF4Weight) else None
        ctx.kernels, ctx.offsets, ctx.scalings, ctx.dropout_ps = kernels, segments.offsets, scalings, dropout_ps
        if kernels:  # the grouped kernels: launches independent of K
            # one seed per adapter with rows and dropout, drawn in adapter order (as the PyTorch path)
            seeds = [eager_seed() if segments.count(k) and dropout_ps[k] > 0 else 0 for k in range(count)]
            dtype = factor_dtype(factors)
            ctx.plan = kernel_modules().multi_lora.GroupPlan(
                segments.order, segments.offsets, [a.shape[0] for a in lora_As], seeds, scalings, dropout_ps,
                x.shape[-1], dense.shape[0], x.dtype, dtype, x.device)
            y, xa, keep = kernel_modules().multi_lora.forward(x2d, dense, *flat_factors(lora_As, lora_Bs, dtype), bias,
                                                              ctx.plan)
            ctx.save_for_backward(x, *dense_saved, ctx.plan.order, *lora_As, *lora_Bs, xa, ctx.plan.table,
                                  *(() if keep is None else (keep,)))
            ctx.plan.table = ctx.plan.order = None  # both travel as saved tensors
            return y.view(*x.shape[:-1], dense.shape[0])  # explicit sizes: M may be 0
        # the LoRA terms and the bias go into C, which the one base GEMM (cuBLAS on a GPU, in x's
        # dtype with fp32 accumulation) adds in its epilogue: y = x·Wᵀ + C
        segments = AdapterSegments(segments.order.to(x.device, non_blocking=True), segments.offsets)
        c = torch.zeros((x2d.shape[0], dense.shape[0]), dtype=x.dtype, device=x.device)
        if bias is not None:
            c += bias
        xas, keeps = [], []
        for k in range(count):
            if segments.count(k) == 0:
                xas.append(None)
                keeps.append(None)
                continue
            rows = segments.rows(k)
            xk = x2d.index_select(0, rows)
            rank = rank_dtype(x.dtype, lora_As[k].dtype)
            keep = None
            if dropout_ps[k] > 0:  # one seed per segment, drawn in adapter order
                mask = torch_keep_mask(eager_seed(), *xk.shape, dropout_ps[k], x.device)
                xk = xk * mask
                keep = pack_keep_bits(mask)
            xa = mm32(xk, lora_As[k].to(rank).t()).mul_(1.0 / (1.0 - dropout_ps[k]))
            term = mm32((xa * scalings[k]).to(rank), lora_Bs[k].to(rank).t())
            c.index_add_(0, rows, term.to(x.dtype))
            xas.append(xa)
            keeps.append(keep)
        present = [k for k in range(count) if xas[k] is not None]
        masked = [k for k in present if keeps[k] is not None]
        ctx.save_for_backward(x, *dense_saved, segments.order, *lora_As, *lora_Bs, *(xas[k] for k in present),
                              *(keeps[k] for k in masked))
        ctx.present, ctx.masked = present, masked
        return c.addmm_(x2d, dense.t()).view(*x.shape[:-1], dense.shape[0])  # in place: no second M×N buffer

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        count = len(ctx.scalings)
        if ctx.weight is None:
            x, weight, order, *rest = saved
        else:
            (x, order, *rest), weight = saved, ctx.weight
        lora_As, lora_Bs = rest[:count], rest[count: 2 * count]
        need_dx, need_dW, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_dAs, need_dBs = ctx.needs_input_grad[7: 7 + count], ctx.needs_input_grad[7 + count:]
        x2d = x.reshape(-1, x.shape[-1])
        dy2d = dy.reshape(x2d.shape[0], dy.shape[-1])
        # only dX reads the base weight: an NF4 one is decoded for it alone
        dense = dense_weight(weight, x.dtype) if need_dx else None
        dW = torch.mm(dy2d.t(), x2d) if need_dW else None
        db = dy2d.sum(dim=0) if need_db else None
        if ctx.kernels:
            xa, ctx.plan.table = rest[2 * count], rest[2 * count + 1]
            keep = rest[2 * count + 2] if len(rest) > 2 * count + 2 else None
            ctx.plan.order = order
            dtype = factor_dtype(lora_As)
            dx, dA, dB = kernel_modules().multi_lora.backward(
                dy2d, x2d, dense, order, *flat_factors(lora_As, lora_Bs, dtype), xa, keep, ctx.plan, need_dx,
                any(need_dAs), any(need_dBs))
            return (dx.view(x.shape) if dx is not None else None, dW, db, None, None, None, None,
                    *split_flat(dA, lora_As, need_dAs), *split_flat(dB, lora_Bs, need_dBs))
        xas = dict(zip(ctx.present, rest[2 * count: 2 * count + len(ctx.present)]))
        keeps = dict(zip(ctx.masked, rest[2 * count + len(ctx.present):]))
        segments = AdapterSegments(order, ctx.offsets)
        # each segment's LoRA term of dX goes into the C of the one base GEMM dY·W, as forward
        dx = torch.zeros_like(x2d) if need_dx else None
        dAs, dBs = [None] * count, [None] * count
        for k in range(count):
            need_dA, need_dB = need_dAs[k], need_dBs[k]
            if segments.count(k) == 0:
                dAs[k] = torch.zeros_like(lora_As[k]) if need_dA else None
                dBs[k] = torch.zeros_like(lora_Bs[k]) if need_dB else None
                continue
            rows, scaling = segments.rows(k), ctx.scalings[k]
            lora_scale = scaling / (1.0 - ctx.dropout_ps[k])
            rank = rank_dtype(dy.dtype, lora_As[k].dtype)
            dyk = dy2d.index_select(0, rows)
            keep = unpack_keep_bits(keeps[k], x2d.shape[1]) if k in keeps else None
            if need_dB:
                dBs[k] = mm32(dyk.t(), xas[k].to(rank)).mul_(scaling).to(lora_Bs[k].dtype)
            if need_dx or need_dA:
                g = mm32(dyk, lora_Bs[k].to(rank))
            if need_dx:
                term = mm32((g * lora_scale).to(rank), lora_As[k].to(rank))
                dx.index_add_(0, rows, (term if keep is None else term * keep).to(x.dtype))
            if need_dA:
                xk = x2d.index_select(0, rows)
                dAs[k] = mm32(g.to(rank).t(), xk if keep is None else xk * keep).mul_(lora_scale).to(
                    lora_As[k].dtype)
        if dx is not None:
            dx = dx.addmm_(dy2d, dense).view(x.shape)
        return (dx, dW, db, None, None, None, None, *dAs, *dBs)


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor | NF4Weight, lora_As: Sequence[torch.Tensor],
                      lora_Bs: Sequence[torch.Tensor], scalings: Sequence[float], adapter_ids: torch.Tensor,
                      bias: torch.Tensor | None = None, dropout_ps: Sequence[float] | None = None) -> torch.Tensor:
    """``x·weightᵀ + bias`` plus, on each row, the LoRA term of that row's adapter:
    ``scalings[k]·(dropout_k(x_m)·lora_As[k]ᵀ)·lora_Bs[k]ᵀ`` with k = ``adapter_ids[m]`` (−1: none).

    x [..., in]; weight [out, in] in x's dtype, or an :class:`~peft_ops.nf4.NF4Weight` (QLoRA);
    lora_As[k] [r_k, in] and lora_Bs[k] [out, r_k] (ranks may differ) in x's dtype or float32;
    adapter_ids an int tensor with one id per row of x (shape x.shape[:-1], or flat), on x's
    device or on the CPU (then the rows are grouped with no device sync); bias [out] or None;
    dropout_ps one rate per adapter (or None). Gradients flow to x, the weight (dense), the bias
    and every adapter; an adapter with no rows gets zero gradients. Each adapter's
    result equals :func:`peft_ops.lora_linear` on its own rows (same dropout masks when the
    adapters draw their seeds in the same order)."""
    if (dtype := autocast_dtype(x)) is not None:  # as F.linear under autocast; fp32 adapters stay fp32
        return call_without_autocast(multi_lora_linear, dtype, dict(
            x=x, weight=weight, lora_As=[a if a.dtype == torch.float32 else a.to(dtype) for a in lora_As],
            lora_Bs=[b if b.dtype == torch.float32 else b.to(dtype) for b in lora_Bs], scalings=scalings,
            adapter_ids=adapter_ids, bias=bias, dropout_ps=dropout_ps))
    segments, scalings, dropout_ps = check_multi_lora_args(x, weight, lora_As, lora_Bs, scalings, adapter_ids, bias,
                                                           dropout_ps)
    backend = resolve(x.device)
    if backend == "reference":
        dense = dense_weight(weight, x.dtype)
        return reference.multi_lora_linear(x, dense, lora_As, lora_Bs, scalings, adapter_ids, bias, dropout_ps)
    if backend == "triton":
        return grouped_kernels(x, weight, bias, segments, scalings, dropout_ps, *lora_As, *lora_Bs)
    return MultiLoraLinearFunction.apply(x, weight, bias, segments, scalings, dropout_ps, False, *lora_As, *lora_Bs)


def grouped_kernels(x, weight, bias, segments, scalings, dropout_ps, *factors):
    """The op on the grouped Triton kernels (validated arguments). Their launches are not custom
    ops: inside torch.compile they run eagerly, at a graph break. (``torch.compiler.disable`` is
    applied here, at the call, not at import: it imports torch._dynamo, and with it triton.)"""
    return torch.compiler.disable(MultiLoraLinearFunction.apply)(x, weight, bias, segments, scalings, dropout_ps, True,
                                                                  *factors)

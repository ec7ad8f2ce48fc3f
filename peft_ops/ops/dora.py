"""DoRA ops: ``dora_linear`` (dense base) and ``qdora_linear`` (NF4 base), with their autograd
Functions over the Triton kernels or the PyTorch path (``peft_ops.ops.paths``), and
``squared_row_norms``, the per-row ‖W_n‖² the norm starts from (the layers cache it)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import reference
from ..backend import resolve
from ..nf4 import NF4Tensors, NF4Weight
from . import checks
from .autograd import autocast_dtype, call_without_autocast, draw_seed
from .custom_ops import ops_for_call
from .lora import check_lora_args, check_lora_linear_args
from .paths import dropped_input, eager_ops, squared_row_norms
from .qlora import check_nf4_base, nf4_meta


def dora_weight_norm(weight: torch.Tensor | NF4Weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     dtype: torch.dtype | None = None, weight_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """‖W_n + scaling·B_n·A‖ per output row, fp32 [out], without building W + s·B·A (as the ops
    compute it, on the current backend; no autograd). An NF4 weight counts as decoded to
    `dtype` (default: its own). What DoRA's magnitude starts from (PEFT: the norm at creation)
    and what a merge divides by."""
    scaling = checks.real_number("scaling", scaling)
    nf4 = isinstance(weight, NF4Weight)
    dtype = dtype or (weight.dtype if nf4 else None)
    device = weight.packed.device if nf4 else weight.device
    impl = resolve(device)
    with torch.no_grad():
        if impl == "reference":
            dense = reference.nf4_dequantize(weight, dtype) if nf4 else weight
            return reference.dora_weight_norm(dense, lora_A, lora_B, scaling).float()
        sq = weight_sq_norm if weight_sq_norm is not None else squared_row_norms(weight, dtype if nf4 else None)
        magnitude = torch.ones(lora_B.shape[0], device=device, dtype=torch.float32)  # unused: the norm alone is kept
        if nf4:
            return eager_ops("qdora", impl).norm(weight.tensors(), lora_A, lora_B, magnitude, scaling, sq, dtype)[0]
        return eager_ops("dora", impl).norm(weight, lora_A, lora_B, magnitude, scaling, sq)[0]


class RowNormCache:
    """‖W_n‖² of one frozen weight (dense or NF4) per compute dtype, computed on first use and
    again only when the weight changes (its storage, or its version counter: an in-place update
    such as a merge). What the DoRA layers hold, so a step reads W once (for A·Wᵀ), not twice."""

    def __init__(self):
        self._key, self._value = None, None

    def __call__(self, weight: torch.Tensor | NF4Weight, dtype: torch.dtype) -> torch.Tensor | None:
        """The cached ‖W_n‖² (fp32 [out]); None inside torch.compile, where storage addresses and
        version counters cannot be read: the op then computes it in the graph (one more pass
        over W per call)."""
        if torch.compiler.is_compiling():
            return None
        tensor = weight.packed if isinstance(weight, NF4Weight) else weight
        key = (tensor.data_ptr(), tensor._version, tensor.device, tensor.shape, dtype)
        if key != self._key:
            self._value = squared_row_norms(weight, dtype if isinstance(weight, NF4Weight) else None)
            self._key = key
        return self._value

    def clear(self) -> None:
        self._key, self._value = None, None


def _check_dora_args(magnitude, weight_sq_norm_arg, out_features: int, x: torch.Tensor, base: torch.Tensor) -> None:
    """magnitude [out] (x's dtype or fp32) and the optional cached ‖W_n‖² (fp32 [out])."""
    checks.tensor("magnitude", magnitude, ndim=1)
    if magnitude.shape[0] != out_features:
        raise ValueError(f"magnitude must be [out_features] = [{out_features}], got {tuple(magnitude.shape)}")
    checks.float_dtype("magnitude", magnitude)
    if magnitude.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"magnitude has dtype {magnitude.dtype}: it must have x's dtype ({x.dtype}) or float32")
    checks.optional_tensor("weight_sq_norm", weight_sq_norm_arg, ndim=1)
    if weight_sq_norm_arg is not None:
        if weight_sq_norm_arg.shape[0] != out_features:
            raise ValueError(f"weight_sq_norm must be [out_features] = [{out_features}], "
                             f"got {tuple(weight_sq_norm_arg.shape)}")
        if weight_sq_norm_arg.dtype != torch.float32:
            raise TypeError(f"weight_sq_norm must be float32 (‖W_n‖² summed in fp32), got {weight_sq_norm_arg.dtype}")
    checks.same_device({"x": x, "weight": base, "magnitude": magnitude, "weight_sq_norm": weight_sq_norm_arg})


class DoraLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b + (c − 1)⊙(xd·Wᵀ) + c⊙s·(xd·Aᵀ)·Bᵀ, c = m / ‖W + s·B·A‖ per output column
    (the norm detached), xd = x⊙keep/(1-p); without dropout y = c⊙(x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b.

    Forward:  ‖W + s·B·A‖² = ‖W‖² + 2s·B⊙(A·Wᵀ)ᵀ + s²·B(A·Aᵀ)⊙B, rows summed (no W + s·B·A)
              xa  = xd·Aᵀ                        (shrink: [M, r], fp32)
              pre = xd·Wᵀ + s·xa·Bᵀ              (GEMM, kept: [M, N] in x's dtype)
              y   = c⊙pre + b [+ (x − xd)·Wᵀ]    (the epilogue [+ a second product under dropout])
    Backward, with dY' = dY⊙c and g = dY'·B (= dY·(c⊙B): fp32 adapters on a half x take this
    form, never rounding dY' on the way to dA and dB; ``paths.folds_scale_into_B``):
              d(magnitude) = Σ_m dY⊙pre / ‖·‖
              dX = dY'·W + s·(g·A)⊙keep/(1-p) [+ ((dY − dY')·W)⊙(1 − keep/(1-p))]
              dA = s/(1-p)·gᵀ·(x⊙keep),  dB = s·dY'ᵀ·xa = c⊙(s·dYᵀ·xa),  db = Σ_m dY
              dW = dY'ᵀ·x; under dropout dYᵀ·x + (dY⊙(c − 1))ᵀ·xd   (only when W trains)
    Saved: x, xa [M, r] fp32, pre [M, N], the keep mask bit-packed, the fp32 [N] norm and c.
    PEFT's DoRA layer saves x, xd, the materialized W + s·B·A and its upcast copies instead.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, sq_norm, ops):
        x2d = x.reshape(-1, x.shape[-1])
        norm, col_scale = ops.norm(weight, lora_A, lora_B, magnitude, scaling, sq_norm)
        xa, keep = ops.shrink(x2d, lora_A, dropout_p, draw_seed(ops, dropout_p))
        y, pre = ops.forward(x2d, weight, xa, keep, lora_B, scaling, bias, col_scale, dropout_p)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, keep, pre, col_scale, norm)
        ctx.scaling, ctx.dropout_p, ctx.ops, ctx.magnitude_dtype = scaling, dropout_p, ops, magnitude.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, xa, keep, pre, col_scale, norm = ctx.saved_tensors
        need_dx, need_dW, need_dA, need_dB, need_dmag, need_db = ctx.needs_input_grad[:6]
        x2d = x.reshape(-1, x.shape[-1])
        dy2d = dy.reshape(-1, weight.shape[0])
        dx, dA, dB, dmag, db = ctx.ops.backward(dy2d, x2d, weight, lora_A, lora_B, xa, keep, pre, col_scale, norm,
                                                ctx.scaling, ctx.dropout_p, need_dx, need_dA, need_dB, need_dmag,
                                                need_db)
        dW = None
        if need_dW:  # rare (a trainable base): PyTorch ops
            dy32 = dy2d.float()
            if keep is None:
                dW = torch.mm((dy32 * col_scale).t(), x2d.float())
            else:
                dropped = dropped_input(x2d, keep, ctx.dropout_p)[0]
                dW = torch.mm(dy32.t(), x2d.float()) + torch.mm((dy32 * (col_scale - 1)).t(), dropped.float())
            dW = dW.to(weight.dtype)
        return (
            dx.view(x.shape) if dx is not None else None,
            dW,
            dA.to(lora_A.dtype) if dA is not None else None,
            dB.to(lora_B.dtype) if dB is not None else None,
            dmag.to(ctx.magnitude_dtype) if dmag is not None else None,
            db,
            None, None, None, None,
        )


class QDoraLinearFunction(torch.autograd.Function):
    """DoraLinearFunction on an NF4 base: W = dequant(W) in x's dtype, frozen (no dW). The norm's
    A·Wᵀ comes from the NF4 decode GEMV (one pass over the 4-bit W). Saved as DoraLinearFunction,
    with the NF4 tensors in place of W (never a dequantized copy)."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, magnitude, bias, packed, absmax, absmax_scale, absmax_offset, meta, scaling,
                dropout_p, sq_norm, ops):
        qw = NF4Tensors(packed, absmax, absmax_scale, absmax_offset, *meta)
        x2d = x.reshape(-1, x.shape[-1])
        norm, col_scale = ops.norm(qw, lora_A, lora_B, magnitude, scaling, sq_norm, x.dtype)
        xa, keep = ops.shrink(x2d, lora_A, dropout_p, draw_seed(ops, dropout_p))
        y, pre = ops.forward(x2d, qw, xa, keep, lora_B, scaling, bias, col_scale, dropout_p)
        ctx.save_for_backward(x, lora_A, lora_B, xa, keep, pre, col_scale, norm, packed, absmax, absmax_scale,
                              absmax_offset)
        ctx.meta, ctx.scaling, ctx.dropout_p, ctx.ops = meta, scaling, dropout_p, ops
        ctx.magnitude_dtype = magnitude.dtype
        return y.view(*x.shape[:-1], qw.out_features)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, lora_A, lora_B, xa, keep, pre, col_scale, norm, *nf4_tensors = ctx.saved_tensors
        qw = NF4Tensors(*nf4_tensors, *ctx.meta)
        need_dx, need_dA, need_dB, need_dmag, need_db = ctx.needs_input_grad[:5]
        x2d = x.reshape(-1, x.shape[-1])
        dy2d = dy.reshape(-1, qw.out_features)
        dx, dA, dB, dmag, db = ctx.ops.backward(dy2d, x2d, qw, lora_A, lora_B, xa, keep, pre, col_scale, norm,
                                                ctx.scaling, ctx.dropout_p, need_dx, need_dA, need_dB, need_dmag,
                                                need_db)
        return (
            dx.view(x.shape) if dx is not None else None,
            dA.to(lora_A.dtype) if dA is not None else None,
            dB.to(lora_B.dtype) if dB is not None else None,
            dmag.to(ctx.magnitude_dtype) if dmag is not None else None,
            db,
            None, None, None, None, None, None, None, None, None,
        )


def dora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                magnitude: torch.Tensor, scaling: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0, *,
                weight_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """DoRA (weight-decomposed LoRA), PEFT's formula fused: with c = magnitude / ‖W + s·B·A‖ per
    output row of W (the norm detached from the graph, as in the paper and PEFT) and
    xd = dropout(x),

        y = x·Wᵀ + bias + (c − 1)·(xd·Wᵀ) + c·scaling·(xd·Aᵀ)·Bᵀ

    — without dropout, c·(x·Wᵀ + scaling·(x·Aᵀ)·Bᵀ) + bias. The norm comes from
    ‖W‖² + 2s·B·(A·Wᵀ) + s²·B·(A·Aᵀ)·Bᵀ: W + s·B·A is never built.

    Layouts and dtypes as :func:`~peft_ops.lora_linear`; magnitude [out] in x's dtype or
    float32 (PEFT's ``lora_magnitude_vector``). ``weight_sq_norm``: ‖W_n‖² (fp32 [out],
    :func:`squared_row_norms`) when cached, else computed here (one more pass over W). Gradients
    flow to x, lora_A, lora_B, magnitude, bias and weight, whichever require grad.
    """
    if (dtype := autocast_dtype(x)) is not None:
        return call_without_autocast(dora_linear, dtype, dict(
            x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, magnitude=magnitude, scaling=scaling, bias=bias,
            dropout_p=dropout_p, weight_sq_norm=weight_sq_norm), keep=("magnitude", "weight_sq_norm"))
    scaling, dropout_p = check_lora_linear_args(x, weight, lora_A, lora_B, scaling, bias, dropout_p)
    _check_dora_args(magnitude, weight_sq_norm, weight.shape[0], x, weight)
    impl = resolve(x.device)
    if impl == "reference":
        return reference.dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p)
    return DoraLinearFunction.apply(x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, weight_sq_norm,
                                    ops_for_call("dora", impl))


def qdora_linear(x: torch.Tensor, qweight: NF4Weight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 magnitude: torch.Tensor, scaling: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0, *,
                 weight_sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`dora_linear` on an NF4 base (QDoRA): W = dequant(qweight) in x's dtype, as
    :func:`~peft_ops.qlora_linear` takes it; the norm's A·Wᵀ reads the 4-bit weight (the
    decode GEMV), and no dequantized W is saved. ``weight_sq_norm``: ‖W_n‖² of the weight
    decoded to x's dtype (``squared_row_norms(qweight, x.dtype)``). Gradients flow to x, lora_A,
    lora_B, magnitude and bias."""
    if (dtype := autocast_dtype(x)) is not None:
        return call_without_autocast(qdora_linear, dtype, dict(
            x=x, qweight=qweight, lora_A=lora_A, lora_B=lora_B, magnitude=magnitude, scaling=scaling, bias=bias,
            dropout_p=dropout_p, weight_sq_norm=weight_sq_norm), keep=("magnitude", "weight_sq_norm"))
    check_nf4_base(x, qweight, bias)
    scaling, dropout_p = check_lora_args(x, qweight.out_features, qweight.in_features, lora_A, lora_B,
                                         scaling, dropout_p, {"qweight": qweight.packed, "bias": bias})
    _check_dora_args(magnitude, weight_sq_norm, qweight.out_features, x, qweight.packed)
    impl = resolve(x.device)
    if impl == "reference":
        return reference.qdora_linear(x, qweight, lora_A, lora_B, magnitude, scaling, bias, dropout_p)
    q = qweight.tensors()
    return QDoraLinearFunction.apply(x, lora_A, lora_B, magnitude, bias, q.packed, q.absmax, q.absmax_scale,
                                     q.absmax_offset, nf4_meta(qweight), scaling, dropout_p, weight_sq_norm,
                                     ops_for_call("qdora", impl))

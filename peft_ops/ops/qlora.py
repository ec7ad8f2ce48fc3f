"""QLoRA ops: ``nf4_linear`` (x·dequant(W)ᵀ + b) and ``qlora_linear`` (plus the LoRA term),
with their autograd Functions over the Triton kernels or the PyTorch path."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import reference
from ..backend import resolve
from ..nf4 import NF4Tensors, NF4Weight
from . import checks
from .autograd import autocast_dtype, call_without_autocast, draw_seed
from .custom_ops import ops_for_call
from .lora import check_bias, check_lora_args


def check_nf4_base(x, qweight, bias) -> None:
    """x, the NF4 weight and the bias of nf4_linear / qlora_linear."""
    if not isinstance(qweight, NF4Weight):
        raise TypeError(f"qweight must be a peft_ops.nf4.NF4Weight, got {type(qweight).__name__}")
    checks.tensor("x", x, min_ndim=1)
    checks.float_dtype("x", x)
    if x.shape[-1] != qweight.in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but qweight "
                         f"{tuple(qweight.shape)} expects in_features={qweight.in_features}")
    check_bias(bias, qweight.out_features, x)
    checks.same_device({"x": x, "qweight": qweight.packed, "bias": bias})


class NF4LinearFunction(torch.autograd.Function):
    """y = x·dequant(W)ᵀ + b, W frozen in NF4.

    Backward: dX = dY·dequant(W) (W decoded again, tile by tile); db = Σ_m dY; W gets none.
    Saved: the NF4 tensors only (x is not needed: there is no dW).
    """

    @staticmethod
    def forward(ctx, x, bias, packed, absmax, absmax_scale, absmax_offset, meta, ops):
        qw = NF4Tensors(packed, absmax, absmax_scale, absmax_offset, *meta)
        x2d = x.reshape(-1, x.shape[-1])
        y = ops.forward(x2d, qw, None, None, 0.0, bias)
        ctx.save_for_backward(packed, absmax, absmax_scale, absmax_offset)
        ctx.meta, ctx.ops, ctx.x_shape = meta, ops, x.shape
        return y.view(*x.shape[:-1], qw.out_features)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        qw = NF4Tensors(*ctx.saved_tensors, *ctx.meta)
        dy2d = dy.reshape(-1, qw.out_features)
        dx = ctx.ops.backward_dx(dy2d, qw).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        db = dy2d.sum(dim=0) if ctx.needs_input_grad[1] else None
        return dx, db, None, None, None, None, None, None


class QLoraLinearFunction(torch.autograd.Function):
    """y = x·dequant(W)ᵀ + s·(drop(x)·Aᵀ)·Bᵀ + b, W frozen in NF4, drop(x) = x⊙keep/(1-p).

    Forward:  xa = drop(x)·Aᵀ                     (shrink: [M, r], fp32)
              y  = x·dequant(W)ᵀ + s·xa·Bᵀ + b    (NF4 GEMM or decode GEMV, LoRA term in its epilogue)
    Backward, with g = dY·B [M, r]:
              dX = dY·dequant(W) + s·(g·A)⊙keep/(1-p)
              dA = s/(1-p)·gᵀ·(x⊙keep)
              dB = s·dYᵀ·xa
              db = Σ_m dY                          (only when bias requires grad)
    Saved: x itself, xa [M, r] fp32, the adapters, the NF4 tensors and with dropout the
    bit-packed keep mask — the budget of lora_linear; no dequantized W.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, packed, absmax, absmax_scale, absmax_offset, meta, scaling,
                dropout_p, ops):
        qw = NF4Tensors(packed, absmax, absmax_scale, absmax_offset, *meta)
        x2d = x.reshape(-1, x.shape[-1])
        xa, keep = ops.shrink(x2d, lora_A, dropout_p, draw_seed(ops, dropout_p))
        y = ops.forward(x2d, qw, xa, lora_B, scaling, bias)
        ctx.save_for_backward(x, lora_A, lora_B, xa, keep, packed, absmax, absmax_scale, absmax_offset)
        ctx.meta, ctx.scaling, ctx.dropout_p, ctx.ops = meta, scaling, dropout_p, ops
        return y.view(*x.shape[:-1], qw.out_features)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, lora_A, lora_B, xa, keep, *nf4_tensors = ctx.saved_tensors
        qw = NF4Tensors(*nf4_tensors, *ctx.meta)
        need_dx, need_dA, need_dB, need_db = ctx.needs_input_grad[:4]
        x2d = x.reshape(-1, x.shape[-1])
        dy2d = dy.reshape(-1, qw.out_features)
        dx, dA, dB, db = ctx.ops.qlora_backward(dy2d, x2d, qw, lora_A, lora_B, xa, keep, ctx.scaling,
                                                ctx.dropout_p, need_dx, need_dA, need_dB, need_db)
        return (
            dx.view(x.shape) if dx is not None else None,
            dA.to(lora_A.dtype) if dA is not None else None,
            dB.to(lora_B.dtype) if dB is not None else None,
            db,
            None, None, None, None, None, None, None, None,
        )


def nf4_meta(qweight: NF4Weight) -> tuple:
    q = qweight.tensors()
    return q.out_features, q.in_features, q.blocksize, q.dtype


def nf4_linear(x: torch.Tensor, qweight: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x·dequant(qweight)ᵀ + bias`` without materializing the dequantized weight.

    x [..., in] (fp32, fp16 or bf16; any leading dims and strides), qweight an
    :class:`~peft_ops.nf4.NF4Weight` [out, in], bias [out] in x's dtype; the result is
    [..., out] in x's dtype, W decoded to x's dtype as bitsandbytes does. Gradients flow to x
    and bias; the frozen weight gets none. M ≤ 16 rows take the split-K decode kernel, more
    rows the fused dequant-GEMM.
    """
    if (dtype := autocast_dtype(x)) is not None:  # x and bias in the autocast dtype; W decodes to x's
        return call_without_autocast(nf4_linear, dtype, dict(x=x, qweight=qweight, bias=bias))
    check_nf4_base(x, qweight, bias)
    impl = resolve(x.device)
    if impl == "reference":
        return reference.nf4_linear(x, qweight, bias)
    q = qweight.tensors()
    return NF4LinearFunction.apply(x, bias, q.packed, q.absmax, q.absmax_scale, q.absmax_offset, nf4_meta(qweight),
                                   ops_for_call("nf4", impl))


def qlora_linear(x: torch.Tensor, qweight: NF4Weight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scaling: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """``x·dequant(qweight)ᵀ + bias + scaling·(dropout(x)·lora_Aᵀ)·lora_Bᵀ``, fused as
    :func:`~peft_ops.lora_linear` is (one pass over x for the LoRA input, the LoRA term in the
    base GEMM's epilogue, the dropout mask kept bit-packed for the backward), on an NF4 base.

    lora_A [r, in] and lora_B [out, r] share x's dtype or float32; the rest as
    :func:`nf4_linear`. Gradients flow to x, lora_A, lora_B and bias.
    """
    if (dtype := autocast_dtype(x)) is not None:
        return call_without_autocast(qlora_linear, dtype, dict(
            x=x, qweight=qweight, lora_A=lora_A, lora_B=lora_B, scaling=scaling, bias=bias, dropout_p=dropout_p))
    check_nf4_base(x, qweight, bias)
    scaling, dropout_p = check_lora_args(x, qweight.out_features, qweight.in_features, lora_A, lora_B,
                                         scaling, dropout_p, {"qweight": qweight.packed, "bias": bias})
    impl = resolve(x.device)
    if impl == "reference":
        return reference.qlora_linear(x, qweight, lora_A, lora_B, scaling, bias, dropout_p)
    q = qweight.tensors()
    return QLoraLinearFunction.apply(x, lora_A, lora_B, bias, q.packed, q.absmax, q.absmax_scale, q.absmax_offset,
                                     nf4_meta(qweight), scaling, dropout_p, ops_for_call("nf4", impl))

"""The LoRA op: ``lora_linear`` and its autograd Function over the Triton or PyTorch path
(``peft_ops.ops.paths``)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import reference
from ..backend import resolve
from . import checks
from .autograd import autocast_dtype, call_without_autocast, draw_seed
from .custom_ops import ops_for_call


def check_lora_linear_args(x, weight, lora_A, lora_B, scaling, bias, dropout_p) -> tuple[float, float]:
    """Validate every argument of lora_linear; returns (scaling, dropout_p) as floats."""
    checks.tensor("x", x, min_ndim=1)
    checks.tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    if in_features == 0 or out_features == 0:
        raise ValueError(f"weight has shape {tuple(weight.shape)}: in_features and out_features must be ≥ 1")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight "
                         f"{tuple(weight.shape)} expects in_features={in_features}")
    checks.float_dtype("x", x)
    checks.same_dtype("weight", weight, "x", x)
    check_bias(bias, out_features, x)
    return check_lora_args(x, out_features, in_features, lora_A, lora_B, scaling, dropout_p,
                              {"weight": weight, "bias": bias})


def check_bias(bias, out_features: int, x: torch.Tensor) -> None:
    """bias: None, or [out_features] in x's dtype (lora_linear, nf4_linear, qlora_linear)."""
    checks.optional_tensor("bias", bias, ndim=1)
    if bias is not None:
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must be [out_features] = [{out_features}], got {tuple(bias.shape)}")
        checks.same_dtype("bias", bias, "x", x)


def check_lora_args(x, out_features, in_features, lora_A, lora_B, scaling, dropout_p,
                    base_tensors: dict) -> tuple[float, float]:
    """The checks lora_linear and qlora_linear share once x, the base weight and the bias are
    checked: the adapters, scaling, dropout_p, and that every tensor (x, `base_tensors`, the
    adapters) is on one device. Returns (scaling, dropout_p)."""
    scaling = checks.real_number("scaling", scaling)
    dropout_p = checks.probability("dropout_p", dropout_p)
    checks.adapter_factors(lora_A, lora_B, in_features, out_features, x.dtype)
    checks.same_device({"x": x, **base_tensors, "lora_A": lora_A, "lora_B": lora_B})
    return scaling, dropout_p


class LoraLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ + b, with drop(x) = x⊙keep/(1-p).

    Forward:  xa = drop(x)·Aᵀ              (shrink: [M, r], fp32)
              y  = x·Wᵀ + s·xa·Bᵀ + b      (GEMM, LoRA term and bias in its epilogue)
    Backward, with g = dY·B [M, r]:
              dX = dY·W + s·(g·A)⊙keep/(1-p)
              dA = s·gᵀ·drop(x)           = s/(1-p)·gᵀ·(x⊙keep)
              dB = s·dYᵀ·xa
              dW = dYᵀ·x                   (only when weight requires grad)
              db = Σ_m dY                  (only when bias requires grad)
    Saved: x itself (no copy), xa [M, r] fp32, the parameters, and with dropout the keep mask
    the shrink drew, bit-packed ([M, ⌈K/32⌉] int32: x/16 bytes for a bf16 x), so the backward
    never redraws it.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling, dropout_p, ops):
        in_features = x.shape[-1]
        out_features = weight.shape[0]
        x2d = x.reshape(-1, in_features)  # a view unless x's strides forbid one
        xa, keep = ops.shrink(x2d, lora_A, dropout_p, draw_seed(ops, dropout_p))
        y = ops.forward(x2d, weight, xa, lora_B, scaling, bias)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, keep)
        ctx.scaling, ctx.dropout_p, ctx.ops = scaling, dropout_p, ops
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    @once_differentiable  # the backward is not itself differentiable: say so, don't return wrong
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, xa, keep = ctx.saved_tensors
        need_dx, need_dW, need_dA, need_dB, need_db = ctx.needs_input_grad[:5]
        x2d = x.reshape(-1, x.shape[-1])
        dy2d = dy.reshape(-1, weight.shape[0])
        dx, dA, dB, db = ctx.ops.backward(dy2d, x2d, weight, lora_A, lora_B, xa, keep, ctx.scaling, ctx.dropout_p,
                                          need_dx, need_dA, need_dB, need_db)
        dW = torch.mm(dy2d.t(), x2d) if need_dW else None
        return (
            dx.view(x.shape) if dx is not None else None,
            dW,
            dA.to(lora_A.dtype) if dA is not None else None,
            dB.to(lora_B.dtype) if dB is not None else None,
            db,
            None, None, None,
        )


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """``x·weightᵀ + scaling·(dropout(x)·lora_Aᵀ)·lora_Bᵀ + bias``, fused.

    Layouts as in PyTorch and PEFT: x [..., in] (any leading dims, any strides), weight
    [out, in], lora_A [r, in], lora_B [out, r], bias [out]; the result is [..., out] in x's
    dtype. x, weight and bias share one dtype (fp32, fp16 or bf16); lora_A and lora_B share
    x's dtype or float32 (PEFT's fp32 adapters on a half-precision base). ``dropout_p``
    applies inverted dropout to the LoRA input only. Gradients flow to every input that
    requires grad.
    """
    if (dtype := autocast_dtype(x)) is not None:  # as F.linear under autocast
        return call_without_autocast(lora_linear, dtype, dict(
            x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, scaling=scaling, bias=bias, dropout_p=dropout_p))
    scaling, dropout_p = check_lora_linear_args(x, weight, lora_A, lora_B, scaling, bias, dropout_p)
    impl = resolve(x.device)
    if impl == "reference":
        return reference.lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout_p)
    return LoraLinearFunction.apply(x, weight, lora_A, lora_B, bias, scaling, dropout_p, ops_for_call("lora", impl))

"""The bottleneck op: ``bottleneck_adapter`` and its autograd Function over the Triton or
PyTorch path (``peft_ops.ops.paths``)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import reference
from ..backend import resolve
from ..kernels.interface import ACTIVATIONS
from . import checks
from .autograd import autocast_dtype, call_without_autocast, draw_seed, save_with_seed, saved_with_seed
from .custom_ops import ops_for_call
from .paths import bottleneck_impl


def check_activation(activation: object) -> str:
    return checks.one_of("activation", activation, ACTIVATIONS)


def check_bottleneck_args(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, dropout_p):
    """Validate every argument of bottleneck_adapter; returns (scaling, dropout_p) as floats."""
    checks.tensor("x", x, min_ndim=1)
    checks.float_dtype("x", x)
    checks.tensor("down_weight", down_weight, ndim=2)
    checks.tensor("up_weight", up_weight, ndim=2)
    checks.optional_tensor("down_bias", down_bias, ndim=1)
    checks.optional_tensor("up_bias", up_bias, ndim=1)
    check_activation(activation)
    scaling = checks.real_number("scaling", scaling)
    dropout_p = checks.probability("dropout_p", dropout_p)
    hidden = x.shape[-1]
    bottleneck = down_weight.shape[0]
    if hidden == 0 or bottleneck == 0:
        raise ValueError(f"down_weight has shape {tuple(down_weight.shape)} and x {tuple(x.shape)}: the hidden "
                         "size and the bottleneck size must be ≥ 1")
    if down_weight.shape[1] != hidden:
        raise ValueError(f"down_weight must be [bottleneck_size, hidden_size] with hidden_size = x.shape[-1] = "
                         f"{hidden}, got {tuple(down_weight.shape)}")
    if tuple(up_weight.shape) != (hidden, bottleneck):
        raise ValueError(f"up_weight must be [hidden_size, bottleneck_size] = [{hidden}, {bottleneck}], "
                         f"got {tuple(up_weight.shape)}")
    if down_bias is not None and tuple(down_bias.shape) != (bottleneck,):
        raise ValueError(f"down_bias must be [bottleneck_size] = [{bottleneck}], got {tuple(down_bias.shape)}")
    if up_bias is not None and tuple(up_bias.shape) != (hidden,):
        raise ValueError(f"up_bias must be [hidden_size] = [{hidden}], got {tuple(up_bias.shape)}")
    named = {"down_weight": down_weight, "down_bias": down_bias, "up_weight": up_weight, "up_bias": up_bias}
    for name, t in named.items():
        if t is not None:
            checks.same_dtype(name, t, "x", x)
    checks.same_device({"x": x, **named})
    return scaling, dropout_p


class BottleneckAdapterFunction(torch.autograd.Function):
    """y = x + s·drop(act(x·W_downᵀ + b_down)·W_upᵀ + b_up), drop(z) = z⊙keep/(1-p).

    Forward:  h = x·W_downᵀ + b_down       [M, m], fp32
              y = x + s·drop(act(h)·W_upᵀ + b_up)
    Backward, with dz = s·dY⊙keep/(1-p) (the gradient at the branch's output):
              dh      = (dz·W_up) ⊙ act′(h)
              dX      = dY + dh·W_down     (the residual passes dY through)
              dW_up   = dzᵀ·act(h)          db_up   = Σ_M dz
              dW_down = dhᵀ·x               db_down = Σ_M dh
    Saved: x itself (no copy), h [M, m] fp32 — act(h) and act′(h) are recomputed from it, which
    costs m FLOPs per row against the M×m bytes a second saved tensor would take — the two
    weights, and the dropout seed as an int (the mask is regenerated, never stored).
    """

    @staticmethod
    def forward(ctx, x, down_weight, down_bias, up_weight, up_bias, activation, scaling, dropout_p, ops):
        x2d = x.reshape(-1, x.shape[-1])  # a view unless x's strides forbid one
        seed = draw_seed(ops, dropout_p)
        y, h = ops.forward(x2d, down_weight, down_bias, up_weight, up_bias, activation, scaling, dropout_p, seed,
                           save_h=any(ctx.needs_input_grad[:5]))
        save_with_seed(ctx, (x, down_weight, up_weight, h), seed)
        ctx.activation, ctx.scaling, ctx.dropout_p, ctx.ops = activation, scaling, dropout_p, ops
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (x, down_weight, up_weight, h), seed = saved_with_seed(ctx)
        need_dx = ctx.needs_input_grad[0]
        need_dw = any(ctx.needs_input_grad[1:5])
        x2d = x.reshape(-1, x.shape[-1])
        dx, dw_down, db_down, dw_up, db_up = ctx.ops.backward(
            dy.reshape(x2d.shape), x2d, h, down_weight, up_weight, ctx.activation, ctx.scaling, ctx.dropout_p,
            seed, need_dx, need_dw)
        grads = [dx.view(x.shape) if dx is not None else None]
        for needed, grad in zip(ctx.needs_input_grad[1:5], (dw_down, db_down, dw_up, db_up)):
            grads.append(grad.to(x.dtype) if needed else None)
        return (*grads, None, None, None, None)


def bottleneck_adapter(x: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor | None,
                       up_weight: torch.Tensor, up_bias: torch.Tensor | None, activation: str = "relu",
                       scaling: float = 1.0, dropout_p: float = 0.0) -> torch.Tensor:
    """``x + scaling·dropout(act(x·down_weightᵀ + down_bias)·up_weightᵀ + up_bias)``, fused.

    x [..., d] (any leading dims, any strides); down_weight [m, d], down_bias [m] or None,
    up_weight [d, m], up_bias [d] or None, all in x's dtype (fp32, fp16 or bf16); activation
    "relu", "gelu" (erf), "gelu_tanh" or "silu". ``dropout_p`` applies inverted dropout to the
    adapter branch before the residual sum. Returns [..., d] in x's dtype; gradients flow to
    every input that requires grad.
    """
    if (dtype := autocast_dtype(x)) is not None:
        return call_without_autocast(bottleneck_adapter, dtype, dict(
            x=x, down_weight=down_weight, down_bias=down_bias, up_weight=up_weight, up_bias=up_bias,
            activation=activation, scaling=scaling, dropout_p=dropout_p))
    scaling, dropout_p = check_bottleneck_args(x, down_weight, down_bias, up_weight, up_bias, activation, scaling,
                                             dropout_p)
    impl = resolve(x.device)
    if impl == "reference":
        return reference.bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, activation, scaling,
                                            dropout_p)
    ops = ops_for_call("bottleneck", bottleneck_impl(impl, x.dtype, down_weight.shape[0]))
    return BottleneckAdapterFunction.apply(x, down_weight, down_bias, up_weight, up_bias, activation, scaling,
                                           dropout_p, ops)

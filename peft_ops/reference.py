"""Plain PyTorch references: the math of every fused op, the same signatures, autograd as is.

These back every correctness test and the "reference" backend. They favour readability over
memory: PyTorch's autograd saves whatever it saves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0, *,
                dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ + scaling·(dropout(x)·Aᵀ)·Bᵀ + bias, computed in x's dtype (or in the adapters'
    dtype for the LoRA branch when it is wider, as PEFT does with fp32 adapters).

    ``dropout_mask`` (bool, x's shape, keyword-only): use this keep mask instead of drawing one,
    so a test can replay the mask a kernel used.
    """
    base = F.linear(x, weight, bias)
    lora_in = x.to(lora_A.dtype)
    if dropout_mask is not None:
        lora_in = lora_in * dropout_mask.to(lora_in.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0:
        lora_in = F.dropout(lora_in, p=dropout_p, training=True)
    lora = (lora_in @ lora_A.t()) @ lora_B.t()
    return base + (scaling * lora).to(base.dtype)


def nf4_dequantize(qweight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W [out, in] = NF4_CODE[nibble]·absmax[block] in fp32, cast to `dtype` (default: the
    weight's original dtype). Element f of the flattened weight is the high nibble of byte
    f // 2 when f is even, the low one when odd; its block is f // blocksize."""
    from .nf4 import ABSMAX_BLOCKSIZE, dynamic_map, nf4_code

    q, device = qweight, qweight.packed.device
    numel = q.out_features * q.in_features
    absmax = q.absmax
    if q.absmax_scale is not None:  # double quantization: map[code8]·scale + offset, two fp32 roundings
        scale = q.absmax_scale.repeat_interleave(ABSMAX_BLOCKSIZE)[: absmax.numel()]
        absmax = dynamic_map(device)[absmax.long()] * scale + q.absmax_offset
    nibbles = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).reshape(-1)[:numel]
    block = torch.arange(numel, device=device) // q.blocksize
    weight = nf4_code(device)[nibbles.long()] * absmax[block]
    return weight.view(q.out_features, q.in_features).to(q.dtype if dtype is None else dtype)


def nf4_linear(x: torch.Tensor, qweight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x·dequant(W)ᵀ + bias, in x's dtype (W dequantized to x's dtype, as bitsandbytes does)."""
    return F.linear(x, nf4_dequantize(qweight, x.dtype), bias)


def qlora_linear(x: torch.Tensor, qweight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 bias: torch.Tensor | None = None, dropout_p: float = 0.0, *,
                 dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """x·dequant(W)ᵀ + bias + scaling·(dropout(x)·Aᵀ)·Bᵀ: :func:`lora_linear` on the
    dequantized weight."""
    return lora_linear(x, nf4_dequantize(qweight, x.dtype), lora_A, lora_B, scaling, bias, dropout_p,
                       dropout_mask=dropout_mask)


_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "silu": F.silu,
}


def bottleneck_adapter(x: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor | None,
                       up_weight: torch.Tensor, up_bias: torch.Tensor | None, activation: str = "relu",
                       scaling: float = 1.0, dropout_p: float = 0.0, *,
                       dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """x + scaling·dropout(act(x·W_downᵀ + b_down)·W_upᵀ + b_up), in x's dtype.

    ``dropout_mask`` (bool, x's shape, keyword-only): use this keep mask instead of drawing one.
    """
    z = F.linear(_ACTIVATIONS[activation](F.linear(x, down_weight, down_bias)), up_weight, up_bias)
    if dropout_mask is not None:
        z = z * dropout_mask.to(z.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0:
        z = F.dropout(z, p=dropout_p, training=True)
    return x + scaling * z

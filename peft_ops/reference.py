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

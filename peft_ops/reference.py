"""Plain PyTorch references: the math of every fused op, the same signatures, autograd as is.

These back every correctness test and the "reference" backend. They favour readability over
memory: PyTorch's autograd saves whatever it saves.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .kernels.interface import ACTIVATIONS
from .nf4 import NF4Tensors, NF4Weight, decode


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


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_As, lora_Bs, scalings, adapter_ids: torch.Tensor,
                      bias: torch.Tensor | None = None, dropout_ps=None, *,
                      dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ + bias, plus on each row m the LoRA term of its adapter k = adapter_ids[m] (−1: none):
    scalings[k]·(dropout_k(x_m)·lora_As[k]ᵀ)·lora_Bs[k]ᵀ — one masked pass per adapter.
    ``dropout_mask`` (bool, x's shape): the keep mask to replay."""
    x2d = x.reshape(-1, x.shape[-1])
    ids = adapter_ids.reshape(-1)
    mask = None if dropout_mask is None else dropout_mask.reshape(x2d.shape)
    y = F.linear(x2d, weight, bias)
    dtype = y.dtype
    for lora_A in lora_As:  # the widest of x's and the adapters' dtypes
        dtype = torch.promote_types(dtype, lora_A.dtype)
    delta = torch.zeros(y.shape, dtype=dtype, device=y.device)
    for k, (lora_A, lora_B, scaling) in enumerate(zip(lora_As, lora_Bs, scalings)):
        rows = (ids == k).nonzero().reshape(-1)
        p = dropout_ps[k] if dropout_ps is not None else 0.0
        lora_in = x2d[rows].to(lora_A.dtype)
        if mask is not None:
            lora_in = lora_in * mask[rows].to(lora_in.dtype) / (1.0 - p)
        elif p > 0:
            lora_in = F.dropout(lora_in, p=p, training=True)
        delta = delta.index_put((rows,), (scaling * (lora_in @ lora_A.t()) @ lora_B.t()).to(dtype))
    return (y + delta.to(y.dtype)).view(*x.shape[:-1], y.shape[-1])


def lora_embedding(ids: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                   scaling: float, padding_idx: int | None = None) -> torch.Tensor:
    """E[ids] + scaling·(A[:, ids])ᵀ·Bᵀ in E's dtype (the LoRA term in the adapters' dtype when it
    is wider), PEFT's embedding LoRA: A = lora_embedding_A [r, V], B = lora_embedding_B [D, r];
    padding_idx's column of A gets no gradient, as F.embedding's rule."""
    base = F.embedding(ids, weight, padding_idx)
    after_A = F.embedding(ids, lora_A.t(), padding_idx)
    return base + (scaling * (after_A @ lora_B.t())).to(base.dtype)


def dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W_n + scaling·B_n·A‖ per output row n, from the materialized matrix (the definition),
    in the wider of the weight's and the adapters' dtypes."""
    dtype = torch.promote_types(weight.dtype, lora_A.dtype)
    return torch.linalg.norm(weight.to(dtype) + scaling * (lora_B.to(dtype) @ lora_A.to(dtype)), dim=1)


def dora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                magnitude: torch.Tensor, scaling: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0, *,
                dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """DoRA as PEFT computes it (``DoraLinearLayer``), with c = magnitude / ‖W + s·B·A‖ per
    output column (the norm detached from the graph) and xd = dropout(x):

        y = x·Wᵀ + b + (c − 1)·(xd·Wᵀ) + c·s·(xd·Aᵀ)·Bᵀ

    which without dropout is c·(x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b. The DoRA terms in the wider of x's and
    the adapters' dtypes (PEFT casts x to the adapters' dtype), the result in x's dtype.
    ``dropout_mask``: as in :func:`lora_linear`.
    """
    base = F.linear(x, weight, bias)
    dtype = torch.promote_types(x.dtype, lora_A.dtype)
    dropped = x.to(dtype)
    if dropout_mask is not None:
        dropped = dropped * dropout_mask.to(dtype) / (1.0 - dropout_p)
    elif dropout_p > 0:
        dropped = F.dropout(dropped, p=dropout_p, training=True)
    norm = dora_weight_norm(weight, lora_A.detach(), lora_B.detach(), scaling).detach()
    scale = magnitude.to(dtype) / norm.to(dtype)
    lora = (dropped @ lora_A.to(dtype).t()) @ lora_B.to(dtype).t()
    y = base + (scale - 1) * F.linear(dropped, weight.to(dtype)) + scale * (scaling * lora)
    return y.to(x.dtype)


def qdora_linear(x: torch.Tensor, qweight, lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor,
                 scaling: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0, *,
                 dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`dora_linear` on the NF4 weight dequantized to x's dtype (as PEFT's DoRA over a
    bitsandbytes 4-bit layer)."""
    return dora_linear(x, nf4_dequantize(qweight, x.dtype), lora_A, lora_B, magnitude, scaling, bias, dropout_p,
                       dropout_mask=dropout_mask)


def nf4_dequantize(qweight: NF4Weight | NF4Tensors, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W [out, in] = NF4_CODE[nibble]·absmax[block] in fp32, cast to `dtype` (default: the
    weight's original dtype): the format's own decoding rule, :func:`peft_ops.nf4.decode`
    (its bytes and values are tested equal to bitsandbytes')."""
    return decode(qweight.tensors() if isinstance(qweight, NF4Weight) else qweight, dtype)


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


def apply_activation(h: torch.Tensor, name: str) -> torch.Tensor:
    """act(h) for `name` in ACTIVATIONS: relu, gelu (erf), gelu_tanh, silu (PyTorch's own)."""
    if name == "relu":
        return F.relu(h)
    if name == "gelu":
        return F.gelu(h)
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if name == "silu":
        return F.silu(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}; got {name!r}")


def activation_derivative(h: torch.Tensor, name: str) -> torch.Tensor:
    """act′(h), derived by hand (relu′(0) = 0, as PyTorch): what the PyTorch path and the
    kernels use; the reference op differentiates :func:`apply_activation` with autograd instead."""
    if name == "relu":
        return (h > 0).to(h.dtype)
    if name == "gelu":
        return 0.5 * (1.0 + torch.erf(h * 0.5**0.5)) + h * torch.exp(-0.5 * h * h) * (2 * torch.pi) ** -0.5
    if name == "gelu_tanh":
        c = (2 / torch.pi) ** 0.5
        t = torch.tanh(c * (h + 0.044715 * h**3))
        return 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * c * (1 + 3 * 0.044715 * h * h)
    if name == "silu":
        sig = torch.sigmoid(h)
        return sig * (1 + h * (1 - sig))
    raise ValueError(f"activation must be one of {ACTIVATIONS}; got {name!r}")


def bottleneck_adapter(x: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor | None,
                       up_weight: torch.Tensor, up_bias: torch.Tensor | None, activation: str = "relu",
                       scaling: float = 1.0, dropout_p: float = 0.0, *,
                       dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """x + scaling·dropout(act(x·W_downᵀ + b_down)·W_upᵀ + b_up), in x's dtype.

    ``dropout_mask`` (bool, x's shape, keyword-only): use this keep mask instead of drawing one.
    """
    z = F.linear(apply_activation(F.linear(x, down_weight, down_bias), activation), up_weight, up_bias)
    if dropout_mask is not None:
        z = z * dropout_mask.to(z.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0:
        z = F.dropout(z, p=dropout_p, training=True)
    return x + scaling * z


# --------------------------------------------------------------------------------------
# The kernels' dropout mask, independently: Philox4x32-10 (Salmon et al., "Parallel random
# numbers: as easy as 1, 2, 3", SC 2011) in numpy, and the documented layout on top of it.
# Nothing here calls Triton, so a kernel that draws its mask wrongly cannot agree with it.
# --------------------------------------------------------------------------------------

PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)  # the round multipliers of Philox4x32
PHILOX_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)  # the key schedule's Weyl increments (golden ratio, √3 − 1)
_LOW32 = 0xFFFFFFFF


def philox4x32_10(counter, key: tuple[int, int]):
    """Philox4x32 with 10 rounds: four uint32 arrays (the 4 lanes) for a counter given as four
    uint32-valued arrays (c0, c1, c2, c3) and a key (k0, k1). Each round multiplies lanes 0
    and 2 into 64-bit products; their high halves mix with the other lanes and the key."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _LOW32 for c in counter)
    k0, k1 = np.uint64(key[0] & _LOW32), np.uint64(key[1] & _LOW32)
    m0, m1 = (np.uint64(m) for m in PHILOX_MULTIPLIERS)
    w0, w1 = (np.uint64(w) for w in PHILOX_KEY_STEPS)
    low, shift = np.uint64(_LOW32), np.uint64(32)
    for _ in range(10):
        p0, p1 = m0 * c0, m1 * c2  # exact: both factors are below 2³²
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ k0, p1 & low, (p0 >> shift) ^ c3 ^ k1, p0 & low
        k0, k1 = (k0 + w0) & low, (k1 + w1) & low
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def philox_uniform(bits):
    """uint32 draws → float32 in [0, 1) as Triton's ``tl.rand`` maps them: the bits read as an
    int32 i, folded to i ≥ 0 by i ↦ ~i, rounded to float32 and multiplied by float32
    4.6566127342e-10 (about 2⁻³¹, the largest scale that keeps (2³¹ − 1)·scale below 1.0)."""
    i = np.asarray(bits, dtype=np.uint32).view(np.int32)
    i = np.where(i < 0, ~i, i)
    return i.astype(np.float32) * np.float32(4.6566127342e-10)


def dropout_keep_mask(seed: int, n_cols: int, dropout_p: float, rows, cols) -> torch.Tensor:
    """The kernels' keep mask (bool [len(rows), len(cols)]) of the given rows and columns of an
    [·, n_cols] tensor for a 64-bit `seed`.

    Element (m, k) is lane k mod 4 of Philox4x32-10 at counter c = m·⌈n_cols/4⌉ + ⌊k/4⌋ (a
    64-bit integer: c0 its low word, c1 its high word, c2 = c3 = 0) under key (seed mod 2³²,
    seed ÷ 2³²), mapped to a float32 u by :func:`philox_uniform`; kept when u ≥ float32(p).
    One Philox call serves four neighbouring elements of a row."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1, 1)
    cols = np.asarray(cols, dtype=np.int64).reshape(1, -1)
    counter = rows * ((n_cols + 3) // 4) + cols // 4
    c0 = counter & _LOW32
    c1 = counter >> 32
    zeros = np.zeros_like(c0)
    lanes = philox4x32_10((c0, c1, zeros, zeros), (seed & _LOW32, (seed >> 32) & _LOW32))
    u = np.choose(np.broadcast_to(cols % 4, counter.shape), [philox_uniform(lane) for lane in lanes])
    return torch.from_numpy(u >= np.float32(dropout_p))

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
    import numpy as np

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
    import numpy as np

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
    import numpy as np

    rows = np.asarray(rows, dtype=np.int64).reshape(-1, 1)
    cols = np.asarray(cols, dtype=np.int64).reshape(1, -1)
    counter = rows * ((n_cols + 3) // 4) + cols // 4
    c0 = counter & _LOW32
    c1 = counter >> 32
    zeros = np.zeros_like(c0)
    lanes = philox4x32_10((c0, c1, zeros, zeros), (seed & _LOW32, (seed >> 32) & _LOW32))
    u = np.choose(np.broadcast_to(cols % 4, counter.shape), [philox_uniform(lane) for lane in lanes])
    return torch.from_numpy(u >= np.float32(dropout_p))

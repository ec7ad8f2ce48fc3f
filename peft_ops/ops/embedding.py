"""The embedding LoRA op: ``lora_embedding`` and its autograd Function over the Triton or
PyTorch path (``peft_ops.ops.paths``)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import reference
from ..backend import resolve
from . import checks
from .custom_ops import ops_for_call

INDEX_DTYPES = (torch.int64, torch.int32)


def check_lora_embedding_args(ids, weight, lora_A, lora_B, scaling, padding_idx) -> float:
    """Validate every argument of lora_embedding (the ids' range included: one device sync);
    returns scaling as a float."""
    checks.tensor("ids", ids)
    if ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"ids must be int64 or int32 token indices, got {ids.dtype}")
    checks.tensor("weight", weight, ndim=2)
    checks.float_dtype("weight", weight)
    num_embeddings, dim = weight.shape
    if num_embeddings == 0 or dim == 0:
        raise ValueError(f"weight has shape {tuple(weight.shape)}: num_embeddings and embedding_dim must be ≥ 1")
    checks.adapter_factors(lora_A, lora_B, num_embeddings, dim, weight.dtype,
                           names=("num_embeddings", "embedding_dim", "the table's"))
    scaling = checks.real_number("scaling", scaling)
    if padding_idx is not None:
        if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
            raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
        if not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx must be in [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
    checks.same_device({"ids": ids, "weight": weight, "lora_A": lora_A, "lora_B": lora_B})
    # (inside torch.compile the range check, a device sync on the ids' values, is skipped: the
    # graph cannot branch on data; an id out of range there reads another row, as a masked gather)
    if ids.numel() and not torch.compiler.is_compiling() and bool(((ids < 0) | (ids >= num_embeddings)).any()):
        bad = ids[(ids < 0) | (ids >= num_embeddings)][0].item()
        raise ValueError(f"ids holds {bad}, outside [0, {num_embeddings}) (the table's rows)")
    return scaling


class LoraEmbeddingFunction(torch.autograd.Function):
    """y = E[ids] + s·(A[:, ids])ᵀ·Bᵀ, E frozen (no gradient), A [r, V], B [D, r].

    Forward:  xa = A[:, ids]ᵀ                 ([M, r] fp32, gathered once)
              y  = E[ids] + s·xa·Bᵀ           (E's rows gathered, the term in the epilogue)
    Backward, with g = dY·B [M, r]:
              dA[:, v] = s·Σ_{m: ids[m] = v} g[m]   (v ≠ padding_idx; summed in token order)
              dB = s·dYᵀ·xa
    Saved: the ids, xa and the parameters.
    """

    @staticmethod
    def forward(ctx, ids, weight, lora_A, lora_B, scaling, padding_idx, ops):
        flat = ids.reshape(-1)
        y, xa = ops.forward(flat, weight, lora_A, lora_B, scaling)
        ctx.save_for_backward(flat, lora_A, lora_B, xa)
        ctx.scaling, ctx.padding_idx, ctx.ops = scaling, padding_idx, ops
        return y.view(*ids.shape, weight.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        ids, lora_A, lora_B, xa = ctx.saved_tensors
        need_dA, need_dB = ctx.needs_input_grad[2:4]
        dA, dB = ctx.ops.backward(dy.reshape(-1, dy.shape[-1]), ids, lora_A, lora_B, xa, ctx.scaling, ctx.padding_idx,
                                  need_dA, need_dB)
        return (None, None, dA.to(lora_A.dtype) if dA is not None else None,
                dB.to(lora_B.dtype) if dB is not None else None, None, None, None)


def lora_embedding(ids: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                   scaling: float, padding_idx: int | None = None) -> torch.Tensor:
    """``weight[ids] + scaling·(lora_A[:, ids])ᵀ·lora_Bᵀ``, fused: PEFT's LoRA on an
    ``nn.Embedding``.

    ids: token indices, any shape, int64 or int32, each in [0, V) (checked: a ValueError, not a
    device assert — one host sync; not inside torch.compile, whose graph cannot branch on it);
    weight [V, D] (frozen: no gradient flows to it); lora_A [r, V] and lora_B
    [D, r] (PEFT's ``lora_embedding_A`` / ``lora_embedding_B``) in the table's dtype or float32.
    The result is [*ids.shape, D] in the table's dtype. Gradients flow to lora_A (none to
    ``padding_idx``'s column, as F.embedding) and lora_B; the sum over repeated ids is
    deterministic. No dropout: PEFT applies none to an embedding's adapter.
    """
    scaling = check_lora_embedding_args(ids, weight, lora_A, lora_B, scaling, padding_idx)
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    impl = resolve(weight.device)
    if impl == "reference":
        return reference.lora_embedding(ids, weight, lora_A, lora_B, scaling, padding_idx)
    return LoraEmbeddingFunction.apply(ids, weight, lora_A, lora_B, scaling, padding_idx,
                                       ops_for_call("embedding", impl))

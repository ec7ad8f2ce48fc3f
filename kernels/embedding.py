"""LoRA on an embedding table: y = E[ids] + s·(A[:, ids])ᵀ·Bᵀ, PEFT's ``lora.Embedding``
(``lora_embedding_A`` A [r, V], ``lora_embedding_B`` B [D, r]).

Forward, two launches:

- `_lora_embedding_gather_kernel`: xa = A[:, ids]ᵀ [M, r] fp32 — r values gathered per token,
  once (the forward tiles would otherwise gather them again for every column block: D/BLOCK_N
  times), and kept for the backward's dB.
- `_lora_embedding_forward_kernel`: y = E[ids] + s·xa·Bᵀ, each table row gathered whole
  (contiguous along D: full-width vector loads), the rank term added in the epilogue
  (`lora_epilogue`), y written once in E's dtype.

Backward (E is frozen; dE is never formed), three launches and one sort:

- g = dY·B [M, r] and dB = s·dYᵀ·xa: the LoRA backward's own kernels (``lora.g_and_dB``);
- dA[:, v] = s·Σ_{m: ids[m] = v} g[m] — a scatter-add. Deterministic without atomics: the ids
  are sorted (``torch.sort``, stable), and `_lora_embedding_dA_kernel` runs one program per
  sorted position; the first position of each distinct id sums that id's rows of g (in a
  fixed order, DA_BLOCK_Q rows a step) and writes its column of dA, the others return at once. A column no token
  names stays zero; so does padding_idx's (F.embedding passes it no gradient).

Offsets: ids index rows of E and columns of A through int64 (V·D and r·V pass 2³¹ on large
vocabularies).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import KernelBuild, autotuned, dtype_family, launch, launch_guard, m_bucket, tile_configs
from .lora import PIECE_CONFIGS, block_r, g_and_dB, launch_flags, lora_epilogue

GATHER_BLOCK_M = 64  # rows per gather program: 64·r fp32 values, a few KB
# The forward's tiles: the LoRA pieces' (one output tile, the rank term in the epilogue), but
# fp32 tables take the 64×64 tile only (32×128 spilled 8 bytes on sm_80 with the row gather).
FORWARD_CONFIGS = {target: dict(table, fp32=table["fp32"][:1]) if isinstance(table, dict) else table
                   for target, table in PIECE_CONFIGS.items()}


@triton.jit
def _lora_embedding_gather_kernel(IDS, A, XA, M, R, stride_ar, stride_av, BLOCK_M: tl.constexpr,
                                  BLOCK_R: tl.constexpr):
    """XA[m, :] = A[:, IDS[m]] in fp32: [M, R], one program per BLOCK_M tokens."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < R
    ids = tl.load(IDS + offs_m, mask=m_mask, other=0).to(tl.int64)
    mask = m_mask[:, None] & r_mask[None, :]
    a = tl.load(A + offs_r[None, :].to(tl.int64) * stride_ar + ids[:, None] * stride_av, mask=mask, other=0.0)
    tl.store(XA + offs_m[:, None].to(tl.int64) * R + offs_r[None, :], a.to(tl.float32), mask=mask)


@autotuned(FORWARD_CONFIGS, dtype_family("Y"), key=["M_BUCKET", "N", "R", "RANK_FP32"])
@triton.jit
def _lora_embedding_forward_kernel(
    IDS, E, XA, B, Y, M, N, R, M_BUCKET, stride_ev, stride_ed, stride_bn, stride_br, scaling,
    BLOCK_R: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Y[M, N] = E[IDS] + scaling·XA·Bᵀ in Y's dtype, one [BLOCK_M, BLOCK_N] tile per program
    (E's rows: stride_ed is 1 for a contiguous table, and the JIT specializes on it)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Loads wrap past the edges onto valid rows / columns (no masks in the gathers); the store clips.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    ids = tl.load(IDS + rows).to(tl.int64)
    acc = tl.load(E + ids[:, None] * stride_ev + cols[None, :] * stride_ed).to(tl.float32)
    acc = lora_epilogue(acc=acc, XA=XA, B=B, BIAS=XA, rows=rows, cols=cols, R=R, stride_bn=stride_bn,
                        stride_br=stride_br, stride_bias=0, scaling=scaling, HAS_LORA=True, HAS_BIAS=False,
                        BLOCK_R=BLOCK_R, RANK_FP32=RANK_FP32, WIDEN_BF16_DOT=WIDEN_BF16_DOT,
                        DOT_PRECISION=DOT_PRECISION, B_ROWS_ALIGNED=False)
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _lora_embedding_dA_kernel(SORTED, ORDER, G, DA, M, R, stride_dar, stride_dav, scale, padding_idx,
                              HAS_PADDING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr):
    """DA[:, v] = scale·Σ G[m] over the tokens m with id v: the program at the first sorted
    position of each id sums that id's run (ORDER: the token of each sorted position), BLOCK_Q
    positions a step — a vector load and a fixed-shape tree sum, so a long run (a token
    repeated thousands of times) costs its length / BLOCK_Q dependent steps, in a fixed order."""
    p = tl.program_id(0)
    v = tl.load(SORTED + p)
    previous = tl.load(SORTED + tl.maximum(p - 1, 0))
    first = (p == 0) | (previous != v)
    if HAS_PADDING:
        first = first & (v != padding_idx)
    if first:
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        q = p
        more = True
        while more:
            offs_q = q + tl.arange(0, BLOCK_Q)
            in_run = tl.load(SORTED + offs_q, mask=offs_q < M, other=-1) == v
            rows = tl.load(ORDER + offs_q, mask=in_run, other=0).to(tl.int64)
            g = tl.load(G + rows[:, None] * R + offs_r[None, :], mask=in_run[:, None] & r_mask[None, :], other=0.0)
            acc += tl.sum(g, axis=0)
            q += BLOCK_Q
            more = tl.sum(in_run.to(tl.int32), axis=0) == BLOCK_Q  # the whole step was this id's: it may go on
        tl.store(DA + offs_r.to(tl.int64) * stride_dar + v.to(tl.int64) * stride_dav,
                 (acc * scale).to(DA.dtype.element_ty), mask=r_mask)


DA_BLOCK_Q = 32  # sorted positions a dA step sums: [32, r] fp32 rows of g, one vector load


def forward(ids: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
            scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, D] in weight's dtype, xa [M, r] fp32) for ids [M] (int32 or int64, in range)."""
    M = ids.shape[0]
    V, D = weight.shape
    R = lora_A.shape[0]
    y = torch.empty((M, D), device=weight.device, dtype=weight.dtype)
    xa = torch.empty((M, R), device=weight.device, dtype=torch.float32)
    if M == 0:
        return y, xa
    with launch_guard(ids, weight, lora_A, lora_B):
        launch(_lora_embedding_gather_kernel, (triton.cdiv(M, GATHER_BLOCK_M),),
               ids, lora_A, xa, M, R, lora_A.stride(0), lora_A.stride(1), BLOCK_M=GATHER_BLOCK_M,
               BLOCK_R=triton.next_power_of_2(R))
        launch(_lora_embedding_forward_kernel,
               lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(D, META["BLOCK_N"])),
               ids, weight, xa, lora_B, y, M, D, R, m_bucket(M), weight.stride(0), weight.stride(1), lora_B.stride(0),
               lora_B.stride(1), float(scaling), **launch_flags(weight.dtype, lora_B.dtype, R))
    return y, xa


def backward(dy: torch.Tensor, ids: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor,
             scaling: float, padding_idx: int | None, need_dA: bool, need_dB: bool):
    """(dA [r, V] in lora_A's dtype, dB [D, r] in lora_B's dtype), None where not needed."""
    M = dy.shape[0]
    R, V = lora_A.shape
    dA = None
    with launch_guard(dy, ids, lora_A, lora_B):
        g, dB = g_and_dB(dy, lora_B, xa, scaling, need_g=need_dA, need_dB=need_dB, adapter_dtype=lora_A.dtype)
        if need_dA:
            dA = torch.zeros((R, V), device=dy.device, dtype=lora_A.dtype)
            if M:
                sorted_ids, order = torch.sort(ids, stable=True)
                launch(_lora_embedding_dA_kernel, (M,), sorted_ids, order, g, dA, M, R, dA.stride(0), dA.stride(1),
                       float(scaling), padding_idx if padding_idx is not None else 0,
                       HAS_PADDING=padding_idx is not None, BLOCK_R=triton.next_power_of_2(R), BLOCK_Q=DA_BLOCK_Q)
    return dA, dB


# The builds `peft-ops aot` proves spill-free: per operand dtype of E (and the adapters).
AOT_VARIANTS = {"bf16": ("bf16", "bf16"), "bf16/fp32 adapters": ("bf16", "fp32"), "fp32": ("fp32", "fp32")}


def aot_specs(target: str) -> list:
    """Each kernel of this file in each of AOT_VARIANTS, the forward at every autotune config of
    its family, at r = 64 (the widest rank chunk)."""
    plain = ("M", "padding_idx")
    specs = []
    for variant, (dt, rt) in AOT_VARIANTS.items():
        fp32_rank = rt == "fp32"
        family = "fp32" if dt == "fp32" else "mixed" if fp32_rank else "half"
        flags = dict(BLOCK_R=block_r(64, fp32_rank), WIDEN_BF16_DOT=False, RANK_FP32=fp32_rank and dt != "fp32",
                     DOT_PRECISION="tf32x3")
        for cfg in FORWARD_CONFIGS[target][family]:
            specs.append(KernelBuild(f"lora_embedding_forward [{variant}]", _lora_embedding_forward_kernel, cfg,
                                     dict(IDS="i64", E=dt, XA="fp32", B=rt, Y=dt), flags, plain_ints=plain,
                                     unit_strides=("stride_ed", "stride_br"), float_args=("scaling",)))
        one = tile_configs(("BLOCK_M",), [(GATHER_BLOCK_M, 4, 1)])[0]
        specs.append(KernelBuild(f"lora_embedding_gather [{variant}]", _lora_embedding_gather_kernel, one,
                                 dict(IDS="i64", A=rt, XA="fp32"), dict(BLOCK_R=64), plain_ints=plain,
                                 unit_strides=("stride_av",), uses_tensor_cores=False))
        specs.append(KernelBuild(f"lora_embedding_dA [{variant}]", _lora_embedding_dA_kernel,
                                 triton.Config({}, num_warps=1, num_stages=1), dict(SORTED="i64", ORDER="i64",
                                                                                    G="fp32", DA=rt),
                                 dict(HAS_PADDING=True, BLOCK_R=64, BLOCK_Q=DA_BLOCK_Q), plain_ints=plain + ("R",),
                                 unit_strides=("stride_dav",), float_args=("scale",), uses_tensor_cores=False))
    return specs

"""Fused LoRA kernels and their launchers (tensors in, tensors out; no autograd here).

    y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ + b        x [M, K], W [N, K], A [r, K], B [N, r], b [N]

Design, from a cost model (bf16, M = 8192, K = N = 4096, r = 16, H200: 4.8 TB/s, 989 TFLOP/s):

- The base GEMM costs 2·M·N·K = 275 GFLOP ≈ 280-350 µs: the layer is compute-bound.
- Forward, choice of where x·Aᵀ comes from:
  (a) a separate *shrink* kernel xa = drop(x)·Aᵀ: one more read of x (64 MiB ≈ 14 µs, ~4 %),
      which also applies dropout and yields xa [M, r] fp32 — the tensor the backward needs;
  (b) x·Aᵀ recomputed inside every output tile of the GEMM: r/BLOCK_N more tensor-core work
      (12.5 % at r = 16, 50 % at r = 64 with BLOCK_N = 128), the dropout mask regenerated
      N/BLOCK_N times, and xa still has to be written for the backward.
  (a) is cheaper for every r ≥ 5, so: `_lora_shrink_kernel`, then `_lora_forward_kernel` =
  the GEMM x·Wᵀ with s·xa·Bᵀ + b added in its epilogue (y is written once, no M×N
  intermediate; the epilogue costs r/K of the GEMM: 0.4 %).
- Backward, g = dY·B [M, r]:
  `_lora_backward_dy_kernel` reads dY once and produces both g and per-M-block partials of
  dB = s·dYᵀ·xa (the two products that read dY).
  `_lora_backward_dx_kernel` is the GEMM dY·W fused with the LoRA term s·(g·A)⊙mask/(1-p)
  (accumulated first, into the accumulator the GEMM then continues, so the mask touches that
  term alone without a second tile of registers); holding the M-block of g, it also reads the
  x tile once and writes the per-M-block partial of dA = s/(1-p)·gᵀ·(x⊙mask).
  Extra HBM traffic over the frozen layer: one read of x (forward), one of dY and one of x
  (backward), plus M×r tensors and the partials.
- Reductions over M are deterministic: each M-block writes its own fp32 partial and the
  launcher sums them (`torch.sum` over a fixed number of blocks); no float atomics. The
  M-block size of the two backward kernels is therefore fixed per target, not autotuned.
- Dropout: the keep mask of element (m, k) is a pure function of (seed, m, k) (Philox with an
  int64 counter, one call per 4 elements; see `dropout.keep_tile`), independent of tile shapes, so
  the backward regenerates exactly the forward's mask from the seed; no mask is stored.
- Partials take ⌈M/BLOCK_M⌉·(N+K)·r·4 bytes; to keep that bounded at long sequences the
  backward runs over row chunks of at most PARTIAL_BUDGET_BYTES of partials each (one chunk
  at M = 8192, d = 4096, r ≤ 32), adding the chunks' sums in order.
- All offsets along M (and the strides they multiply) are int64: M·K passes 2³¹ at long
  sequences. Accumulation is fp32 throughout; xa and g are kept in fp32 and rounded to the
  compute dtype only as tensor-core operands — or kept fp32 (RANK_FP32) when the adapters are
  fp32 on a half-precision x, PEFT's default, so that branch has fp32 accuracy as in PEFT.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import (
    KernelBuild,
    autotuned,
    current_target,
    dot_flags,
    dtype_family,
    grouped_tile,
    launch,
    launch_guard,
    m_bucket,
    mma,
    tile_configs,
)
from .dropout import keep_tile


def block_r(r: int, fp32_rank: bool) -> int:
    """Rank chunk (tl.dot needs ≥ 16): up to 64 columns, but 16 when the rank products take
    fp32 operands (fp32 x, or fp32 adapters): tf32x3 splits every fp32 operand in two, and
    wider chunks spilled (ptxas, sm_80)."""
    return min(16 if fp32_rank else 64, max(16, triton.next_power_of_2(r)))


def launch_flags(dtype: torch.dtype, adapter_dtype: torch.dtype, r: int) -> dict:
    """The constexprs every LoRA kernel takes: the dot switches and the rank chunk, both
    decided by whether the rank-r products take fp32 operands (fp32 adapters)."""
    return {**dot_flags(dtype, adapter_dtype), "BLOCK_R": block_r(r, adapter_dtype == torch.float32)}


def _families(names, base, wide, fp32):
    """Autotune lists of one target by operand family: "half" (fp16/bf16 operands) = base +
    wide; "mixed" (half x, fp32 adapters: fp32 rank products) = base only, as the wide tiles
    spilled there; "fp32" (fp32 x: tf32x3 dots) = its own smaller tiles."""
    base, wide = tile_configs(names, base), tile_configs(names, wide)
    return {"half": base + wide, "mixed": base, "fp32": tile_configs(names, fp32)}


_GEMM = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
_SHRINK = ("BLOCK_M", "BLOCK_K")
_DY = ("BLOCK_N",)
_DX = ("BLOCK_N", "BLOCK_K", "GROUP_M")  # BLOCK_K: dX column tile (in); BLOCK_N: reduction (out)

# Autotune lists per target; `peft-ops aot` proves every one spill-free in its family.
# BLOCK_N in the forward is the output-column tile.
FORWARD_CONFIGS = {
    "sm80": _families(_GEMM, base=[(128, 128, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4), (128, 64, 32, 8, 4, 4)],
                      wide=[(128, 256, 32, 8, 8, 3)],
                      fp32=[(64, 64, 32, 8, 4, 3), (64, 128, 16, 8, 8, 3), (32, 64, 32, 8, 4, 3),
                            (64, 64, 16, 8, 4, 3)]),
    "sm90": _families(_GEMM, base=[(128, 128, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4), (64, 256, 64, 8, 8, 3)],
                      wide=[(128, 256, 64, 8, 8, 3)],
                      fp32=[(64, 64, 32, 8, 4, 3), (64, 128, 16, 8, 8, 3), (128, 128, 16, 8, 8, 2),
                            (64, 64, 16, 8, 4, 3)]),
    "interpreter": tile_configs(_GEMM, [(32, 32, 32, 8, 4, 1)]),
}
SHRINK_CONFIGS = {
    "sm80": _families(_SHRINK, base=[(64, 64, 4, 3), (32, 128, 4, 3), (16, 128, 4, 4)], wide=[(128, 64, 4, 3)],
                      fp32=[(32, 32, 4, 3), (64, 32, 4, 3), (32, 64, 4, 2)]),
    "sm90": _families(_SHRINK, base=[(64, 64, 4, 4), (128, 64, 8, 3), (32, 128, 4, 4), (16, 128, 4, 4)], wide=[],
                      fp32=[(32, 32, 4, 3), (64, 32, 4, 3), (32, 64, 4, 2)]),
    "interpreter": tile_configs(_SHRINK, [(32, 32, 4, 1)]),
}
# Backward: BLOCK_M is fixed per target (BACKWARD_BLOCK_M) because it sets how many partials
# the M-reduction sums; only the other tile sizes are tuned. The dX kernel holds the GEMM
# accumulator, the x tile, g and the regenerated dropout mask at once: at BLOCK_M = 128
# every config spilled (ptxas), at 64 none does.
BACKWARD_BLOCK_M = {"sm80": {"dy": 64, "dx": 64}, "sm90": {"dy": 64, "dx": 64},
                    "interpreter": {"dy": 32, "dx": 32}}
BACKWARD_DY_CONFIGS = {
    "sm80": _families(_DY, base=[(64, 4, 3), (64, 4, 4)], wide=[(128, 8, 3)],
                      fp32=[(32, 4, 3), (32, 8, 3), (16, 4, 3)]),
    "sm90": _families(_DY, base=[(64, 4, 4), (64, 8, 3)], wide=[(128, 4, 3), (128, 8, 3)],
                      fp32=[(32, 4, 3), (32, 8, 3), (16, 4, 3)]),
    "interpreter": tile_configs(_DY, [(32, 4, 1)]),
}
BACKWARD_DX_CONFIGS = {
    "sm80": _families(_DX, base=[(64, 128, 8, 8, 3), (64, 64, 8, 4, 3), (64, 64, 8, 4, 4)], wide=[(64, 256, 8, 8, 3)],
                      fp32=[(32, 32, 8, 4, 3), (32, 64, 8, 8, 3), (16, 64, 8, 4, 3), (32, 32, 8, 4, 2)]),
    "sm90": _families(_DX, base=[(64, 128, 8, 8, 3), (64, 64, 8, 4, 4), (64, 64, 8, 4, 3)], wide=[(64, 256, 8, 8, 3)],
                      fp32=[(32, 32, 8, 4, 3), (32, 64, 8, 8, 3), (16, 64, 8, 4, 3), (32, 32, 8, 4, 2)]),
    "interpreter": tile_configs(_DX, [(32, 64, 8, 4, 1)]),
}


@autotuned(SHRINK_CONFIGS, dtype_family("X"), key=["M_BUCKET", "K", "R", "HAS_DROPOUT", "RANK_FP32"])
@triton.jit(do_not_specialize=["seed"])  # a fresh seed per step must not trigger a recompile
def _lora_shrink_kernel(
    X, A, XA, M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak,
    seed, dropout_p, keep_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """XA[M, R] (fp32) = (X ⊙ keep)·Aᵀ · keep_scale, one program per (M-block, R-chunk)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)
    m_mask = offs_m < M
    r_mask = offs_r < R
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    a_ptrs = A + offs_r[None, :].to(tl.int64) * stride_ar + offs_k[:, None].to(tl.int64) * stride_ak
    x_step = BLOCK_K * tl.cast(stride_xk, tl.int64)
    a_step = BLOCK_K * tl.cast(stride_ak, tl.int64)
    rank_dtype = tl.float32 if RANK_FP32 else X.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = keep_tile(seed=seed, rows=rows, k0=k0, n_cols=K, dropout_p=dropout_p, BLOCK_M=BLOCK_M,
                             BLOCK_K=BLOCK_K)
            x = tl.where(keep, x, 0.0)  # zeroing is exact; the 1/(1-p) is applied to the fp32 sum
        a = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = mma(x.to(rank_dtype), a.to(rank_dtype), acc, WIDEN_BF16_DOT, DOT_PRECISION)
        x_ptrs += x_step
        a_ptrs += a_step
    if HAS_DROPOUT:
        acc = acc * keep_scale
    xa_ptrs = XA + rows[:, None] * R + offs_r[None, :]
    tl.store(xa_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def lora_epilogue(acc, XA, B, BIAS, rows, cols, R, stride_bn, stride_br, stride_bias, scaling,
                  HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, RANK_FP32: tl.constexpr,
                  WIDEN_BF16_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc [+ scaling·XA[rows]·B[cols]ᵀ] [+ BIAS[cols]]: the epilogue of every forward output
    tile (dense and NF4; rows, cols are valid int64 indices). Scaling is folded into the fp32
    xa before its one rounding to the compute dtype, so the term accumulates straight into acc
    (no second M×N tile)."""
    if HAS_LORA:
        # The rank operands' dtype: B's own (x's dtype, or fp32 when RANK_FP32 / fp32 x).
        rank_dtype = B.dtype.element_ty
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            r_mask = (r0 + offs_r) < R
            xa = tl.load(XA + rows[:, None] * R + (r0 + offs_r)[None, :], mask=r_mask[None, :], other=0.0)
            b = tl.load(B + cols[None, :] * stride_bn + (r0 + offs_r)[:, None].to(tl.int64) * stride_br,
                        mask=r_mask[:, None], other=0.0)
            acc = mma((xa * scaling).to(rank_dtype), b.to(rank_dtype), acc, WIDEN_BF16_DOT, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols * stride_bias).to(tl.float32)[None, :]
    return acc


@triton.jit
def lora_da_partial(G, X, DA_PARTIAL, pid_m, rows, m_mask, offs_k, k_mask, mask_rows, K, R,
                    stride_xm, stride_xk, seed, dropout_p, pid_k,
                    HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, RANK_FP32: tl.constexpr,
                    WIDEN_BF16_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """DA_PARTIAL[pid_m, :, offs_k] = G[rows]ᵀ·(X[rows, offs_k]⊙keep), for the dX kernels."""
    rank_dtype = tl.float32 if RANK_FP32 else X.dtype.element_ty
    # Rows past M load as zero (not wrapped) in both G and X: they must add nothing to dA.
    x = tl.load(X + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                mask=m_mask[:, None] & k_mask[None, :], other=0.0)
    if HAS_DROPOUT:
        keep = keep_tile(seed=seed, rows=mask_rows, k0=pid_k * BLOCK_K, n_cols=K, dropout_p=dropout_p,
                         BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
        x = tl.where(keep, x, 0.0)
    x = x.to(rank_dtype)
    offs_r = tl.arange(0, BLOCK_R)
    partial_base = DA_PARTIAL + pid_m.to(tl.int64) * R * K
    for r0 in range(0, R, BLOCK_R):
        r_mask = (r0 + offs_r) < R
        g = tl.load(G + rows[:, None] * R + (r0 + offs_r)[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        part = mma(tl.trans(g.to(rank_dtype)), x, tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32),
                   WIDEN_BF16_DOT, DOT_PRECISION)
        part_ptrs = partial_base + (r0 + offs_r)[:, None].to(tl.int64) * K + offs_k[None, :]
        tl.store(part_ptrs, part, mask=r_mask[:, None] & k_mask[None, :])


@triton.jit
def lora_dx_term(G, A, rows, m_mask, cols, mask_rows, R, K, stride_ar, stride_ak, seed, dropout_p, lora_scale,
                 pid_k, HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """lora_scale·(G[rows]·A[:, cols])⊙keep as a fresh fp32 [BLOCK_M, BLOCK_K] accumulator: the
    dX kernels start from it and continue with their GEMM, so the dropout mask (which applies
    to this term only) needs no second M×K tile of registers."""
    rank_dtype = A.dtype.element_ty  # x's dtype, or fp32 (RANK_FP32 / fp32 x)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_mask = (r0 + offs_r) < R
        g = tl.load(G + rows[:, None] * R + (r0 + offs_r)[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        a = tl.load(A + (r0 + offs_r)[:, None].to(tl.int64) * stride_ar + cols[None, :] * stride_ak,
                    mask=r_mask[:, None], other=0.0)
        # lora_scale folds into fp32 g before its one rounding to the compute dtype.
        acc = mma((g * lora_scale).to(rank_dtype), a.to(rank_dtype), acc, WIDEN_BF16_DOT, DOT_PRECISION)
    if HAS_DROPOUT:
        # The mask is regenerated rather than kept from the dA step: holding a BM×BK mask
        # in registers across both steps made ptxas spill.
        keep = keep_tile(seed=seed, rows=mask_rows, k0=pid_k * BLOCK_K, n_cols=K, dropout_p=dropout_p,
                         BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
        acc = tl.where(keep, acc, 0.0)
    return acc


@autotuned(FORWARD_CONFIGS, dtype_family("X"), key=["M_BUCKET", "N", "K", "R", "HAS_BIAS", "RANK_FP32"])
@triton.jit
def _lora_forward_kernel(
    X, W, XA, B, BIAS, Y, M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bn, stride_br, stride_bias,
    scaling,
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y[M, N] = X·Wᵀ + scaling·XA·Bᵀ + BIAS, the LoRA term and bias in the epilogue."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge wrap onto valid ones for the loads (the store is masked), so
    # the main-loop loads need no M/N mask and stay vectorized.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    w_ptrs = W + cols[None, :] * stride_wn + offs_k[:, None].to(tl.int64) * stride_wk
    x_step = BLOCK_K * tl.cast(stride_xk, tl.int64)
    w_step = BLOCK_K * tl.cast(stride_wk, tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = mma(x, w, acc, WIDEN_BF16_DOT, DOT_PRECISION)
        x_ptrs += x_step
        w_ptrs += w_step

    acc = lora_epilogue(acc=acc, XA=XA, B=B, BIAS=BIAS, rows=rows, cols=cols, R=R, stride_bn=stride_bn,
                        stride_br=stride_br, stride_bias=stride_bias, scaling=scaling, HAS_LORA=True,
                        HAS_BIAS=HAS_BIAS, BLOCK_R=BLOCK_R, RANK_FP32=RANK_FP32, WIDEN_BF16_DOT=WIDEN_BF16_DOT,
                        DOT_PRECISION=DOT_PRECISION)

    out_rows = offs_m.to(tl.int64)
    y_ptrs = Y + out_rows[:, None] * N + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@autotuned(BACKWARD_DY_CONFIGS, dtype_family("DY"), key=["M_BUCKET", "N", "R", "COMPUTE_G", "COMPUTE_DB", "RANK_FP32"])
@triton.jit
def _lora_backward_dy_kernel(
    DY, B, XA, G, DB_PARTIAL, M, N, R, M_BUCKET,
    stride_dym, stride_dyn, stride_bn, stride_br,
    COMPUTE_G: tl.constexpr, COMPUTE_DB: tl.constexpr, BLOCK_R: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One pass over dY for both products that read it, per (M-block, R-chunk):
    G[M, R] = dY·B (fp32) and DB_PARTIAL[m_block, N, R] = dY[m_block]ᵀ·XA[m_block]."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    m_mask = offs_m < M
    r_mask = offs_r < R
    rank_dtype = tl.float32 if RANK_FP32 else DY.dtype.element_ty
    if COMPUTE_DB:
        # Rows past M load as zero (not wrapped): they must add nothing to the dB sum.
        xa = tl.load(XA + rows[:, None] * R + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        xa = xa.to(rank_dtype)
    g = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    dy_ptrs = DY + rows[:, None] * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn
    b_ptrs = B + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :].to(tl.int64) * stride_br
    dy_step = BLOCK_N * tl.cast(stride_dyn, tl.int64)
    b_step = BLOCK_N * tl.cast(stride_bn, tl.int64)
    partial_base = DB_PARTIAL + pid_m.to(tl.int64) * N * R
    for n0 in range(0, N, BLOCK_N):
        n_mask = (n0 + offs_n) < N
        dy = tl.load(dy_ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(rank_dtype)
        if COMPUTE_G:
            b = tl.load(b_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            g = mma(dy, b.to(rank_dtype), g, WIDEN_BF16_DOT, DOT_PRECISION)
        if COMPUTE_DB:
            part = mma(tl.trans(dy), xa, tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32),
                       WIDEN_BF16_DOT, DOT_PRECISION)
            part_ptrs = partial_base + (n0 + offs_n)[:, None].to(tl.int64) * R + offs_r[None, :]
            tl.store(part_ptrs, part, mask=n_mask[:, None] & r_mask[None, :])
        dy_ptrs += dy_step
        b_ptrs += b_step
    if COMPUTE_G:
        tl.store(G + rows[:, None] * R + offs_r[None, :], g, mask=m_mask[:, None] & r_mask[None, :])


@autotuned(BACKWARD_DX_CONFIGS, dtype_family("DY"),
           key=["M_BUCKET", "N", "K", "R", "COMPUTE_DX", "COMPUTE_DA", "HAS_DROPOUT", "RANK_FP32"])
@triton.jit(do_not_specialize=["seed"])
def _lora_backward_dx_kernel(
    DY, W, G, A, X, DX, DA_PARTIAL, M, N, K, R, M_BUCKET, row0,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_xm, stride_xk,
    seed, dropout_p, lora_scale,
    COMPUTE_DX: tl.constexpr, COMPUTE_DA: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Per output tile (M-block, K-block), with lora_scale = scaling/(1-p):
    DX = dY·W + lora_scale·(G·A)⊙keep, and DA_PARTIAL[m_block, R, K-block] = Gᵀ·(X⊙keep).
    Rows are those of a chunk starting at row `row0` of the whole x (for the dropout mask)."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    k_mask = offs_k < K
    rows = offs_m.to(tl.int64)
    cols = (offs_k % K).to(tl.int64)  # wrapped like the forward GEMM; the store is masked
    mask_rows = rows + row0  # the dropout mask is indexed by the row of the whole x

    # dA partial first: x (masked) meets gᵀ, and both die before the GEMM starts.
    if COMPUTE_DA:
        lora_da_partial(G=G, X=X, DA_PARTIAL=DA_PARTIAL, pid_m=pid_m, rows=rows, m_mask=m_mask, offs_k=offs_k,
                        k_mask=k_mask, mask_rows=mask_rows, K=K, R=R, stride_xm=stride_xm, stride_xk=stride_xk,
                        seed=seed, dropout_p=dropout_p, pid_k=pid_k, HAS_DROPOUT=HAS_DROPOUT, BLOCK_R=BLOCK_R,
                        RANK_FP32=RANK_FP32, WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION,
                        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    if COMPUTE_DX:
        acc = lora_dx_term(G=G, A=A, rows=rows, m_mask=m_mask, cols=cols, mask_rows=mask_rows, R=R, K=K,
                           stride_ar=stride_ar, stride_ak=stride_ak, seed=seed, dropout_p=dropout_p,
                           lora_scale=lora_scale, pid_k=pid_k, HAS_DROPOUT=HAS_DROPOUT, BLOCK_R=BLOCK_R,
                           WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M,
                           BLOCK_K=BLOCK_K)
        wrapped_rows = (offs_m % M).to(tl.int64)
        dy_ptrs = DY + wrapped_rows[:, None] * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn
        w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + cols[None, :] * stride_wk
        dy_step = BLOCK_N * tl.cast(stride_dyn, tl.int64)
        w_step = BLOCK_N * tl.cast(stride_wn, tl.int64)
        for n0 in range(0, N, BLOCK_N):
            n_mask = offs_n < N - n0
            dy = tl.load(dy_ptrs, mask=n_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
            acc = mma(dy, w, acc, WIDEN_BF16_DOT, DOT_PRECISION)
            dy_ptrs += dy_step
            w_ptrs += w_step
        dx_ptrs = DX + rows[:, None] * K + offs_k[None, :]
        tl.store(dx_ptrs, acc.to(DX.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])


# --------------------------------------------------------------------------------------
# Launchers. Inputs are validated by peft_ops.ops.lora; these only shape, allocate and launch.
# --------------------------------------------------------------------------------------

# Most bytes of fp32 partials (dA and dB) the backward holds at once; beyond it, row chunks.
PARTIAL_BUDGET_BYTES = 128 * 2**20


def target_block_m(kind: str) -> int:
    return BACKWARD_BLOCK_M[current_target()][kind]


def shrink(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """xa = dropout(x)·lora_Aᵀ in fp32, [M, r]; x is 2-D [M, K] with any strides."""
    M, K = x.shape
    R = lora_A.shape[0]
    xa = torch.empty((M, R), device=x.device, dtype=torch.float32)
    if M == 0:
        return xa
    flags = launch_flags(x.dtype, lora_A.dtype, R)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(R, META["BLOCK_R"]))  # noqa: E731
    with launch_guard(x, lora_A):
        launch(_lora_shrink_kernel, grid,
            x, lora_A, xa, M, K, R, m_bucket(M),
            x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
            seed, dropout_p, 1.0 / (1.0 - dropout_p),
            HAS_DROPOUT=dropout_p > 0, **flags,
        )
    return xa


def forward(x: torch.Tensor, weight: torch.Tensor, xa: torch.Tensor, lora_B: torch.Tensor,
            scaling: float, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x·weightᵀ + scaling·xa·lora_Bᵀ + bias, [M, N] in x's dtype."""
    M, K = x.shape
    N = weight.shape[0]
    R = lora_B.shape[1]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
    with launch_guard(x, weight, lora_B):
        launch(_lora_forward_kernel, grid,
            x, weight, xa, lora_B, bias if bias is not None else y, y, M, N, K, R, m_bucket(M),
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_B.stride(0), lora_B.stride(1),
            bias.stride(0) if bias is not None else 0,
            float(scaling),
            HAS_BIAS=bias is not None, **launch_flags(x.dtype, lora_B.dtype, R),
        )
    return y


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
             lora_B: torch.Tensor, xa: torch.Tensor, scaling: float, dropout_p: float, seed: int,
             need_dx: bool, need_dA: bool, need_dB: bool):
    """(dx, dA, dB) of the LoRA layer (None where not needed); dW and db are the caller's.

    dx = dy·W + s/(1-p)·((dy·B)·A)⊙keep       [M, K], x's dtype
    dA = s/(1-p)·(dy·B)ᵀ·(x⊙keep)             [r, K], fp32 (caller casts)
    dB = s·dyᵀ·xa                             [N, r], fp32 (caller casts)
    """
    def launch_dx(grid, dy_c, g, x_c, dx_c, da_partial, rows, row0, lora_scale, **constexprs):
        launch(_lora_backward_dx_kernel, grid,
            dy_c, weight, g, lora_A, x_c, dx_c, da_partial, rows, weight.shape[0], x.shape[1], lora_A.shape[0],
            m_bucket(rows), row0, dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1),
            lora_A.stride(0), lora_A.stride(1), x.stride(0), x.stride(1), seed, dropout_p, lora_scale, **constexprs)

    with launch_guard(dy, x, weight, lora_A, lora_B):
        return backward_with(launch_dx, dy, x, lora_A, lora_B, xa, scaling, dropout_p, need_dx, need_dA, need_dB)


def backward_with(launch_dx, dy: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                  xa: torch.Tensor, scaling: float, dropout_p: float, need_dx: bool, need_dA: bool, need_dB: bool):
    """The LoRA backward for any frozen base weight: row chunks, the dY kernel (g and dB
    partials) and `launch_dx(grid, dy, g, x, dx, da_partial, rows, row0, lora_scale, **constexprs)`,
    which launches a dX kernel for the caller's weight format (dense here, NF4 in nf4.py)."""
    M, N = dy.shape
    K = x.shape[1]
    R = lora_A.shape[0]
    device = dy.device
    need_g = need_dx or need_dA
    dx = torch.empty((M, K), device=device, dtype=x.dtype) if need_dx else None
    dA = torch.zeros((R, K), device=device, dtype=torch.float32) if need_dA else None
    dB = torch.zeros((N, R), device=device, dtype=torch.float32) if need_dB else None
    if M == 0 or not (need_g or need_dB):
        return dx, dA, dB

    block_m_dy, block_m_dx = target_block_m("dy"), target_block_m("dx")
    # Row chunks: a multiple of both M-blocks, as many rows as PARTIAL_BUDGET_BYTES allows
    # (a function of the shapes only, so the summation order is fixed run to run).
    step = block_m_dy * block_m_dx // math.gcd(block_m_dy, block_m_dx)
    partial_bytes_per_row = (N * need_dB + K * need_dA) * R * 4 / min(block_m_dy, block_m_dx)
    chunk = max(step, int(PARTIAL_BUDGET_BYTES // max(partial_bytes_per_row, 1)) // step * step)
    chunk = min(chunk, triton.cdiv(M, step) * step)

    flags = launch_flags(dy.dtype, lora_A.dtype, R)
    lora_scale = scaling / (1.0 - dropout_p)
    g = torch.empty((chunk, R), device=device, dtype=torch.float32) if need_g else xa  # else: unused
    db_partial = torch.empty((triton.cdiv(chunk, block_m_dy), N, R), device=device, dtype=torch.float32) \
        if need_dB else xa
    da_partial = torch.empty((triton.cdiv(chunk, block_m_dx), R, K), device=device, dtype=torch.float32) \
        if need_dA else xa
    for row0 in range(0, M, chunk):
        rows = min(chunk, M - row0)
        dy_c, x_c, xa_c = dy[row0:row0 + rows], x[row0:row0 + rows], xa[row0:row0 + rows]
        blocks_dy, blocks_dx = triton.cdiv(rows, block_m_dy), triton.cdiv(rows, block_m_dx)
        launch(_lora_backward_dy_kernel, (blocks_dy, triton.cdiv(R, flags["BLOCK_R"])),
            dy_c, lora_B, xa_c, g, db_partial, rows, N, R, m_bucket(rows),
            dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1),
            COMPUTE_G=need_g, COMPUTE_DB=need_dB, BLOCK_M=block_m_dy, **flags,
        )
        if need_dB:
            dB += db_partial[:blocks_dy].sum(dim=0)
        if need_g:
            grid = lambda META, blocks=blocks_dx: (blocks * triton.cdiv(K, META["BLOCK_K"]),)  # noqa: E731
            launch_dx(grid, dy_c, g, x_c, dx[row0:row0 + rows] if need_dx else g, da_partial, rows, row0,
                      lora_scale, COMPUTE_DX=need_dx, COMPUTE_DA=need_dA, HAS_DROPOUT=dropout_p > 0,
                      BLOCK_M=block_m_dx, **flags)
            if need_dA:
                dA += da_partial[:blocks_dx].sum(dim=0)
    if need_dA:
        dA *= lora_scale
    if need_dB:
        dB *= scaling
    return dx, dA, dB


# What the aot builds cover: each config in the variants that differ in registers.
AOT_VARIANTS = {
    "bf16": dict(dtype="bf16", rank_dtype="bf16", family="half"),
    "bf16+fp32 A,B": dict(dtype="bf16", rank_dtype="fp32", family="mixed"),
    "fp32": dict(dtype="fp32", rank_dtype="fp32", family="fp32"),
}


def aot_specs(target: str) -> list:
    """Every kernel of this file at every autotune config of `target`, in each of
    AOT_VARIANTS, at its heaviest settings (the widest rank chunk, dropout, bias, all
    gradients)."""
    plain = ("M", "seed", "row0")
    specs = []
    for variant, v in AOT_VARIANTS.items():
        dt, rt, family = v["dtype"], v["rank_dtype"], v["family"]
        fp32_rank = rt == "fp32"
        common = dict(BLOCK_R=block_r(64, fp32_rank), WIDEN_BF16_DOT=False, RANK_FP32=fp32_rank and dt != "fp32",
                      DOT_PRECISION="tf32x3")

        def build(name, kernel, configs, pointers, constexprs, family=family, variant=variant, common=common, **kw):
            for cfg in configs[target][family]:
                specs.append(KernelBuild(f"{name} [{variant}]", kernel, cfg, pointers, {**common, **constexprs},
                                         plain_ints=plain, **kw))

        build("lora_shrink", _lora_shrink_kernel, SHRINK_CONFIGS, dict(X=dt, A=rt, XA="fp32"),
              dict(HAS_DROPOUT=True), unit_strides=("stride_xk", "stride_ak"),
              float_args=("dropout_p", "keep_scale"))
        build("lora_forward", _lora_forward_kernel, FORWARD_CONFIGS,
              dict(X=dt, W=dt, XA="fp32", B=rt, BIAS=dt, Y=dt), dict(HAS_BIAS=True),
              unit_strides=("stride_xk", "stride_wk", "stride_br", "stride_bias"), float_args=("scaling",))
        build("lora_backward_dy", _lora_backward_dy_kernel, BACKWARD_DY_CONFIGS,
              dict(DY=dt, B=rt, XA="fp32", G="fp32", DB_PARTIAL="fp32"),
              dict(COMPUTE_G=True, COMPUTE_DB=True, BLOCK_M=BACKWARD_BLOCK_M[target]["dy"]),
              unit_strides=("stride_dyn", "stride_br"))
        build("lora_backward_dx", _lora_backward_dx_kernel, BACKWARD_DX_CONFIGS,
              dict(DY=dt, W=dt, G="fp32", A=rt, X=dt, DX=dt, DA_PARTIAL="fp32"),
              dict(COMPUTE_DX=True, COMPUTE_DA=True, HAS_DROPOUT=True, BLOCK_M=BACKWARD_BLOCK_M[target]["dx"]),
              unit_strides=("stride_dyn", "stride_wk", "stride_ak", "stride_xk"),
              float_args=("dropout_p", "lora_scale"))
    return specs

"""Grouped LoRA kernels for many adapters in one batch (``multi_lora_linear``) and their
launchers (tensors in, tensors out; no autograd here).

    y_m = x_m·Wᵀ + b + s_k·(drop_k(x_m)·A_kᵀ)·B_kᵀ      k = the adapter of row m (−1: none)

The rows are grouped by adapter once (a stable sort of the ids: ``order``), so the rows of
adapter k sit at the positions [start_k, end_k) of the order. One small int64 table, built on
the host from the segment sizes and copied once per call, tells every program what it works
on: per adapter its factors' offsets and rank, its rows, its dropout seed and scales; per
tile (BLOCK_M positions of one segment: no tile mixes adapters) its adapter and positions.
The adapters' factors are concatenated flat ([r_k, in] then [out, r_k] each, their own ranks,
no padding), and so are xa and g ([n_k, r_k] fp32 per adapter: each row its own rank).

Design, from a cost model (bf16, K = 8 adapters of r = 16, in = out = 4096, M = 8192 rows split
evenly, H200: 4.8 TB/s, ≈ 790 TFLOP/s in cuBLAS):

- The base products x·Wᵀ and dY·W are one cuBLAS GEMM each over every row (``torch.addmm``,
  275 GFLOP ≈ 350 µs each): the base weight is read once for all K adapters. Their C is the
  LoRA term (and bias) written by a memory-bound kernel here, as on the LoRA op's cuBLAS path:
  one M×N write and read more per phase (2 × 64 MiB ≈ 30 µs, ≈ 4 %) against a grouped GEMM
  that would load x's rows through the order (no TMA for x on sm_90a) — not built.
- Launches per call do not depend on K: forward = table copy, shrink, expand, addmm (+ the
  concatenation of the factors when K > 1); backward = concatenation, g, dX term, addmm, the
  rank pass (+ dW, db when asked). Each kernel's programs cover every segment at once.
- Forward: `_multi_lora_shrink_kernel` xa = drop_k(x)·A_kᵀ per tile (reads x once, rows gathered
  through the order: each row is contiguous, so the loads stay 16 bytes wide), storing the
  keep mask bit-packed by sorted position; `_multi_lora_expand_kernel` C = s_k·xa·B_kᵀ + b for
  every row (the −1 rows get b alone: C needs no zero-fill).
- Backward: `_multi_lora_backward_g_kernel` g = dY·B_k per tile (reads dY once);
  `_multi_lora_dx_term_kernel` C = s_k/(1−p_k)·(g·A_k)⊙keep for every row (then cuBLAS adds
  dY·W); `_multi_lora_backward_rank_kernel` dA_k = s_k/(1−p_k)·gᵀ·(x⊙keep) and
  dB_k = s_k·dYᵀ·xa, each program owning BLOCK_C columns of one adapter's gradient and summing
  that adapter's rows in order: deterministic, no atomics, no partials, written final in the
  factors' dtype (reads x and dY once more, 128 MiB ≈ 30 µs). An adapter without rows gets
  exact zeros (its programs sum nothing).
- The LoRA work is one adapter's per row: no pass over all of x per adapter; the factors are
  re-read per tile from L2 (M/64 tiles × r·(in + out)·2 bytes ≈ 32 MiB of L2 traffic).
- Dropout: row m of adapter k keeps element (m, c) by the package's Philox mask
  (``dropout.keep_tile``) with adapter k's seed and m's position inside its segment as the row:
  exactly the mask ``lora_linear``'s kernels draw for that seed over the adapter's rows alone.
- Offsets along rows are int64 (positions and row indices come from int64 tensors); fp32
  accumulation throughout; xa and g stay fp32, rounded to the compute dtype only as tensor-core
  operands (or kept fp32: RANK_FP32, fp32 adapters on a half-precision x).
- Tiles are fixed per compute family (the tile map is built before the launch, so BLOCK_M cannot
  be autotuned). Read from the sm_90a / sm_80 builds (`peft-ops aot --only multi_lora`): every
  main-loop load of x, dY and the factors is a 16-byte ``cp.async`` when ranks and features are
  multiples of 8 (ALIGNED), under Triton 3.6 as under 3.9. Unaligned, the factor rows'
  alignment is unknown and those loads go one element at a time. (Under 3.6 they did so aligned
  too while the hint was a ``tl.multiple_of`` on the loaded offset, which 3.6 drops: 64
  synchronous 2-byte loads per step in the g kernel at r = 64, 16 in the shrink;
  `adapter_layout` now states it arithmetically.) The rank pass's fp32 xa / g rows load 4 bytes
  at a time, as in the LoRA rank kernel. 0 spills; 1 CTA per SM for the shrink (8 warps), 2 for
  the others in half precision, 3-4 in fp32; shrink BLOCK_K = 64 (128 spilled 600 bytes under
  dropout's Philox).

Static estimate (`peft_ops.tools.estimate`, H200, 8 adapters of r = 16 over M = 8192, 4096 → 4096):
forward 5 launches (table copy 2.5 µs, factors' cat 3.5, shrink 18, expand 31, cuBLAS 356),
backward 5 (cat 3.5, g 18, dX term 31, cuBLAS 356, rank pass 34): 854 µs, 1.119× one adapter's
fused LoRA over the same rows (763 µs). 8 adapters × 128 rows: 155 µs against 516 µs for 8
single-adapter calls (3.34×): the base weight is read once instead of 8 times. The shrink and
the two pieces run 8 warps in half precision: at 4 they spilled under triton 3.6 (48, 1516 and
2088 bytes on sm_90a; 0 under 3.9, where 4 warps estimate the expand 8 µs faster).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import KernelBuild, current_target, dot_flags, launch, launch_guard, mma
from .dropout import keep_from_bits, keep_tile, store_keep_bits
from .lora import block_r, keep_words

# The table: one row of ADAPTER_COLUMNS int64 per adapter, then one of TILE_COLUMNS per tile.
# Float columns hold a float64's bits (one table, one host-to-device copy per call).
ADAPTER_COLUMNS = 11
A_OFFSET, B_OFFSET, RANK, XA_OFFSET, SEGMENT_START, SEGMENT_END, SEED, SCALING, LORA_SCALE, DROPOUT_P, KEEP_SCALE = \
    range(ADAPTER_COLUMNS)
TILE_COLUMNS = 3  # adapter (−1: rows without one), first position, end position

# Fixed tiles (not autotuned: the tile map depends on BLOCK_M, and the table is built before
# the launch). Per compute family: "half" (bf16/fp16 rank operands), "fp32" (fp32 rank
# operands: tf32x3 splits each in two, so narrower tiles). BLOCK_M = the tile map's rows; the
# column tiles are multiples of 32 (one keep-mask word per 32 columns).
TILES = {
    "half": dict(BLOCK_M=64, SHRINK_K=64, G_N=128, PIECE_N=128, RANK_M=64, RANK_C=128,
                 SHRINK_WARPS=8, G_WARPS=4, PIECE_WARPS=8, RANK_WARPS=4),
    "fp32": dict(BLOCK_M=64, SHRINK_K=32, G_N=64, PIECE_N=64, RANK_M=32, RANK_C=64,
                 SHRINK_WARPS=4, G_WARPS=4, PIECE_WARPS=4, RANK_WARPS=4),
    # small tiles in the interpreter, so small test shapes still span several tiles per segment
    "interpreter": dict(BLOCK_M=16, SHRINK_K=32, G_N=32, PIECE_N=32, RANK_M=16, RANK_C=32,
                        SHRINK_WARPS=4, G_WARPS=4, PIECE_WARPS=4, RANK_WARPS=4),
}
NUM_STAGES = 3  # the rank pass
# The shrink's and g's loops stream x / dY: one stage more, so at small batches (few programs,
# each looping over all of K or N) a step waits a third of a memory latency, not half (static
# estimate, 8 adapters × 128 rows: shrink 25 → 18 µs, g 15 → 11 µs; M = 8192: shrink 25 → 18 µs)
STREAM_STAGES = 4
# Integer arguments the JIT must not specialize on (== 1, % 16): the table's tile offset, and the
# sizes only the static estimate's loop bounds read (a new batch size or adapter count would
# otherwise compile another variant).
UNSPECIALIZED = ["M", "ADAPTERS", "R_MAX", "TILES_AT"]
# For a static estimate (peft_ops.tools.estimate): the loops' bounds (read from the table at run
# time) for an even split of the rows: every adapter of rank R_MAX with M/ADAPTERS rows.
_RANK_LOOP = {"rank": "R_MAX"}
LOOP_BOUNDS = {"_multi_lora_shrink_kernel": {"k_stop": "K"}, "_multi_lora_backward_g_kernel": {"n_stop": "N"},
               "_multi_lora_expand_kernel": _RANK_LOOP, "_multi_lora_dx_term_kernel": _RANK_LOOP,
               "_multi_lora_backward_rank_kernel": {"seg_rows": "cdiv(M, ADAPTERS)"}}


@triton.jit
def adapter_int(TABLE, k, column):
    return tl.load(TABLE + k * 11 + column)  # 11 = ADAPTER_COLUMNS


@triton.jit
def adapter_layout(TABLE, k, column, ALIGNED: tl.constexpr):
    """A rank or flat offset of adapter k, declared a multiple of 8 elements when ALIGNED (every
    rank and both feature counts multiples of 8): rows of xa, g and the factors then start
    16-byte aligned, and their loads can be vector loads instead of one per element."""
    value = adapter_int(TABLE, k, column)
    if ALIGNED:
        # (v >> 3)·8, the identity on a multiple of 8, not tl.multiple_of: Triton 3.6 drops that
        # hint on a loaded scalar, and the factors' loads were then 2 bytes each, synchronous
        value = (value >> 3) * 8
    return value


@triton.jit
def adapter_float(TABLE, k, column):
    """A float column of adapter k: stored as a float64's bits, used in fp32 (as the LoRA kernels'
    float arguments)."""
    return tl.load(TABLE + k * 11 + column).to(tl.float64, bitcast=True).to(tl.float32)


@triton.jit
def tile_rows(TABLE, ORDER, TILES_AT, tile, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr):
    """(adapter k ≥ 0 — 0 for rows without one —, its rank — 0 for those —, the tile's positions
    in the order, their mask, the rows of x they are (int64), their index inside the segment)."""
    entry = TABLE + TILES_AT + tile * 3
    adapter = tl.load(entry)
    start = tl.load(entry + 1)
    end = tl.load(entry + 2)
    k = tl.maximum(adapter, 0)  # rows without an adapter read adapter 0's entries, with rank 0
    rank = tl.where(adapter >= 0, adapter_layout(TABLE, k, 2, ALIGNED), 0)  # 2 = RANK
    if ALIGNED:
        rank = tl.multiple_of(rank, 8)
    positions = start + tl.arange(0, BLOCK_M)
    p_mask = positions < end
    rows = tl.load(ORDER + positions, mask=p_mask, other=0)
    local = positions - adapter_int(TABLE, k, 4)  # 4 = SEGMENT_START (any count: no alignment hint)
    return k, rank, positions, p_mask, rows, local


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _multi_lora_shrink_kernel(
    X, ORDER, A, TABLE, XA, KEEP, M, K, ADAPTERS, R_MAX, TILES_AT, stride_xm, stride_xk,
    HAS_DROPOUT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_R: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr,
    RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """XA_k[local rows, R-chunk] (fp32) = drop_k(X[rows])·A_kᵀ, one program per (tile with an
    adapter, rank chunk); the first chunk's programs store the keep mask bit-packed by position."""
    k, rank, positions, p_mask, rows, local = tile_rows(TABLE, ORDER, TILES_AT, tl.program_id(0), ALIGNED, BLOCK_M)
    pid_r = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    a_base = A + adapter_layout(TABLE, k, 0, ALIGNED)  # 0 = A_OFFSET: A_k [rank, K] row-major
    seed = adapter_int(TABLE, k, 6)  # 6 = SEED
    dropout_p = adapter_float(TABLE, k, 9)  # 9 = DROPOUT_P
    rank_dtype = tl.float32 if RANK_FP32 else X.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    # pointers advanced each step (not rebuilt from k0): the compiler then keeps x's rows
    # contiguous and 16-byte aligned along K, so the loads stay vectorized
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    a_ptrs = a_base + offs_r[None, :].to(tl.int64) * K + offs_k[:, None]
    x_step = BLOCK_K * tl.cast(stride_xk, tl.int64)
    k_stop = tl.where(pid_r * BLOCK_R < rank, K, 0)  # a chunk past this adapter's rank reads nothing
    for k0 in range(0, k_stop, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=p_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            if dropout_p > 0:
                keep = keep_tile(seed=seed, rows=local, k0=k0, n_cols=K, dropout_p=dropout_p, BLOCK_M=BLOCK_M,
                                 BLOCK_K=BLOCK_K)
                x = tl.where(keep, x, 0.0)  # zeroing is exact; 1/(1-p) scales the fp32 sum
                if pid_r == 0:
                    store_keep_bits(KEEP=KEEP, keep=keep & k_mask[None, :], rows=positions, row_mask=p_mask, k0=k0,
                                    n_cols=K, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
        a = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = mma(x.to(rank_dtype), a.to(rank_dtype), acc, WIDEN_BF16_DOT, DOT_PRECISION)
        x_ptrs += x_step
        a_ptrs += BLOCK_K
    acc = acc * adapter_float(TABLE, k, 10)  # 10 = KEEP_SCALE, 1/(1 − p_k)
    xa_base = XA + adapter_layout(TABLE, k, 3, ALIGNED)  # 3 = XA_OFFSET: xa_k [n_k, rank] row-major
    tl.store(xa_base + local[:, None] * rank + offs_r[None, :], acc, mask=p_mask[:, None] & r_mask[None, :])


@triton.jit
def rank_product(LEFT, RIGHT, k, rank, local, p_mask, cols, stride_right_c, stride_right_r, left_scale, TABLE,
                 ALIGNED: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """left_scale·LEFT_k[local]·RIGHT_k[:, cols] as a fresh fp32 [BLOCK_M, BLOCK_N] tile: LEFT_k the
    adapter's fp32 [n_k, rank] rows (xa or g, at its XA_OFFSET), RIGHT_k its factor through the
    strides (Bᵀ for the expand, A for the dX term). Zero for rank 0 (rows without an adapter).
    The scale folds into the fp32 left operand before its one rounding to the compute dtype."""
    rank_dtype = RIGHT.dtype.element_ty
    left_base = LEFT + adapter_layout(TABLE, k, 3, ALIGNED)  # 3 = XA_OFFSET
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r_mask = (r0 + offs_r) < rank
        left = tl.load(left_base + local[:, None] * rank + (r0 + offs_r)[None, :],
                       mask=p_mask[:, None] & r_mask[None, :], other=0.0)
        right = tl.load(RIGHT + cols[None, :] * stride_right_c + (r0 + offs_r)[:, None].to(tl.int64) * stride_right_r,
                        mask=r_mask[:, None], other=0.0)
        acc = mma((left * left_scale).to(rank_dtype), right.to(rank_dtype), acc, WIDEN_BF16_DOT, DOT_PRECISION)
    return acc


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _multi_lora_expand_kernel(
    XA, B, BIAS, TABLE, ORDER, C, M, N, ADAPTERS, R_MAX, TILES_AT, stride_bias,
    HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_R: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr,
    RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """C[rows, cols] = s_k·xa_k·B_kᵀ + BIAS in C's dtype for every tile (rows without an adapter:
    BIAS, or 0): addmm's C, to which cuBLAS adds x·Wᵀ. Memory-bound: writes M×N once."""
    k, rank, positions, p_mask, rows, local = tile_rows(TABLE, ORDER, TILES_AT, tl.program_id(0), ALIGNED, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (offs_n % N).to(tl.int64)  # in range for the loads; the store masks offs_n ≥ N
    # B_k [N, rank] row-major at its B_OFFSET: Bᵀ's column c is row c of B_k
    acc = rank_product(LEFT=XA, RIGHT=B + adapter_layout(TABLE, k, 1, ALIGNED), k=k, rank=rank, local=local,
                       p_mask=p_mask, cols=cols, stride_right_c=rank, stride_right_r=1,
                       left_scale=adapter_float(TABLE, k, 7), TABLE=TABLE, ALIGNED=ALIGNED,
                       WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION, BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M,
                       BLOCK_N=BLOCK_N)  # 1 = B_OFFSET, 7 = SCALING
    if HAS_BIAS:
        acc += tl.load(BIAS + cols * stride_bias).to(tl.float32)[None, :]
    tl.store(C + rows[:, None] * N + offs_n[None, :], acc.to(C.dtype.element_ty),
             mask=p_mask[:, None] & (offs_n < N)[None, :])


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _multi_lora_backward_g_kernel(
    DY, ORDER, B, TABLE, G, M, N, ADAPTERS, R_MAX, TILES_AT, stride_dym, stride_dyn,
    ALIGNED: tl.constexpr, BLOCK_R: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """G_k[local rows, R-chunk] (fp32) = dY[rows]·B_k, one program per (tile with an adapter,
    rank chunk): one read of dY."""
    k, rank, positions, p_mask, rows, local = tile_rows(TABLE, ORDER, TILES_AT, tl.program_id(0), ALIGNED, BLOCK_M)
    pid_r = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_n = tl.arange(0, BLOCK_N)
    b_base = B + adapter_layout(TABLE, k, 1, ALIGNED)  # 1 = B_OFFSET: B_k [N, rank] row-major
    rank_dtype = tl.float32 if RANK_FP32 else DY.dtype.element_ty
    g = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    # pointers advanced each step, as in the shrink (vectorized loads of dY's rows)
    dy_ptrs = DY + rows[:, None] * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn
    b_ptrs = b_base + offs_n[:, None].to(tl.int64) * rank + offs_r[None, :]
    dy_step = BLOCK_N * tl.cast(stride_dyn, tl.int64)
    n_stop = tl.where(pid_r * BLOCK_R < rank, N, 0)  # a chunk past this adapter's rank reads nothing
    for n0 in range(0, n_stop, BLOCK_N):
        n_mask = (n0 + offs_n) < N
        dy = tl.load(dy_ptrs, mask=p_mask[:, None] & n_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        g = mma(dy.to(rank_dtype), b.to(rank_dtype), g, WIDEN_BF16_DOT, DOT_PRECISION)
        dy_ptrs += dy_step
        b_ptrs += BLOCK_N * rank
    g_base = G + adapter_layout(TABLE, k, 3, ALIGNED)  # 3 = XA_OFFSET (g has xa's layout)
    tl.store(g_base + local[:, None] * rank + offs_r[None, :], g, mask=p_mask[:, None] & r_mask[None, :])


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _multi_lora_dx_term_kernel(
    G, A, KEEP, TABLE, ORDER, C, M, K, ADAPTERS, R_MAX, TILES_AT,
    HAS_DROPOUT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_R: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr,
    RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """C[rows, cols] = s_k/(1−p_k)·(g_k·A_k)⊙keep in C's dtype for every tile (rows without an
    adapter: 0): addmm's C, to which cuBLAS adds dY·W. BLOCK_N: the tile's columns (of K)."""
    k, rank, positions, p_mask, rows, local = tile_rows(TABLE, ORDER, TILES_AT, tl.program_id(0), ALIGNED, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_N
    offs_k = k0 + tl.arange(0, BLOCK_N)
    acc = rank_product(LEFT=G, RIGHT=A + adapter_layout(TABLE, k, 0, ALIGNED), k=k, rank=rank, local=local,
                       p_mask=p_mask, cols=(offs_k % K).to(tl.int64), stride_right_c=1, stride_right_r=K,
                       left_scale=adapter_float(TABLE, k, 8), TABLE=TABLE, ALIGNED=ALIGNED,
                       WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION, BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M,
                       BLOCK_N=BLOCK_N)  # 0 = A_OFFSET, 8 = LORA_SCALE
    if HAS_DROPOUT:
        # rows with an adapter whose DROPOUT_P (9) > 0 have mask bits; other rows' words were never written
        if (rank > 0) & (adapter_float(TABLE, k, 9) > 0):
            keep = keep_from_bits(KEEP=KEEP, rows=positions, row_mask=p_mask, k0=k0, n_cols=K, BLOCK_M=BLOCK_M,
                                  BLOCK_K=BLOCK_N)
            acc = tl.where(keep, acc, 0.0)
    tl.store(C + rows[:, None] * K + offs_k[None, :], acc.to(C.dtype.element_ty),
             mask=p_mask[:, None] & (offs_k < K)[None, :])


@triton.jit(do_not_specialize=UNSPECIALIZED)
def _multi_lora_backward_rank_kernel(
    X, DY, ORDER, KEEP, G, XA, TABLE, DA, DB, M, N, K, ADAPTERS, R_MAX,
    stride_xm, stride_xk, stride_dym, stride_dyn,
    COMPUTE_DA: tl.constexpr, COMPUTE_DB: tl.constexpr, HAS_DROPOUT: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The reductions over each adapter's rows, one program per (adapter, column block of one
    gradient, rank chunk), summing the adapter's rows in order (deterministic: no partials, no
    atomics) and writing its block final, scaled, in the factors' dtype:

        blocks [0, ⌈K/BLOCK_C⌉) if COMPUTE_DA:  dA_k  = s_k/(1−p_k)·g_kᵀ·(x⊙keep)   (x rows gathered)
        the next ⌈N/BLOCK_C⌉ if COMPUTE_DB:     dB_kᵀ = s_k·xa_kᵀ·dY                 (dY rows gathered)

    so one loop serves both (operands picked per program; dB stored transposed)."""
    a_blocks = tl.cdiv(K, BLOCK_C) if COMPUTE_DA else 0
    b_blocks = tl.cdiv(N, BLOCK_C) if COMPUTE_DB else 0
    pid = tl.program_id(0)
    k = pid // (a_blocks + b_blocks)
    item = pid % (a_blocks + b_blocks)
    is_a = item < a_blocks
    cols = (tl.where(is_a, item, item - a_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_mask = cols < tl.where(is_a, K, N)
    rank = adapter_layout(TABLE, k, 2, ALIGNED)  # 2 = RANK
    seg_start = adapter_int(TABLE, k, 4)  # 4 = SEGMENT_START (any count: no alignment hint)
    seg_end = adapter_int(TABLE, k, 5)  # 5 = SEGMENT_END
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_p = tl.arange(0, BLOCK_M)
    # this program's operands: L = the adapter's g or xa rows (fp32, by local row); V = x or dY rows
    L = tl.where(is_a, G, XA) + adapter_layout(TABLE, k, 3, ALIGNED)  # 3 = XA_OFFSET
    V = tl.where(is_a, X, DY)
    stride_vm = tl.where(is_a, stride_xm, stride_dym).to(tl.int64)
    stride_vc = tl.where(is_a, stride_xk, stride_dyn).to(tl.int64)
    # x is dropped where the forward dropped it (the adapter's mask bits); dY is not
    masked_stop = tl.where(is_a & (adapter_float(TABLE, k, 9) > 0), seg_end, seg_start)  # 9 = DROPOUT_P
    rank_dtype = tl.float32 if RANK_FP32 else X.dtype.element_ty
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    seg_rows = tl.where(tl.program_id(1) * BLOCK_R < rank, seg_end - seg_start, 0)  # a chunk past the rank: none
    for local0 in range(0, seg_rows, BLOCK_M):  # from 0 by BLOCK_M: the compiler sees L's rows aligned
        local = local0 + offs_p
        positions = seg_start + local
        p_mask = positions < seg_end
        rows = tl.load(ORDER + positions, mask=p_mask, other=0)
        # rows past the segment load as zero in both operands: they add nothing to the sums
        v = tl.load(V + rows[:, None] * stride_vm + cols[None, :] * stride_vc, mask=p_mask[:, None] & c_mask[None, :],
                    other=0.0)
        if HAS_DROPOUT:
            # (tensor comparisons, not a scalar in the mask: the interpreter refuses one)
            masked = positions < masked_stop
            keep = keep_from_bits(KEEP=KEEP, rows=positions, row_mask=masked, k0=item * BLOCK_C, n_cols=K,
                                  BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_C)
            v = tl.where(keep | (~masked)[:, None], v, 0.0)
        left = tl.load(L + local[:, None] * rank + offs_r[None, :], mask=p_mask[:, None] & r_mask[None, :], other=0.0)
        acc = mma(tl.trans(left.to(rank_dtype)), v.to(rank_dtype), acc, WIDEN_BF16_DOT, DOT_PRECISION)
    if is_a:
        da = acc * adapter_float(TABLE, k, 8)  # 8 = LORA_SCALE
        tl.store(DA + adapter_layout(TABLE, k, 0, ALIGNED) + offs_r[:, None].to(tl.int64) * K + cols[None, :],
                 da.to(DA.dtype.element_ty), mask=r_mask[:, None] & c_mask[None, :])  # 0 = A_OFFSET
    else:
        db = acc * adapter_float(TABLE, k, 7)  # 7 = SCALING
        tl.store(DB + adapter_layout(TABLE, k, 1, ALIGNED) + cols[None, :] * rank + offs_r[:, None],
                 db.to(DB.dtype.element_ty), mask=r_mask[:, None] & c_mask[None, :])  # 1 = B_OFFSET


# --------------------------------------------------------------------------------------
# Launchers. Inputs are validated by peft_ops.ops.multi_lora; these only shape, allocate and launch.
# --------------------------------------------------------------------------------------

def tiles_for(family: str) -> dict:
    """The fixed tiles of the launch at hand (this process's, or a launch plan's GPU) for a compute
    family ("half" or "fp32")."""
    return TILES["interpreter" if current_target() == "interpreter" else family]


class GroupPlan:
    """What every launch of one call shares: the table (on the device), the tile counts, the
    flat layouts' sizes and the constexprs.

    order: the rows sorted by adapter (int64 [M]), on `device` or on the CPU (then it travels in
    the table's one copy; ``self.order`` is its view there); offsets: K + 1 positions (adapter
    k's rows are order[offsets[k]:offsets[k + 1]], the rows without an adapter
    order[:offsets[0]]); ranks, seeds, scalings, dropout_ps: per adapter."""

    def __init__(self, order: torch.Tensor, offsets, ranks, seeds, scalings, dropout_ps, in_features: int,
                 out_features: int, dtype: torch.dtype, factor_dtype: torch.dtype, device):
        count = len(ranks)
        self.adapters, self.in_features, self.out_features = count, in_features, out_features
        self.r_max = max(ranks)
        self.flags = {**dot_flags(dtype, factor_dtype),
                      "BLOCK_R": block_r(self.r_max, factor_dtype == torch.float32 or dtype == torch.float32),
                      # every flat offset and row stride a multiple of 8 elements (see adapter_layout)
                      "ALIGNED": all(r % 8 == 0 for r in ranks) and in_features % 8 == 0 and out_features % 8 == 0}
        self.tiles = tiles_for("fp32" if factor_dtype == torch.float32 or dtype == torch.float32 else "half")
        block_m = self.tiles["BLOCK_M"]
        rows, floats, tiles = [], [], []
        a_offset = b_offset = xa_offset = 0
        for k in range(count):
            start, end = offsets[k], offsets[k + 1]
            p = float(dropout_ps[k])
            rows.append([a_offset, b_offset, ranks[k], xa_offset, start, end, seeds[k]])
            floats.append([float(scalings[k]), scalings[k] / (1.0 - p), p, 1.0 / (1.0 - p)])
            tiles += [[k, s, min(s + block_m, end)] for s in range(start, end, block_m)]
            a_offset += ranks[k] * in_features
            b_offset += ranks[k] * out_features
            xa_offset += (end - start) * ranks[k]
        self.lora_tiles = len(tiles)  # the tiles with an adapter come first: the rank kernels' grid
        tiles += [[-1, s, min(s + block_m, offsets[0])] for s in range(0, offsets[0], block_m)]
        self.all_tiles = len(tiles)
        self.xa_numel, self.a_numel, self.b_numel = xa_offset, a_offset, b_offset
        self.rows = offsets[-1]
        adapters = torch.cat([torch.tensor(rows, dtype=torch.int64),
                              torch.tensor(floats, dtype=torch.float64).view(torch.int64)], dim=1)
        self.tiles_at = count * ADAPTER_COLUMNS
        parts = [adapters.reshape(-1), torch.tensor(tiles, dtype=torch.int64).reshape(-1)]
        order_here = order.device.type != "cpu" or torch.device(device).type == "cpu"  # ids on x's device or the CPU
        table = torch.cat(parts if order_here else parts + [order.reshape(-1).to(torch.int64)])
        self.table = table.to(device, non_blocking=True)
        self.order = order if order_here else self.table[table.numel() - order.numel():]
        self.has_dropout = any(p > 0 for p in dropout_ps)
        self.rank_chunks = triton.cdiv(self.r_max, self.flags["BLOCK_R"])


def forward(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
            bias: torch.Tensor | None, plan: GroupPlan):
    """(y, xa, keep): y = x·weightᵀ + bias + each row's LoRA term [M, N] in x's dtype; xa the
    adapters' x·A_kᵀ flat (fp32, [n_k, r_k] per adapter); keep the bit-packed dropout mask by
    sorted position ([M, ⌈K/32⌉] int32), or None without dropout. x [M, K] any strides; weight
    [N, K] dense; lora_A / lora_B the factors flat; the rows' order is the plan's."""
    M, K = x.shape
    order = plan.order
    N = plan.out_features
    tiles = plan.tiles
    xa = torch.empty(max(plan.xa_numel, 1), device=x.device, dtype=torch.float32)  # ≥ 1: a pointer even when empty
    keep = torch.empty((M, keep_words(K)), device=x.device, dtype=torch.int32) if plan.has_dropout else None
    c = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return c.addmm_(x, weight.t()), xa, keep
    with launch_guard(x, weight, lora_A, lora_B):
        if plan.lora_tiles:
            launch(_multi_lora_shrink_kernel, (plan.lora_tiles, plan.rank_chunks),
                x, order, lora_A, plan.table, xa, keep if keep is not None else xa, M, K, plan.adapters, plan.r_max,
                plan.tiles_at, x.stride(0), x.stride(1), HAS_DROPOUT=plan.has_dropout, **plan.flags,
                BLOCK_M=tiles["BLOCK_M"], BLOCK_K=tiles["SHRINK_K"], num_warps=tiles["SHRINK_WARPS"],
                num_stages=STREAM_STAGES)
        launch(_multi_lora_expand_kernel, (plan.all_tiles, triton.cdiv(N, tiles["PIECE_N"])),
            xa, lora_B, bias if bias is not None else c, plan.table, order, c, M, N, plan.adapters, plan.r_max,
            plan.tiles_at, bias.stride(0) if bias is not None else 0, HAS_BIAS=bias is not None, **plan.flags,
            BLOCK_M=tiles["BLOCK_M"], BLOCK_N=tiles["PIECE_N"], num_warps=tiles["PIECE_WARPS"], num_stages=2)
        # cuBLAS (torch's matmul elsewhere) adds the base product in place: y = x·Wᵀ + C
        return c.addmm_(x, weight.t()), xa, keep


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, order: torch.Tensor,
             lora_A: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor, keep: torch.Tensor | None, plan: GroupPlan,
             need_dx: bool, need_dA: bool, need_dB: bool):
    """(dx [M, K] in x's dtype, dA flat, dB flat in the factors' dtype), None where not needed
    (`weight` may be None when dx is not):

        dX    = dY·W + s_k/(1−p_k)·(g_k·A_k)⊙keep on adapter k's rows,  g_k = dY_k·B_k
        dA_k  = s_k/(1−p_k)·g_kᵀ·(x_k⊙keep),   dB_k = s_k·dY_kᵀ·xa_k   (zeros for an adapter without rows)
    """
    M, N = dy.shape
    K = x.shape[1]
    tiles = plan.tiles
    device = dy.device
    alloc = torch.zeros if M == 0 else torch.empty  # no rows: sums over nothing
    dx = torch.empty((M, K), device=device, dtype=x.dtype) if need_dx else None
    dA = alloc(plan.a_numel, device=device, dtype=lora_A.dtype) if need_dA else None
    dB = alloc(plan.b_numel, device=device, dtype=lora_B.dtype) if need_dB else None
    if M == 0:
        return (dx.zero_() if dx is not None else None), dA, dB
    with launch_guard(dy, x, lora_A, lora_B, *(() if weight is None else (weight,))):
        g = None
        if (need_dx or need_dA) and plan.lora_tiles:
            g = torch.empty(max(plan.xa_numel, 1), device=device, dtype=torch.float32)
            launch(_multi_lora_backward_g_kernel, (plan.lora_tiles, plan.rank_chunks),
                dy, order, lora_B, plan.table, g, M, N, plan.adapters, plan.r_max, plan.tiles_at, dy.stride(0),
                dy.stride(1), **plan.flags, BLOCK_M=tiles["BLOCK_M"], BLOCK_N=tiles["G_N"],
                num_warps=tiles["G_WARPS"], num_stages=STREAM_STAGES)
        if need_dx:
            launch(_multi_lora_dx_term_kernel, (plan.all_tiles, triton.cdiv(K, tiles["PIECE_N"])),
                g if g is not None else xa, lora_A, keep if keep is not None else xa, plan.table, order, dx, M, K,
                plan.adapters, plan.r_max, plan.tiles_at, HAS_DROPOUT=keep is not None, **plan.flags,
                BLOCK_M=tiles["BLOCK_M"], BLOCK_N=tiles["PIECE_N"], num_warps=tiles["PIECE_WARPS"], num_stages=2)
            dx.addmm_(dy, weight)  # cuBLAS adds the base product in place: dX = dY·W + C
        if need_dA or need_dB:
            blocks = triton.cdiv(K, tiles["RANK_C"]) * need_dA + triton.cdiv(N, tiles["RANK_C"]) * need_dB
            launch(_multi_lora_backward_rank_kernel, (plan.adapters * blocks, plan.rank_chunks),
                x, dy, order, keep if keep is not None else xa, g if g is not None else xa, xa, plan.table,
                dA if dA is not None else xa, dB if dB is not None else xa, M, N, K, plan.adapters, plan.r_max,
                x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), COMPUTE_DA=need_dA, COMPUTE_DB=need_dB,
                HAS_DROPOUT=keep is not None, **plan.flags, BLOCK_M=tiles["RANK_M"], BLOCK_C=tiles["RANK_C"],
                num_warps=tiles["RANK_WARPS"], num_stages=NUM_STAGES)
    return dx, dA, dB


# What the aot builds cover: each kernel in the variants that differ in registers.
AOT_VARIANTS = {
    "bf16": dict(dtype="bf16", rank_dtype="bf16", family="half"),
    "bf16+fp32 A,B": dict(dtype="bf16", rank_dtype="fp32", family="fp32"),
}


def aot_specs(target: str) -> list:
    """Every kernel of this file at its fixed tiles, in each of AOT_VARIANTS, at its heaviest
    settings (dropout, bias, both gradients; r ≤ 64: one rank chunk in half precision)."""
    plain = ("M", "ADAPTERS", "R_MAX", "TILES_AT")
    specs = []
    for variant, v in AOT_VARIANTS.items():
        dt, rt, tiles = v["dtype"], v["rank_dtype"], TILES[v["family"]]
        fp32_rank = rt == "fp32"
        common = dict(BLOCK_R=block_r(64, fp32_rank), WIDEN_BF16_DOT=False, RANK_FP32=fp32_rank, ALIGNED=True,
                      DOT_PRECISION="tf32x3", BLOCK_M=tiles["BLOCK_M"])

        def config(warps_key, stages=NUM_STAGES):
            return triton.Config({}, num_warps=tiles[warps_key], num_stages=stages)

        def build(name, kernel, cfg, pointers, constexprs, **kw):
            # ALIGNED: every main-loop load is a vector (Triton 3.6 once made the factors' 2-byte loads)
            specs.append(KernelBuild(f"{name} [{variant}]", kernel, cfg, {**pointers, "TABLE": "i64", "ORDER": "i64"},
                                     {**common, **constexprs}, plain_ints=plain, vector_loads=True, **kw))

        build("multi_lora_shrink", _multi_lora_shrink_kernel, config("SHRINK_WARPS", STREAM_STAGES),
              dict(X=dt, A=rt, XA="fp32", KEEP="i32"), dict(HAS_DROPOUT=True, BLOCK_K=tiles["SHRINK_K"]),
              unit_strides=("stride_xk",))
        build("multi_lora_expand", _multi_lora_expand_kernel, config("PIECE_WARPS", 2),
              dict(XA="fp32", B=rt, BIAS=dt, C=dt), dict(HAS_BIAS=True, BLOCK_N=tiles["PIECE_N"]),
              unit_strides=("stride_bias",))
        build("multi_lora_backward_g", _multi_lora_backward_g_kernel, config("G_WARPS", STREAM_STAGES),
              dict(DY=dt, B=rt, G="fp32"), dict(BLOCK_N=tiles["G_N"]), unit_strides=("stride_dyn",))
        build("multi_lora_dx_term", _multi_lora_dx_term_kernel, config("PIECE_WARPS", 2),
              dict(G="fp32", A=rt, KEEP="i32", C=dt), dict(HAS_DROPOUT=True, BLOCK_N=tiles["PIECE_N"]))
        build("multi_lora_backward_rank", _multi_lora_backward_rank_kernel, config("RANK_WARPS"),
              dict(X=dt, DY=dt, KEEP="i32", G="fp32", XA="fp32", DA=rt, DB=rt),
              dict(COMPUTE_DA=True, COMPUTE_DB=True, HAS_DROPOUT=True, BLOCK_M=tiles["RANK_M"],
                   BLOCK_C=tiles["RANK_C"]), unit_strides=("stride_xk", "stride_dyn"))
    return specs

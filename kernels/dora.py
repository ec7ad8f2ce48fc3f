"""DoRA kernels and their launchers: the column norm ‖W + s·B·A‖ without materializing
W + s·B·A, and the backward's pass over dY. The GEMMs are the LoRA kernels' (``lora.forward``
with the DoRA scale in its epilogue, ``lora.backward`` on the scaled dY).

    y = m ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) / ‖W + s·B·A‖ + b       (per output column n; no dropout)

The norm, per output row n of W [N, K] (detached from the graph, as in the paper §4.3 and PEFT):

    ‖W_n + s·B_n·A‖² = ‖W_n‖² + 2s·B_n·(A·W_nᵀ) + s²·B_n·(A·Aᵀ)·B_nᵀ

‖W_n‖² is the frozen weight's (cached by the caller: the layers compute it once), A·Wᵀ [r, N]
a skinny product (one pass over W; for NF4 the decode GEMV's), A·Aᵀ [r, r]. PEFT builds
W + s·B·A (N·K elements, upcast to the adapters' dtype) at every step instead.

Cost model (bf16, M = 8192, K = N = 4096, r = 16, H200: 4.8 TB/s), against LoRA's ≈ 763 µs
fwd+bwd (static estimate):

- Norm: one read of W (32 MiB ≈ 7 µs), split-K over ≥ 2 programs per SM; the last program of
  each column tile sums the slices in a fixed order and finishes the norm (one launch).
- Forward: the LoRA GEMM's epilogue writes pre = x·Wᵀ + s·xa·Bᵀ (the pre-scale output) and
  y = (m/‖·‖)·pre + b: one more M×N write (64 MiB ≈ 14 µs).
- Backward: d(magnitude)_n = Σ_m dY·pre / ‖·‖_n needs pre per element. Recomputing it costs a
  GEMM (2·M·N·K = 275 GFLOP ≈ 300 µs); keeping it costs one [M, N] tensor in x's dtype and its
  write + read (≈ 28 µs): kept, for every K ≥ 64 (where the GEMM's K-fold reuse outweighs two
  passes over M×N). `_dora_backward_dy_kernel` reads dY and pre once, writes dY·(m/‖·‖) (the
  dY the LoRA backward then takes: dX = dY'·W + s·(g·A), g = dY'·B, dB = s·dY'ᵀ·xa; with fp32
  adapters g = dY·(c⊙B) and dB = c⊙(s·dYᵀ·xa) from the unrounded dY instead) and sums
  d(magnitude) and db over the rows in a fixed order: 3 × 64 MiB ≈ 42 µs. Estimated DoRA
  fwd+bwd ≈ 763 + 7 + 14 + 42 ≈ 826 µs ≈ 1.08× LoRA (target ≤ 1.15×).
- Dropout (training with p > 0): PEFT's DoRA takes its base term on the dropped-out input,
  y = x·Wᵀ + b + (m/‖·‖ − 1)·(drop(x)·Wᵀ) + (m/‖·‖)·s·(drop(x)·Aᵀ)·Bᵀ, which needs the base GEMM
  twice, forward and backward. The fused kernels take drop(x) and the second product
  ((x − drop(x))·Wᵀ forward, ((dY − dY')·W)⊙(1 − keep/(1−p)) in dX) runs as a plain
  half-precision GEMM; `_dora_dropout_split_kernel` and `_dora_dropout_dx_kernel` are the
  elementwise glue around it (one pass each).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    KernelBuild,
    current_target,
    dot_flags,
    fixed_config,
    launch,
    launch_guard,
    mma,
    multiprocessor_count,
    split_k_total,
)
from .dropout import keep_from_bits

# (BLOCK_N, BLOCK_K, warps, stages) of the norm's pass over W per target and operand family
# ("half": bf16/fp16 A and W; "fp32": fp32 adapters, W widened in registers). Memory-bound:
# a 64-column tile is one 128-byte line per row of W's bf16 tile; fp32 operands take 32-wide
# K steps (tf32x3 splits each operand in two: 128 spilled).
NORM_TILES = {"sm80": {"half": (64, 128, 4, 3), "fp32": (64, 32, 4, 3)},
              "sm90": {"half": (64, 128, 4, 4), "fp32": (64, 32, 4, 3)},
              "interpreter": {"half": (16, 32, 4, 1), "fp32": (16, 32, 4, 1)}}
# (BLOCK_M, BLOCK_N, warps, stages) of the dY pass: 64 bf16 columns = one 128-byte line per row.
DY_TILES = {"sm80": (64, 64, 4, 3), "sm90": (64, 64, 4, 4), "interpreter": (16, 16, 4, 1)}
# (BLOCK_M, BLOCK_K, warps) of the dropout glue's elementwise passes: BLOCK_K a multiple of 32
# (whole words of the bit-packed keep mask), 128 bf16 columns = two 128-byte lines per row.
DROPOUT_TILES = {"sm80": (16, 128, 4), "sm90": (16, 128, 4), "interpreter": (16, 32, 4)}
MAX_SLICES = 16  # K (norm) or M (dY pass) slices per column tile: powers of two up to this
PROGRAMS_PER_SM = 2  # memory-bound passes: two resident programs per SM keep loads in flight


# For the static estimate: the loops' local bounds (program 0's slice: every slice but the last
# is as long), and the loop only the last program of a column tile runs (the quadratic term).
LOOP_BOUNDS = {
    "_dora_norm_kernel": {"k_start": "0", "k_end": "min(K, cdiv(cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K)"},
    "_dora_backward_dy_kernel": {"m_start": "0", "m_end": "min(M, rows_per_slice)"},
}
LOOP_SHARES = {"_dora_norm_kernel": {"for i in range(0, R):": "1 / SPLIT_K"}}


def rank_pad(r: int) -> int:
    """The rank as the norm kernel's tiles hold it: a power of two ≥ 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(r))


def norm_block_n(r: int, block_n: int) -> int:
    """Column tile of the norm kernel at rank r: the [r, BLOCK_N] fp32 product and B's tile
    beside it ≤ 16 registers a thread each at 4 warps (r ≤ 32: 64 columns; r = 64: 32; r ≥ 128: 16)."""
    return max(16, min(block_n, 2048 // rank_pad(r)))


def norm_block_k(r: int, block_k: int) -> int:
    """K step of the norm kernel at rank r: A's [r, BLOCK_K] tile (re-read by every program,
    from L2) stays ≤ 16 KiB a pipeline stage in bf16 (r = 256: 32 columns)."""
    return max(32, min(block_k, 8192 // rank_pad(r)))


def slices_for(tiles: int, length: int, block: int, device) -> int:
    """Slices of one reduction (K for the norm, M for the dY pass) per column tile: enough
    programs for PROGRAMS_PER_SM per SM, at least one `block` of `length` each; a power of two
    ≤ MAX_SLICES. In the interpreter (no SMs): 2 where the length allows, so tests run the
    in-kernel sum."""
    most = min(MAX_SLICES, triton.next_power_of_2(max(1, triton.cdiv(length, block))))
    sms = multiprocessor_count(device)
    want = 2 if sms is None else triton.next_power_of_2(max(1, triton.cdiv(PROGRAMS_PER_SM * sms, tiles)))
    s = min(want, most)
    while s > 1 and (s - 1) * triton.cdiv(triton.cdiv(length, s), block) * block >= length:
        s //= 2  # every slice gets rows: the last must start before the end
    return s


def _scratch(device, floats: int, counters: int, scratch):
    """(fp32 partials, zeroed int32 counters): `scratch(device, floats, counters)` (reusable,
    ``peft_ops.ops.workspace``) or fresh ones."""
    if scratch is not None:
        return scratch(device, floats, counters)
    return (torch.empty(floats, device=device, dtype=torch.float32),
            torch.zeros(counters, device=device, dtype=torch.int32))


@triton.jit
def _dora_norm_kernel(
    A, W, V, B, GRAM, WSQ, MAG, NORM, SCALE, PARTIALS, COUNTERS, N, K, R,
    stride_ar, stride_ak, stride_wn, stride_wk, stride_vr, stride_bn, stride_br, scaling,
    HAS_W: tl.constexpr, SPLIT_K: tl.constexpr, R_PAD: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """NORM[n] = ‖W_n + s·B_n·A‖ = √(WSQ[n] + 2s·B_n·V[:, n] + s²·B_n·GRAM·B_nᵀ) and
    SCALE[n] = MAG[n] / NORM[n], fp32. HAS_W: V = A·Wᵀ formed here, program (n, s) taking
    K-slice s of its column tile, the tile's last program summing the slices in order
    (`split_k_total`) and finishing; else V [R, N] (fp32) is given (the NF4 path's product)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (offs_n % N).to(tl.int64)  # wrapped onto valid columns for the loads; stores are masked
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    last = pid_s == 0
    if HAS_W:
        operand = A.dtype.element_ty  # fp32 adapters on a half-precision W: the product in fp32
        k_per_slice = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_start = pid_s * k_per_slice
        k_end = tl.minimum(k_start + k_per_slice, K)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([R_PAD, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < k_end
            a = tl.load(A + offs_r[:, None] * stride_ar + k[None, :].to(tl.int64) * stride_ak,
                        mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(W + cols[None, :] * stride_wn + k[:, None].to(tl.int64) * stride_wk,
                        mask=k_mask[:, None], other=0.0)
            acc = mma(a.to(operand), w.to(operand), acc, WIDEN_BF16_DOT, DOT_PRECISION)
        if SPLIT_K > 1:
            acc, last = split_k_total(acc, PARTIALS, COUNTERS, pid_n, pid_s, SPLIT_K, R_PAD, BLOCK_N)
    else:
        acc = tl.load(V + offs_r[:, None] * stride_vr + cols[None, :], mask=r_mask[:, None], other=0.0)
    if last:
        # b_t[j, n] = B[n, j]: the tile's rows of B, transposed to the layout of V
        b_t = tl.load(B + cols[None, :] * stride_bn + offs_r[:, None].to(tl.int64) * stride_br,
                      mask=r_mask[:, None], other=0.0).to(tl.float32)
        cross = tl.sum(b_t * acc, axis=0)
        if R_PAD <= 64:
            # B_n·GRAM·B_nᵀ as one [r, r] × [r, BLOCK_N] dot: GRAM loaded with B's tile (one
            # wait), fp32 operands at DOT_PRECISION (tf32x3: fp32-accurate)
            gram = tl.load(GRAM + offs_r[:, None] * R + offs_r[None, :], mask=r_mask[:, None] & r_mask[None, :],
                           other=0.0)
            quad = tl.sum(b_t * tl.dot(gram, b_t, input_precision=DOT_PRECISION), axis=0)
        else:
            # wider ranks: one row of GRAM at a time in fp32 FMAs (the whole [r, r] tile spills)
            quad = tl.zeros([BLOCK_N], dtype=tl.float32)
            for i in range(0, R):
                gram_row = tl.load(GRAM + i * R + offs_r, mask=r_mask, other=0.0)
                b_i = tl.load(B + cols * stride_bn + i * stride_br).to(tl.float32)
                quad += b_i * tl.sum(gram_row[:, None] * b_t, axis=0)
        square = tl.load(WSQ + cols) + 2.0 * scaling * cross + (scaling * scaling) * quad
        norm = tl.sqrt(tl.maximum(square, 0.0))  # ≥ 0 in exact math; rounding may not
        n_mask = offs_n < N
        tl.store(NORM + offs_n, norm, mask=n_mask)
        tl.store(SCALE + offs_n, tl.load(MAG + cols).to(tl.float32) / norm, mask=n_mask)


@triton.jit
def _dora_backward_dy_kernel(
    DY, PRE, SCALE, NORM, DYS, DMAG, DBIAS, PARTIALS, COUNTERS, M, N, rows_per_slice,
    stride_dym, stride_dyn,
    STORE_DYS: tl.constexpr, COMPUTE_DMAG: tl.constexpr, COMPUTE_DBIAS: tl.constexpr, SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """DYS = DY ⊙ SCALE[n] (DY's dtype), DMAG[n] = Σ_m DY·PRE / NORM[n] (fp32) and
    DBIAS[n] = Σ_m DY (DY's dtype): program (n, s) takes rows slice s of its column tile; the
    tile's last program sums the slices' partials in slice order (`split_k_total`)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    cols = (offs_n % N).to(tl.int64)
    scale = tl.load(SCALE + cols)
    dmag = tl.zeros([BLOCK_N], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
    m_start = pid_s * rows_per_slice
    m_end = tl.minimum(m_start + rows_per_slice, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < m_end)[:, None] & n_mask[None, :]
        rows = offs_m.to(tl.int64)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        if STORE_DYS:
            tl.store(DYS + rows[:, None] * N + offs_n[None, :], (dy * scale[None, :]).to(DYS.dtype.element_ty),
                     mask=mask)
        if COMPUTE_DMAG:
            pre = tl.load(PRE + rows[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
            dmag += tl.sum(dy * pre.to(tl.float32), axis=0)
        if COMPUTE_DBIAS:
            dbias += tl.sum(dy, axis=0)
    if COMPUTE_DMAG or COMPUTE_DBIAS:
        last = pid_s == 0
        if SLICES > 1:
            total, last = split_k_total(tl.join(dmag, dbias), PARTIALS, COUNTERS, pid_n, pid_s, SLICES, BLOCK_N, 2)
            dmag, dbias = tl.split(total)
        if last:
            if COMPUTE_DMAG:
                tl.store(DMAG + offs_n, dmag / tl.load(NORM + cols), mask=n_mask)
            if COMPUTE_DBIAS:
                tl.store(DBIAS + offs_n, dbias.to(DBIAS.dtype.element_ty), mask=n_mask)


@triton.jit
def _dora_dropout_split_kernel(X, KEEP, XD, REST, M, K, stride_xm, stride_xk, keep_scale,
                               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """XD = X⊙keep·keep_scale and REST = X − XD (from XD before its rounding), [M, K] in X's
    dtype, keep_scale = 1/(1-p), KEEP bit-packed: DoRA's base term under dropout takes XD through
    the fused GEMM and REST through the second product. One read of X, two writes."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = offs_m < M
    rows = offs_m.to(tl.int64)
    mask = row_mask[:, None] & (offs_k < K)[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk, mask=mask,
                other=0.0).to(tl.float32)
    keep = keep_from_bits(KEEP, rows, row_mask, tl.program_id(1) * BLOCK_K, K, BLOCK_M, BLOCK_K)
    dropped = tl.where(keep, x * keep_scale, 0.0)
    out = rows[:, None] * K + offs_k[None, :]
    tl.store(XD + out, dropped.to(XD.dtype.element_ty), mask=mask)
    tl.store(REST + out, (x - dropped).to(REST.dtype.element_ty), mask=mask)


@triton.jit
def _dora_dropout_dx_kernel(DX, CORRECTION, KEEP, OUT, M, K, kept_factor,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT = DX + CORRECTION ⊙ (1 − keep/(1-p)) in DX's dtype (kept_factor = −p/(1-p), dropped
    elements 1), all [M, K] contiguous: DoRA's dX under dropout from the LoRA backward's dX on
    dY' and CORRECTION = (dY − dY')·W. One fp32 sum, one rounding."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = offs_m < M
    rows = offs_m.to(tl.int64)
    mask = row_mask[:, None] & (offs_k < K)[None, :]
    offsets = rows[:, None] * K + offs_k[None, :]
    dx = tl.load(DX + offsets, mask=mask, other=0.0).to(tl.float32)
    correction = tl.load(CORRECTION + offsets, mask=mask, other=0.0).to(tl.float32)
    keep = keep_from_bits(KEEP, rows, row_mask, tl.program_id(1) * BLOCK_K, K, BLOCK_M, BLOCK_K)
    tl.store(OUT + offsets, (dx + correction * tl.where(keep, kept_factor, 1.0)).to(OUT.dtype.element_ty),
             mask=mask)


def _dropout_launch(kernel, M: int, K: int, *args) -> None:
    block_m, block_k, warps = DROPOUT_TILES[current_target()]
    launch(kernel, (triton.cdiv(M, block_m), triton.cdiv(K, block_k)), *args, BLOCK_M=block_m, BLOCK_K=block_k,
           num_warps=warps, num_stages=1)


def dropout_split(x: torch.Tensor, keep: torch.Tensor, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(xd, x − xd), [M, K] contiguous in x's dtype: xd = x⊙keep/(1-p) for the bit-packed keep
    mask [M, ⌈K/32⌉] int32 (the shrink's). One launch."""
    M, K = x.shape
    xd, rest = torch.empty((M, K), device=x.device, dtype=x.dtype), torch.empty((M, K), device=x.device, dtype=x.dtype)
    if M * K:
        with launch_guard(x, keep):
            _dropout_launch(_dora_dropout_split_kernel, M, K, x, keep, xd, rest, M, K, x.stride(0), x.stride(1),
                            1.0 / (1.0 - dropout_p))
    return xd, rest


def dropout_dx(dx: torch.Tensor, correction: torch.Tensor, keep: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """dx + correction ⊙ (1 − keep/(1-p)) in dx's dtype (a new tensor; dx and correction [M, K]
    contiguous, correction in any float dtype). One launch."""
    M, K = dx.shape
    out = torch.empty_like(dx)
    if M * K:
        with launch_guard(dx, correction, keep):
            _dropout_launch(_dora_dropout_dx_kernel, M, K, dx, correction.contiguous(), keep, out, M, K,
                            -dropout_p / (1.0 - dropout_p))
    return out


def weight_norm(lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                weight_sq_norm: torch.Tensor, *, weight: torch.Tensor | None = None,
                products: torch.Tensor | None = None, scratch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖W + s·B·A‖ per output row, magnitude / that norm), both fp32 [N], in one launch (plus
    the [r, r] product A·Aᵀ). Either `weight` [N, K] (A·Wᵀ formed in the kernel, W read once)
    or `products` = A·Wᵀ [r, N] fp32 (an NF4 weight's, from its decode GEMV). `weight_sq_norm`:
    ‖W_n‖² fp32 [N]. `scratch`: as ``nf4.split_k_scratch``'s."""
    if (weight is None) == (products is None):
        raise ValueError("weight_norm takes exactly one of weight and products")
    R, K = lora_A.shape
    N = lora_B.shape[0]
    device = lora_A.device
    norm = torch.empty(N, device=device, dtype=torch.float32)
    scale = torch.empty(N, device=device, dtype=torch.float32)
    a32 = lora_A.float()
    gram = torch.mm(a32, a32.t())  # [r, r]: r²·K FMAs, nothing next to the pass over W
    family = "fp32" if lora_A.dtype == torch.float32 else "half"
    block_n, block_k, warps, stages = NORM_TILES[current_target()][family]
    block_n, block_k = norm_block_n(R, block_n), norm_block_k(R, block_k)
    tiles = triton.cdiv(N, block_n)
    split = slices_for(tiles, K, block_k, device) if weight is not None else 1
    partials, counters = _scratch(device, split * tiles * rank_pad(R) * block_n if split > 1 else 1,
                                  tiles, scratch)
    flags = dot_flags(weight.dtype if weight is not None else lora_A.dtype, lora_A.dtype)
    source = weight if weight is not None else products
    with launch_guard(source, lora_A, lora_B, magnitude):
        launch(_dora_norm_kernel, (tiles, split),
               lora_A, weight if weight is not None else products, products if products is not None else a32,
               lora_B, gram, weight_sq_norm, magnitude, norm, scale, partials, counters, N, K, R,
               lora_A.stride(0), lora_A.stride(1),
               weight.stride(0) if weight is not None else 0, weight.stride(1) if weight is not None else 0,
               products.stride(0) if products is not None else 0, lora_B.stride(0), lora_B.stride(1),
               float(scaling), HAS_W=weight is not None, SPLIT_K=split, R_PAD=rank_pad(R),
               WIDEN_BF16_DOT=flags["WIDEN_BF16_DOT"], DOT_PRECISION=flags["DOT_PRECISION"],
               BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return norm, scale


def backward_dy(dy: torch.Tensor, pre: torch.Tensor | None, col_scale: torch.Tensor, norm: torch.Tensor,
                need_scaled: bool, need_dmag: bool, need_db: bool, *, scratch=None):
    """(dY ⊙ col_scale in dY's dtype, d(magnitude) = Σ_m dY·pre / norm in fp32, db = Σ_m dY in
    dY's dtype), each None where not needed: one launch, reading dY (and pre) once."""
    M, N = dy.shape
    device = dy.device
    dys = torch.empty((M, N), device=device, dtype=dy.dtype) if need_scaled else None
    dmag = torch.empty(N, device=device, dtype=torch.float32) if need_dmag else None
    db = torch.empty(N, device=device, dtype=dy.dtype) if need_db else None
    if M == 0:
        return dys, (dmag.zero_() if need_dmag else None), (db.zero_() if need_db else None)
    block_m, block_n, warps, stages = DY_TILES[current_target()]
    tiles = triton.cdiv(N, block_n)
    slices = slices_for(tiles, M, block_m, device) if (need_dmag or need_db) else 1
    rows_per_slice = triton.cdiv(triton.cdiv(M, slices), block_m) * block_m
    partials, counters = _scratch(device, slices * tiles * block_n * 2 if slices > 1 else 1, tiles, scratch)
    unused = col_scale  # any fp32 tensor, for pointers the constexprs switch off
    with launch_guard(dy, col_scale):
        launch(_dora_backward_dy_kernel, (tiles, slices),
               dy, pre if pre is not None else unused, col_scale, norm,
               dys if dys is not None else unused, dmag if dmag is not None else unused,
               db if db is not None else unused, partials, counters, M, N, rows_per_slice,
               dy.stride(0), dy.stride(1),
               STORE_DYS=need_scaled, COMPUTE_DMAG=need_dmag, COMPUTE_DBIAS=need_db, SLICES=slices,
               BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return dys, dmag, db


# The builds `peft-ops aot` proves spill-free: per operand dtype of W (and the adapters).
AOT_VARIANTS = {"bf16": ("bf16", "bf16"), "bf16/fp32 adapters": ("bf16", "fp32"), "fp32": ("fp32", "fp32")}


def aot_specs(target: str) -> list:
    specs = []
    for variant, (wt, at) in AOT_VARIANTS.items():
        block_n, block_k, warps, stages = NORM_TILES[target]["fp32" if at == "fp32" else "half"]
        for r in (16, 64, 256):
            specs.append(KernelBuild(
                f"dora_norm [{variant}, r {r}]", _dora_norm_kernel, fixed_config(warps, stages),
                dict(A=at, W=wt, V="fp32", B=at, GRAM="fp32", WSQ="fp32", MAG=at, NORM="fp32", SCALE="fp32",
                     PARTIALS="fp32", COUNTERS="i32"),
                dict(HAS_W=True, SPLIT_K=4, R_PAD=rank_pad(r), WIDEN_BF16_DOT=False, DOT_PRECISION="tf32x3",
                     BLOCK_N=norm_block_n(r, block_n), BLOCK_K=norm_block_k(r, block_k)),
                unit_strides=("stride_ak", "stride_wk", "stride_br"), float_args=("scaling",), plain_ints=("R",)))
    block_m, block_k, warps = DROPOUT_TILES[target]
    for dt in ("bf16", "fp32"):
        config = triton.Config(dict(BLOCK_M=block_m, BLOCK_K=block_k), num_warps=warps, num_stages=1)
        specs.append(KernelBuild(f"dora_dropout_split [{dt}]", _dora_dropout_split_kernel, config,
                                 dict(X=dt, KEEP="i32", XD=dt, REST=dt), {}, unit_strides=("stride_xk",),
                                 float_args=("keep_scale",), plain_ints=("M",), uses_tensor_cores=False))
        specs.append(KernelBuild(f"dora_dropout_dx [{dt}]", _dora_dropout_dx_kernel, config,
                                 dict(DX=dt, CORRECTION=dt, KEEP="i32", OUT=dt), {}, float_args=("kept_factor",),
                                 plain_ints=("M",), uses_tensor_cores=False))
    block_m, block_n, warps, stages = DY_TILES[target]
    for dt in ("bf16", "fp32"):
        specs.append(KernelBuild(
            f"dora_backward_dy [{dt}]", _dora_backward_dy_kernel, fixed_config(warps, stages),
            dict(DY=dt, PRE=dt, SCALE="fp32", NORM="fp32", DYS=dt, DMAG="fp32", DBIAS=dt, PARTIALS="fp32",
                 COUNTERS="i32"),
            dict(STORE_DYS=True, COMPUTE_DMAG=True, COMPUTE_DBIAS=True, SLICES=4, BLOCK_M=block_m,
                 BLOCK_N=block_n),
            unit_strides=("stride_dyn",), plain_ints=("M",), uses_tensor_cores=False))
    return specs

"""NF4 kernels: dequantize, and x·dequant(W)ᵀ with the LoRA term fused (QLoRA), forward and dX.

    y = x·dequant(W)ᵀ [+ s·xa·Bᵀ] + b        x [M, K], W [N, K] in NF4 (peft_ops.nf4), xa [M, r], B [N, r]

The format is bitsandbytes' (see ``peft_ops.nf4``, which owns it and hands its two code tables
to every launcher here as ``tables``): element f = n·K + k of the flattened W is
nibble (f odd: low, even: high) of byte f // 2, scaled by the fp32 absmax of block
f // blocksize, which is itself ``map[code8]·scale[block // 256] + offset`` with double
quantization. `nf4_tile` decodes any [rows × BLOCK_K] tile of W straight from those bytes.

Design, from a cost model (bf16, d = 4096, MLP 14336, H200: 4.8 TB/s, 989 TFLOP/s):

- Training-size M (> DECODE_MAX_M): `_nf4_matmul_kernel` is the GEMM of the LoRA forward with
  its W tile decoded in registers from the 4-bit bytes instead of loaded as bf16. Each W tile
  is decoded once per BLOCK_M rows of x, so the decode (a byte load, two 16-entry table
  lookups, the block scale, one multiply per weight) is amortized over 64-128 rows of
  tensor-core work, and W costs 0.5 byte per weight in HBM instead of 2. No dequantized W
  exists, in HBM or saved for backward. The alternative — dequantize W to a bf16 buffer
  (N·K·2 bytes written and read again: 2.5 B/weight extra) and run the dense GEMM — is
  what bitsandbytes does; which wins above some M is a GPU measurement
  (`peft-ops bench` times the fused op against dequantize + torch.matmul). Until one is
  recorded, the fused GEMM is the only path, and this comment is where the crossover goes.
- Decode-size M (1 … DECODE_MAX_M): the GEMM's tiles would leave most SMs idle (N/BLOCK_N
  programs) and the op is bound by reading W (4096 × 14336 × 0.5 B = 29 MB ≈ 6 µs). So
  `_nf4_gemv_kernel` splits K too (split-K): ⌈N/BLOCK_N⌉ × SPLIT_K programs, about two per
  SM, each decoding its W slice exactly once and multiplying it by all M ≤ 16 rows of x
  (one 16-row tensor-core dot: x is tiny and stays in L1/L2). Partial sums go to an fp32
  [SPLIT_K, M, N] buffer summed in a fixed order (deterministic; no atomics).
- dX = dY·dequant(W) (+ the LoRA term and the dA partials, as in ``lora.py``):
  `_nf4_backward_dx_kernel`, the dense dX kernel with the same in-register decode.
- Bit-exactness: the absmax decode ``map·scale + offset`` must round twice, as in
  bitsandbytes; a fused multiply-add would round once and differ in the last bit. Every
  kernel here is launched with ``enable_fp_fusion=False`` (NF4_LAUNCH_OPTIONS), so the
  dequantized values equal bitsandbytes' ``dequantize_4bit`` bit for bit.
- Offsets: the flat index n·K + k passes 2³¹ for a 32k × 64k weight, so it is int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    TRITON_VERSION,
    KernelBuild,
    autotuned,
    current_target,
    dtype_family,
    grouped_tile,
    launch,
    launch_guard,
    m_bucket,
    mma,
    multiprocessor_count,
    tile_configs,
)
from .lora import (
    backward_with,
    block_r,
    launch_flags,
    lora_dx_term,
    lora_epilogue,
)

# M at or below which the forward takes the split-K GEMV (decode) path.
DECODE_MAX_M = 16
GEMV_BLOCK_M = 16  # tl.dot's smallest M; rows past M are masked
# No fused multiply-add: the absmax decode must round twice, as bitsandbytes does.
NF4_LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def nf4_block_absmax(ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, blocks, NESTED: tl.constexpr):
    """fp32 absmax of NF4 blocks `blocks` (int64 indices, any shape)."""
    if NESTED:
        code8 = tl.load(ABSMAX + blocks)
        # one fp32 scale per 256 absmax values (peft_ops.nf4.ABSMAX_BLOCKSIZE)
        absmax = tl.load(ABSMAX_MAP + code8) * tl.load(ABSMAX_SCALE + blocks // 256)
        absmax = absmax + tl.load(ABSMAX_OFFSET)  # a separate rounding (fp fusion is off)
    else:
        absmax = tl.load(ABSMAX + blocks)
    return absmax


@triton.jit
def nf4_tile(PACKED, NF4, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, rows, k0, K,
             BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
             EVEN_K: tl.constexpr, ROW_ALIGNED: tl.constexpr):
    """fp32 W[rows, k0 + j mod K] for j < BLOCK_K: a [len(rows), BLOCK_K] tile decoded from the
    NF4 bytes. `rows` are valid int64 row indices; columns past K wrap onto valid ones (the
    caller's other operand is zero there), so every load is in bounds and unmasked."""
    row_start = rows * K  # int64: n·K passes 2³¹ for big weights
    flat = row_start[:, None] + ((k0 + tl.arange(0, BLOCK_K)) % K)[None, :]  # flat index of each weight
    if EVEN_K:
        # K even: each row starts on a byte, so byte j of the tile holds its columns 2j
        # (high nibble) and 2j+1 (low): one byte load per two weights.
        pair_cols = (k0 + 2 * tl.arange(0, BLOCK_K // 2)) % K
        byte = tl.load(PACKED + (row_start[:, None] + pair_cols[None, :]) // 2)
        values = tl.interleave(tl.load(NF4 + (byte >> 4)), tl.load(NF4 + (byte & 0xF)))
    else:
        byte = tl.load(PACKED + flat // 2)
        values = tl.load(NF4 + tl.where(flat % 2 == 0, byte >> 4, byte & 0xF))
    if ROW_ALIGNED and BLOCK_K <= BLOCKSIZE:
        # K % blocksize == 0 and the tile (k0 a multiple of BLOCK_K) sits inside one block of
        # each row: one scale per row instead of one per weight.
        scale = nf4_block_absmax(ABSMAX=ABSMAX, ABSMAX_SCALE=ABSMAX_SCALE, ABSMAX_MAP=ABSMAX_MAP,
                                 ABSMAX_OFFSET=ABSMAX_OFFSET, blocks=(row_start + k0) // BLOCKSIZE,
                                 NESTED=NESTED)[:, None]
    else:
        scale = nf4_block_absmax(ABSMAX=ABSMAX, ABSMAX_SCALE=ABSMAX_SCALE, ABSMAX_MAP=ABSMAX_MAP,
                                 ABSMAX_OFFSET=ABSMAX_OFFSET, blocks=flat // BLOCKSIZE, NESTED=NESTED)
    return values * scale


@triton.jit
def nf4_x_wt(acc, x_ptrs, x_step, k_begin, k_end, cols, PACKED, NF4, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP,
             ABSMAX_OFFSET, K, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
             EVEN_K: tl.constexpr, ROW_ALIGNED: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    """acc + X[:, k_begin:k_end]·dequant(W)[cols, k_begin:k_end]ᵀ, W decoded tile by tile in
    registers (k_begin a multiple of BLOCK_K; x_ptrs point at column k_begin of the x rows)."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        x = tl.load(x_ptrs, mask=(offs_k < k_end - k0)[None, :], other=0.0)  # zero past the end: W wraps there
        w = nf4_tile(PACKED=PACKED, NF4=NF4, ABSMAX=ABSMAX, ABSMAX_SCALE=ABSMAX_SCALE, ABSMAX_MAP=ABSMAX_MAP,
                     ABSMAX_OFFSET=ABSMAX_OFFSET, rows=cols, k0=k0, K=K, BLOCK_K=BLOCK_K, BLOCKSIZE=BLOCKSIZE,
                     NESTED=NESTED, EVEN_K=EVEN_K, ROW_ALIGNED=ROW_ALIGNED)
        acc = mma(x, tl.trans(w.to(x.dtype)), acc, WIDEN_BF16_DOT, DOT_PRECISION)
        x_ptrs += x_step
    return acc


@triton.jit
def _nf4_dequantize_kernel(PACKED, NF4, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, OUT, numel,
                           BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[f] = NF4[nibble f]·absmax[f // BLOCKSIZE] for 2·BLOCK elements (BLOCK bytes) per
    program; one launch for the whole weight, nested absmax included."""
    pid = tl.program_id(0).to(tl.int64)
    offs_byte = pid * BLOCK + tl.arange(0, BLOCK)
    byte = tl.load(PACKED + offs_byte, mask=offs_byte < (numel + 1) // 2, other=0)
    values = tl.interleave(tl.load(NF4 + (byte >> 4)), tl.load(NF4 + (byte & 0xF)))
    flat = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    in_range = flat < numel
    blocks = tl.where(in_range, flat, 0) // BLOCKSIZE  # in bounds past the end; the store is masked
    absmax = nf4_block_absmax(ABSMAX=ABSMAX, ABSMAX_SCALE=ABSMAX_SCALE, ABSMAX_MAP=ABSMAX_MAP,
                              ABSMAX_OFFSET=ABSMAX_OFFSET, blocks=blocks, NESTED=NESTED)
    tl.store(OUT + flat, (values * absmax).to(OUT.dtype.element_ty), mask=in_range)


# Autotune lists per target and operand family: "half" = fp16/bf16 x and adapters, "mixed" =
# half x with fp32 adapters, "fp32" = fp32 x (tf32x3 dots), and "general" = any dtype when K
# is odd or not a multiple of the blocksize (a scale per weight, not per row: more registers
# and shared memory). `peft-ops aot` proves every one spill-free and within shared memory;
# the pruned ones spilled or overflowed (e.g. 128×256 tiles, BLOCK_K ≥ 128 in the GEMV).
def _lists(names, half, mixed, fp32, general):
    return {"half": tile_configs(names, half), "mixed": tile_configs(names, mixed),
            "fp32": tile_configs(names, fp32), "general": tile_configs(names, general)}


_GEMM = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
_MATMUL_GPU = _lists(_GEMM, half=[(128, 128, 64, 8, 8, 3), (64, 128, 64, 8, 4, 3), (128, 64, 64, 8, 4, 3)],
                     mixed=[(64, 128, 64, 8, 4, 3)], fp32=[(64, 64, 32, 8, 4, 3)], general=[(64, 64, 32, 8, 8, 2)])
MATMUL_CONFIGS = {"sm80": _MATMUL_GPU, "sm90": _MATMUL_GPU, "interpreter": tile_configs(_GEMM, [(32, 32, 32, 8, 4, 1)])}
_GEMV = ("BLOCK_N", "BLOCK_K")
# Triton before 3.9 spilled (16 B) on the 128-column GEMV tile with fp32 adapters (sm_90).
_OLD_TRITON = TRITON_VERSION < (3, 9)
_GEMV_GPU = _lists(_GEMV, half=[(128, 64, 4, 3), (64, 64, 4, 3)],
                   mixed=[(64, 64, 4, 3)] if _OLD_TRITON else [(128, 64, 4, 3), (64, 64, 4, 3)],
                   fp32=[(64, 64, 4, 3)], general=[(64, 32, 4, 2)])
GEMV_CONFIGS = {"sm80": _GEMV_GPU, "sm90": _GEMV_GPU, "interpreter": tile_configs(_GEMV, [(32, 32, 4, 1)])}
GEMV_BLOCK_N_FOR_SPLIT = 64  # the tile width the split-K heuristic assumes
# dX: BLOCK_M is DX_BLOCK_M (each M-block decodes every W tile once: a wider one halves the
# decode work but the tile then holds a 128-row accumulator next to the decode).
DX_BLOCK_M = {"sm80": 64, "sm90": 64, "interpreter": 32}
_DX = ("BLOCK_N", "BLOCK_K", "GROUP_M")
# Triton before 3.9 spilled (16–40 B, sm_80) on the 32×32 "general" tile: a 16-row one without
# pipelining there (0 spills under 3.6).
_DX_GPU = _lists(_DX, half=[(64, 64, 8, 4, 3)], mixed=[(64, 64, 8, 4, 3)], fp32=[(32, 32, 8, 4, 3), (16, 64, 8, 4, 3)],
                 general=[(16, 32, 8, 4, 1)] if _OLD_TRITON else [(32, 32, 8, 4, 2)])
BACKWARD_DX_CONFIGS = {"sm80": _DX_GPU, "sm90": _DX_GPU, "interpreter": tile_configs(_DX, [(32, 32, 8, 4, 1)])}


def _unaligned(constexprs: dict) -> bool:
    """The "general" autotune family: K odd or not a multiple of the blocksize."""
    return not (constexprs.get("ROW_ALIGNED") and constexprs.get("EVEN_K"))


_NF4_KEY = ["BLOCKSIZE", "NESTED", "EVEN_K", "ROW_ALIGNED", "RANK_FP32"]
# The bounds of loops over names local to a kernel (its helpers' arguments), as expressions of
# its launch arguments: what a static estimate needs to count the iterations (peft_ops.tools.estimate).
LOOP_BOUNDS = {
    "_nf4_matmul_kernel": {"k_begin": "0", "k_end": "K"},
    "_nf4_gemv_kernel": {"k_begin": "0", "k_end": "min(K, cdiv(cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K)"},
}


@autotuned(MATMUL_CONFIGS, dtype_family("X", _unaligned),
           key=["M_BUCKET", "N", "K", "R", "HAS_LORA", "HAS_BIAS"] + _NF4_KEY)
@triton.jit
def _nf4_matmul_kernel(
    X, PACKED, NF4, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, XA, B, BIAS, Y, M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_bn, stride_br, stride_bias, scaling,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, EVEN_K: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y[M, N] = X·dequant(W)ᵀ [+ scaling·XA·Bᵀ] + BIAS, W decoded tile by tile in registers."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge wrap onto valid ones for the loads (the store is masked).
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    acc = nf4_x_wt(acc=tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), x_ptrs=x_ptrs,
                   x_step=BLOCK_K * tl.cast(stride_xk, tl.int64), k_begin=0, k_end=K, cols=cols, PACKED=PACKED,
                   NF4=NF4, ABSMAX=ABSMAX, ABSMAX_SCALE=ABSMAX_SCALE, ABSMAX_MAP=ABSMAX_MAP,
                   ABSMAX_OFFSET=ABSMAX_OFFSET, K=K, BLOCK_K=BLOCK_K, BLOCKSIZE=BLOCKSIZE, NESTED=NESTED,
                   EVEN_K=EVEN_K, ROW_ALIGNED=ROW_ALIGNED, WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION)
    acc = lora_epilogue(acc=acc, XA=XA, B=B, BIAS=BIAS, rows=rows, cols=cols, R=R, stride_bn=stride_bn,
                        stride_br=stride_br, stride_bias=stride_bias, scaling=scaling, HAS_LORA=HAS_LORA,
                        HAS_BIAS=HAS_BIAS, BLOCK_R=BLOCK_R, RANK_FP32=RANK_FP32, WIDEN_BF16_DOT=WIDEN_BF16_DOT,
                        DOT_PRECISION=DOT_PRECISION)
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@autotuned(GEMV_CONFIGS, dtype_family("X", _unaligned),
           key=["M", "N", "K", "R", "SPLIT_K", "HAS_LORA", "HAS_BIAS"] + _NF4_KEY)
@triton.jit
def _nf4_gemv_kernel(
    X, PACKED, NF4, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, XA, B, BIAS, OUT, M, N, K, R, SPLIT_K,
    stride_xm, stride_xk, stride_bn, stride_br, stride_bias, scaling,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, EVEN_K: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """OUT[s, M, N] = partial s of X·dequant(W)ᵀ over the s-th K slice, M ≤ BLOCK_M; slice 0
    also adds scaling·XA·Bᵀ and BIAS. Each program decodes its [BLOCK_N × K-slice] of W once."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    # Slices are whole BLOCK_K tiles, so a tile never straddles two of them (and ROW_ALIGNED
    # tiles stay inside one NF4 block).
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_s * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    x_ptrs = X + rows[:, None] * stride_xm + (k_begin + offs_k)[None, :].to(tl.int64) * stride_xk
    acc = nf4_x_wt(acc=tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), x_ptrs=x_ptrs,
                   x_step=BLOCK_K * tl.cast(stride_xk, tl.int64), k_begin=k_begin, k_end=k_end, cols=cols,
                   PACKED=PACKED, NF4=NF4, ABSMAX=ABSMAX, ABSMAX_SCALE=ABSMAX_SCALE, ABSMAX_MAP=ABSMAX_MAP,
                   ABSMAX_OFFSET=ABSMAX_OFFSET, K=K, BLOCK_K=BLOCK_K, BLOCKSIZE=BLOCKSIZE, NESTED=NESTED,
                   EVEN_K=EVEN_K, ROW_ALIGNED=ROW_ALIGNED, WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION)
    if pid_s == 0:  # the LoRA term and bias once, with the first K slice
        acc = lora_epilogue(acc=acc, XA=XA, B=B, BIAS=BIAS, rows=rows, cols=cols, R=R, stride_bn=stride_bn,
                            stride_br=stride_br, stride_bias=stride_bias, scaling=scaling, HAS_LORA=HAS_LORA,
                            HAS_BIAS=HAS_BIAS, BLOCK_R=BLOCK_R, RANK_FP32=RANK_FP32, WIDEN_BF16_DOT=WIDEN_BF16_DOT,
                            DOT_PRECISION=DOT_PRECISION)
    out_ptrs = OUT + pid_s.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@autotuned(BACKWARD_DX_CONFIGS, dtype_family("DY", _unaligned),
           key=["M_BUCKET", "N", "K", "R", "HAS_LORA", "HAS_DROPOUT"] + _NF4_KEY)
@triton.jit
def _nf4_backward_dx_kernel(
    DY, PACKED, NF4, ABSMAX, ABSMAX_SCALE, ABSMAX_MAP, ABSMAX_OFFSET, G, A, KEEP, DX,
    M, N, K, R, M_BUCKET, stride_dym, stride_dyn, stride_ar, stride_ak, lora_scale,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, EVEN_K: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_R: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Per output tile (M-block, K-block): DX = dY·dequant(W) [+ lora_scale·(G·A)⊙keep], the
    LoRA term first in the accumulator as in the dense dX kernel."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    k_mask = offs_k < K
    rows = offs_m.to(tl.int64)
    cols = (offs_k % K).to(tl.int64)
    if HAS_LORA:
        acc = lora_dx_term(G=G, A=A, KEEP=KEEP, rows=rows, m_mask=m_mask, cols=cols, k0=pid_k * BLOCK_K, R=R, K=K,
                           stride_ar=stride_ar, stride_ak=stride_ak, lora_scale=lora_scale, HAS_DROPOUT=HAS_DROPOUT,
                           BLOCK_R=BLOCK_R, WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION,
                           BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    wrapped_rows = (offs_m % M).to(tl.int64)
    dy_ptrs = DY + wrapped_rows[:, None] * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn
    dy_step = BLOCK_N * tl.cast(stride_dyn, tl.int64)
    for n0 in range(0, N, BLOCK_N):
        dy = tl.load(dy_ptrs, mask=(offs_n < N - n0)[None, :], other=0.0)  # zero past N: W wraps there
        w_rows = ((n0 + offs_n) % N).to(tl.int64)
        w = nf4_tile(PACKED=PACKED, NF4=NF4, ABSMAX=ABSMAX, ABSMAX_SCALE=ABSMAX_SCALE, ABSMAX_MAP=ABSMAX_MAP,
                     ABSMAX_OFFSET=ABSMAX_OFFSET, rows=w_rows, k0=pid_k * BLOCK_K, K=K, BLOCK_K=BLOCK_K,
                     BLOCKSIZE=BLOCKSIZE, NESTED=NESTED, EVEN_K=EVEN_K, ROW_ALIGNED=ROW_ALIGNED)
        acc = mma(dy, w.to(DY.dtype.element_ty), acc, WIDEN_BF16_DOT, DOT_PRECISION)
        dy_ptrs += dy_step
    dx_ptrs = DX + rows[:, None] * K + offs_k[None, :]
    tl.store(dx_ptrs, acc.to(DX.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])


# --------------------------------------------------------------------------------------
# Launchers. `qw` is a peft_ops.nf4.NF4Tensors (the weight's tensors and shape), validated
# by peft_ops; `tables` the format's (NF4 code values, 8-bit dynamic map) as fp32 tensors on
# the weight's device (peft_ops.nf4.code_tables). These only shape, allocate and launch.
# --------------------------------------------------------------------------------------

def _format_args(qw, tables) -> tuple:
    """The six pointer arguments every kernel here takes for W, in order."""
    code, absmax_map = tables
    nested = qw.absmax_scale is not None
    absmax_map = absmax_map if nested else qw.absmax  # (unused when not nested)
    return (qw.packed, code, qw.absmax, qw.absmax_scale if nested else qw.absmax, absmax_map,
            qw.absmax_offset if nested else qw.absmax)


def _format_flags(qw) -> dict:
    K = qw.in_features
    return {"BLOCKSIZE": qw.blocksize, "NESTED": qw.absmax_scale is not None, "EVEN_K": K % 2 == 0,
            "ROW_ALIGNED": K % qw.blocksize == 0}


def dequantize(qw, dtype: torch.dtype, *, tables) -> torch.Tensor:
    """W [N, K] in `dtype`, one launch."""
    N, K = qw.out_features, qw.in_features
    out = torch.empty((N, K), device=qw.packed.device, dtype=dtype)
    BLOCK = 1024  # bytes per program: 2048 weights
    with launch_guard(qw.packed):
        launch(_nf4_dequantize_kernel, (triton.cdiv(triton.cdiv(N * K, 2), BLOCK),),
            *_format_args(qw, tables), out, N * K, BLOCKSIZE=qw.blocksize, NESTED=qw.absmax_scale is not None,
            BLOCK=BLOCK, **NF4_LAUNCH_OPTIONS)
    return out


def split_k_for(N: int, K: int, device: torch.device) -> int:
    """K slices of the decode GEMV: enough programs for about two per SM, each slice ≥ 512
    columns (shorter ones would not amortize their partial sums)."""
    sms = multiprocessor_count(device)
    if sms is None:
        return 1
    tiles = triton.cdiv(N, GEMV_BLOCK_N_FOR_SPLIT)
    return max(1, min(triton.cdiv(2 * sms, tiles), K // 512))


def forward(x: torch.Tensor, qw, xa: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float,
            bias: torch.Tensor | None, regime: str | None = None, split_k: int | None = None, *,
            tables) -> torch.Tensor:
    """y = x·dequant(W)ᵀ [+ scaling·xa·lora_Bᵀ] + bias, [M, N] in x's dtype. `regime`: "gemm"
    or "decode" (default: decode for M ≤ DECODE_MAX_M); `split_k`: the decode path's K slices
    (default: split_k_for)."""
    M, K = x.shape
    N = qw.out_features
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    regime = regime or ("decode" if M <= DECODE_MAX_M else "gemm")
    if regime == "decode" and M > GEMV_BLOCK_M:
        raise ValueError(f"the decode regime takes at most {GEMV_BLOCK_M} rows, got {M}")
    has_lora = xa is not None
    R = lora_B.shape[1] if has_lora else 0
    adapter_dtype = lora_B.dtype if has_lora else x.dtype
    flags = {**launch_flags(x.dtype, adapter_dtype, max(R, 1)), **_format_flags(qw)}
    lora_args = (xa, lora_B) if has_lora else (x, x)  # unused pointers when HAS_LORA is False
    common = dict(HAS_LORA=has_lora, HAS_BIAS=bias is not None, **flags, **NF4_LAUNCH_OPTIONS)
    tail = (x.stride(0), x.stride(1), lora_B.stride(0) if has_lora else 0, lora_B.stride(1) if has_lora else 0,
            bias.stride(0) if bias is not None else 0, float(scaling))
    with launch_guard(x, qw.packed):
        if regime == "gemm":
            grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
            launch(_nf4_matmul_kernel, grid, x, *_format_args(qw, tables), *lora_args,
                   bias if bias is not None else y, y, M, N, K, R, m_bucket(M), *tail, **common)
            return y
        split = split_k or split_k_for(N, K, x.device)
        out = y if split == 1 else torch.empty((split, M, N), device=x.device, dtype=torch.float32)
        grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]), split)  # noqa: E731
        launch(_nf4_gemv_kernel, grid, x, *_format_args(qw, tables), *lora_args, bias if bias is not None else y,
               out, M, N, K, R, split, *tail, BLOCK_M=GEMV_BLOCK_M, **common)
    if split > 1:
        y.copy_(out.sum(dim=0))  # a fixed summation order: deterministic
    return y


def backward_dx(dy: torch.Tensor, qw, *, tables) -> torch.Tensor:
    """dx = dy·dequant(W) [M, K] in dy's dtype (nf4_linear's backward; W gets no gradient)."""
    M, N = dy.shape
    K = qw.in_features
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    if M == 0:
        return dx
    block_m = DX_BLOCK_M[current_target()]
    grid = lambda META: (triton.cdiv(M, block_m) * triton.cdiv(K, META["BLOCK_K"]),)  # noqa: E731
    flags = {**launch_flags(dy.dtype, dy.dtype, 1), **_format_flags(qw)}
    with launch_guard(dy, qw.packed):
        launch(_nf4_backward_dx_kernel, grid,
            dy, *_format_args(qw, tables), dy, dy, dy, dx, M, N, K, 0, m_bucket(M),
            dy.stride(0), dy.stride(1), 0, 0, 1.0,
            HAS_LORA=False, HAS_DROPOUT=False, BLOCK_M=block_m, **flags, **NF4_LAUNCH_OPTIONS)
    return dx


def qlora_backward(dy: torch.Tensor, x: torch.Tensor, qw, lora_A: torch.Tensor, lora_B: torch.Tensor,
                   xa: torch.Tensor, keep: torch.Tensor | None, scaling: float, dropout_p: float,
                   need_dx: bool, need_dA: bool, need_dB: bool, need_db: bool, *, tables):
    """(dx, dA, dB, db) of the QLoRA layer, as ``lora.backward`` with the NF4 dX kernel."""
    block_m = DX_BLOCK_M[current_target()]

    def launch_dx(g, dx, lora_scale, rank, **constexprs):  # the rank pass stays its own launch
        M = dy.shape[0]
        grid = lambda META: (triton.cdiv(M, block_m) * triton.cdiv(qw.in_features, META["BLOCK_K"]),)  # noqa: E731
        launch(_nf4_backward_dx_kernel, grid,
            dy, *_format_args(qw, tables), g, lora_A, keep if keep is not None else g, dx, M, qw.out_features,
            qw.in_features, lora_A.shape[0], m_bucket(M), dy.stride(0), dy.stride(1), lora_A.stride(0),
            lora_A.stride(1), lora_scale, HAS_LORA=True, BLOCK_M=block_m, **constexprs, **_format_flags(qw),
            **NF4_LAUNCH_OPTIONS)
        return False

    with launch_guard(dy, x, qw.packed, lora_A, lora_B):
        return backward_with(launch_dx, dy, x, lora_A, lora_B, xa, keep, scaling, dropout_p, need_dx, need_dA,
                             need_dB, need_db)


# What the aot builds cover: each config at the heaviest settings (LoRA, bias, dropout,
# nested absmax) in the operand variants that differ in registers, with the fast decode
# (K even, K % blocksize == 0: real models) and the "general" configs with the general one.
AOT_VARIANTS = {
    "bf16": dict(dtype="bf16", rank_dtype="bf16", family="half"),
    "bf16+fp32 A,B": dict(dtype="bf16", rank_dtype="fp32", family="mixed"),
    "fp32": dict(dtype="fp32", rank_dtype="fp32", family="fp32"),
}
FORMAT_VARIANTS = {"aligned": dict(EVEN_K=True, ROW_ALIGNED=True), "odd K": dict(EVEN_K=False, ROW_ALIGNED=False)}


def aot_specs(target: str) -> list:
    plain = ("M", "seed", "SPLIT_K", "R")
    fmt_pointers = dict(PACKED="u8", NF4="fp32", ABSMAX="u8", ABSMAX_SCALE="fp32", ABSMAX_MAP="fp32",
                        ABSMAX_OFFSET="fp32")
    options = dict(NF4_LAUNCH_OPTIONS)
    specs = []
    for variant, v in AOT_VARIANTS.items():
        dt, rt, family = v["dtype"], v["rank_dtype"], v["family"]
        fp32_rank = rt == "fp32"
        common = dict(BLOCK_R=block_r(64, fp32_rank), WIDEN_BF16_DOT=False, RANK_FP32=fp32_rank and dt != "fp32",
                      DOT_PRECISION="tf32x3", BLOCKSIZE=64, NESTED=True)
        for fmt, fmt_flags in FORMAT_VARIANTS.items():
            def build(name, kernel, configs, pointers, constexprs, fmt=fmt, fmt_flags=fmt_flags, variant=variant,
                      family=family, common=common, **kw):
                for cfg in configs[target][family if fmt == "aligned" else "general"]:
                    specs.append(KernelBuild(f"{name} [{variant}, {fmt}]", kernel, cfg, {**fmt_pointers, **pointers},
                                             {**common, **fmt_flags, **constexprs}, plain_ints=plain,
                                             options=options, **kw))

            build("nf4_matmul", _nf4_matmul_kernel, MATMUL_CONFIGS, dict(X=dt, XA="fp32", B=rt, BIAS=dt, Y=dt),
                  dict(HAS_LORA=True, HAS_BIAS=True), unit_strides=("stride_xk", "stride_br", "stride_bias"),
                  float_args=("scaling",))
            build("nf4_gemv", _nf4_gemv_kernel, GEMV_CONFIGS, dict(X=dt, XA="fp32", B=rt, BIAS=dt, OUT="fp32"),
                  dict(HAS_LORA=True, HAS_BIAS=True, BLOCK_M=GEMV_BLOCK_M),
                  unit_strides=("stride_xk", "stride_br", "stride_bias"), float_args=("scaling",))
            build("nf4_backward_dx", _nf4_backward_dx_kernel, BACKWARD_DX_CONFIGS,
                  dict(DY=dt, G="fp32", A=rt, KEEP="i32", DX=dt),
                  dict(HAS_LORA=True, HAS_DROPOUT=True, BLOCK_M=DX_BLOCK_M[target]),
                  unit_strides=("stride_dyn", "stride_ak"), float_args=("lora_scale",))
    for out in ("bf16", "fp32"):
        specs.append(KernelBuild(f"nf4_dequantize [{out}]", _nf4_dequantize_kernel,
                                 triton.Config({"BLOCK": 1024}, num_warps=4, num_stages=1),
                                 {**fmt_pointers, "OUT": out}, dict(BLOCKSIZE=64, NESTED=True),
                                 plain_ints=("numel",), options=options, uses_tensor_cores=False))
    return specs


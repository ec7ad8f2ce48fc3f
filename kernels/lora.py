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
- The shrink at decode sizes (M ≤ SHRINK_SPLIT_MAX_M = 16): one program over all of K waits
  K/BLOCK_K pipelined steps in a row (static estimate, H200, M = 1, K = 4096: 11.4 µs, against
  15 µs for the NF4 decode GEMV after it). `_lora_shrink_split_kernel` splits K over up to 32
  programs of whole tiles; the last to finish (an atomic ticket, `split_k_total`) adds their
  fp32 partials in slice order — deterministic — and stores xa: 5.1 µs (the estimate does not
  charge the ticket and the partials' reload, ≈ 1 µs on a GPU). `qlora_linear` at M = 1,
  4096 → 14336, r = 16: 26.3 → 20.0 µs, still 2 launches (the partials and counters are the
  decode GEMV's reusable scratch: no memset).
- Backward, g = dY·B [M, r], in three launches (two on sm_90a; no PyTorch tail):
  `_lora_backward_g_kernel`: g, one read of dY (64 MiB ≈ 15 µs). At r = 8 (PEFT's default)
  Triton's JIT marks neither R nor B's row stride aligned (it marks multiples of 16), so B's
  tiles were loaded 2 bytes at a time, synchronously, a memory latency per step; the launcher
  now states both multiples of 8 (B_ROWS_ALIGNED) and they are 16-byte `cp.async` (static
  estimate, H200, r = 8: 25.2 → 18.1 µs at M = 8192, 25.2 → 14.8 µs at M = 512, as at r = 16).
  The forward epilogues that load xa and B after their main loop (`lora_epilogue`: the NF4
  GEMVs, the cuBLAS path's expand) take the same flag: NF4 decode GEMV at r = 8, M = 1, 4096 →
  14336: 15.23 → 14.91 µs (as at r = 16); the expand's 167 → 103 registers.
  `_lora_backward_rank_kernel`: every reduction over M, each program owning BLOCK_C columns
  of one output and summing all M rows in order: dA = s/(1-p)·gᵀ·(x⊙keep) (reads x once),
  dB = s·dYᵀ·xa and db = Σ dY (read dY once more), written final — scaled, in the
  parameters' dtype. No partials: before this pass each 64-row block wrote fp32 partials,
  ⌈M/64⌉·(N+K)·r·4 = 64 MiB written and read again at r = 16 (256 MiB at r = 64), then 8
  PyTorch ops summed, scaled and cast them. Cost of the choice: one more read of dY (≈ 15 µs,
  ≈ 2 % of the layer); the scratch is g alone (M·r·4 = 512 KiB).
  `_lora_backward_dx_kernel` (`_lora_backward_dx_tma_kernel` on sm_90a): the GEMM dY·W with
  the LoRA term s/(1-p)·(g·A)⊙keep accumulated first, into the accumulator the GEMM then
  continues (the mask touches that term alone, without a second tile of registers). With dA
  gone from it, it runs 128-row tiles (two 64-row wgmma warpgroups, N = 128 or 256), 0 spills.
- The rank pass inside the dX launch (sm_90a). The persistent dX GEMM's tiles rarely fill its
  last wave: 2048 tiles of 128×128 on 132 SMs leave 66 SMs idle for one tile's time (≈ 22 µs),
  while the rank pass is memory-bound (x + dY, 128 MiB ≈ 31 µs at HBM speed) and needs no
  tensor-core time to speak of. So the launch gets ⌈K/128⌉ + ⌈N/128⌉ extra programs (64 at the
  headline shape), each one item of the rank pass (`rank_reduction`, the same code as the
  rank kernel's programs); the hardware starts them as the GEMM's programs finish. Static
  estimate, H200: dX + rank items 370 µs against 357 + 34 µs as two launches; LoRA fwd+bwd
  763 µs against the cuBLAS base layer's 711 (1.07×; 784 µs, 1.10×, before). Where the dX GEMM
  is not the persistent one (sm_80, unaligned operands, NF4, cuBLAS) or dX is not wanted, the
  rank pass stays its own launch.
- The LoRA term's operands in the TMA GEMMs: the first rank chunk (r ≤ 64 in half precision:
  all of it) is loaded before the main loop and applied after it, so its load latency hides
  behind the loop instead of stalling every tile's epilogue: 357 µs per GEMM at the headline
  shape against 367 µs with the loads after the loop. Under dropout the mask applies to the
  dX term alone, so the term starts the accumulator, loaded at the tile's start (loading its
  operands and mask words one tile ahead measured 380 µs against 395 µs for dX with dropout
  0.1, but spilled 140 bytes under triton 3.6). The dX GEMM's 128×256 tiles have no registers
  left to hold the operands across the loop and add the term first too; the pointer GEMMs
  keep loading after the loop (held across it, the operands spill sm_80 tiles).
- The sm_90a GEMMs (forward and dX) are persistent (one program per SM looping over output
  tiles in grouped order) and take their operands by TMA (tensor descriptors: the copy
  engine moves the tiles, edges zero-filled, stores clipped); where descriptors cannot address
  an operand (a row not 16-byte aligned, an inner stride ≠ 1) and on sm_80, the pointer-based
  `cp.async` GEMMs run. Warp specialization: triton 3.6 and 3.9 emit the same PTX for sm_90a
  with `tl.range(..., warp_specialize=True)` as without (no producer/consumer split, no
  setmaxnreg), so it is not asked for.
- Dropout: the keep mask of element (m, k) is a pure function of (seed, m, k) (Philox with an
  int64 counter, one call per 4 elements; see `dropout.keep_tile`), independent of tile
  shapes. It is drawn once, in the shrink, which also stores it bit-packed for the backward
  ([M, ⌈K/32⌉] int32: x/16 bytes in bf16; see `dropout.store_keep_bits` for the cost model:
  a Philox pass costs ≈ 37 integer instructions per element, 40-75 µs over x at M = 8192,
  K = 4096, against ≈ 1 µs to read the packed mask).
- All offsets along M (and the strides they multiply) are int64: M·K passes 2³¹ at long
  sequences. Accumulation is fp32 throughout; xa and g are kept in fp32 and rounded to the
  compute dtype only as tensor-core operands — or kept fp32 (RANK_FP32) when the adapters are
  fp32 on a half-precision x, PEFT's default, so that branch has fp32 accuracy as in PEFT.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation  # the scratch allocator's default, to leave a caller's own in place

from .common import (
    INTERPRETED,
    OLD_TRITON,
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
    multiprocessor_count,
    split_k_total,
    tile_configs,
)
from .dropout import keep_from_bits, keep_tile, store_keep_bits


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
_G = ("BLOCK_M", "BLOCK_N")
_RANK = ("BLOCK_M", "BLOCK_C")  # BLOCK_M: rows summed per step; BLOCK_C: the columns a program owns
_DX = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")  # BLOCK_K: dX column tile (in); BLOCK_N: reduction (out)

# Autotune lists per target; `peft-ops aot` proves every one spill-free in its family.
# BLOCK_N in the forward is the output-column tile. Every BLOCK_K of a kernel reading the
# bit-packed keep mask is a multiple of 32 (one int32 word per 32 columns).
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
# DoRA's forward (DORA: pre stored, the column scale in the epilogue) in half precision: the base
# tiles only (the 128×256 tile spilled 48 bytes on sm_90a with the extra store).
for _tables in (FORWARD_CONFIGS["sm80"], FORWARD_CONFIGS["sm90"]):
    _tables["dora"] = _tables["mixed"]
# W stored [K, N] (Conv1D, unit stride along N) in half precision: on sm_80 the base tiles only
# (the 128×256 tile spilled 60 bytes there); sm_90a's pointer GEMM keeps every tile spill-free.
FORWARD_CONFIGS["sm80"]["kn"] = FORWARD_CONFIGS["sm80"]["mixed"]
FORWARD_CONFIGS["sm90"]["kn"] = FORWARD_CONFIGS["sm90"]["half"]


def forward_family(named_args: dict, constexprs: dict) -> str:
    """dtype_family("X"), with half-precision DoRA launches in their own list ("dora"), and those
    over W stored [K, N] in theirs ("kn")."""
    family = dtype_family("X")(named_args, constexprs)
    if family == "half" and constexprs.get("DORA"):
        return "dora"
    if family == "half" and named_args.get("stride_wn") == 1 and named_args.get("stride_wk") != 1:
        return "kn"
    return family


def forward_tma_family(named_args: dict, constexprs: dict) -> str:
    """dtype_family("X"), with half-precision DoRA launches in their own list ("dora")."""
    family = dtype_family("X")(named_args, constexprs)
    return "dora" if family == "half" and constexprs.get("DORA") else family


def dx_tma_family(named_args: dict, constexprs: dict) -> str:
    """dtype_family("DY"), with half-precision launches over W stored [K, N] in their own list ("kn")."""
    family = dtype_family("DY")(named_args, constexprs)
    return "kn" if family == "half" and constexprs.get("W_KN") else family


SHRINK_CONFIGS = {
    "sm80": _families(_SHRINK, base=[(64, 64, 4, 3), (16, 128, 4, 4)], wide=[(128, 64, 8, 3), (32, 128, 4, 3)],
                      fp32=[(32, 32, 4, 3), (64, 32, 4, 3), (32, 64, 4, 2)]),
    # Triton 3.6 spilled 24 bytes on the 32×128 tile (sm_90a)
    "sm90": _families(_SHRINK, base=[(64, 64, 4, 4), (128, 64, 8, 3), (16, 128, 8, 4)],
                      wide=[] if OLD_TRITON else [(32, 128, 4, 4)],
                      fp32=[(32, 32, 4, 3), (64, 32, 4, 3), (32, 64, 4, 2)]),
    "interpreter": tile_configs(_SHRINK, [(32, 32, 4, 1)]),
}
# The shrink at decode sizes (`_lora_shrink_split_kernel`, M ≤ SHRINK_SPLIT_MAX_M): a fixed tile
# (the partials' layout follows it), K split into up to SHRINK_MAX_SPLIT slices of whole tiles.
SHRINK_SPLIT_MAX_M = 16
SHRINK_MAX_SPLIT = 32
# Keyed by whether the rank products take fp32 operands: tf32x3 splits each in two, and the
# 128-column tile spilled 12 bytes there (sm_90a, fp32 x).
_SHRINK_SPLIT = {False: dict(BLOCK_M=16, BLOCK_K=128, num_warps=4, num_stages=2),
                 True: dict(BLOCK_M=16, BLOCK_K=64, num_warps=4, num_stages=2)}
_SHRINK_SPLIT_INTERPRETED = dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1)
SHRINK_SPLIT_TILE = {"sm80": _SHRINK_SPLIT, "sm90": _SHRINK_SPLIT,
                     "interpreter": {False: _SHRINK_SPLIT_INTERPRETED, True: _SHRINK_SPLIT_INTERPRETED}}
BACKWARD_G_CONFIGS = {
    "sm80": _families(_G, base=[(64, 64, 4, 3), (64, 64, 4, 4)], wide=[(64, 128, 8, 3), (128, 64, 8, 3)],
                      fp32=[(64, 32, 4, 3), (64, 32, 8, 3), (64, 16, 4, 3)]),
    "sm90": _families(_G, base=[(64, 64, 4, 4), (64, 64, 8, 3)], wide=[(64, 128, 4, 3), (64, 128, 8, 3),
                                                                       (128, 64, 8, 3)],
                      fp32=[(64, 32, 4, 3), (64, 32, 8, 3), (64, 16, 4, 3)]),
    "interpreter": tile_configs(_G, [(32, 32, 4, 1)]),
}
BACKWARD_RANK_CONFIGS = {
    "sm80": _families(_RANK, base=[(64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 4)], wide=[(64, 128, 4, 3)],
                      fp32=[(32, 64, 4, 3), (64, 32, 4, 3)]),
    "sm90": _families(_RANK, base=[(64, 64, 4, 4), (128, 64, 4, 3), (128, 32, 4, 4)], wide=[(64, 128, 4, 3)],
                      fp32=[(64, 32, 4, 3), (32, 32, 4, 3)]),
    "interpreter": tile_configs(_RANK, [(32, 32, 4, 1)]),
}
BACKWARD_DX_CONFIGS = {
    "sm80": _families(_DX, base=[(128, 64, 128, 8, 8, 3), (64, 64, 128, 8, 4, 4), (64, 64, 64, 8, 4, 3)],
                      wide=[],  # 128×256 spilled here (4-28 bytes, sm_80): 128×128 is the widest
                      fp32=[(64, 32, 32, 8, 4, 3), (64, 32, 64, 8, 8, 3), (64, 16, 64, 8, 4, 3),
                            (64, 32, 32, 8, 4, 2)]),
    "sm90": _families(_DX, base=[(128, 64, 128, 8, 8, 3), (64, 64, 128, 8, 4, 4), (64, 64, 64, 8, 4, 3)],
                      wide=[(128, 64, 256, 8, 8, 3)],
                      fp32=[(64, 32, 32, 8, 4, 3), (64, 32, 64, 8, 8, 3), (64, 16, 64, 8, 4, 3),
                            (64, 32, 32, 8, 4, 2)]),
    "interpreter": tile_configs(_DX, [(32, 32, 64, 8, 4, 1)]),
}
# sm_90a: the persistent TMA GEMMs (forward and dX), each program looping over output tiles.
# Their half-precision tiles are 128 rows (two 64-row wgmma warpgroups at 8 warps) by 128 or
# 256 columns; the lists are per family as above. On sm_80 they are never launched (no TMA):
# the entry only gives the autotuner of an sm_80 process a list.
# fp32 on Triton before 3.9: the 128-row tiles only (the 64-row, 4-warp ones spilled 16 bytes on
# sm_90a under 3.6: the forward with DoRA's epilogue, the dX without dropout)
_TMA_FORWARD = _families(_GEMM, base=[(128, 128, 64, 8, 8, 3)], wide=[(128, 256, 64, 8, 8, 2)],
                         fp32=[(128, 128, 32, 8, 8, 3)] + ([] if OLD_TRITON else [(64, 128, 32, 8, 4, 3)]))
# DoRA (PRE stored beside Y) in half precision: the base tile only, as in the pointer GEMM (the
# 128×256 tile spilled 48 bytes on sm_90a at 255 registers without a bias).
_TMA_FORWARD["dora"] = _TMA_FORWARD["mixed"]
FORWARD_TMA_CONFIGS = {"sm80": _TMA_FORWARD, "sm90": _TMA_FORWARD,
                       "interpreter": tile_configs(_GEMM, [(32, 32, 32, 8, 4, 1)])}
_TMA_DX = _families(_DX, base=[(128, 64, 128, 8, 8, 3)], wide=[(128, 64, 256, 8, 8, 2)],
                    fp32=[(128, 32, 128, 8, 8, 3)] + ([] if OLD_TRITON else [(64, 32, 128, 8, 4, 3)]))
# W stored [K, N] (Conv1D) in half precision: the base tile only (the 128×256 tile spilled 16
# bytes on sm_90a, at 255 registers, with the B tiles transposed in shared memory).
_TMA_DX["kn"] = _TMA_DX["mixed"]
BACKWARD_DX_TMA_CONFIGS = {"sm80": _TMA_DX, "sm90": _TMA_DX,
                           "interpreter": tile_configs(_DX, [(32, 32, 64, 8, 4, 1)])}
# The cuBLAS path's memory-bound LoRA pieces: the expand C = s·xa·Bᵀ + b (forward, addmm's C)
# and the dX term C = s/(1-p)·(g·A)⊙keep (backward): one [BLOCK_M, BLOCK_N] tile each program.
_TILE = ("BLOCK_M", "BLOCK_N")
_PIECES = _families(_TILE, base=[(64, 128, 4, 2), (128, 64, 4, 2)], wide=[(128, 128, 8, 2)],
                    fp32=[(64, 64, 4, 2), (32, 128, 4, 2)])
PIECE_CONFIGS = {"sm80": _PIECES, "sm90": _PIECES, "interpreter": tile_configs(_TILE, [(32, 64, 4, 1)])}
# The rank items the persistent TMA dX GEMM runs as extra programs: (RANK_BLOCK_M, RANK_BLOCK_C)
# keyed by whether the rank products take fp32 operands (fp32 adapters). 128 × 128 in half
# precision: a 40 KB step keeps one CTA per SM (the GEMM's footprint) streaming, and ⌈K/128⌉ +
# ⌈N/128⌉ items are few enough to fill the GEMM's last, partial wave (the best mean over the
# default shapes in the static estimate; 256 × 64 and 128 × 256 measured worse there).
_RANK_ITEMS = {False: (128, 128), True: (128, 32)}
RANK_ITEM_TILE = {"sm80": _RANK_ITEMS, "sm90": _RANK_ITEMS, "interpreter": {False: (32, 32), True: (32, 32)}}
# Targets whose GEMMs take the persistent TMA kernels (tests add "interpreter" to run them there).
TMA_TARGETS = {"sm90"}
# Programs of a persistent kernel in the interpreter (no SMs): a few, so each loops over tiles.
INTERPRETER_PROGRAMS = 3
# For a static estimate: the persistent kernels' local loop bounds, their work (dX tiles and
# rank items) as virtual CTAs scheduled in waves, and the loops only part of that work runs.
_DX_WORK = {"dx_tiles": "cdiv(M, BLOCK_M) * cdiv(K, BLOCK_K)",
            "rank_items": "(cdiv(K, RANK_BLOCK_C) * COMPUTE_DA"
                          " + cdiv(N, RANK_BLOCK_C) * max(COMPUTE_DB, COMPUTE_DBIAS)) * cdiv(R, BLOCK_R)"}
LOOP_BOUNDS = {"_lora_forward_tma_kernel": {"k_steps": "cdiv(K, BLOCK_K)"},
               "_lora_shrink_kernel": {"k_begin": "0", "k_end": "K"},
               "_lora_shrink_split_kernel": {"k_begin": "0",
                                             "k_end": "min(K, cdiv(cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K)"},
               "_lora_backward_dx_tma_kernel": {"n_steps": "cdiv(N, BLOCK_N)", **_DX_WORK},
               "_lora_backward_rank_kernel": {"RANK_BLOCK_M": "BLOCK_M"}}
PERSISTENT_TILES = {
    "_lora_forward_tma_kernel": "cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)",
    "_lora_backward_dx_tma_kernel": "dx_tiles + rank_items",
}
_DX_SHARE = "dx_tiles / (dx_tiles + rank_items)"
LOOP_SHARES = {"_lora_backward_dx_tma_kernel": {
    "for n in range(0, n_steps):": _DX_SHARE, "for r0 in range(0, R, BLOCK_R):": _DX_SHARE,
    "for r0 in range(BLOCK_R, R, BLOCK_R):": _DX_SHARE,
    "for m0 in range(0, M, RANK_BLOCK_M):": "rank_items / (dx_tiles + rank_items)"}}


@triton.jit
def shrink_partial(X, A, KEEP, rows, m_mask, offs_r, r_mask, K, k_begin, k_end, stride_xm, stride_xk, stride_ar,
                   stride_ak, seed, dropout_p, store_keep, HAS_DROPOUT: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr,
                   RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """(X[rows, k_begin:k_end] ⊙ keep)·A[offs_r, k_begin:k_end]ᵀ in fp32 [BLOCK_M, BLOCK_R], k_begin a
    multiple of BLOCK_K; with `store_keep` the keep mask of those columns is stored bit-packed."""
    offs_k = tl.arange(0, BLOCK_K)
    # pointers advanced each step (not rebuilt from k0): the compiler then keeps x's rows
    # contiguous and 16-byte aligned along K, so the loads stay vectorized
    x_ptrs = X + rows[:, None] * stride_xm + (k_begin + offs_k)[None, :].to(tl.int64) * stride_xk
    a_ptrs = A + offs_r[None, :].to(tl.int64) * stride_ar + (k_begin + offs_k)[:, None].to(tl.int64) * stride_ak
    x_step = BLOCK_K * tl.cast(stride_xk, tl.int64)
    a_step = BLOCK_K * tl.cast(stride_ak, tl.int64)
    rank_dtype = tl.float32 if RANK_FP32 else X.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_mask = (k0 + offs_k) < k_end
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = keep_tile(seed=seed, rows=rows, k0=k0, n_cols=K, dropout_p=dropout_p, BLOCK_M=BLOCK_M,
                             BLOCK_K=BLOCK_K)
            x = tl.where(keep, x, 0.0)  # zeroing is exact; the 1/(1-p) is applied to the fp32 sum
            if store_keep:
                store_keep_bits(KEEP=KEEP, keep=keep & k_mask[None, :], rows=rows, row_mask=m_mask, k0=k0, n_cols=K,
                                BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
        a = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = mma(x.to(rank_dtype), a.to(rank_dtype), acc, WIDEN_BF16_DOT, DOT_PRECISION)
        x_ptrs += x_step
        a_ptrs += a_step
    return acc


@autotuned(SHRINK_CONFIGS, dtype_family("X"), key=["M_BUCKET", "K", "R", "HAS_DROPOUT", "RANK_FP32"])
@triton.jit(do_not_specialize=["seed"])  # a fresh seed per step must not trigger a recompile
def _lora_shrink_kernel(
    X, A, XA, KEEP, M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak,
    seed, dropout_p, keep_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """XA[M, R] (fp32) = (X ⊙ keep)·Aᵀ · keep_scale, one program per (M-block, R-chunk); the
    programs of the first R-chunk also store the keep mask bit-packed in KEEP, for the backward.
    Its loop is `shrink_partial`'s written out: through the helper (the same PTX, reordered)
    ptxas spilled 8 bytes in two tiles' builds of the headline launches."""
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
            if pid_r == 0:
                store_keep_bits(KEEP=KEEP, keep=keep & k_mask[None, :], rows=rows, row_mask=m_mask, k0=k0, n_cols=K,
                                BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
        a = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = mma(x.to(rank_dtype), a.to(rank_dtype), acc, WIDEN_BF16_DOT, DOT_PRECISION)
        x_ptrs += x_step
        a_ptrs += a_step
    if HAS_DROPOUT:
        acc = acc * keep_scale
    xa_ptrs = XA + rows[:, None] * R + offs_r[None, :]
    tl.store(xa_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit(do_not_specialize=["seed"])
def _lora_shrink_split_kernel(
    X, A, XA, KEEP, PARTIALS, COUNTERS, M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak,
    seed, dropout_p, keep_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The shrink at decode sizes (M ≤ SHRINK_SPLIT_MAX_M), K split over programs: program (m, r, s)
    sums slice s of K (whole BLOCK_K tiles; its keep bits stored by the first R-chunk), and the
    tile's last program adds the slices' fp32 partials in slice order (`split_k_total`:
    deterministic) and stores XA. One program over all of K waited K/BLOCK_K pipelined steps
    in a row (static estimate, H200, M = 1, K = 4096: 11.4 µs, the LoRA decode's costliest launch)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = offs_m.to(tl.int64)
    m_mask = offs_m < M
    r_mask = offs_r < R
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_s * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    acc = shrink_partial(X=X, A=A, KEEP=KEEP, rows=rows, m_mask=m_mask, offs_r=offs_r, r_mask=r_mask, K=K,
                         k_begin=k_begin, k_end=k_end, stride_xm=stride_xm, stride_xk=stride_xk, stride_ar=stride_ar,
                         stride_ak=stride_ak, seed=seed, dropout_p=dropout_p, store_keep=pid_r == 0,
                         HAS_DROPOUT=HAS_DROPOUT, WIDEN_BF16_DOT=WIDEN_BF16_DOT, RANK_FP32=RANK_FP32,
                         DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
    acc, last = split_k_total(acc, PARTIALS, COUNTERS, pid_m * tl.num_programs(1) + pid_r, pid_s, SPLIT_K, BLOCK_M,
                              BLOCK_R)
    if last:
        if HAS_DROPOUT:
            acc = acc * keep_scale
        tl.store(XA + rows[:, None] * R + offs_r[None, :], acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def rank_operands(LEFT, RIGHT, rows, row_mask, cols, r0, R, stride_right_c, stride_right_r, left_scale,
                  BLOCK_R: tl.constexpr):
    """One rank chunk [r0, r0 + BLOCK_R) of a LoRA term left·right: (left_scale·LEFT[rows, chunk],
    RIGHT[chunk, cols]) in RIGHT's dtype (x's, or fp32 for RANK_FP32 / fp32 x). LEFT is an fp32
    [M, R] (x·Aᵀ or g = dY·B); RIGHT is Bᵀ (forward) or A (dX) through its strides. The scale
    folds into the fp32 left operand before its one rounding to the compute dtype."""
    rank_dtype = RIGHT.dtype.element_ty
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    left = tl.load(LEFT + rows[:, None] * R + offs_r[None, :], mask=row_mask[:, None] & r_mask[None, :], other=0.0)
    right = tl.load(RIGHT + cols[None, :] * stride_right_c + offs_r[:, None].to(tl.int64) * stride_right_r,
                    mask=r_mask[:, None], other=0.0)
    return (left * left_scale).to(rank_dtype), right.to(rank_dtype)


@triton.jit
def rank_term(acc, left0, right0, LEFT, RIGHT, rows, row_mask, cols, R, stride_right_c, stride_right_r, left_scale,
              BLOCK_R: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + left_scale·LEFT[rows]·RIGHT[:, cols], the first rank chunk from operands the caller
    loaded before its main loop (so their latency hides behind it; one chunk covers r ≤ 64 in
    half precision), the chunks past it (r > BLOCK_R) loaded here."""
    acc = mma(left0, right0, acc, WIDEN_BF16_DOT, DOT_PRECISION)
    for r0 in range(BLOCK_R, R, BLOCK_R):
        left, right = rank_operands(LEFT=LEFT, RIGHT=RIGHT, rows=rows, row_mask=row_mask, cols=cols, r0=r0, R=R,
                                    stride_right_c=stride_right_c, stride_right_r=stride_right_r,
                                    left_scale=left_scale, BLOCK_R=BLOCK_R)
        acc = mma(left, right, acc, WIDEN_BF16_DOT, DOT_PRECISION)
    return acc


@triton.jit
def lora_epilogue(acc, XA, B, BIAS, rows, cols, R, stride_bn, stride_br, stride_bias, scaling,
                  HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, RANK_FP32: tl.constexpr,
                  WIDEN_BF16_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, B_ROWS_ALIGNED: tl.constexpr):
    """acc [+ scaling·XA[rows]·B[cols]ᵀ] [+ BIAS[cols]]: the epilogue of the forward output tiles
    that load their rank operands after the main loop (NF4, the cuBLAS path's expand; rows,
    cols are valid int64 indices). The term accumulates straight into acc (no second M×N tile).
    B_ROWS_ALIGNED: R and B's row stride are multiples of 8 (`b_rows_aligned`)."""
    if HAS_LORA and B_ROWS_ALIGNED:
        # as in the g kernel: at r = 8 (PEFT's default) xa's and B's rows then load as 16-byte
        # vectors (32-byte for fp32 xa), not a synchronous 2- or 4-byte load per element
        R = (R >> 3) * 8
        stride_bn = (stride_bn >> 3) * 8
    if HAS_LORA:
        # (rank_operands' loads, written out: its address arithmetic spilled sm_80's 128×256 tile)
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
def dora_scale(acc, SCALE, BIAS, cols, stride_bias, HAS_BIAS: tl.constexpr):
    """DoRA's output from the pre-scale tile acc = x·Wᵀ + s·xa·Bᵀ: acc ⊙ SCALE[cols] + BIAS[cols]
    (SCALE = magnitude / ‖W + s·B·A‖ per output column, fp32; see ``kernels.dora``)."""
    acc = acc * tl.load(SCALE + cols)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + cols * stride_bias).to(tl.float32)[None, :]
    return acc


@triton.jit
def lora_dx_term(G, A, KEEP, rows, m_mask, cols, k0, R, K, stride_ar, stride_ak, lora_scale,
                 HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """lora_scale·(G[rows]·A[:, cols])⊙keep as a fresh fp32 [BLOCK_M, BLOCK_K] accumulator for
    the columns [k0, k0 + BLOCK_K): the dX kernels under dropout start from it and continue
    with their GEMM, so the mask (which applies to this term only) needs no second tile of
    registers."""
    # (rank_operands' loads, written out: through it the TMA dX 128×256 tile spilled 4 bytes)
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
        keep = keep_from_bits(KEEP=KEEP, rows=rows, row_mask=m_mask, k0=k0, n_cols=K, BLOCK_M=BLOCK_M,
                              BLOCK_K=BLOCK_K)
        acc = tl.where(keep, acc, 0.0)
    return acc


@autotuned(FORWARD_CONFIGS, forward_family, key=["M_BUCKET", "N", "K", "R", "HAS_BIAS", "DORA", "RANK_FP32"])
@triton.jit
def _lora_forward_kernel(
    X, W, XA, B, BIAS, Y, SCALE, PRE, M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bn, stride_br, stride_bias,
    scaling,
    HAS_BIAS: tl.constexpr, DORA: tl.constexpr, BLOCK_R: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y[M, N] = X·Wᵀ + scaling·XA·Bᵀ + BIAS, the LoRA term and bias in the epilogue. DORA: PRE
    gets X·Wᵀ + scaling·XA·Bᵀ and Y = PRE ⊙ SCALE[n] + BIAS (`dora_scale`)."""
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

    # The rank operands load after the loop here (held across it they spill the sm_80 tiles).
    acc = lora_epilogue(acc=acc, XA=XA, B=B, BIAS=BIAS, rows=rows, cols=cols, R=R, stride_bn=stride_bn,
                        stride_br=stride_br, stride_bias=stride_bias, scaling=scaling, HAS_LORA=True,
                        HAS_BIAS=HAS_BIAS and not DORA, BLOCK_R=BLOCK_R, RANK_FP32=RANK_FP32,
                        WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION, B_ROWS_ALIGNED=False)

    out_rows = offs_m.to(tl.int64)
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if DORA:
        tl.store(PRE + out_rows[:, None] * N + offs_n[None, :], acc.to(PRE.dtype.element_ty), mask=out_mask)
        acc = dora_scale(acc, SCALE, BIAS, cols, stride_bias, HAS_BIAS)
    y_ptrs = Y + out_rows[:, None] * N + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=out_mask)


@autotuned(BACKWARD_G_CONFIGS, dtype_family("DY"), key=["M_BUCKET", "N", "R", "RANK_FP32"])
@triton.jit
def _lora_backward_g_kernel(
    DY, B, G, M, N, R, M_BUCKET,
    stride_dym, stride_dyn, stride_bn, stride_br,
    BLOCK_R: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    B_ROWS_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """G[M, R] = dY·B in fp32, one program per (M-block, R-chunk): one read of dY.
    B_ROWS_ALIGNED: R and B's row stride are multiples of 8 (the launcher's check)."""
    if B_ROWS_ALIGNED:
        # (v >> 3)·8, the identity here, tells the compiler what Triton's JIT does not (it marks
        # multiples of 16 only): at r = 8, PEFT's default, B's rows and the rank mask then come
        # in runs of 8, and B's tiles load as 16-byte vectors, not a synchronous 2-byte load each
        R = (R >> 3) * 8
        stride_bn = (stride_bn >> 3) * 8
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    m_mask = offs_m < M
    r_mask = offs_r < R
    rank_dtype = tl.float32 if RANK_FP32 else DY.dtype.element_ty
    g = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    dy_ptrs = DY + rows[:, None] * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn
    b_ptrs = B + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :].to(tl.int64) * stride_br
    dy_step = BLOCK_N * tl.cast(stride_dyn, tl.int64)
    b_step = BLOCK_N * tl.cast(stride_bn, tl.int64)
    for n0 in range(0, N, BLOCK_N):
        n_mask = (n0 + offs_n) < N
        dy = tl.load(dy_ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        g = mma(dy.to(rank_dtype), b.to(rank_dtype), g, WIDEN_BF16_DOT, DOT_PRECISION)
        dy_ptrs += dy_step
        b_ptrs += b_step
    tl.store(G + rows[:, None] * R + offs_r[None, :], g, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def rank_reduction(pid, pid_r, X, KEEP, G, DY, XA, DA, DB, DBIAS, M, N, K, R,
                   stride_xm, stride_xk, stride_dym, stride_dyn, da_scale, db_scale,
                   COMPUTE_DA: tl.constexpr, COMPUTE_DB: tl.constexpr, COMPUTE_DBIAS: tl.constexpr,
                   HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr,
                   RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   RANK_BLOCK_M: tl.constexpr, RANK_BLOCK_C: tl.constexpr):
    """One item of the reductions over M: RANK_BLOCK_C columns of one output (`pid`) for the
    rank chunk `pid_r`, summing every row of M in order (deterministic: no partials, no
    atomics). Both gradients have the form  out[R-chunk, cols] = scale · Lᵀ·V[:, cols]  with a
    rank-r left operand L:

        items [0, ⌈K/RANK_BLOCK_C⌉) if COMPUTE_DA:  dA      = da_scale·Gᵀ·(X⊙keep)   (reads x once)
        the next ⌈N/RANK_BLOCK_C⌉:                  dBᵀ     = db_scale·XAᵀ·dY        (reads dY once)
                                                    and DBIAS = Σ_m dY                (the same dY tiles)

    so one loop serves both (operands picked per item, dB stored transposed), each output
    written once, scaled, in its parameter's dtype: nothing is left for a finishing kernel.
    DBIAS is written by the first R-chunk's items only."""
    a_items = tl.cdiv(K, RANK_BLOCK_C) if COMPUTE_DA else 0
    is_a = pid < a_items
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_m = tl.arange(0, RANK_BLOCK_M)
    cols = tl.where(is_a, pid, pid - a_items) * RANK_BLOCK_C + tl.arange(0, RANK_BLOCK_C)
    c_mask = cols < tl.where(is_a, K, N)
    # this item's operands: L [M, R] fp32 rows of g or xa; V [M, ·] rows of x or dY
    L = tl.where(is_a, G, XA)
    V = tl.where(is_a, X, DY)
    stride_vm = tl.where(is_a, stride_xm, stride_dym).to(tl.int64)
    stride_vc = tl.where(is_a, stride_xk, stride_dyn).to(tl.int64)
    rank_dtype = tl.float32 if RANK_FP32 else X.dtype.element_ty
    acc = tl.zeros([BLOCK_R, RANK_BLOCK_C], dtype=tl.float32)
    col_sums = tl.zeros([RANK_BLOCK_C], dtype=tl.float32)
    for m0 in range(0, M, RANK_BLOCK_M):
        rows = (m0 + offs_m).to(tl.int64)
        m_mask = (m0 + offs_m) < M
        # Rows past M load as zero in both operands: they add nothing to the sums.
        v = tl.load(V + rows[:, None] * stride_vm + cols[None, :].to(tl.int64) * stride_vc,
                    mask=m_mask[:, None] & c_mask[None, :], other=0.0)
        if HAS_DROPOUT:  # x is dropped where the forward dropped it; dY is not
            # (tensor comparisons, not `& is_a`: the interpreter refuses a scalar in a mask)
            keep = keep_from_bits(KEEP=KEEP, rows=rows, row_mask=(m0 + offs_m) < tl.where(is_a, M, 0),
                                  k0=pid * RANK_BLOCK_C, n_cols=K, BLOCK_M=RANK_BLOCK_M, BLOCK_K=RANK_BLOCK_C)
            v = tl.where(keep | (offs_m >= tl.where(is_a, RANK_BLOCK_M, 0))[:, None], v, 0.0)
        if COMPUTE_DBIAS:
            col_sums += tl.sum(v.to(tl.float32), axis=0)
        left = tl.load(L + rows[:, None] * R + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        acc = mma(tl.trans(left.to(rank_dtype)), v.to(rank_dtype), acc, WIDEN_BF16_DOT, DOT_PRECISION)
    if is_a:
        tl.store(DA + offs_r[:, None].to(tl.int64) * K + cols[None, :], (acc * da_scale).to(DA.dtype.element_ty),
                 mask=r_mask[:, None] & c_mask[None, :])
    else:
        if COMPUTE_DB:  # dBᵀ's tile, stored into dB [N, R]
            tl.store(DB + cols[None, :].to(tl.int64) * R + offs_r[:, None], (acc * db_scale).to(DB.dtype.element_ty),
                     mask=r_mask[:, None] & c_mask[None, :])
        if COMPUTE_DBIAS:
            if pid_r == 0:
                tl.store(DBIAS + cols, col_sums.to(DBIAS.dtype.element_ty), mask=c_mask)


@autotuned(BACKWARD_RANK_CONFIGS, dtype_family("X"),
           key=["M_BUCKET", "N", "K", "R", "COMPUTE_DA", "COMPUTE_DB", "COMPUTE_DBIAS", "HAS_DROPOUT", "RANK_FP32"])
@triton.jit(do_not_specialize=["M", "M_BUCKET"])  # M = 1 as a constant: ptxas spilled 24-40 bytes at 56 registers
def _lora_backward_rank_kernel(
    X, KEEP, G, DY, XA, DA, DB, DBIAS, M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_dym, stride_dyn, da_scale, db_scale,
    COMPUTE_DA: tl.constexpr, COMPUTE_DB: tl.constexpr, COMPUTE_DBIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_R: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The reductions over M (dA, dB, the bias gradient) as their own launch, one program per
    item of `rank_reduction`: for the dX GEMMs that cannot take them as extra work (pointer
    GEMMs, NF4, cuBLAS) and for calls that need no dX."""
    rank_reduction(pid=tl.program_id(0), pid_r=tl.program_id(1), X=X, KEEP=KEEP, G=G, DY=DY, XA=XA, DA=DA, DB=DB,
                   DBIAS=DBIAS, M=M, N=N, K=K, R=R, stride_xm=stride_xm, stride_xk=stride_xk, stride_dym=stride_dym,
                   stride_dyn=stride_dyn, da_scale=da_scale, db_scale=db_scale, COMPUTE_DA=COMPUTE_DA,
                   COMPUTE_DB=COMPUTE_DB, COMPUTE_DBIAS=COMPUTE_DBIAS, HAS_DROPOUT=HAS_DROPOUT, BLOCK_R=BLOCK_R,
                   WIDEN_BF16_DOT=WIDEN_BF16_DOT, RANK_FP32=RANK_FP32, DOT_PRECISION=DOT_PRECISION,
                   RANK_BLOCK_M=BLOCK_M, RANK_BLOCK_C=BLOCK_C)


@autotuned(BACKWARD_DX_CONFIGS, dtype_family("DY"), key=["M_BUCKET", "N", "K", "R", "HAS_DROPOUT", "RANK_FP32"])
@triton.jit
def _lora_backward_dx_kernel(
    DY, W, G, A, KEEP, DX, M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, lora_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """DX = dY·W + lora_scale·(G·A)⊙keep per output tile (M-block, K-block), lora_scale =
    scaling/(1-p): the LoRA term starts the accumulator the GEMM then continues."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    k_mask = offs_k < K
    rows = offs_m.to(tl.int64)
    cols = (offs_k % K).to(tl.int64)  # wrapped like the forward GEMM; the store is masked
    acc = lora_dx_term(G=G, A=A, KEEP=KEEP, rows=rows, m_mask=m_mask, cols=cols, k0=pid_k * BLOCK_K, R=R, K=K,
                       stride_ar=stride_ar, stride_ak=stride_ak, lora_scale=lora_scale, HAS_DROPOUT=HAS_DROPOUT,
                       BLOCK_R=BLOCK_R, WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION,
                       BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
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


@autotuned(FORWARD_TMA_CONFIGS, forward_tma_family,
           key=["M_BUCKET", "N", "K", "R", "HAS_BIAS", "DORA", "W_KN", "RANK_FP32"])
@triton.jit
def _lora_forward_tma_kernel(
    X, W, XA, B, BIAS, Y, SCALE, PRE, M, N, K, R, M_BUCKET,
    stride_xm, stride_w, stride_bn, stride_br, stride_bias, scaling, num_programs,
    HAS_BIAS: tl.constexpr, DORA: tl.constexpr, W_KN: tl.constexpr, BLOCK_R: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y = X·Wᵀ + scaling·XA·Bᵀ + BIAS as `_lora_forward_kernel`, persistent (num_programs
    programs, each looping over output tiles in grouped order) with X, W and Y through TMA
    tensor descriptors: the copy engine moves the tiles (no address arithmetic in the warps),
    edges are zero-filled on load and clipped on store, so no masks. W_KN: W is stored [K, N]
    (a transposed view, e.g. GPT-2's Conv1D weight; stride_w its row stride), read as such."""
    x_desc = tl.make_tensor_descriptor(X, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    if W_KN:  # [K, N] tiles are the B operand as they are: wgmma reads them N-major from shared memory
        w_desc = tl.make_tensor_descriptor(W, shape=[K, N], strides=[stride_w, 1], block_shape=[BLOCK_K, BLOCK_N])
    else:
        w_desc = tl.make_tensor_descriptor(W, shape=[N, K], strides=[stride_w, 1], block_shape=[BLOCK_N, BLOCK_K])
    y_desc = tl.make_tensor_descriptor(Y, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    if DORA:
        pre_desc = tl.make_tensor_descriptor(PRE, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    # Not flattened (tl.range(..., flatten=True) would overlap a tile's epilogue with the next
    # tile's first loads): a per-tile k-loop is what the static estimate reads; to measure on a GPU.
    for tile in range(tl.program_id(0), tiles, num_programs):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        # The epilogue's loads wrap past the edge onto valid rows/columns; the store clips them.
        rows = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
        cols = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
        # The LoRA term's first rank chunk is loaded now, consumed after the main loop.
        xa0, b0 = rank_operands(LEFT=XA, RIGHT=B, rows=rows, row_mask=rows >= 0, cols=cols, r0=0, R=R,
                                stride_right_c=stride_bn, stride_right_r=stride_br, left_scale=scaling,
                                BLOCK_R=BLOCK_R)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, k_steps):
            x = x_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            if W_KN:
                acc = mma(x, w_desc.load([k * BLOCK_K, pid_n * BLOCK_N]), acc, WIDEN_BF16_DOT, DOT_PRECISION)
            else:
                acc = mma(x, w_desc.load([pid_n * BLOCK_N, k * BLOCK_K]).T, acc, WIDEN_BF16_DOT, DOT_PRECISION)
        acc = rank_term(acc=acc, left0=xa0, right0=b0, LEFT=XA, RIGHT=B, rows=rows, row_mask=rows >= 0, cols=cols,
                        R=R, stride_right_c=stride_bn, stride_right_r=stride_br, left_scale=scaling, BLOCK_R=BLOCK_R,
                        WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION)
        acc = lora_epilogue(acc=acc, XA=XA, B=B, BIAS=BIAS, rows=rows, cols=cols, R=R, stride_bn=stride_bn,
                            stride_br=stride_br, stride_bias=stride_bias, scaling=scaling, HAS_LORA=False,
                            HAS_BIAS=HAS_BIAS and not DORA, BLOCK_R=BLOCK_R, RANK_FP32=RANK_FP32,
                            WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION, B_ROWS_ALIGNED=False)
        if DORA:
            pre_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(PRE.dtype.element_ty))
            acc = dora_scale(acc, SCALE, BIAS, cols, stride_bias, HAS_BIAS)
        y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(Y.dtype.element_ty))


@autotuned(BACKWARD_DX_TMA_CONFIGS, dx_tma_family,
           key=["M_BUCKET", "N", "K", "R", "HAS_DROPOUT", "W_KN", "RANK_FP32"])
@triton.jit
def _lora_backward_dx_tma_kernel(
    DY, W, G, A, KEEP, DX, X, XA, DA, DB, DBIAS, M, N, K, R, M_BUCKET,
    stride_dym, stride_w, stride_ar, stride_ak, stride_xm, stride_xk, lora_scale, da_scale, db_scale,
    num_programs,
    W_KN: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE_DA: tl.constexpr, COMPUTE_DB: tl.constexpr,
    COMPUTE_DBIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RANK_BLOCK_M: tl.constexpr, RANK_BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """DX = dY·W + lora_scale·(G·A)⊙keep as `_lora_backward_dx_kernel`, persistent, with dY, W
    and DX through TMA tensor descriptors — and the reductions over M of the rank pass
    (`rank_reduction`: dA, dB, the bias gradient) as extra programs of the same launch.

    Programs [0, num_programs) loop over the dX tiles (one per SM); each program past them runs
    one rank item. The hardware starts those as SMs free up, so the memory-bound rank items fill
    the GEMM's last, partial wave (at M = 8192, d = 4096 on 132 SMs, 2048 tiles of 128×128 leave
    66 SMs idle for one tile's time) and stream x and dY beside tensor-core-bound tiles, instead of a launch
    of their own after the GEMM. Nothing orders the two: both read only g, x, dY and write
    disjoint outputs. W_KN: W is stored [K, N] (a transposed view; stride_w its row stride)."""
    pid = tl.program_id(0)
    if pid < num_programs:
        dy_desc = tl.make_tensor_descriptor(DY, shape=[M, N], strides=[stride_dym, 1],
                                            block_shape=[BLOCK_M, BLOCK_N])
        if W_KN:  # [K, N] tiles, transposed in shared memory for the B operand
            w_desc = tl.make_tensor_descriptor(W, shape=[K, N], strides=[stride_w, 1],
                                               block_shape=[BLOCK_K, BLOCK_N])
        else:
            w_desc = tl.make_tensor_descriptor(W, shape=[N, K], strides=[stride_w, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
        dx_desc = tl.make_tensor_descriptor(DX, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(K, BLOCK_K)
        n_steps = tl.cdiv(N, BLOCK_N)
        # The term starts the accumulator under dropout (the mask applies to it alone) and in
        # tiles wider than 128 × 128 (no registers left to hold its operands across the loop);
        # otherwise its first rank chunk is loaded at the tile's start and added after the loop.
        TERM_FIRST: tl.constexpr = HAS_DROPOUT or BLOCK_M * BLOCK_K > 128 * 128
        for tile in range(pid, tiles, num_programs):
            pid_m, pid_k = grouped_tile(tile, M, K, BLOCK_M, BLOCK_K, GROUP_M)
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            cols = ((pid_k * BLOCK_K + tl.arange(0, BLOCK_K)) % K).to(tl.int64)
            rows = offs_m.to(tl.int64)
            m_mask = offs_m < M
            if TERM_FIRST:
                acc = lora_dx_term(G=G, A=A, KEEP=KEEP, rows=rows, m_mask=m_mask, cols=cols, k0=pid_k * BLOCK_K,
                                   R=R, K=K, stride_ar=stride_ar, stride_ak=stride_ak, lora_scale=lora_scale,
                                   HAS_DROPOUT=HAS_DROPOUT, BLOCK_R=BLOCK_R, WIDEN_BF16_DOT=WIDEN_BF16_DOT,
                                   DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
            else:
                acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
                g0, a0 = rank_operands(LEFT=G, RIGHT=A, rows=rows, row_mask=m_mask, cols=cols, r0=0, R=R,
                                       stride_right_c=stride_ak, stride_right_r=stride_ar, left_scale=lora_scale,
                                       BLOCK_R=BLOCK_R)
            for n in range(0, n_steps):
                dy = dy_desc.load([pid_m * BLOCK_M, n * BLOCK_N])
                if W_KN:
                    w = w_desc.load([pid_k * BLOCK_K, n * BLOCK_N]).T
                else:
                    w = w_desc.load([n * BLOCK_N, pid_k * BLOCK_K])
                acc = mma(dy, w, acc, WIDEN_BF16_DOT, DOT_PRECISION)
            if not TERM_FIRST:
                acc = rank_term(acc=acc, left0=g0, right0=a0, LEFT=G, RIGHT=A, rows=rows, row_mask=m_mask,
                                cols=cols, R=R, stride_right_c=stride_ak, stride_right_r=stride_ar,
                                left_scale=lora_scale, BLOCK_R=BLOCK_R, WIDEN_BF16_DOT=WIDEN_BF16_DOT,
                                DOT_PRECISION=DOT_PRECISION)
            dx_desc.store([pid_m * BLOCK_M, pid_k * BLOCK_K], acc.to(DX.dtype.element_ty))
    else:
        if COMPUTE_DA or COMPUTE_DB or COMPUTE_DBIAS:
            item = pid - num_programs
            column_items = (tl.cdiv(K, RANK_BLOCK_C) if COMPUTE_DA else 0) + \
                (tl.cdiv(N, RANK_BLOCK_C) if COMPUTE_DB or COMPUTE_DBIAS else 0)
            rank_reduction(pid=item % column_items, pid_r=item // column_items, X=X, KEEP=KEEP, G=G, DY=DY, XA=XA,
                           DA=DA, DB=DB, DBIAS=DBIAS, M=M, N=N, K=K, R=R, stride_xm=stride_xm, stride_xk=stride_xk,
                           stride_dym=stride_dym, stride_dyn=1, da_scale=da_scale, db_scale=db_scale,
                           COMPUTE_DA=COMPUTE_DA, COMPUTE_DB=COMPUTE_DB, COMPUTE_DBIAS=COMPUTE_DBIAS,
                           HAS_DROPOUT=HAS_DROPOUT, BLOCK_R=BLOCK_R, WIDEN_BF16_DOT=WIDEN_BF16_DOT,
                           RANK_FP32=RANK_FP32, DOT_PRECISION=DOT_PRECISION, RANK_BLOCK_M=RANK_BLOCK_M,
                           RANK_BLOCK_C=RANK_BLOCK_C)


@autotuned(PIECE_CONFIGS, dtype_family("C"), key=["M_BUCKET", "N", "R", "HAS_BIAS", "RANK_FP32"])
@triton.jit
def _lora_expand_kernel(
    XA, B, BIAS, C, M, N, R, M_BUCKET, stride_bn, stride_br, stride_bias, scaling,
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, B_ROWS_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """C[M, N] = scaling·XA·Bᵀ + BIAS in C's dtype: the LoRA term and bias of the cuBLAS path's
    forward, which cuBLAS then adds to x·Wᵀ (C of addmm). Memory-bound: writes M×N once."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = lora_epilogue(acc=acc, XA=XA, B=B, BIAS=BIAS, rows=(offs_m % M).to(tl.int64), cols=(offs_n % N).to(tl.int64),
                        R=R, stride_bn=stride_bn, stride_br=stride_br, stride_bias=stride_bias, scaling=scaling,
                        HAS_LORA=True, HAS_BIAS=HAS_BIAS, BLOCK_R=BLOCK_R, RANK_FP32=RANK_FP32,
                        WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION,
                        B_ROWS_ALIGNED=B_ROWS_ALIGNED)
    c_ptrs = C + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@autotuned(PIECE_CONFIGS, dtype_family("Y"), key=["M_BUCKET", "N", "HAS_BIAS"])
@triton.jit
def _dora_scale_kernel(
    PRE, SCALE, BIAS, Y, M, N, M_BUCKET, stride_bias,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Y[M, N] = PRE ⊙ SCALE[n] + BIAS[n] (`dora_scale`): the DoRA output of the cuBLAS path's
    forward from its pre-scale output (cuBLAS's addmm). Memory-bound: reads and writes M×N once."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    offsets = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    pre = tl.load(PRE + offsets, mask=mask, other=0.0).to(tl.float32)
    y = dora_scale(pre, SCALE, BIAS, (offs_n % N).to(tl.int64), stride_bias, HAS_BIAS)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@autotuned(PIECE_CONFIGS, dtype_family("C"), key=["M_BUCKET", "K", "R", "HAS_DROPOUT", "RANK_FP32"])
@triton.jit
def _lora_dx_term_kernel(
    G, A, KEEP, C, M, K, R, M_BUCKET, stride_ar, stride_ak, lora_scale,
    HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, RANK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """C[M, K] = lora_scale·(G·A)⊙keep in C's dtype: the LoRA term of the cuBLAS path's dX,
    which cuBLAS then adds to dY·W (C of addmm). BLOCK_N is the tile's column count (of K)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    acc = lora_dx_term(G=G, A=A, KEEP=KEEP, rows=offs_m.to(tl.int64), m_mask=m_mask, cols=(offs_k % K).to(tl.int64),
                       k0=tl.program_id(1) * BLOCK_N, R=R, K=K, stride_ar=stride_ar, stride_ak=stride_ak,
                       lora_scale=lora_scale, HAS_DROPOUT=HAS_DROPOUT, BLOCK_R=BLOCK_R,
                       WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_N)
    c_ptrs = C + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=m_mask[:, None] & (offs_k[None, :] < K))


# --------------------------------------------------------------------------------------
# Launchers. Inputs are validated by peft_ops.ops.lora; these only shape, allocate and launch.
# --------------------------------------------------------------------------------------

def keep_words(K: int) -> int:
    """int32 words per row of a bit-packed keep mask of K columns."""
    return triton.cdiv(K, 32)


def shrink_split_k(M: int, K: int, fp32_rank: bool = False) -> int:
    """K slices of the shrink: 1 (the autotuned `_lora_shrink_kernel`) above SHRINK_SPLIT_MAX_M
    rows, else the largest power of two ≤ SHRINK_MAX_SPLIT with at least one K tile per slice
    (`fp32_rank`: the rank products take fp32 operands, a narrower tile)."""
    if M > SHRINK_SPLIT_MAX_M:
        return 1
    tiles = triton.cdiv(K, SHRINK_SPLIT_TILE[current_target()][fp32_rank]["BLOCK_K"])
    return min(SHRINK_MAX_SPLIT, 1 << (tiles.bit_length() - 1))


def shrink(x: torch.Tensor, lora_A: torch.Tensor, dropout_p: float, seed: int, *, scratch=None):
    """(xa, keep): xa = dropout(x)·lora_Aᵀ in fp32 [M, r]; keep the dropout keep mask, bit-packed
    ([M, ⌈K/32⌉] int32, bit b of word j = column 32j + b), or None without dropout. x is 2-D
    [M, K] with any strides. At decode sizes K is split over programs (`shrink_split_k`);
    `scratch(device, floats, counters)` gives their reusable partials and zeroed counters
    (``peft_ops.ops.workspace``: no memset per call); without it they are allocated per call."""
    M, K = x.shape
    R = lora_A.shape[0]
    xa = torch.empty((M, R), device=x.device, dtype=torch.float32)
    keep = torch.empty((M, keep_words(K)), device=x.device, dtype=torch.int32) if dropout_p > 0 else None
    if M == 0:
        return xa, keep
    flags = launch_flags(x.dtype, lora_A.dtype, R)
    fp32_rank = torch.float32 in (x.dtype, lora_A.dtype)
    split = shrink_split_k(M, K, fp32_rank)
    args = (x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), seed, dropout_p, 1.0 / (1.0 - dropout_p))
    with launch_guard(x, lora_A):
        if split == 1:
            grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(R, META["BLOCK_R"]))  # noqa: E731
            launch(_lora_shrink_kernel, grid, x, lora_A, xa, keep if keep is not None else xa, M, K, R, m_bucket(M),
                   *args, HAS_DROPOUT=dropout_p > 0, **flags)
            return xa, keep
        tile = SHRINK_SPLIT_TILE[current_target()][fp32_rank]
        tiles = triton.cdiv(M, tile["BLOCK_M"]) * triton.cdiv(R, flags["BLOCK_R"])
        floats, counters = split * tiles * tile["BLOCK_M"] * flags["BLOCK_R"], tiles
        partials, counts = scratch(x.device, floats, counters) if scratch is not None else (
            torch.empty(floats, device=x.device, dtype=torch.float32),
            torch.zeros(counters, device=x.device, dtype=torch.int32))
        launch(_lora_shrink_split_kernel, (triton.cdiv(M, tile["BLOCK_M"]), triton.cdiv(R, flags["BLOCK_R"]), split),
               x, lora_A, xa, keep if keep is not None else xa, partials, counts, M, K, R, *args,
               HAS_DROPOUT=dropout_p > 0, **flags, SPLIT_K=split, BLOCK_M=tile["BLOCK_M"], BLOCK_K=tile["BLOCK_K"],
               num_warps=tile["num_warps"], num_stages=tile["num_stages"])
    return xa, keep


def tma_ready(*matrices: torch.Tensor) -> bool:
    """Whether TMA tensor descriptors can address these 2-D tensors: unit inner stride, and the
    base and the row stride 16-byte aligned (the copy engine's rules)."""
    return all(t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in matrices)


def weight_operand(weight: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(the rows TMA reads W [N, K] through, whether they are W's columns): W itself when its
    inner stride is 1, else Wᵀ when that one's is — a Conv1D weight [in, out] passed as its
    transpose, read in place (no copy) by the kernels' W_KN layout."""
    transposed = weight.stride(1) != 1 and weight.stride(0) == 1
    return (weight.t() if transposed else weight), transposed


def uses_tma(*matrices: torch.Tensor) -> bool:
    """Whether a GEMM over these operands takes the persistent TMA kernel here (sm_90a, or a
    target a test added to TMA_TARGETS) rather than the pointer-based one."""
    return current_target() in TMA_TARGETS and tma_ready(*matrices)


def _scratch(size: int, alignment: int, stream):
    # PyTorch's caching allocator aligns to ≥ 256 bytes (Triton asks for 128).
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRETED else torch.cuda.current_device())


def ensure_scratch_allocator() -> None:
    """Tensor descriptors made inside a kernel need Triton's global scratch allocator: install
    one over PyTorch's caching allocator unless the caller installed their own. (It is a
    context variable: the autograd engine's threads start without one, hence a check per launch.)"""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def persistent_programs(device: torch.device) -> int:
    """Programs of a persistent kernel: one per SM (its tiles fill an SM), a few in the interpreter."""
    return multiprocessor_count(device) or INTERPRETER_PROGRAMS


GEMMS = ("triton", "cublas")


def forward(x: torch.Tensor, weight: torch.Tensor, xa: torch.Tensor, lora_B: torch.Tensor,
            scaling: float, bias: torch.Tensor | None, gemm: str = "triton") -> torch.Tensor:
    """y = x·weightᵀ + scaling·xa·lora_Bᵀ + bias, [M, N] in x's dtype.

    gemm="triton": one fused kernel — the persistent TMA GEMM on sm_90a when the operands allow
    descriptors, else the pointer-based GEMM — with the LoRA term and bias in its epilogue.
    gemm="cublas": the expand kernel writes C = scaling·xa·Bᵀ + bias and ``torch.addmm`` adds
    x·Wᵀ to it (cuBLAS on a GPU): one more launch and one more M×N write + read, against
    cuBLAS's own GEMM; the LoRA term is rounded once more (to x's dtype, as addmm's C)."""
    return _forward(x, weight, xa, lora_B, scaling, bias, gemm, None)[0]


def dora_forward(x: torch.Tensor, weight: torch.Tensor, xa: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 bias: torch.Tensor | None, col_scale: torch.Tensor, gemm: str = "triton"):
    """(y, pre): pre = x·weightᵀ + scaling·xa·lora_Bᵀ (the pre-scale output DoRA's backward
    needs) and y = pre ⊙ col_scale + bias, both [M, N] in x's dtype; col_scale fp32 [N] (the
    magnitude over the column norm, ``dora.weight_norm``). The same GEMM as :func:`forward`,
    the scale in its epilogue (gemm="triton"); on the cuBLAS path the scale and bias are one
    more launch (`_dora_scale_kernel`, after addmm's pre)."""
    return _forward(x, weight, xa, lora_B, scaling, bias, gemm, col_scale)


def _forward(x, weight, xa, lora_B, scaling, bias, gemm, col_scale):
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
    M, K = x.shape
    N = weight.shape[0]
    R = lora_B.shape[1]
    dora = col_scale is not None
    if M == 0:
        empty = torch.empty((M, N), device=x.device, dtype=x.dtype)
        return empty, (torch.empty_like(empty) if dora else None)
    if gemm == "cublas":
        c = torch.empty((M, N), device=x.device, dtype=x.dtype)
        expand_bias = None if dora else bias  # DoRA: the bias comes after the scale
        with launch_guard(x, weight, lora_B):
            launch(_lora_expand_kernel, lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(N, META["BLOCK_N"])),
                xa, lora_B, expand_bias if expand_bias is not None else c, c, M, N, R, m_bucket(M), lora_B.stride(0),
                lora_B.stride(1), expand_bias.stride(0) if expand_bias is not None else 0, float(scaling),
                HAS_BIAS=expand_bias is not None, B_ROWS_ALIGNED=b_rows_aligned(lora_B),
                **launch_flags(x.dtype, lora_B.dtype, R))
        y = torch.addmm(c, x, weight.t())
        if not dora:
            return y, None
        scaled = torch.empty_like(y)
        with launch_guard(y, col_scale):
            launch(_dora_scale_kernel, lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(N, META["BLOCK_N"])),
                y, col_scale, bias if bias is not None else y, scaled, M, N, m_bucket(M),
                bias.stride(0) if bias is not None else 0, HAS_BIAS=bias is not None)
        return scaled, y
    common = dict(HAS_BIAS=bias is not None, DORA=dora, **launch_flags(x.dtype, lora_B.dtype, R))
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    pre = torch.empty_like(y) if dora else None
    dora_args = (col_scale, pre) if dora else (y, y)  # unused pointers when not DORA
    w_rows, w_kn = weight_operand(weight)
    with launch_guard(x, weight, lora_B):
        if uses_tma(x, w_rows, y):
            ensure_scratch_allocator()
            programs = persistent_programs(x.device)
            grid = lambda META: (min(programs, triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"])),)  # noqa: E731
            launch(_lora_forward_tma_kernel, grid,
                x, weight, xa, lora_B, bias if bias is not None else y, y, *dora_args, M, N, K, R, m_bucket(M),
                x.stride(0), w_rows.stride(0), lora_B.stride(0), lora_B.stride(1),
                bias.stride(0) if bias is not None else 0, float(scaling), programs, W_KN=w_kn, **common)
            return y, pre
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
        launch(_lora_forward_kernel, grid,
            x, weight, xa, lora_B, bias if bias is not None else y, y, *dora_args, M, N, K, R, m_bucket(M),
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_B.stride(0), lora_B.stride(1),
            bias.stride(0) if bias is not None else 0,
            float(scaling), **common,
        )
    return y, pre


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
             lora_B: torch.Tensor, xa: torch.Tensor, keep: torch.Tensor | None, scaling: float, dropout_p: float,
             need_dx: bool, need_dA: bool, need_dB: bool, need_db: bool, gemm: str = "triton",
             dy_base: torch.Tensor | None = None):
    """(dx, dA, dB, db) of the LoRA layer (None where not needed); dW is the caller's.

    dx = dy_base·W + s/(1-p)·((dy·B)·A)⊙keep  [M, K], x's dtype (dy_base: dy unless given)
    dA = s/(1-p)·(dy·B)ᵀ·(x⊙keep)             [r, K], lora_A's dtype
    dB = s·dyᵀ·xa                             [N, r], lora_B's dtype
    db = Σ_m dy                               [N], dy's dtype

    gemm: the dX GEMM fused ("triton") or cuBLAS's ``torch.addmm`` over the LoRA term written by
    `_lora_dx_term_kernel` ("cublas"; one more launch), as in ``forward``. `dy_base` [M, N] (dy's
    dtype): another gradient for the base product only (DoRA's dY⊙c, its rank terms taking dY with
    c folded into B); the rank pass then runs as its own launch.
    """
    if gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
    base = dy if dy_base is None else dy_base

    def launch_dx(g, dx, lora_scale, rank, **constexprs):
        if dy_base is not None:
            rank = None  # the TMA GEMM's rank items read its own dY operand: here not the rank terms' dY
        M, N = dy.shape
        K = x.shape[1]
        if gemm == "cublas":
            c = torch.empty_like(dx)
            launch(_lora_dx_term_kernel,
                lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(K, META["BLOCK_N"])),
                g, lora_A, keep if keep is not None else g, c, M, K, lora_A.shape[0], m_bucket(M),
                lora_A.stride(0), lora_A.stride(1), lora_scale, **constexprs)
            torch.addmm(c, base, weight, out=dx)
            return False
        tiles = lambda META: triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(K, META["BLOCK_K"])  # noqa: E731
        w_rows, w_kn = weight_operand(weight)
        if uses_tma(base, w_rows, dx):
            ensure_scratch_allocator()
            programs = persistent_programs(dy.device)
            rank_block_m, rank_block_c = RANK_ITEM_TILE[current_target()][lora_A.dtype == torch.float32]
            if rank is None:
                items, rank = 0, dict(X=g, XA=g, DA=g, DB=g, DBIAS=g, da_scale=0.0, db_scale=0.0, COMPUTE_DA=False,
                                      COMPUTE_DB=False, COMPUTE_DBIAS=False)
            else:
                items = rank_items(M, N, K, constexprs["BLOCK_R"], lora_A.shape[0], rank_block_c, rank)
            launch(_lora_backward_dx_tma_kernel, (programs + items,),
                base, weight, g, lora_A, keep if keep is not None else g, dx, rank["X"], rank["XA"], rank["DA"],
                rank["DB"], rank["DBIAS"], M, N, K, lora_A.shape[0], m_bucket(M), base.stride(0), w_rows.stride(0),
                lora_A.stride(0), lora_A.stride(1), x.stride(0), x.stride(1), lora_scale, rank["da_scale"],
                rank["db_scale"], programs, W_KN=w_kn, COMPUTE_DA=rank["COMPUTE_DA"], COMPUTE_DB=rank["COMPUTE_DB"],
                COMPUTE_DBIAS=rank["COMPUTE_DBIAS"], RANK_BLOCK_M=rank_block_m, RANK_BLOCK_C=rank_block_c,
                **constexprs)
            return items > 0
        grid = lambda META: (tiles(META),)  # noqa: E731
        launch(_lora_backward_dx_kernel, grid,
            base, weight, g, lora_A, keep if keep is not None else g, dx, M, N, x.shape[1], lora_A.shape[0],
            m_bucket(M), base.stride(0), base.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0),
            lora_A.stride(1), lora_scale, **constexprs)
        return False

    with launch_guard(dy, base, x, weight, lora_A, lora_B):
        return backward_with(launch_dx, dy, x, lora_A, lora_B, xa, keep, scaling, dropout_p, need_dx, need_dA,
                             need_dB, need_db)


def rank_items(M: int, N: int, K: int, block_r: int, R: int, block_c: int, rank: dict) -> int:
    """Items of `rank_reduction` for column blocks of `block_c`: one per (output column block,
    rank chunk)."""
    columns = triton.cdiv(K, block_c) * rank["COMPUTE_DA"] + \
        triton.cdiv(N, block_c) * (rank["COMPUTE_DB"] or rank["COMPUTE_DBIAS"])
    return columns * triton.cdiv(R, block_r)


def b_rows_aligned(lora_B: torch.Tensor) -> bool:
    """Whether B's [N, r] rows are runs of a multiple of 8 elements, 8-aligned (the g kernel's
    B_ROWS_ALIGNED)."""
    return lora_B.shape[1] % 8 == 0 and lora_B.stride(0) % 8 == 0 and lora_B.stride(1) == 1


def g_and_dB(dy: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor, scaling: float, need_g: bool, need_dB: bool,
             adapter_dtype: torch.dtype):
    """(g = dY·B [M, r] fp32, dB = scaling·dYᵀ·xa [N, r] in lora_B's dtype), None where not
    needed: the rank-side pieces of the LoRA backward (`_lora_backward_g_kernel` and the rank
    pass with dB alone), for an op whose input side is its own (the embedding's gathered A)."""
    M, N = dy.shape
    R = lora_B.shape[1]
    flags = launch_flags(dy.dtype, adapter_dtype, R)
    rank_chunks = triton.cdiv(R, flags["BLOCK_R"])
    g = torch.empty((M, R), device=dy.device, dtype=torch.float32) if need_g else None
    dB = (torch.zeros if M == 0 else torch.empty)((N, R), device=dy.device, dtype=lora_B.dtype) if need_dB else None
    if M == 0:
        return g, dB
    if need_g:
        launch(_lora_backward_g_kernel, lambda META: (triton.cdiv(M, META["BLOCK_M"]), rank_chunks),
            dy, lora_B, g, M, N, R, m_bucket(M), dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1),
            B_ROWS_ALIGNED=b_rows_aligned(lora_B), **flags)
    if need_dB:
        launch(_lora_backward_rank_kernel, lambda META: (triton.cdiv(N, META["BLOCK_C"]), rank_chunks),
            dy, xa, xa, dy, xa, xa, dB, dy, M, N, N, R, m_bucket(M), dy.stride(0), dy.stride(1),  # X: dY's type
            dy.stride(0), dy.stride(1), 0.0, float(scaling), COMPUTE_DA=False, COMPUTE_DB=True,
            COMPUTE_DBIAS=False, HAS_DROPOUT=False, **flags)
    return g, dB


def backward_with(launch_dx, dy: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                  xa: torch.Tensor, keep: torch.Tensor | None, scaling: float, dropout_p: float, need_dx: bool,
                  need_dA: bool, need_dB: bool, need_db: bool):
    """The LoRA backward for any frozen base weight, in at most three launches: g = dY·B,
    `launch_dx(g, dx, lora_scale, rank, **constexprs)` — the dX GEMM of the caller's weight
    format (dense here, NF4 in nf4.py), which returns whether it also ran the reductions over M
    described by `rank` (the persistent TMA GEMM takes them as extra programs) — and, unless it
    did, the rank pass: dA, dB and the bias gradient, final."""
    M, N = dy.shape
    K = x.shape[1]
    R = lora_A.shape[0]
    device = dy.device
    dx = torch.empty((M, K), device=device, dtype=x.dtype) if need_dx else None
    alloc = torch.zeros if M == 0 else torch.empty  # M = 0: sums over no rows
    dA = alloc((R, K), device=device, dtype=lora_A.dtype) if need_dA else None
    dB = alloc((N, R), device=device, dtype=lora_B.dtype) if need_dB else None
    db = alloc((N,), device=device, dtype=dy.dtype) if need_db else None
    if M == 0:
        return dx, dA, dB, db
    flags = launch_flags(dy.dtype, lora_A.dtype, R)
    rank_chunks = triton.cdiv(R, flags["BLOCK_R"])
    lora_scale = scaling / (1.0 - dropout_p)
    has_dropout = keep is not None
    g = None
    if need_dx or need_dA:
        g = torch.empty((M, R), device=device, dtype=torch.float32)
        launch(_lora_backward_g_kernel, lambda META: (triton.cdiv(M, META["BLOCK_M"]), rank_chunks),
            dy, lora_B, g, M, N, R, m_bucket(M), dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1),
            B_ROWS_ALIGNED=b_rows_aligned(lora_B), **flags)
    rank = None
    if need_dA or need_dB or need_db:
        unused = xa  # any tensor, for pointers the constexprs switch off
        rank = dict(X=x, XA=xa, DA=dA if need_dA else unused, DB=dB if need_dB else unused,
                    DBIAS=db if need_db else unused, da_scale=lora_scale, db_scale=float(scaling), COMPUTE_DA=need_dA,
                    COMPUTE_DB=need_dB, COMPUTE_DBIAS=need_db)
    if need_dx and launch_dx(g, dx, lora_scale, rank, HAS_DROPOUT=has_dropout, **flags):
        rank = None  # the dX launch ran the rank items
    if rank is not None:
        def rank_grid(META):
            return (triton.cdiv(K, META["BLOCK_C"]) * need_dA + triton.cdiv(N, META["BLOCK_C"]) * (need_dB or need_db),
                    rank_chunks)
        launch(_lora_backward_rank_kernel, rank_grid,
            x, keep if has_dropout else xa, g if g is not None else xa, dy, xa, rank["DA"], rank["DB"], rank["DBIAS"],
            M, N, K, R, m_bucket(M), x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), lora_scale,
            float(scaling), COMPUTE_DA=need_dA, COMPUTE_DB=need_dB, COMPUTE_DBIAS=need_db, HAS_DROPOUT=has_dropout,
            **flags)
    return dx, dA, dB, db


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
    plain = ("M", "seed", "num_programs")
    specs = []
    for variant, v in AOT_VARIANTS.items():
        dt, rt, family = v["dtype"], v["rank_dtype"], v["family"]
        fp32_rank = rt == "fp32"
        common = dict(BLOCK_R=block_r(64, fp32_rank), WIDEN_BF16_DOT=False, RANK_FP32=fp32_rank and dt != "fp32",
                      DOT_PRECISION="tf32x3")

        def build(name, kernel, configs, pointers, constexprs, family=family, variant=variant, common=common,
                  plain_ints=plain, **kw):
            for cfg in configs[target][family]:
                specs.append(KernelBuild(f"{name} [{variant}]", kernel, cfg, pointers, {**common, **constexprs},
                                         plain_ints=plain_ints, vector_loads=True, **kw))

        build("lora_shrink", _lora_shrink_kernel, SHRINK_CONFIGS, dict(X=dt, A=rt, XA="fp32", KEEP="i32"),
              dict(HAS_DROPOUT=True), unit_strides=("stride_xk", "stride_ak"),
              float_args=("dropout_p", "keep_scale"))
        split_tile = SHRINK_SPLIT_TILE[target][family != "half"]
        specs.append(KernelBuild(
            f"lora_shrink_split [{variant}]", _lora_shrink_split_kernel,
            triton.Config({}, num_warps=split_tile["num_warps"], num_stages=split_tile["num_stages"]),
            dict(X=dt, A=rt, XA="fp32", KEEP="i32", PARTIALS="fp32", COUNTERS="i32"),
            {**common, "HAS_DROPOUT": True, "SPLIT_K": SHRINK_MAX_SPLIT, "BLOCK_M": split_tile["BLOCK_M"],
             "BLOCK_K": split_tile["BLOCK_K"]},
            plain_ints=plain, unit_strides=("stride_xk", "stride_ak"), float_args=("dropout_p", "keep_scale"),
            vector_loads=True))
        build("lora_forward", _lora_forward_kernel, FORWARD_CONFIGS,
              dict(X=dt, W=dt, XA="fp32", B=rt, BIAS=dt, Y=dt, SCALE="fp32", PRE=dt), dict(HAS_BIAS=True, DORA=False),
              unit_strides=("stride_xk", "stride_wk", "stride_br", "stride_bias"), float_args=("scaling",))
        build("lora_forward", _lora_forward_kernel, FORWARD_CONFIGS,
              dict(X=dt, W=dt, XA="fp32", B=rt, BIAS=dt, Y=dt, SCALE="fp32", PRE=dt), dict(HAS_BIAS=True, DORA=True),
              variant=f"{variant}, DoRA", family="dora" if family == "half" else family,
              unit_strides=("stride_xk", "stride_wk", "stride_br", "stride_bias"),
              float_args=("scaling",))
        # as at r = 8 (PEFT's default): R and B's row stride multiples of 8, not 16
        build("lora_backward_g", _lora_backward_g_kernel, BACKWARD_G_CONFIGS, dict(DY=dt, B=rt, G="fp32"),
              dict(B_ROWS_ALIGNED=True), unit_strides=("stride_dyn", "stride_br"),
              plain_ints=plain + ("R", "stride_bn"))
        build("lora_backward_rank", _lora_backward_rank_kernel, BACKWARD_RANK_CONFIGS,
              dict(X=dt, KEEP="i32", G="fp32", DY=dt, XA="fp32", DA=rt, DB=rt, DBIAS=dt),
              dict(COMPUTE_DA=True, COMPUTE_DB=True, COMPUTE_DBIAS=True, HAS_DROPOUT=True),
              unit_strides=("stride_xk", "stride_dyn"), float_args=("da_scale", "db_scale"))
        build("lora_backward_dx", _lora_backward_dx_kernel, BACKWARD_DX_CONFIGS,
              dict(DY=dt, W=dt, G="fp32", A=rt, KEEP="i32", DX=dt), dict(HAS_DROPOUT=True),
              unit_strides=("stride_dyn", "stride_wk", "stride_ak"), float_args=("lora_scale",))
        if variant == "bf16":  # W stored [K, N] (Conv1D): unit stride along N, the B tiles N-major
            build("lora_forward", _lora_forward_kernel, FORWARD_CONFIGS,
                  dict(X=dt, W=dt, XA="fp32", B=rt, BIAS=dt, Y=dt, SCALE="fp32", PRE=dt),
                  dict(HAS_BIAS=True, DORA=False), variant=f"{variant}, W [K, N]", family="kn",
                  unit_strides=("stride_xk", "stride_wn", "stride_br", "stride_bias"), float_args=("scaling",))
            build("lora_backward_dx", _lora_backward_dx_kernel, BACKWARD_DX_CONFIGS,
                  dict(DY=dt, W=dt, G="fp32", A=rt, KEEP="i32", DX=dt), dict(HAS_DROPOUT=True),
                  variant=f"{variant}, W [K, N]", unit_strides=("stride_dyn", "stride_wn", "stride_ak"),
                  float_args=("lora_scale",))
        build("lora_expand", _lora_expand_kernel, PIECE_CONFIGS, dict(XA="fp32", B=rt, BIAS=dt, C=dt),
              dict(HAS_BIAS=True, B_ROWS_ALIGNED=True), unit_strides=("stride_br", "stride_bias"),
              float_args=("scaling",))
        if not fp32_rank or dt == "fp32":  # no rank operands: the fp32-adapter variant is the bf16 build
            for cfg in PIECE_CONFIGS[target][family]:
                specs.append(KernelBuild(f"dora_scale [{dt}]", _dora_scale_kernel, cfg,
                                         dict(PRE=dt, SCALE="fp32", BIAS=dt, Y=dt), dict(HAS_BIAS=True),
                                         plain_ints=plain, unit_strides=("stride_bias",), uses_tensor_cores=False))
        build("lora_dx_term", _lora_dx_term_kernel, PIECE_CONFIGS, dict(G="fp32", A=rt, KEEP="i32", C=dt),
              dict(HAS_DROPOUT=True), unit_strides=("stride_ak",), float_args=("lora_scale",))
        if target in TMA_TARGETS:  # the persistent TMA GEMMs (sm_90a only: TMA)
            # DoRA with and without a bias (without one the wide tile spilled where it did not with)
            for dora, bias in ((False, True), (True, True), (True, False)):
                build("lora_forward_tma", _lora_forward_tma_kernel, FORWARD_TMA_CONFIGS,
                      dict(X=dt, W=dt, XA="fp32", B=rt, BIAS=dt, Y=dt, SCALE="fp32", PRE=dt),
                      dict(HAS_BIAS=bias, DORA=dora, W_KN=False),
                      variant=variant + (", DoRA" if dora else "") + ("" if bias else ", no bias"),
                      family="dora" if dora and family == "half" else family,
                      unit_strides=("stride_br", "stride_bias"), float_args=("scaling",))
            # W stored [K, N] (Conv1D): the same GEMM with the B operand's tiles N-major (LoRA, DoRA)
            for dora in (False, True):
                build("lora_forward_tma", _lora_forward_tma_kernel, FORWARD_TMA_CONFIGS,
                      dict(X=dt, W=dt, XA="fp32", B=rt, BIAS=dt, Y=dt, SCALE="fp32", PRE=dt),
                      dict(HAS_BIAS=True, DORA=dora, W_KN=True),
                      variant=f"{variant}, DoRA, W [K, N]" if dora else f"{variant}, W [K, N]",
                      family="dora" if dora and family == "half" else family,
                      unit_strides=("stride_br", "stride_bias"), float_args=("scaling",))
            rank_block_m, rank_block_c = RANK_ITEM_TILE[target][fp32_rank]
            # without dropout, dX holds its first rank chunk across the loop; W [K, N]: Conv1D's layout
            for dropout, w_kn in ((True, False), (False, False), (True, True)):
                label = variant + ("" if dropout else ", no dropout") + (", W [K, N]" if w_kn else "")
                build("lora_backward_dx_tma", _lora_backward_dx_tma_kernel, BACKWARD_DX_TMA_CONFIGS,
                      dict(DY=dt, W=dt, G="fp32", A=rt, KEEP="i32", DX=dt, X=dt, XA="fp32", DA=rt, DB=rt, DBIAS=dt),
                      dict(HAS_DROPOUT=dropout, W_KN=w_kn, COMPUTE_DA=True, COMPUTE_DB=True, COMPUTE_DBIAS=True,
                           RANK_BLOCK_M=rank_block_m, RANK_BLOCK_C=rank_block_c),
                      variant=label, family="kn" if w_kn and family == "half" else family,
                      unit_strides=("stride_ak", "stride_xk"),
                      float_args=("lora_scale", "da_scale", "db_scale"))
    return specs

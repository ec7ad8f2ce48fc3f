"""Fused bottleneck-adapter kernels and their launchers (tensors in, tensors out; no autograd).

    h = x·W_downᵀ + b_down          x [M, d], W_down [m, d], b_down [m]     (h: [M, m], fp32)
    y = x + s·drop(act(h)·W_upᵀ + b_up)          W_up [d, m], b_up [d]       (y: [M, d])

Design, from a cost model (bf16, M = 8192, d = 4096, m = 64):

- 4·M·d·m = 8.6 GFLOP against ≥ 2·M·d·2 B = 134 MB of activations: ≈ m FLOP/byte, below every
  GPU's ridge point, so the op is memory-bound and the only question is how many times the
  M×d tensors cross HBM.
- Eager PyTorch (linear, act, linear, ·s, + x): reads x for the down projection, writes and
  reads h and act(h) (M×m, small), writes z = act(h)·W_upᵀ + b_up, reads it to scale it, writes
  s·z, reads it and x again for the residual, writes y: 6 passes over M×d (403 MB at the shape
  above; 7 with dropout). The forward kernel below makes 2 (read x, write y: 134 MB) plus
  h [M, m] fp32 for the backward (2 MiB) and the weights once per program (from L2).
- Forward, one program per BLOCK_M rows: phase 1 streams the row block of x to accumulate
  h [BLOCK_M, m] in registers (m ≤ 256); phase 2 streams it again for the residual while it
  forms act(h)·W_upᵀ chunk by chunk and writes y. The second read is meant for L2: phase 1
  loads x with evict_last and phase 2 with evict_first (rows in flight: ~2 programs/SM ×
  BLOCK_M × d × 2 B = 34 MiB at BLOCK_M = 16 on 132 SMs, under the 50 MiB L2 of an H100/H200).
  Phase 2's loop carries its own stage count (RESIDUAL_STAGES), which makes Triton's pipeliner
  stream x's tiles with `cp.async` like W_up's; by default it pipelines only loads that feed a
  dot, and the residual load waited a full memory latency per iteration (static estimate,
  H200, bf16, M = 8192, d = 4096, m = 64: 37.8 → 35.0 µs, now bound by L2→SM bytes).
- Two-pass forward (`two_pass_forward`: m = 256 and fp32 m > 64 always, bf16/fp16 m ≤ 128 on
  sm_80 always and on sm_90 below 8192 rows): the one kernel streams all of W_down and W_up through every row
  block (4 MiB per block at m = 256, d = 4096) in row tiles its m-wide registers keep small
  (32 rows, `mma.sync`): bound by shared-memory operand bytes, and below M = 8192 its row
  blocks leave SMs idle. `_bottleneck_down_kernel` computes h by GEMM tiles of 64 bottleneck
  columns (the dh kernel's shape: 64–128 rows, `wgmma`; a row block's programs are neighbours,
  sharing its x rows in L2) and writes h (saved) and act(h) in x's dtype (scratch, M×m);
  `_bottleneck_up_kernel` owns a column block of d over a row slice, loads W_up[cols, :] and
  b_up[cols] once for the whole slice, and per 64-row block forms act(h)·W_upᵀ (`wgmma`, K = m)
  with the residual, bias and dropout in its epilogue. x crosses HBM twice instead of once
  (+M·d·2 B), which the one kernel wins back only once its row blocks fill the GPU (see the
  table). Static estimate, H200, bf16, d = 4096, M = 4096, m = 256: 82.4 → 42.5 µs.
- Backward (dz = s·dY⊙keep/(1-p), the gradient reaching the branch's output):
  `_bottleneck_backward_dh_kernel` reads dY once per row block: dh = (dz·W_up)⊙act′(h)
  [M, m] fp32, and act(h) [M, m] in x's dtype (computed once per element: the dX kernel's
  ⌈d/BLOCK_D⌉ column blocks each recomputed it before, 64× at d = 4096 — an erf per element
  for gelu, ≈ a third of that kernel's instructions). `_bottleneck_backward_dx_kernel` owns a
  column block of d and a slice of rows; it keeps W_down[:, cols] in registers, reads dY and
  x once, writes dX = dY + dh·W_down, and accumulates dW_down = dhᵀ·x, dW_up = dzᵀ·act(h),
  db_up = Σ dz for its columns over its rows. 4 passes over M×d (dY twice, x, dX) against
  eager's ≈ 8 (5 for the two linears' gradients, the residual sum read twice and written once).
- Reductions over M are deterministic: within a program in a fixed row order, across row
  slices as fp32 partials that `_bottleneck_finish_kernel` sums in slice order, scales and
  casts to the parameters' dtype (one launch where PyTorch took 8: 4 sums, 2 scalings, 2
  casts); the slice count and the backward tiles are fixed per target and shape (never
  autotuned), so the order never changes. No float atomics. db_down = Σ_M dh: the first column
  block's programs sum their slice's dh rows after their main loop. Backward: 3 launches, also
  where the dX kernel's launch runs its roles as sets of programs with tiles of their own
  (m ≥ 128 on sm_90, every half-precision m on sm_80: one program doing dX and the partials
  either spilled or had to take tiles too small for the dX GEMM): dX's, dW_down's and
  db_down's partials', dW_up's and db_up's (apart, each partials' program holds one
  [m, BLOCK_D] accumulator, not two: twice the columns; static estimate, bf16, d = 4096, the
  launch at M = 4096 / 8192: H200 m = 256 61.6 / 116.9 µs with the partials in one role →
  49.6 / 92.9; A100 m = 128 275.4 / 542.9 with one role for all → 110.2 / 189.9; see
  BACKWARD_DX_TILES).
- The dh kernel also writes dh in x's dtype (fp16/bf16: the dX kernel's dot operand, rounded
  there before): the dX kernel's ⌈d/BLOCK_D⌉ column blocks each re-read dh, and read half the
  bytes (static estimate, H200, bf16, d = 4096, M = 4096, m = 256: dX kernel 119 → 83 µs at its
  tiles then; m = 128: 52 → 38 µs). The fp32 dh stays for db_down's sum. Its programs own 64
  bottleneck columns (DH_BLOCK_B), several per row block when m > 64: GEMM tiles of 64–128 rows
  on `wgmma` instead of 32-row `mma.sync` tiles m wide (m = 256: 32.4 → 22.4 µs).
- Where this design stops (static estimate, same shape; `peft_ops.tools.estimate`). The HBM
  roofline reads x and writes y (forward), reads dY and x and writes dX (backward): 5 passes,
  336 MB, 70.5 µs at 4.8 TB/s; the ≥ 80 % target means ≤ 88 µs. Here: forward 35.0 µs, dh
  19.6, dX 52.2 (HBM-bound), finishing kernel 5.8: 112.5 µs = 63 %. The backward reads dY twice
  (the dh pass owns rows, the dX pass owns columns), so the design's floor is 6 passes: every
  kernel at 0.9 of HBM plus 2.5 µs per launch gives ≈ 103 µs (68 %). Reading dY once needs a
  row slice's dh before that slice's dX programs read dY again (from L2): one launch whose dX
  work items wait on their slice's dh items, items taken in order from an atomic counter (so
  every awaited item belongs to a program already running: no deadlock). Its bytes (201 MB at
  0.9 of HBM: ≈ 51 µs) suggest ≈ 90 µs with the forward, but the same model without its HBM term
  puts the two passes' SM time above that: dh 13.9 µs (bound by L2→SM bytes) + dX 47.1 µs
  (bound by shared-memory operand bytes) = 61 µs, so fwd + one backward launch with the
  finishing work folded in is ≈ 98 µs (72 %), still under 80 %. Not built: that gain does not
  reach the target, and its correctness rests on memory ordering between programs, which the
  interpreter (one program at a time) cannot exercise; it waits for a GPU to validate it.
- The one-kernel forward does not stage W_down and W_up for many row blocks: together they are
  4·d·m bytes (1 MiB at the shape above, 192 KiB at d = 768, m = 64) against 228 KiB of shared
  memory per SM. At M = 8192 the 64-row blocks give 128 programs for 132 SMs, so each SM
  already reads W once per launch (from L2: 40 % of the forward's L2→SM bytes, which bound it
  there). What a program can hold for a whole row slice is a column block's slice of W (the
  up kernel's W_up[cols, :], the dX kernel's W_down[:, cols]): the two-pass forward and the
  backward are built that way. From
  M = 16384 the forward is HBM-bound (65.9 µs: 0.9 of HBM plus the launch), and a 128-row
  tile, which would halve W's share (it builds: 185 registers, 0 spills), won nowhere in the
  estimate, so the tables leave it out. Below M = 8192 row blocks leave SMs idle (M = 4096:
  64 programs; the forward takes as long as at 8192).
- Dropout (on the branch output, before the residual) reuses the LoRA kernels' Philox mask: a
  pure function of (seed, row, column), regenerated in the backward, never stored.
- Offsets along M (and the strides they multiply) are int64: M·d passes 2³¹ at long sequences.
- Bottleneck sizes up to `max_bottleneck(dtype)` run here (256 in fp16/bf16, 128 in fp32:
  the widest tile family in the tables): h, act(h), dh and the dW accumulators are register tiles m wide, and wider
  ones spilled (ptxas). Past that the op nears compute-bound (m FLOP/byte against a ridge of
  ≈ 150–300 on an A100/H100/H200) and peft_ops runs its PyTorch path (cuBLAS GEMMs) instead.
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
    launch,
    launch_guard,
    m_bucket,
    mma,
    tile_configs,
)
from .dropout import keep_tile
from .interface import ACTIVATIONS  # constexpr ACTIVATION = the activation's index in it


def block_bottleneck(bottleneck_size: int) -> int:
    """The register tile width that holds the whole bottleneck (tl.dot needs ≥ 16)."""
    return max(16, triton.next_power_of_2(bottleneck_size))


def tile_family(dtype: torch.dtype, block_b: int) -> str:
    """Key of the tile tables: operand family ("half" or "fp32": tf32x3 dots split every fp32
    operand in two) / bottleneck tile class (the h, act(h) and dW tiles grow with it)."""
    return ("fp32" if dtype == torch.float32 else "half") + "/" + ("b64" if block_b <= 64 else f"b{block_b}")


def _configs(rows):
    return tile_configs(("BLOCK_M", "BLOCK_D"), rows)


# The one-kernel forward's autotune lists (BLOCK_M, BLOCK_D, warps, stages) per target and tile
# family; `peft-ops aot` proves every one spill-free, with and without biases and dropout. It
# has no tiles for m = 256 (fp16/bf16) and m > 64 (fp32): the two-pass forward runs those
# (FORWARD_TWO_PASS_ROWS), faster on every target and shape the estimate knows.
# sm_90a m ≤ 64 starts at 16×128 with 4 warps and 4 stages: without biases or dropout the
# forward spilled 24 bytes at 8 warps and at 4 warps with 3 stages (0 at 4 stages, 79
# registers), and 4 warps estimate faster for both kernels (forward 79.0 → 70.8 µs, dh 42.5 →
# 34.3 µs at M = 8192, d = 4096, 3 stages; neither is the fastest tile there).
_HALF = {
    "sm80": {"half/b64": [(16, 128, 4, 3), (32, 64, 4, 3), (64, 64, 8, 3), (16, 64, 4, 4)],
             "half/b128": [(16, 64, 4, 3), (32, 64, 8, 3), (16, 128, 8, 3)]},
    "sm90": {"half/b64": [(16, 128, 4, 4), (32, 64, 4, 3), (64, 64, 8, 3), (64, 128, 8, 3)],
             "half/b128": [(16, 64, 4, 3), (32, 64, 8, 3), (64, 64, 8, 3)]},
}


def _tables(fp32: dict) -> dict:
    tables = {t: {family: _configs(rows) for family, rows in {**_HALF[t], **fp32[t]}.items()} for t in _HALF}
    return {**tables, "interpreter": _configs([(16, 32, 4, 1)])}


FORWARD_CONFIGS = _tables({
    "sm80": {"fp32/b64": [(16, 32, 4, 3), (32, 32, 8, 3)]},
    "sm90": {"fp32/b64": [(16, 32, 4, 3), (32, 32, 8, 3), (64, 64, 8, 3)]},
})
# The dh kernel reduces over d inside one row block, so its tiles may be tuned (like the LoRA
# dY kernel); the dX kernel sums over rows, so its tiles are fixed (see the module docstring).
# Its programs are DH_BLOCK_B = 64 bottleneck columns wide whatever the bottleneck, so it has
# the b64 families only. sm_90 drops the forward's 32×64 (it spilled 32 bytes here, writing
# the dh operand) and adds 128×128 (176–185 registers, 0 spills), the fastest at m = 256:
# static estimate, H200, bf16, d = 4096, M = 4096 / 8192: 22.4 / 42.2 µs, against 32.4 / 62.4
# with one program per row block (32-row `mma.sync` tiles: 64 rows spilled 224 bytes); m = 128:
# 16.4 / 22.4 against 25.2 / 25.2 (128-wide programs: 22.4 / 22.4).
DH_BLOCK_B = 64
BACKWARD_DH_CONFIGS = {
    "sm80": {"half/b64": _configs(_HALF["sm80"]["half/b64"]),
             "fp32/b64": _configs([(16, 128, 4, 3), (32, 64, 4, 3), (16, 64, 4, 4)])},
    "sm90": {"half/b64": _configs([(16, 128, 4, 4), (64, 64, 8, 3), (64, 128, 8, 3), (128, 128, 8, 3)]),
             "fp32/b64": _configs([(16, 128, 4, 3), (32, 64, 4, 3), (64, 64, 8, 3)])},
    "interpreter": _configs([(16, 32, 4, 1)]),
}
# The dX kernel's fixed tiles: programs computing dX and the parameter gradients, or ("dx",
# "dw"; one launch) dX programs beside programs of dW_down's and db_down's partials and programs
# of dW_up's and db_up's, the partials' two roles at one tile of their own ("dw with dropout"
# where the mask's registers spilled at "dw"): one more read of dY and dh than one role, but the
# dX role takes GEMM tiles and each partials' role holds one [m, BLOCK_D] fp32 accumulator, not
# two, so takes twice the columns. The fastest spill-free choice in the static estimate (H200 /
# A100, bf16, d = 4096, µs at M = 4096 / 8192, each role timed as its own launch at the
# launch's occupancy; `split_roles`):
# - sm_90 m = 64: one role, 64×64 with 4 warps (2 CTAs per SM, `wgmma m64n64k16`): HBM-bound
#   from M = 8192; 8 warps 70 against 52 µs at M = 8192.
# - sm_90 m = 128: split, 64×128 | 64×128 with 8 warps: 34.4 / 62.3 (partials' roles at 32×128:
#   41.0 / 75.6), against the partials in one role at 32×128: 34.3 / 66.0, and one role for
#   all at 64×64: 38.1 / 69.8 (4 warps spilled 848 bytes).
# - sm_90 m = 256: split, 64×128 | 64×128 with 8 warps, 3 stages: 49.6 / 92.9 (with dropout
#   64×64: 64×128 spilled 392 bytes, 32×128 88), against the partials in one role at 32×64:
#   61.6 / 116.9, one role for all at 32×64: 83.2 / 160.0 (the partials' roles at 32×128:
#   51.9 / 101.2; 128×128 does not fit shared memory).
# - sm_80 m = 256: split, 64×128 | 64×64, 2 stages: 200.6 / 357.8 (partials' roles at 32×64:
#   232.3 / 421.0; 32×128 spilled 200 bytes), against the partials in one role at 16×64: 216.6 /
#   391.5. m = 128: split, 64×128 | 64×128: 110.2 / 189.9 (at 64×64: 136.7 / 242.9), against
#   one role for all at 16×32: 275.4 / 542.9. m = 64: split, 64×128 | 64×256 (64×128 with
#   dropout: 64×256 spilled 300 bytes): 72.0 / 125.3 (partials' roles at 64×128: 79.4 / 138.2),
#   against one role at 32×32: 161.3 / 314.6 — sm_80 is far from its HBM floor here, so the
#   extra read of dY costs less than the tiles win (on sm_90 m = 64 the one role is HBM-bound).
#   sm_80 fp32 m ≤ 64 at 16×32: 32×32 spilled 460 bytes without dropout (255 registers; 16×32
#   195 / 214 registers, 0 spills).
_ONE = (16, 16, 4, 1)
BACKWARD_DX_TILES = {
    "sm80": {"half/b64": {"dx": (64, 128, 8, 2), "dw": (64, 256, 8, 2), "dw with dropout": (64, 128, 8, 2)},
             "half/b128": {"dx": (64, 128, 8, 2), "dw": (64, 128, 8, 2)},
             "half/b256": {"dx": (64, 128, 8, 2), "dw": (64, 64, 8, 2)},
             "fp32/b64": (16, 32, 8, 2), "fp32/b128": (16, 16, 8, 2)},
    "sm90": {"half/b64": (64, 64, 4, 3), "half/b128": {"dx": (64, 128, 8, 3), "dw": (64, 128, 8, 3)},
             "half/b256": {"dx": (64, 128, 8, 3), "dw": (64, 128, 8, 3), "dw with dropout": (64, 64, 8, 3)},
             "fp32/b64": (32, 32, 8, 2), "fp32/b128": (16, 16, 8, 2)},
    # the split variant here too, so that the CPU tests run it
    "interpreter": {"half/b64": _ONE, "half/b128": _ONE, "half/b256": {"dx": _ONE, "dw": _ONE},
                    "fp32/b64": _ONE, "fp32/b128": _ONE},
}
# The two-pass forward: always for the families the one-kernel forward has no tiles for, and
# below FORWARD_TWO_PASS_ROWS[target][tile family] rows for the others. Static estimate, µs,
# forward, d = 4096, M = 512 / 4096 / 8192, one kernel → two passes:
# - H200 bf16 m = 256: 68.5 / 82.4 / 162.2 → 28.7 / 42.5 / 80.0; m = 128: 46.7 / 52.8 / 52.8 →
#   23.8 / 34.9 / 56.7 (at 8192 rows the one kernel's 64-row blocks fill the SMs, and it reads x
#   once from HBM where the two passes read it twice); m = 64: 21.5 / 35.0 / 35.0 → 20.1 / 34.7
#   / 52.8 (not taken: within 7 % below 8192 rows); fp32 m = 100: 91.3 / 175.3 / 357.7 → 50.1 /
#   126.9 / 244.9.
# - A100 bf16 m = 256: 106.5 / 283.7 / 425.4 → 41.0 / 134.7 / 211.1; m = 128: 60.1 / 132.7 /
#   198.9 → 28.9 / 91.7 / 153.1; fp32 m = 100: 132.7 / 390.6 / 648.5 → 59.4 / 263.5 / 475.1.
FORWARD_TWO_PASS_ROWS = {"sm80": {"half/b128": math.inf}, "sm90": {"half/b128": 8192},
                         "interpreter": {"half/b128": math.inf, "half/b256": math.inf, "fp32/b128": math.inf}}
# Its first pass is the dh kernel's GEMM shape ([M, d]·[d, 64] per program), with lists of its
# own where the dh kernel's spilled here (16×128: 8–108 bytes).
DOWN_CONFIGS = {
    "sm80": {"half/b64": _configs(_HALF["sm80"]["half/b64"]), "fp32/b64": _configs([(32, 64, 4, 3), (16, 64, 4, 4)])},
    "sm90": {"half/b64": _configs([(16, 64, 4, 4), (32, 64, 4, 3), (64, 64, 8, 3), (64, 128, 8, 3), (128, 128, 8, 3)]),
             "fp32/b64": _configs([(32, 64, 4, 3), (64, 64, 8, 3)])},
    "interpreter": BACKWARD_DH_CONFIGS["interpreter"],
}
# Its second pass, the up kernel, owns a column block of d and a row slice (fixed tiles: the
# slices follow them; the row loop's stages are the last number). The fastest spill-free in
# the static estimate, µs at M = 512 / 4096 / 8192:
# - H200 bf16 m = 256: 64×128 with 8 warps, 12.3 / 20.1 / 37.7 (4 warps, 11.2 / 19.0 / 35.0,
#   spilled 348 bytes with bias and dropout; 128×128 does not fit shared memory); m ≤ 128: 64×64
#   with 4 warps, 7.4 / 18.5 (2 CTAs per SM; 128×128 spilled 48 bytes with bias and dropout);
#   fp32: 32×64 with 8 warps (4 warps and every 64-row tile spilled 240–3,788 bytes).
# - A100 m = 256: 64×128 with 4 warps, 2 stages, 17.5 / 58.9 / 87.1 (8 warps 20.3 / 70.0 /
#   103.7); m ≤ 128: 64×64 with 4 warps, 10.1 / 40.9 / 77.4.
UP_TILES = {
    "sm80": {"half/b128": (64, 64, 4, 3), "half/b256": (64, 128, 4, 2), "fp32/b128": (32, 64, 8, 2)},
    "sm90": {"half/b128": (64, 64, 4, 3), "half/b256": (64, 128, 8, 3), "fp32/b128": (32, 64, 8, 2)},
    "interpreter": {"half/b128": _ONE, "half/b256": _ONE, "fp32/b128": _ONE},
}
# The bounds of loops over kernel-local names, as expressions of the launch arguments (for the
# static estimate, peft_ops.tools.estimate): the dX and up kernels' row loops cover one slice.
LOOP_BOUNDS = {"_bottleneck_backward_dx_kernel": {"row_start": "0", "row_end": "min(M, rows_per_slice)"},
               "_bottleneck_up_kernel": {"row_start": "0", "row_end": "min(M, rows_per_slice)"}}
# Loops that only some programs run (for the static estimate): the dX kernel's Σ dh pass (the
# first column block), and the finishing kernel's four slice sums (each program runs one).
LOOP_SHARES = {
    "_bottleneck_backward_dx_kernel": {"for m1 in range(row_start, row_end, BLOCK_M):": "1 / cdiv(D, BLOCK_D)"},
    "_bottleneck_finish_kernel": {"for s in tl.range(0, slices, num_stages=RESIDUAL_STAGES):": "1 / 4"},
}


def partials_tiles(tiles: dict, dropout_p: float) -> tuple:
    """The partials' roles' tiles of a split entry of BACKWARD_DX_TILES: its "dw with dropout"
    where dropout is on and it has one (the mask's registers spilled at the wider tile)."""
    return tiles.get("dw with dropout", tiles["dw"]) if dropout_p > 0 else tiles["dw"]


def split_roles(args: dict) -> list[tuple[dict, tuple]] | None:
    """For the static estimate: a SPLIT launch of the dX kernel as its three roles, each the
    launch of that role alone ([(arguments, grid)]: the dX programs, then the dW_down partials',
    then the dW_up partials'), since the roles inline the same row loop (one source line) at
    different tiles; None otherwise."""
    if not args.get("SPLIT"):
        return None
    D, M = args["D"], args["M"]
    one = {**args, "SPLIT": False, "dx_programs": 0}
    dx_columns = triton.cdiv(D, args["BLOCK_D"])
    dx = ({**one, "COMPUTE_DW": False}, (dx_columns, args["dx_programs"] // dx_columns))
    dw = {**one, "COMPUTE_DX": False, "BLOCK_M": args["DW_BLOCK_M"], "BLOCK_D": args["DW_BLOCK_D"],
          "rows_per_slice": args["dw_rows_per_slice"]}
    dw_grid = (triton.cdiv(D, args["DW_BLOCK_D"]), triton.cdiv(M, args["dw_rows_per_slice"]))
    return [dx, ({**dw, "DW_PART": 1}, dw_grid), ({**dw, "DW_PART": 2}, dw_grid)]


LAUNCH_ROLES = {"_bottleneck_backward_dx_kernel": split_roles}
RESIDUAL_STAGES = tl.constexpr(3)  # pipeline depth of loops whose loads do not all feed a dot (see the forward)
ROWS_PER_SLICE = 1024  # the dX kernel's row slices: at least this many rows each …
TARGET_PROGRAMS = 256  # … and no more slices than it takes to reach this many programs


def max_bottleneck(dtype: torch.dtype) -> int:
    """The widest bottleneck the tile tables hold for `dtype`: the largest class of its family
    ("b64" holds m ≤ 64, "b128" m ≤ 128, …); wider ones spilled (ptxas)."""
    family = tile_family(dtype, 16).split("/")[0] + "/b"
    return max(int(key[len(family):]) for key in BACKWARD_DX_TILES[current_target()] if key.startswith(family))


def two_pass_forward(family: str, M: int, target: str | None = None) -> bool:
    """Whether the forward of `family` (tile_family) over M rows runs as two passes on
    `target` (the current one by default): FORWARD_TWO_PASS_ROWS, and always where the
    one-kernel forward has no tiles."""
    target = target or current_target()
    tables = FORWARD_CONFIGS[target]
    has_tiles = family in tables if isinstance(tables, dict) else True  # the interpreter: one list for all
    return not has_tiles or M < FORWARD_TWO_PASS_ROWS[target].get(family, 0)


def _tile_family_of_launch(named_args: dict, constexprs: dict) -> str:
    """The tile family of a launch (autotune pruning): operand dtype / bottleneck tile class."""
    return tile_family(named_args["X" if "X" in named_args else "DY"].dtype, constexprs["BLOCK_B"])


@triton.jit
def activation(h, ACTIVATION: tl.constexpr):
    """act(h) in fp32; act(0) = 0 for all four, so padded bottleneck columns stay zero."""
    if ACTIVATION == 0:  # relu
        return tl.maximum(h, 0.0)
    elif ACTIVATION == 1:  # gelu: h·Φ(h), with the exact (erf) normal CDF, as F.gelu
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACTIVATION == 2:  # gelu_tanh: tanh(u) = 2σ(2u) - 1 (Triton has no portable tanh)
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        return h * tl.sigmoid(2.0 * u)  # = 0.5·h·(1 + tanh(u))
    else:  # silu
        return h * tl.sigmoid(h)


@triton.jit
def activation_grad(h, ACTIVATION: tl.constexpr):
    """act′(h) in fp32 (relu′(0) = 0, as PyTorch)."""
    if ACTIVATION == 0:
        return tl.where(h > 0.0, 1.0, 0.0)
    elif ACTIVATION == 1:  # Φ(h) + h·φ(h)
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        return cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    elif ACTIVATION == 2:  # ½(1 + t) + ½·h·(1 - t²)·u′ with t = tanh(u)
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        du = 0.7978845608028654 * (1.0 + 0.134145 * h * h)
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * du
    else:  # σ(h)·(1 + h·(1 - σ(h)))
        sig = tl.sigmoid(h)
        return sig * (1.0 + h * (1.0 - sig))


@triton.jit
def rows_times_d_by_m(ACT, stride_am, stride_ad, MAT, stride_mat_d, stride_mat_b, rows, m_mask, b_mask, D, seed,
                      dropout_p, HAS_DROPOUT: tl.constexpr, EVICTION: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_B: tl.constexpr):
    """ACT[rows, :]·MAT over the whole row, fp32 [BLOCK_M, BLOCK_B], MAT a [d, m] matrix (given by
    its strides; W_downᵀ in the forward, W_up in the dh kernel), streamed BLOCK_D columns at a
    time; with HAS_DROPOUT, ACT's dropped elements are zeroed first (exact)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_b = tl.arange(0, BLOCK_B)
    acc = tl.zeros([BLOCK_M, BLOCK_B], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = (d0 + offs_d).to(tl.int64)
        d_mask = (d0 + offs_d) < D
        act = tl.load(ACT + rows[:, None] * stride_am + cols[None, :] * stride_ad,
                      mask=m_mask[:, None] & d_mask[None, :], other=0.0, eviction_policy=EVICTION)
        if HAS_DROPOUT:
            keep = keep_tile(seed=seed, rows=rows, k0=d0, n_cols=D, dropout_p=dropout_p, BLOCK_M=BLOCK_M,
                             BLOCK_K=BLOCK_D)
            act = tl.where(keep, act, 0.0)
        mat = tl.load(MAT + cols[:, None] * stride_mat_d + offs_b[None, :] * stride_mat_b,
                      mask=d_mask[:, None] & b_mask[None, :], other=0.0)
        acc = mma(act, mat, acc, WIDEN_BF16_DOT, DOT_PRECISION)
    return acc


@autotuned(FORWARD_CONFIGS, _tile_family_of_launch,
           key=["M_BUCKET", "D", "BOTTLENECK", "HAS_DROPOUT", "SAVE_H", "ACTIVATION"])
@triton.jit(do_not_specialize=["seed"])  # a fresh seed per step must not trigger a recompile
def _bottleneck_forward_kernel(
    X, W_DOWN, B_DOWN, W_UP, B_UP, Y, H, M, D, BOTTLENECK, M_BUCKET,
    stride_xm, stride_xd, stride_down_b, stride_down_d, stride_up_d, stride_up_b,
    scaling, seed, dropout_p, keep_scale,
    ACTIVATION: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, SAVE_H: tl.constexpr, BLOCK_B: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Y = X + s·drop(act(X·W_downᵀ + b_down)·W_upᵀ + b_up) for one block of rows; H = the
    pre-activation (fp32) when SAVE_H."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m.to(tl.int64)
    m_mask = offs_m < M
    b_mask = offs_b < BOTTLENECK
    x_row_ptrs = X + rows[:, None] * stride_xm

    # Phase 1: h = x·W_downᵀ over the whole row, in registers; evict_last: phase 2 reads these
    # rows again, and should find them in L2.
    h = rows_times_d_by_m(ACT=X, stride_am=stride_xm, stride_ad=stride_xd, MAT=W_DOWN, stride_mat_d=stride_down_d,
                          stride_mat_b=stride_down_b, rows=rows, m_mask=m_mask, b_mask=b_mask, D=D, seed=seed,
                          dropout_p=dropout_p, HAS_DROPOUT=False, EVICTION="evict_last",
                          WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M,
                          BLOCK_D=BLOCK_D, BLOCK_B=BLOCK_B)
    if HAS_DOWN_BIAS:
        h += tl.load(B_DOWN + offs_b, mask=b_mask, other=0.0).to(tl.float32)[None, :]
    if SAVE_H:
        tl.store(H + rows[:, None] * BOTTLENECK + offs_b[None, :], h, mask=m_mask[:, None] & b_mask[None, :])
    # act(h) meets the tensor cores in x's dtype: its one rounding on the way to y.
    act = activation(h, ACTIVATION).to(X.dtype.element_ty)

    # Phase 2: y = x + s·drop(act·W_upᵀ + b_up), one column block at a time. The loop's own
    # stage count makes the pipeliner stream x's tiles too (cp.async), not only W_up's: by
    # default it pipelines only loads that feed a dot, and the residual's would wait a full
    # memory latency each iteration.
    for d0 in tl.range(0, D, BLOCK_D, num_stages=RESIDUAL_STAGES):
        cols = (d0 + offs_d).to(tl.int64)
        d_mask = (d0 + offs_d) < D
        w_up_t = tl.load(W_UP + cols[None, :] * stride_up_d + offs_b[:, None] * stride_up_b,
                         mask=b_mask[:, None] & d_mask[None, :], other=0.0)
        z = mma(act, w_up_t, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), WIDEN_BF16_DOT, DOT_PRECISION)
        if HAS_UP_BIAS:
            z += tl.load(B_UP + cols, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_DROPOUT:
            keep = keep_tile(seed=seed, rows=rows, k0=d0, n_cols=D, dropout_p=dropout_p, BLOCK_M=BLOCK_M,
                             BLOCK_K=BLOCK_D)
            z = tl.where(keep, z * keep_scale, 0.0)
        io_mask = m_mask[:, None] & d_mask[None, :]
        x = tl.load(x_row_ptrs + cols[None, :] * stride_xd, mask=io_mask, other=0.0, eviction_policy="evict_first")
        y = x.to(tl.float32) + scaling * z
        tl.store(Y + rows[:, None] * D + cols[None, :], y.to(Y.dtype.element_ty), mask=io_mask)


@triton.jit
def row_and_bottleneck_block(M, BOTTLENECK, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    """This program's block of rows and of bottleneck columns (the down and dh kernels): a row
    block's bottleneck blocks are neighbours in launch order, so they share its rows in L2.
    (first bottleneck column, rows as int64, bottleneck columns, row mask, column mask)."""
    bottleneck_blocks = tl.cdiv(BOTTLENECK, BLOCK_B)
    pid = tl.program_id(0)
    b0 = (pid % bottleneck_blocks) * BLOCK_B
    offs_m = (pid // bottleneck_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = b0 + tl.arange(0, BLOCK_B)
    return b0, offs_m.to(tl.int64), offs_b, offs_m < M, offs_b < BOTTLENECK


@autotuned(DOWN_CONFIGS, _tile_family_of_launch, key=["M_BUCKET", "D", "BOTTLENECK", "SAVE_H", "ACTIVATION"])
@triton.jit
def _bottleneck_down_kernel(
    X, W_DOWN, B_DOWN, H, ACT, M, D, BOTTLENECK, M_BUCKET,
    stride_xm, stride_xd, stride_down_b, stride_down_d,
    ACTIVATION: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr, SAVE_H: tl.constexpr, BLOCK_B: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The two-pass forward's first pass: H = X·W_downᵀ + b_down (fp32, when SAVE_H) and
    ACT = act(H) in X's dtype (the up kernel's operand, rounded as the one-kernel forward rounds
    it), BLOCK_M rows and BLOCK_B (DH_BLOCK_B) bottleneck columns per program — the dh kernel's
    GEMM tile, neighbours in launch order sharing a row block of X in L2."""
    b0, rows, offs_b, m_mask, b_mask = row_and_bottleneck_block(M, BOTTLENECK, BLOCK_M, BLOCK_B)
    h = rows_times_d_by_m(ACT=X, stride_am=stride_xm, stride_ad=stride_xd, MAT=W_DOWN + b0.to(tl.int64) * stride_down_b,
                          stride_mat_d=stride_down_d, stride_mat_b=stride_down_b, rows=rows, m_mask=m_mask,
                          b_mask=b_mask, D=D, seed=0, dropout_p=0.0, HAS_DROPOUT=False, EVICTION="",
                          WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M,
                          BLOCK_D=BLOCK_D, BLOCK_B=BLOCK_B)
    if HAS_DOWN_BIAS:
        h += tl.load(B_DOWN + offs_b, mask=b_mask, other=0.0).to(tl.float32)[None, :]
    h_ptrs = rows[:, None] * BOTTLENECK + offs_b[None, :]
    hb_mask = m_mask[:, None] & b_mask[None, :]
    if SAVE_H:
        tl.store(H + h_ptrs, h, mask=hb_mask)
    tl.store(ACT + h_ptrs, activation(h, ACTIVATION).to(ACT.dtype.element_ty), mask=hb_mask)


@triton.jit(do_not_specialize=["seed"])
def _bottleneck_up_kernel(
    X, ACT, W_UP, B_UP, Y, M, D, BOTTLENECK, rows_per_slice,
    stride_xm, stride_xd, stride_up_d, stride_up_b,
    scaling, seed, dropout_p, keep_scale,
    HAS_UP_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_B: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):
    """The two-pass forward's second pass: Y = X + s·drop(ACT·W_upᵀ + b_up) for column block
    program_id(0) over the rows of slice program_id(1). W_up[cols, :]ᵀ and b_up[cols] are
    loaded once and serve every row block of the slice; a wave's programs share their slice's
    ACT rows in L2 (column blocks vary fastest in launch order)."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_b = tl.arange(0, BLOCK_B)
    offs_r = tl.arange(0, BLOCK_M)
    cols = offs_d.to(tl.int64)
    d_mask = offs_d < D
    b_mask = offs_b < BOTTLENECK
    w_up_t = tl.load(W_UP + cols[None, :] * stride_up_d + offs_b[:, None] * stride_up_b,
                     mask=b_mask[:, None] & d_mask[None, :], other=0.0)
    if HAS_UP_BIAS:
        bias = tl.load(B_UP + cols, mask=d_mask, other=0.0).to(tl.float32)
    row_start = pid_s.to(tl.int64) * rows_per_slice
    row_end = tl.minimum(row_start + rows_per_slice, M)
    # the loop's own stage count streams x's tiles too (cp.async), not only ACT's (see the forward)
    for m0 in tl.range(row_start, row_end, BLOCK_M, num_stages=STAGES):
        rows = m0 + offs_r
        m_mask = rows < row_end
        act = tl.load(ACT + rows[:, None] * BOTTLENECK + offs_b[None, :], mask=m_mask[:, None] & b_mask[None, :],
                      other=0.0)
        z = mma(act, w_up_t, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), WIDEN_BF16_DOT, DOT_PRECISION)
        if HAS_UP_BIAS:
            z += bias[None, :]
        if HAS_DROPOUT:
            keep = keep_tile(seed=seed, rows=rows, k0=pid_d * BLOCK_D, n_cols=D, dropout_p=dropout_p,
                             BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_D)
            z = tl.where(keep, z * keep_scale, 0.0)
        io_mask = m_mask[:, None] & d_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xd, mask=io_mask, other=0.0)
        y = x.to(tl.float32) + scaling * z
        tl.store(Y + rows[:, None] * D + cols[None, :], y.to(Y.dtype.element_ty), mask=io_mask)


@autotuned(BACKWARD_DH_CONFIGS, _tile_family_of_launch,
           key=["M_BUCKET", "D", "BOTTLENECK", "HAS_DROPOUT", "ACTIVATION"])
@triton.jit(do_not_specialize=["seed"])
def _bottleneck_backward_dh_kernel(
    DY, W_UP, H, DH, DH_OPERAND, ACT, M, D, BOTTLENECK, M_BUCKET,
    stride_dym, stride_dyd, stride_up_d, stride_up_b,
    branch_scale, seed, dropout_p,
    ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, SAVE_ACT: tl.constexpr, SAVE_DH_OPERAND: tl.constexpr,
    BLOCK_B: tl.constexpr,
    WIDEN_BF16_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """DH[M, m] (fp32) = branch_scale·((dY⊙keep)·W_up)⊙act′(H), branch_scale = s/(1-p); with
    SAVE_ACT also ACT[M, m] = act(H) in ACT's dtype (x's), rounded as the forward fed it to
    W_up: the dX kernel's column blocks load it instead of each recomputing the activation; with
    SAVE_DH_OPERAND also DH_OPERAND = DH in x's (half-precision) dtype, the dX kernel's dot
    operand: its column blocks then read half the bytes of dh (they cast it so anyway). Each
    program owns BLOCK_M rows and BLOCK_B (DH_BLOCK_B) bottleneck columns: a wider bottleneck
    runs as several programs per row block, each the GEMM tile dY·W_up[:, its columns], which
    keeps 64- and 128-row tiles within the registers."""
    b0, rows, offs_b, m_mask, b_mask = row_and_bottleneck_block(M, BOTTLENECK, BLOCK_M, BLOCK_B)
    grad_act = rows_times_d_by_m(ACT=DY, stride_am=stride_dym, stride_ad=stride_dyd,
                                 MAT=W_UP + b0.to(tl.int64) * stride_up_b,
                                 stride_mat_d=stride_up_d, stride_mat_b=stride_up_b, rows=rows, m_mask=m_mask,
                                 b_mask=b_mask, D=D, seed=seed, dropout_p=dropout_p, HAS_DROPOUT=HAS_DROPOUT,
                                 EVICTION="", WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION,
                                 BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_B=BLOCK_B)
    h_ptrs = rows[:, None] * BOTTLENECK + offs_b[None, :]
    hb_mask = m_mask[:, None] & b_mask[None, :]
    h = tl.load(H + h_ptrs, mask=hb_mask, other=0.0)
    dh = branch_scale * grad_act * activation_grad(h, ACTIVATION)
    tl.store(DH + h_ptrs, dh, mask=hb_mask)
    if SAVE_DH_OPERAND:
        tl.store(DH_OPERAND + h_ptrs, dh.to(DH_OPERAND.dtype.element_ty), mask=hb_mask)
    if SAVE_ACT:
        tl.store(ACT + h_ptrs, activation(h, ACTIVATION).to(ACT.dtype.element_ty), mask=hb_mask)


@triton.jit
def dx_slice(
    pid_d, pid_s, DY, X, ACT, DH, DH_OPERAND, W_DOWN, DX, DW_DOWN_PARTIAL, DW_UP_PARTIAL, DB_UP_PARTIAL,
    DB_DOWN_PARTIAL, M, D, BOTTLENECK, rows_per_slice,
    stride_dym, stride_dyd, stride_xm, stride_xd, stride_down_b, stride_down_d,
    seed, dropout_p,
    HAS_DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, DW_PART: tl.constexpr,
    BLOCK_B: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """For the columns of column block pid_d and the rows of slice pid_s:
    DX = dY + DH·W_down, and the slice's partials DW_DOWN = DHᵀ·X and (column block 0)
    DB_DOWN = Σ DH (unless DW_PART = 2), DW_UP = (dY⊙keep)ᵀ·ACT and DB_UP = Σ dY⊙keep (unless
    DW_PART = 1); `_bottleneck_finish_kernel` sums the slices and applies s/(1-p) to DW_UP and
    DB_UP. The dots read DH_OPERAND (DH in X's dtype), the sum DH itself (fp32)."""
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_b = tl.arange(0, BLOCK_B)
    offs_r = tl.arange(0, BLOCK_M)
    cols = offs_d.to(tl.int64)
    d_mask = offs_d < D
    b_mask = offs_b < BOTTLENECK
    dtype = X.dtype.element_ty
    # W_down[:, cols] stays in registers for every row of the slice.
    w_down = tl.load(W_DOWN + offs_b[:, None] * stride_down_b + cols[None, :] * stride_down_d,
                     mask=b_mask[:, None] & d_mask[None, :], other=0.0)
    dw_down = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    dw_up = tl.zeros([BLOCK_D, BLOCK_B], dtype=tl.float32)
    db_up = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid_s.to(tl.int64) * rows_per_slice
    row_end = tl.minimum(row_start + rows_per_slice, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + offs_r
        m_mask = rows < row_end
        io_mask = m_mask[:, None] & d_mask[None, :]
        hb_mask = m_mask[:, None] & b_mask[None, :]
        # Rows past the slice load as zero (not wrapped): they must add nothing to the sums.
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyd, mask=io_mask, other=0.0)
        dh = tl.load(DH_OPERAND + rows[:, None] * BOTTLENECK + offs_b[None, :], mask=hb_mask, other=0.0).to(dtype)
        if COMPUTE_DX:
            dx = mma(dh, w_down, dy.to(tl.float32), WIDEN_BF16_DOT, DOT_PRECISION)
            tl.store(DX + rows[:, None] * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=io_mask)
        if COMPUTE_DW and DW_PART != 2:
            x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xd, mask=io_mask, other=0.0)
            dw_down = mma(tl.trans(dh), x, dw_down, WIDEN_BF16_DOT, DOT_PRECISION)
        if COMPUTE_DW and DW_PART != 1:
            act = tl.load(ACT + rows[:, None] * BOTTLENECK + offs_b[None, :], mask=hb_mask, other=0.0)
            if HAS_DROPOUT:
                keep = keep_tile(seed=seed, rows=rows, k0=pid_d * BLOCK_D, n_cols=D, dropout_p=dropout_p,
                                 BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_D)
                dy = tl.where(keep, dy, 0.0)
            dw_up = mma(tl.trans(dy), act, dw_up, WIDEN_BF16_DOT, DOT_PRECISION)
            db_up += tl.sum(dy.to(tl.float32), axis=0)
    slice_base = pid_s.to(tl.int64) * BOTTLENECK * D
    if COMPUTE_DW and DW_PART != 1:
        tl.store(DW_UP_PARTIAL + slice_base + cols[:, None] * BOTTLENECK + offs_b[None, :], dw_up,
                 mask=d_mask[:, None] & b_mask[None, :])
        tl.store(DB_UP_PARTIAL + pid_s.to(tl.int64) * D + cols, db_up, mask=d_mask)
    if COMPUTE_DW and DW_PART != 2:
        tl.store(DW_DOWN_PARTIAL + slice_base + offs_b[:, None] * D + cols[None, :], dw_down,
                 mask=b_mask[:, None] & d_mask[None, :])
        if pid_d == 0:  # the slice's Σ dh for db_down: a second, light pass over its dh rows (from L2),
            # kept out of the main loop, whose registers are dead by now
            dh_sum = tl.zeros([BLOCK_M, BLOCK_B], dtype=tl.float32)
            for m1 in range(row_start, row_end, BLOCK_M):
                rows = m1 + offs_r
                dh_sum += tl.load(DH + rows[:, None] * BOTTLENECK + offs_b[None, :],
                                  mask=(rows < row_end)[:, None] & b_mask[None, :], other=0.0)
            tl.store(DB_DOWN_PARTIAL + pid_s.to(tl.int64) * BOTTLENECK + offs_b, tl.sum(dh_sum, axis=0), mask=b_mask)


@triton.jit
def dw_slice(item, dw_columns, DY, X, ACT, DH, DH_OPERAND, W_DOWN, DX, DW_DOWN_PARTIAL, DW_UP_PARTIAL,
             DB_UP_PARTIAL, DB_DOWN_PARTIAL, M, D, BOTTLENECK, dw_rows_per_slice, stride_dym, stride_dyd, stride_xm,
             stride_xd, stride_down_b, stride_down_d, seed, dropout_p, HAS_DROPOUT: tl.constexpr,
             DW_PART: tl.constexpr, BLOCK_B: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr,
             DOT_PRECISION: tl.constexpr, DW_BLOCK_M: tl.constexpr, DW_BLOCK_D: tl.constexpr):
    """One partials' program of a SPLIT launch: work item `item` of its role (DW_PART 1: dW_down
    and db_down; 2: dW_up and db_up), column block item % dw_columns of row slice item // dw_columns."""
    dx_slice(pid_d=item % dw_columns, pid_s=item // dw_columns, DY=DY, X=X, ACT=ACT, DH=DH,
             DH_OPERAND=DH_OPERAND, W_DOWN=W_DOWN, DX=DX, DW_DOWN_PARTIAL=DW_DOWN_PARTIAL,
             DW_UP_PARTIAL=DW_UP_PARTIAL, DB_UP_PARTIAL=DB_UP_PARTIAL, DB_DOWN_PARTIAL=DB_DOWN_PARTIAL,
             M=M, D=D, BOTTLENECK=BOTTLENECK, rows_per_slice=dw_rows_per_slice, stride_dym=stride_dym,
             stride_dyd=stride_dyd, stride_xm=stride_xm, stride_xd=stride_xd, stride_down_b=stride_down_b,
             stride_down_d=stride_down_d, seed=seed, dropout_p=dropout_p,
             HAS_DROPOUT=HAS_DROPOUT, COMPUTE_DX=False, COMPUTE_DW=True, DW_PART=DW_PART, BLOCK_B=BLOCK_B,
             WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION, BLOCK_M=DW_BLOCK_M, BLOCK_D=DW_BLOCK_D)


@triton.jit(do_not_specialize=["seed"])
def _bottleneck_backward_dx_kernel(
    DY, X, ACT, DH, DH_OPERAND, W_DOWN, DX, DW_DOWN_PARTIAL, DW_UP_PARTIAL, DB_UP_PARTIAL, DB_DOWN_PARTIAL,
    M, D, BOTTLENECK, rows_per_slice, dw_rows_per_slice, dx_programs,
    stride_dym, stride_dyd, stride_xm, stride_xd, stride_down_b, stride_down_d,
    seed, dropout_p,
    ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr,
    DW_PART: tl.constexpr, SPLIT: tl.constexpr, BLOCK_B: tl.constexpr, WIDEN_BF16_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DW_BLOCK_M: tl.constexpr,
    DW_BLOCK_D: tl.constexpr,
):
    """`dx_slice` for the (column block, row slice) of each program: one role (dX and the
    parameter gradients' partials, or what COMPUTE_DX / COMPUTE_DW / DW_PART leave: a SPLIT
    launch's roles, each alone, for the static estimate) over a 2-D grid; or,
    with SPLIT (where one program doing both spilled, ptxas), three roles in one launch:
    programs [0, dx_programs) compute dX in BLOCK_M × BLOCK_D tiles, the next ⌈D/DW_BLOCK_D⌉ ×
    slices the partials of dW_down and db_down, the last as many those of dW_up and db_up, both
    in DW_BLOCK_M × DW_BLOCK_D tiles (each program runs one branch, so the registers are the
    largest branch's, not their sum; apart, each partial's role holds one [m, DW_BLOCK_D] fp32
    accumulator and can take twice the columns), at the cost of one more read of dY and dh."""
    if SPLIT:
        pid = tl.program_id(0)
        if pid < dx_programs:
            dx_columns = tl.cdiv(D, BLOCK_D)
            dx_slice(pid_d=pid % dx_columns, pid_s=pid // dx_columns, DY=DY, X=X, ACT=ACT, DH=DH,
                     DH_OPERAND=DH_OPERAND, W_DOWN=W_DOWN, DX=DX, DW_DOWN_PARTIAL=DW_DOWN_PARTIAL,
                     DW_UP_PARTIAL=DW_UP_PARTIAL, DB_UP_PARTIAL=DB_UP_PARTIAL, DB_DOWN_PARTIAL=DB_DOWN_PARTIAL,
                     M=M, D=D, BOTTLENECK=BOTTLENECK, rows_per_slice=rows_per_slice, stride_dym=stride_dym,
                     stride_dyd=stride_dyd, stride_xm=stride_xm, stride_xd=stride_xd, stride_down_b=stride_down_b,
                     stride_down_d=stride_down_d, seed=seed, dropout_p=dropout_p,
                     HAS_DROPOUT=HAS_DROPOUT, COMPUTE_DX=True, COMPUTE_DW=False, DW_PART=0, BLOCK_B=BLOCK_B,
                     WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)
        else:
            dw_columns = tl.cdiv(D, DW_BLOCK_D)
            per_part = dw_columns * tl.cdiv(M, dw_rows_per_slice)
            item = pid - dx_programs
            if item < per_part:
                dw_slice(item, dw_columns, DY=DY, X=X, ACT=ACT, DH=DH, DH_OPERAND=DH_OPERAND, W_DOWN=W_DOWN, DX=DX,
                         DW_DOWN_PARTIAL=DW_DOWN_PARTIAL, DW_UP_PARTIAL=DW_UP_PARTIAL, DB_UP_PARTIAL=DB_UP_PARTIAL,
                         DB_DOWN_PARTIAL=DB_DOWN_PARTIAL, M=M, D=D, BOTTLENECK=BOTTLENECK,
                         dw_rows_per_slice=dw_rows_per_slice, stride_dym=stride_dym, stride_dyd=stride_dyd,
                         stride_xm=stride_xm, stride_xd=stride_xd, stride_down_b=stride_down_b,
                         stride_down_d=stride_down_d, seed=seed, dropout_p=dropout_p, HAS_DROPOUT=HAS_DROPOUT,
                         DW_PART=1, BLOCK_B=BLOCK_B, WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION,
                         DW_BLOCK_M=DW_BLOCK_M, DW_BLOCK_D=DW_BLOCK_D)
            else:
                dw_slice(item - per_part, dw_columns, DY=DY, X=X, ACT=ACT, DH=DH, DH_OPERAND=DH_OPERAND,
                         W_DOWN=W_DOWN, DX=DX, DW_DOWN_PARTIAL=DW_DOWN_PARTIAL, DW_UP_PARTIAL=DW_UP_PARTIAL,
                         DB_UP_PARTIAL=DB_UP_PARTIAL, DB_DOWN_PARTIAL=DB_DOWN_PARTIAL, M=M, D=D,
                         BOTTLENECK=BOTTLENECK, dw_rows_per_slice=dw_rows_per_slice, stride_dym=stride_dym,
                         stride_dyd=stride_dyd, stride_xm=stride_xm, stride_xd=stride_xd,
                         stride_down_b=stride_down_b, stride_down_d=stride_down_d, seed=seed, dropout_p=dropout_p,
                         HAS_DROPOUT=HAS_DROPOUT, DW_PART=2, BLOCK_B=BLOCK_B, WIDEN_BF16_DOT=WIDEN_BF16_DOT,
                         DOT_PRECISION=DOT_PRECISION, DW_BLOCK_M=DW_BLOCK_M, DW_BLOCK_D=DW_BLOCK_D)
    else:
        dx_slice(pid_d=tl.program_id(0), pid_s=tl.program_id(1), DY=DY, X=X, ACT=ACT, DH=DH, DH_OPERAND=DH_OPERAND,
                 W_DOWN=W_DOWN, DX=DX, DW_DOWN_PARTIAL=DW_DOWN_PARTIAL, DW_UP_PARTIAL=DW_UP_PARTIAL,
                 DB_UP_PARTIAL=DB_UP_PARTIAL, DB_DOWN_PARTIAL=DB_DOWN_PARTIAL, M=M, D=D, BOTTLENECK=BOTTLENECK,
                 rows_per_slice=rows_per_slice, stride_dym=stride_dym, stride_dyd=stride_dyd, stride_xm=stride_xm,
                 stride_xd=stride_xd, stride_down_b=stride_down_b, stride_down_d=stride_down_d, seed=seed,
                 dropout_p=dropout_p, HAS_DROPOUT=HAS_DROPOUT, COMPUTE_DX=COMPUTE_DX, COMPUTE_DW=COMPUTE_DW,
                 DW_PART=DW_PART, BLOCK_B=BLOCK_B, WIDEN_BF16_DOT=WIDEN_BF16_DOT, DOT_PRECISION=DOT_PRECISION,
                 BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)


@triton.jit
def _slice_sum(PARTIAL, OUT, n, slices, scale, block, BLOCK: tl.constexpr):
    """OUT[i] = scale·Σ_s PARTIAL[s, i] for i in block `block` of n, in slice order, cast to OUT's dtype."""
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # the loop's own stage count streams the slices (cp.async): no dot here to start the pipeliner
    for s in tl.range(0, slices, num_stages=RESIDUAL_STAGES):
        acc += tl.load(PARTIAL + tl.cast(s, tl.int64) * n + offs, mask=mask, other=0.0)
    tl.store(OUT + offs, (acc * scale).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bottleneck_finish_kernel(
    DW_DOWN_PARTIAL, DW_UP_PARTIAL, DB_UP_PARTIAL, DB_DOWN_PARTIAL, DW_DOWN, DW_UP, DB_UP, DB_DOWN,
    slices, D, BOTTLENECK, branch_scale, BLOCK: tl.constexpr,
):
    """The parameter gradients from the dX kernel's row-slice partials, in one launch: each
    output element sums its slices in slice order (deterministic), is scaled (s/(1-p) for
    dW_up and db_up) and cast to the parameters' dtype. Programs cover dW_down [m, d], then
    dW_up [d, m], db_up [d], db_down [m], BLOCK elements each."""
    pid = tl.program_id(0)
    n_w = BOTTLENECK * D
    w_blocks = tl.cdiv(n_w, BLOCK)
    if pid < w_blocks:
        _slice_sum(DW_DOWN_PARTIAL, DW_DOWN, n_w, slices, 1.0, pid, BLOCK)
    elif pid < 2 * w_blocks:
        _slice_sum(DW_UP_PARTIAL, DW_UP, n_w, slices, branch_scale, pid - w_blocks, BLOCK)
    elif pid < 2 * w_blocks + tl.cdiv(D, BLOCK):
        _slice_sum(DB_UP_PARTIAL, DB_UP, D, slices, branch_scale, pid - 2 * w_blocks, BLOCK)
    else:
        _slice_sum(DB_DOWN_PARTIAL, DB_DOWN, BOTTLENECK, slices, 1.0, pid - 2 * w_blocks - tl.cdiv(D, BLOCK), BLOCK)


# --------------------------------------------------------------------------------------
# Launchers. Inputs are validated by peft_ops.ops.bottleneck; these only shape,
# allocate and launch. x and dy are 2-D [M, d] with any strides.
# --------------------------------------------------------------------------------------

def _flags(x: torch.Tensor, bottleneck_size: int, activation_name: str, dropout_p: float) -> dict:
    if bottleneck_size > max_bottleneck(x.dtype):
        raise ValueError(f"bottleneck size {bottleneck_size} is wider than the kernels hold in {x.dtype} "
                         f"({max_bottleneck(x.dtype)}): use peft_ops.bottleneck_adapter, which runs the "
                         "PyTorch path there")
    flags = dot_flags(x.dtype)
    del flags["RANK_FP32"]  # one dtype for every operand here
    return {**flags, "ACTIVATION": ACTIVATIONS.index(activation_name), "HAS_DROPOUT": dropout_p > 0,
            "BLOCK_B": block_bottleneck(bottleneck_size)}


def forward(x, down_weight, down_bias, up_weight, up_bias, activation_name: str, scaling: float,
            dropout_p: float, seed: int, save_h: bool):
    """(y [M, d] in x's dtype, h [M, m] fp32 or None unless save_h)."""
    M, D = x.shape
    B = down_weight.shape[0]
    y = torch.empty((M, D), device=x.device, dtype=x.dtype)
    h = torch.empty((M, B), device=x.device, dtype=torch.float32) if save_h else None
    if M == 0:
        return y, h
    flags = _flags(x, B, activation_name, dropout_p)
    if two_pass_forward(tile_family(x.dtype, flags["BLOCK_B"]), M):
        _two_pass_forward(x, down_weight, down_bias, up_weight, up_bias, scaling, dropout_p, seed, y, h, flags)
        return y, h
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]),)  # noqa: E731
    with launch_guard(x, down_weight, up_weight):
        launch(_bottleneck_forward_kernel, grid,
            x, down_weight, down_bias if down_bias is not None else y, up_weight,
            up_bias if up_bias is not None else y, y, h if save_h else y, M, D, B, m_bucket(M),
            x.stride(0), x.stride(1), down_weight.stride(0), down_weight.stride(1),
            up_weight.stride(0), up_weight.stride(1),
            float(scaling), seed, dropout_p, 1.0 / (1.0 - dropout_p),
            HAS_DOWN_BIAS=down_bias is not None, HAS_UP_BIAS=up_bias is not None, SAVE_H=save_h, **flags,
        )
    return y, h


def _two_pass_forward(x, down_weight, down_bias, up_weight, up_bias, scaling, dropout_p, seed, y, h, flags):
    """Where `two_pass_forward` takes it: the down kernel writes act(h) [M, m] in x's
    dtype (and h when saved), the up kernel reads it back with x and writes y (2 launches; act(h)
    is scratch, not saved: the backward recomputes it from h as before)."""
    M, D = x.shape
    B = down_weight.shape[0]
    act = torch.empty((M, B), device=x.device, dtype=x.dtype)
    dots = {"WIDEN_BF16_DOT": flags["WIDEN_BF16_DOT"], "DOT_PRECISION": flags["DOT_PRECISION"]}
    block_m, block_d, warps, stages = UP_TILES[current_target()][tile_family(x.dtype, flags["BLOCK_B"])]
    slices, rows_per_slice = row_slices(M, D, block_m, block_d)
    down_grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(B, DH_BLOCK_B),)  # noqa: E731
    with launch_guard(x, down_weight, up_weight):
        launch(_bottleneck_down_kernel, down_grid,
            x, down_weight, down_bias if down_bias is not None else act, h if h is not None else act, act,
            M, D, B, m_bucket(M), x.stride(0), x.stride(1), down_weight.stride(0), down_weight.stride(1),
            ACTIVATION=flags["ACTIVATION"], HAS_DOWN_BIAS=down_bias is not None, SAVE_H=h is not None,
            BLOCK_B=DH_BLOCK_B, **dots,
        )
        launch(_bottleneck_up_kernel, (triton.cdiv(D, block_d), slices),
            x, act, up_weight, up_bias if up_bias is not None else y, y, M, D, B, rows_per_slice,
            x.stride(0), x.stride(1), up_weight.stride(0), up_weight.stride(1),
            float(scaling), seed, dropout_p, 1.0 / (1.0 - dropout_p),
            HAS_UP_BIAS=up_bias is not None, HAS_DROPOUT=flags["HAS_DROPOUT"], BLOCK_B=flags["BLOCK_B"],
            BLOCK_M=block_m, BLOCK_D=block_d, STAGES=stages, num_warps=warps, num_stages=stages, **dots,
        )


def row_slices(M: int, D: int, block_m: int, block_d: int, roles: int = 1) -> tuple[int, int]:
    """(slices, rows per slice) of the dX kernel: a function of the shapes only, so the
    summation order of the parameter gradients is fixed. Rows per slice are whole row blocks.
    `roles`: how many sets of programs share TARGET_PROGRAMS (a split launch's two partials'
    roles: each takes half, so that the partials' bytes stay those of one role)."""
    col_blocks = triton.cdiv(D, block_d)
    slices = max(1, min(triton.cdiv(M, ROWS_PER_SLICE), triton.cdiv(TARGET_PROGRAMS // roles, col_blocks)))
    rows_per_slice = triton.cdiv(triton.cdiv(M, slices), block_m) * block_m
    return triton.cdiv(M, rows_per_slice), rows_per_slice


FINISH_BLOCK = 1024  # elements per program of the finishing kernel


def backward(dy, x, h, down_weight, up_weight, activation_name: str, scaling: float, dropout_p: float,
             seed: int, need_dx: bool, need_dw: bool):
    """(dx, dW_down, db_down, dW_up, db_up): dx (None unless need_dx) and the parameter
    gradients (None unless need_dw) in x's dtype; the caller drops what it needs not. Three
    launches: dh, dX with the row slices' partials (its roles in one launch where the tables
    split them), the finishing kernel (no PyTorch tail).

    dz = s/(1-p)·dY⊙keep,  dh = (dz·W_up)⊙act′(h)
    dx = dY + dh·W_down,  dW_down = dhᵀ·x,  db_down = Σ dh,  dW_up = dzᵀ·act(h),  db_up = Σ dz
    """
    M, D = x.shape
    B = down_weight.shape[0]
    device = x.device
    branch_scale = scaling / (1.0 - dropout_p)
    flags = _flags(x, B, activation_name, dropout_p)
    dx = torch.empty((M, D), device=device, dtype=x.dtype) if need_dx else None
    if M == 0 or not (need_dx or need_dw):
        zeros = (lambda *shape: torch.zeros(shape, device=device, dtype=x.dtype)) if need_dw else (lambda *shape: None)
        return dx, zeros(B, D), zeros(B), zeros(D, B), zeros(D)
    dh = torch.empty((M, B), device=device, dtype=torch.float32)
    act = torch.empty((M, B), device=device, dtype=x.dtype) if need_dw else dh  # act(h), for dW_up
    # dh as the dX kernel's dots take it (x's dtype): half the bytes its column blocks re-read
    half = x.dtype != torch.float32
    dh_operand = torch.empty((M, B), device=device, dtype=x.dtype) if half else dh
    tiles = BACKWARD_DX_TILES[current_target()][tile_family(x.dtype, flags["BLOCK_B"])]
    # the dX kernel's tiles: one role's, or (split tables, both roles wanted) dX's and the partials'
    dx_tiles, dw_tiles = (tiles, tiles) if isinstance(tiles, tuple) else (tiles["dx"], partials_tiles(tiles, dropout_p))
    # split tables: the partials in their two roles, beside dX's programs where dX is wanted
    split = isinstance(tiles, dict) and need_dw
    # the partials' row slices (a split launch: two roles of partials' programs)
    slices, dw_rows_per_slice = row_slices(M, D, dw_tiles[0], dw_tiles[1], 2 if split else 1)
    if need_dw:
        dw_down_partial = torch.empty((slices, B, D), device=device, dtype=torch.float32)
        dw_up_partial = torch.empty((slices, D, B), device=device, dtype=torch.float32)
        db_up_partial = torch.empty((slices, D), device=device, dtype=torch.float32)
        db_down_partial = torch.empty((slices, B), device=device, dtype=torch.float32)
    else:
        dw_down_partial = dw_up_partial = db_up_partial = db_down_partial = dh  # not written
    with launch_guard(dy, x, down_weight, up_weight):
        dh_block_b = min(flags["BLOCK_B"], DH_BLOCK_B)
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(B, dh_block_b),)  # noqa: E731
        launch(_bottleneck_backward_dh_kernel, grid,
            dy, up_weight, h, dh, dh_operand, act, M, D, B, m_bucket(M),
            dy.stride(0), dy.stride(1), up_weight.stride(0), up_weight.stride(1),
            branch_scale, seed, dropout_p, SAVE_ACT=need_dw, SAVE_DH_OPERAND=half, **{**flags, "BLOCK_B": dh_block_b},
        )
        # a split launch keeps dX's tiles even without dX: the build its partials' roles were checked in
        block_m, block_d, warps, stages = dx_tiles if need_dx or split else dw_tiles
        dx_slices, rows_per_slice = row_slices(M, D, block_m, block_d)
        if split:  # the roles in one launch: the dX programs (if wanted), then the partials' programs
            assert dw_tiles[2] == warps, "the roles of one launch share its warps"
            dx_programs = triton.cdiv(D, block_d) * dx_slices if need_dx else 0
            grid = (dx_programs + 2 * triton.cdiv(D, dw_tiles[1]) * slices,)
            stages = min(stages, dw_tiles[3])
        else:
            dx_programs = 0
            grid = (triton.cdiv(D, block_d), dx_slices)
        launch(_bottleneck_backward_dx_kernel, grid,
            dy, x, act, dh, dh_operand, down_weight, dx if need_dx else dy, dw_down_partial, dw_up_partial,
            db_up_partial, db_down_partial, M, D, B, rows_per_slice, dw_rows_per_slice, dx_programs,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), down_weight.stride(0), down_weight.stride(1),
            seed, dropout_p, COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, DW_PART=0, SPLIT=split, BLOCK_M=block_m,
            BLOCK_D=block_d, DW_BLOCK_M=dw_tiles[0], DW_BLOCK_D=dw_tiles[1], num_warps=warps, num_stages=stages,
            **flags,
        )
        if not need_dw:
            return dx, None, None, None, None
        grads = [torch.empty(shape, device=device, dtype=x.dtype) for shape in ((B, D), (D, B), (D,), (B,))]
        blocks = 2 * triton.cdiv(B * D, FINISH_BLOCK) + triton.cdiv(D, FINISH_BLOCK) + triton.cdiv(B, FINISH_BLOCK)
        launch(_bottleneck_finish_kernel, (blocks,),
            dw_down_partial, dw_up_partial, db_up_partial, db_down_partial, *grads, slices, D, B, branch_scale,
            BLOCK=FINISH_BLOCK, num_warps=4)
    dw_down, dw_up, db_up, db_down = grads
    return dx, dw_down, db_down, dw_up, db_up


def aot_specs(target: str) -> list:
    """Every kernel of this file at every config of `target`, in each tile family (bf16 for
    "half", and fp32) at its widest bottleneck tile, with dropout, biases and all gradients,
    and the forward and dX kernels also without (ptxas allocates each specialization anew:
    the plain ones spilled where the full ones did not)."""
    plain = ("M", "seed", "rows_per_slice")
    specs = []
    for family, dx_tiles in BACKWARD_DX_TILES[target].items():
        dt = "fp32" if family.startswith("fp32") else "bf16"
        block_b = {"b64": 64, "b128": 128, "b256": 256}[family.split("/")[1]]
        common = dict(BLOCK_B=block_b, WIDEN_BF16_DOT=False, DOT_PRECISION="tf32x3", ACTIVATION=1, HAS_DROPOUT=True)
        variant = f"{dt}, m≤{block_b}"
        for full in (True, False):  # biases and dropout, or neither
            for cfg in FORWARD_CONFIGS[target].get(family, ()):  # the one-kernel forward's families
                specs.append(KernelBuild(
                    f"bottleneck_forward [{variant}{'' if full else ', no biases or dropout'}]",
                    _bottleneck_forward_kernel, cfg,
                    dict(X=dt, W_DOWN=dt, B_DOWN=dt, W_UP=dt, B_UP=dt, Y=dt, H="fp32"),
                    {**common, "HAS_DROPOUT": full, "HAS_DOWN_BIAS": full, "HAS_UP_BIAS": full, "SAVE_H": True},
                    unit_strides=("stride_xd", "stride_down_d", "stride_up_b"),
                    float_args=("scaling", "dropout_p", "keep_scale"), plain_ints=plain))
        for cfg in BACKWARD_DH_CONFIGS[target].get(family, ()):  # DH_BLOCK_B wide: the b64 families
            specs.append(KernelBuild(
                f"bottleneck_backward_dh [{dt}, {DH_BLOCK_B} bottleneck columns per program]",
                _bottleneck_backward_dh_kernel, cfg,
                dict(DY=dt, W_UP=dt, H="fp32", DH="fp32", DH_OPERAND=dt, ACT=dt),
                {**common, "BLOCK_B": DH_BLOCK_B, "SAVE_ACT": True, "SAVE_DH_OPERAND": dt != "fp32"},
                unit_strides=("stride_dyd", "stride_up_b"), float_args=("branch_scale", "dropout_p"),
                plain_ints=plain))
        dots = dict(WIDEN_BF16_DOT=False, DOT_PRECISION="tf32x3")
        for full in (True, False):  # the two-pass forward: with biases (and dropout), or neither
            for cfg in DOWN_CONFIGS[target].get(family, ()):  # DH_BLOCK_B wide: the b64 families
                specs.append(KernelBuild(
                    f"bottleneck_down [{dt}, {DH_BLOCK_B} bottleneck columns per program{'' if full else ', no bias'}]",
                    _bottleneck_down_kernel, cfg, dict(X=dt, W_DOWN=dt, B_DOWN=dt, H="fp32", ACT=dt),
                    {**dots, "BLOCK_B": DH_BLOCK_B, "ACTIVATION": 1, "HAS_DOWN_BIAS": full, "SAVE_H": True},
                    unit_strides=("stride_xd", "stride_down_d"), plain_ints=plain))
            if family in UP_TILES[target]:
                block_m, block_d, warps, stages = UP_TILES[target][family]
                specs.append(KernelBuild(
                    f"bottleneck_up [{variant}{'' if full else ', no bias or dropout'}]", _bottleneck_up_kernel,
                    triton.Config(dict(BLOCK_M=block_m, BLOCK_D=block_d), num_warps=warps, num_stages=stages),
                    dict(X=dt, ACT=dt, W_UP=dt, B_UP=dt, Y=dt),
                    {**dots, "BLOCK_B": block_b, "STAGES": stages, "HAS_UP_BIAS": full, "HAS_DROPOUT": full},
                    unit_strides=("stride_xd", "stride_up_b"), float_args=("scaling", "dropout_p", "keep_scale"),
                    plain_ints=plain))
        # one role per program ("dX+dW"), or where that spilled the roles of one launch ("dX, dW":
        # programs of any role — dX, dW_down's partials, dW_up's —, the tiles of each)
        split = isinstance(dx_tiles, dict)
        for dropout in (True, False):  # fixed tiles: what a GPU runs, so both specializations
            dx_t, dw_t = (dx_tiles["dx"], partials_tiles(dx_tiles, dropout)) if split else (dx_tiles, dx_tiles)
            specs.append(KernelBuild(
                f"bottleneck_backward_dx [{variant}, {'dX, dW' if split else 'dX+dW'}"
                f"{'' if dropout else ', no dropout'}]", _bottleneck_backward_dx_kernel,
                triton.Config(dict(BLOCK_M=dx_t[0], BLOCK_D=dx_t[1]), num_warps=dx_t[2],
                              num_stages=min(dx_t[3], dw_t[3])),
                dict(DY=dt, X=dt, ACT=dt, DH="fp32", DH_OPERAND=dt, W_DOWN=dt, DX=dt, DW_DOWN_PARTIAL="fp32",
                     DW_UP_PARTIAL="fp32", DB_UP_PARTIAL="fp32", DB_DOWN_PARTIAL="fp32"),
                {**common, "HAS_DROPOUT": dropout, "COMPUTE_DX": True, "COMPUTE_DW": True, "DW_PART": 0,
                 "SPLIT": split, "DW_BLOCK_M": dw_t[0], "DW_BLOCK_D": dw_t[1]},
                unit_strides=("stride_dyd", "stride_xd", "stride_down_d"), float_args=("dropout_p",),
                plain_ints=plain + ("dw_rows_per_slice", "dx_programs")))
    for dt in ("bf16", "fp32"):
        specs.append(KernelBuild(
            f"bottleneck_finish [{dt}]", _bottleneck_finish_kernel,
            triton.Config(dict(BLOCK=FINISH_BLOCK), num_warps=4, num_stages=3),
            dict(DW_DOWN_PARTIAL="fp32", DW_UP_PARTIAL="fp32", DB_UP_PARTIAL="fp32", DB_DOWN_PARTIAL="fp32",
                 DW_DOWN=dt, DW_UP=dt, DB_UP=dt, DB_DOWN=dt), {}, float_args=("branch_scale",),
            plain_ints=("slices",), uses_tensor_cores=False))
    return specs

"""The dropout keep mask every kernel of this package draws: a pure function of (seed, row,
column), so a backward regenerates its forward's mask from the seed and no mask is stored.

Element (m, k) of an [·, n_cols] tensor takes lane k % 4 of the Philox4x32-10 call at the
int64 counter m·⌈n_cols/4⌉ + k // 4, keyed by the 64-bit seed; kept when its uniform
u ≥ p. It does not depend on tile shapes. ``peft_ops.reference.dropout_keep_mask`` computes
the same mask in numpy, independently of Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import KernelBuild, launch, launch_guard


@triton.jit
def keep_tile(seed, rows, k0, n_cols, dropout_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Keep mask of the tile rows × [k0, k0 + BLOCK_K) of an [·, n_cols] tensor (k0 % 4 == 0).

    Element (m, k) takes lane k % 4 of the Philox call at counter m·⌈n_cols/4⌉ + k // 4: a pure
    function of (seed, m, k), so every kernel and tile shape regenerates the same mask, and one
    Philox call (10 rounds of 32-bit multiplies) serves 4 elements, as in PyTorch's dropout.
    """
    groups = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    counters = rows[:, None] * tl.cdiv(n_cols, 4) + groups[None, :]
    u0, u1, u2, u3 = tl.rand4x(seed, counters)
    # join(join(u0, u2), join(u1, u3)) is [BM, BK/4, 2, 2] whose row-major flattening puts u_l at
    # lane l of each group of 4.
    u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), (BLOCK_M, BLOCK_K))
    return u >= dropout_p


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(KEEP, M, K, row0, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """KEEP[M, K] = rows [row0, row0 + M) of the keep mask for seed (for the tests and the
    checker: a large row0 reaches counters past 2³² without a huge tensor)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)
    keep = keep_tile(seed, rows + row0, tl.program_id(1) * BLOCK_K, K, dropout_p, BLOCK_M, BLOCK_K)
    tl.store(KEEP + rows[:, None] * K + offs_k[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def keep_mask(seed: int, M: int, K: int, dropout_p: float, device, row0: int = 0) -> torch.Tensor:
    """The bool keep mask [M, K] every kernel of this package uses for `seed` and `dropout_p`
    (rows row0 … row0 + M − 1 of an [·, K] tensor)."""
    keep = torch.empty((M, K), device=device, dtype=torch.int8)
    # A tile shape unlike the ops' kernels' on purpose: the mask must not depend on tiling.
    BLOCK_M, BLOCK_K = 8, 16
    if M * K:
        with launch_guard(keep):
            launch(_dropout_mask_kernel, (triton.cdiv(M, BLOCK_M), triton.cdiv(K, BLOCK_K)),
                keep, M, K, row0, seed, dropout_p, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K)
    return keep.bool()


def aot_specs(target: str) -> list:
    """The mask kernel (it serves the tests and the checker; the ops' kernels inline keep_tile)."""
    return [KernelBuild("dropout_mask (tests only)", _dropout_mask_kernel,
                        triton.Config(dict(BLOCK_M=8, BLOCK_K=16), num_warps=4, num_stages=1),
                        dict(KEEP="i8"), {}, float_args=("dropout_p",), plain_ints=("M", "seed", "row0"),
                        uses_tensor_cores=False)]

"""The dropout keep mask every kernel of this package draws: a pure function of (seed, row,
column), independent of tile shapes, and how a forward hands it to its backward, bit-packed.

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


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def store_keep_bits(KEEP, keep, rows, row_mask, k0, n_cols, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Store the bool tile `keep` (rows × [k0, k0 + BLOCK_K), k0 and BLOCK_K multiples of 32,
    columns ≥ n_cols False) into the bit-packed mask KEEP [·, ⌈n_cols/32⌉] int32: bit b of word j
    of a row is column 32·j + b.

    Why packed (cost model, H200, M = 8192, K = 4096): one Philox4x32-10 call is ≈ 150 integer
    instructions (sm_90a PTX: 40 mul, 43 xor, 28 add, …) for 4 elements, ≈ 37 per element:
    ≈ 1.2·10⁹ instructions per pass over x, 40-75 µs at 64-128 integer ops/clk/SM. Unpacking a
    word costs ≈ 3 instructions per element and the mask is M·K/8 = 4 MiB (≈ 1 µs of HBM) per
    read, so generating it once in the shrink and reading it in the two backward kernels that
    need it saves ≈ 80-150 µs per layer step against regenerating it there (x/16 bytes kept
    for a bf16 x)."""
    bits = tl.reshape(keep.to(tl.int32), (BLOCK_M, BLOCK_K // 32, 32)) << tl.arange(0, 32)[None, None, :]
    words = tl.reduce(bits, 2, _bit_or)  # an OR, not a sum: bit 31 is the sign bit
    offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    n_words = tl.cdiv(n_cols, 32)
    tl.store(KEEP + rows[:, None] * n_words + offs_w[None, :], words,
             mask=row_mask[:, None] & (offs_w < n_words)[None, :])


@triton.jit
def keep_from_bits(KEEP, rows, row_mask, k0, n_cols, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The bool keep tile rows × [k0, k0 + BLOCK_K) from the bit-packed mask KEEP (see
    store_keep_bits; k0 and BLOCK_K multiples of 32): one int32 load per 32 elements."""
    offs_w = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    n_words = tl.cdiv(n_cols, 32)
    words = tl.load(KEEP + rows[:, None] * n_words + offs_w[None, :],
                    mask=row_mask[:, None] & (offs_w < n_words)[None, :], other=0)
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1  # arithmetic shift: the & keeps bit b
    return tl.reshape(bits, (BLOCK_M, BLOCK_K)) != 0


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

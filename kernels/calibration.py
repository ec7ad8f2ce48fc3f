"""Two reference kernels that calibrate the static time estimate (``peft_ops.tools.estimate``); no op
launches them.

- ``matmul``: the Triton tutorial's matrix multiplication (grouped tile order, a masked K
  loop, fp32 accumulation, its autotune list for CUDA). Published: "on par with cuBLAS" on an
  A100; a non-persistent ``cp.async`` GEMM of this kind reaches roughly 75–90 % of cuBLAS on
  Hopper, where cuBLAS uses persistent, TMA-fed, warp-specialized kernels.
- ``copy``: a device-to-device copy with 16-byte accesses, the measure of achievable HBM
  bandwidth (4.3 TB/s on an H200, counting bytes read and written).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import autotuned, grouped_tile, launch, launch_guard, tile_configs


def _tutorial_configs(rows):
    return tile_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), [(m, n, k, 8, w, s) for m, n, k, w, s in rows])


# The tutorial's list for CUDA GPUs (fp16/bf16 operands), the same for both targets.
_TUTORIAL = _tutorial_configs([(128, 256, 64, 8, 3), (64, 256, 32, 4, 4), (128, 128, 32, 4, 4), (128, 64, 32, 4, 4),
                               (64, 128, 32, 4, 4), (128, 32, 32, 4, 4), (64, 32, 32, 2, 5), (32, 64, 32, 2, 5)])
MATMUL_CONFIGS = {"sm80": _TUTORIAL, "sm90": _TUTORIAL, "interpreter": _tutorial_configs([(32, 32, 32, 4, 1)])}


@autotuned(MATMUL_CONFIGS, lambda named_args, constexprs: "half", key=["M", "N", "K"])
@triton.jit
def _tutorial_matmul_kernel(A, B, C, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr):
    """C[M, N] = A[M, K]·B[K, N], fp32 accumulation, C in A's dtype."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_am = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    offs_bn = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k0, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    offs_cm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(C + offs_cm[:, None] * stride_cm + offs_cn[None, :] * stride_cn, acc.to(C.dtype.element_ty),
             mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))


@triton.jit
def _copy_kernel(X, Y, numel, BLOCK: tl.constexpr):
    """Y[i] = X[i], BLOCK elements per program (16-byte accesses on contiguous tensors)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    tl.store(Y + offs, tl.load(X + offs, mask=mask), mask=mask)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] · b [K, N] in a's dtype."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
    with launch_guard(a, b):
        launch(_tutorial_matmul_kernel, grid, a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
               c.stride(0), c.stride(1))
    return c


COPY_BLOCK = 4096  # elements per program: 4 warps × 32 threads × 32 elements (64 B of bf16 each)


def copy(x: torch.Tensor) -> torch.Tensor:
    """A copy of a contiguous x."""
    y = torch.empty_like(x)
    with launch_guard(x):
        launch(_copy_kernel, (triton.cdiv(x.numel(), COPY_BLOCK),), x, y, x.numel(), BLOCK=COPY_BLOCK)
    return y

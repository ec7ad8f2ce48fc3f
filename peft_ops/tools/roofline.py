"""The roofline model of every op: FLOPs, bytes (the minimum any implementation moves, what the
fused kernels move, what eager PyTorch moves) and the time a GPU would need.

- FLOPs count multiply-adds as 2; elementwise work is not counted.
- "min" bytes: each input read once and each output written once (activations, weights,
  adapters; for the backward also the adapter gradients) — the floor of any implementation.
- "fused" bytes: what this package's kernels move, from their design (each kernel file's
  docstring): e.g. the LoRA shrink re-reads x, the LoRA backward reads dY twice, fp32
  per-block partials of the adapter gradients, the saved fp32 rank/bottleneck tensors.
- "unfused" bytes: measured, not modelled — eager PyTorch's reference chain (PEFT's way) runs
  on meta tensors (no memory, any shape) and every ATen op is counted as reading its tensor
  inputs and writing its outputs (views excluded). For NF4 the dequantization bitsandbytes
  does before each matmul (forward and backward) is added: read the 4-bit weight, write the
  dense one.
- time on a GPU = max(FLOPs ÷ peak FLOP/s, bytes ÷ peak bandwidth), peaks from GPUS.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import reference
from ..backend import kernel_modules

OPS = ("lora", "qlora", "dora", "qdora", "nf4", "bottleneck")
# ops with a LoRA adapter (rank r), and those whose base weight is NF4
ADAPTER_OPS = ("lora", "qlora", "dora", "qdora")
NF4_OPS = ("qlora", "qdora", "nf4")
PHASES = ("forward", "backward")

# Dense bf16 tensor-core FLOP/s and HBM bandwidth from the vendors' datasheets (no sparsity).
GPUS = {
    "A100-40GB": {"bandwidth_GBps": 1555, "bf16_TFLOPs": 312},
    "A100-80GB": {"bandwidth_GBps": 2039, "bf16_TFLOPs": 312},
    "H100-PCIe": {"bandwidth_GBps": 2000, "bf16_TFLOPs": 756},
    "H100-SXM": {"bandwidth_GBps": 3350, "bf16_TFLOPs": 989},
    "H200": {"bandwidth_GBps": 4800, "bf16_TFLOPs": 989},
    "L40S": {"bandwidth_GBps": 864, "bf16_TFLOPs": 362},
    "RTX-4090": {"bandwidth_GBps": 1008, "bf16_TFLOPs": 165},
    "B200": {"bandwidth_GBps": 8000, "bf16_TFLOPs": 2250},
}


def gpu_for_device_name(name: str) -> str | None:
    """The GPUS key of a CUDA device name (torch.cuda.get_device_name()), or None."""
    upper = name.upper()
    if "H200" in upper:
        return "H200"
    if "H100" in upper:
        return "H100-PCIe" if "PCIE" in upper else "H100-SXM"
    if "A100" in upper:
        return "A100-80GB" if "80GB" in upper else "A100-40GB"
    for key, needle in (("L40S", "L40S"), ("RTX-4090", "4090"), ("B200", "B200")):
        if needle in upper:
            return key
    return None


@dataclasses.dataclass(frozen=True)
class OpShape:
    """One op at one shape. lora / qlora / dora / qdora: x [M, K] → [M, N] with rank r; nf4: the
    same without an adapter; bottleneck: x [M, d] with bottleneck m (K = N = d, r = m)."""
    op: str
    M: int
    K: int
    N: int
    r: int = 0
    element_bytes: int = 2  # bf16

    def label(self) -> str:
        if self.op == "bottleneck":
            return f"M={self.M} d={self.K} m={self.r}"
        rank = f" r={self.r}" if self.op in ADAPTER_OPS else ""
        return f"M={self.M} {self.K}→{self.N}{rank}"


def nf4_weight_bytes(N: int, K: int, blocksize: int = 64) -> int:
    """What the NF4 kernels read of an [N, K] weight: 4-bit codes, one 8-bit absmax code per
    block, one fp32 scale per 256 blocks and the fp32 offset (bitsandbytes' double quant)."""
    blocks = math.ceil(N * K / blocksize)
    return math.ceil(N * K / 2) + blocks + 4 * math.ceil(blocks / 256) + 4


def flops(s: OpShape, phase: str) -> int:
    M, K, N, r = s.M, s.K, s.N, s.r
    if s.op == "bottleneck":  # two d×m GEMMs forward; dh, dX, dW_down, dW_up backward
        return 4 * M * K * r if phase == "forward" else 8 * M * K * r
    base = 2 * M * N * K
    if s.op == "nf4":
        return base  # forward x·Wᵀ; backward dX = dY·W
    norm = 2 * r * N * K if s.op in ("dora", "qdora") else 0  # DoRA's A·Wᵀ for the column norm
    if phase == "forward":  # x·Wᵀ + (x·Aᵀ)·Bᵀ
        return base + 2 * M * K * r + 2 * M * N * r + norm
    return base + 4 * M * N * r + 4 * M * K * r  # dX (with g = dY·B and g·A), dA, dB


def _weight_bytes(s: OpShape) -> int:
    return nf4_weight_bytes(s.N, s.K) if s.op in NF4_OPS else s.N * s.K * s.element_bytes


def min_bytes(s: OpShape, phase: str) -> int:
    e, M, K, N, r = s.element_bytes, s.M, s.K, s.N, s.r
    if s.op == "bottleneck":
        params = (2 * K * r + r + K) * e
        return 2 * M * K * e + params if phase == "forward" else 3 * M * K * e + 2 * params
    adapters = (r * K + N * r) * e
    # DoRA: d(magnitude) needs the pre-scale output per element, kept (written, read) or recomputed
    kept = M * N * e if s.op in ("dora", "qdora") else 0
    if phase == "forward":  # read x, W (and A, B), write y
        return (M * K + M * N) * e + _weight_bytes(s) + adapters + kept
    return (M * N + 2 * M * K) * e + _weight_bytes(s) + 2 * adapters + kept  # read dY, W, x; write dX (dA, dB)


def fused_bytes(s: OpShape, phase: str) -> int:
    """What the kernels move (see the module docstring and each kernel file's)."""
    e, M, K, N, r = s.element_bytes, s.M, s.K, s.N, s.r
    if s.op == "bottleneck":
        return _bottleneck_fused_bytes(M, K, r, e)[phase]
    if s.op == "nf4":  # one pass over x, W and y (the decode GEMV's split-K partials are M×N fp32)
        return min_bytes(s, phase)
    rank_fp32 = 4 * M * r  # xa or g, fp32
    if s.op in ("dora", "qdora"):  # DoRA: the norm's pass over W; the dY pass (dY, pre → dY')
        lora = fused_bytes(dataclasses.replace(s, op="lora" if s.op == "dora" else "qlora"), phase)
        if phase == "forward":
            return lora + _weight_bytes(s) + M * N * e  # + pre written
        return lora + 3 * M * N * e
    if phase == "forward":  # shrink reads x and writes xa; the GEMM reads x, W, xa, B and writes y
        return min_bytes(s, phase) + M * K * e + 2 * rank_fp32
    # dY kernel: dY, B, xa → g and dB partials; dX kernel: dY, W, g, A, x → dX and dA partials
    partials = 2 * 4 * math.ceil(M / 64) * r * (N + K)  # written, then read by the sum
    return min_bytes(s, phase) + M * N * e + 3 * rank_fp32 + partials


def _bottleneck_fused_bytes(M: int, d: int, m: int, e: int) -> dict:
    """Bottleneck adapter kernels (kernels/bottleneck.py), as sm_90a runs them: forward reads x
    once (its second read from L2), writes y and h [M, m] fp32 — or, where the two-pass forward
    runs, reads x twice and writes and reads act(h) [M, m] besides; backward: the dh kernel
    reads dY and h and writes dh (fp32, and in x's dtype when that is half precision) and act(h), the dX
    kernel reads dY, x, act(h), dh (its dot operand, and the fp32 dh once for Σ dh) and writes
    dX and fp32 row-slice partials (one more read of dY where the tables split the dX kernel's
    programs in roles: dX's, dW_down's, dW_up's)."""
    kernels = kernel_modules().bottleneck
    act, weights = M * d * e, (2 * m * d + m + d) * e
    # per element of [M, m]: h read, dh written and read (fp32), act(h) written and read, and
    # the half-precision dh operand written and read
    saved_h = M * m * 4
    h = M * m * (12 + 2 * e + (2 * e if e < 4 else e))
    family = kernels.tile_family(torch.float32 if e == 4 else torch.bfloat16, kernels.block_bottleneck(m))
    tiles = kernels.BACKWARD_DX_TILES["sm90"][family]
    split = isinstance(tiles, dict)
    block_m, block_d = (tiles["dw"] if split else tiles)[:2]
    partials = 2 * kernels.row_slices(M, d, block_m, block_d, 2 if split else 1)[0] * (2 * m * d + d) * 4
    two_pass = kernels.two_pass_forward(family, M, "sm90")
    forward = (3 * act + 2 * M * m * e if two_pass else 2 * act) + saved_h + weights
    return {"forward": forward, "backward": (4 + split) * act + h + 2 * weights + partials}


# --------------------------------------------------------------------------------------
# Eager PyTorch, counted op by op
# --------------------------------------------------------------------------------------

_MATMULS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default"}


class CountBytes(TorchDispatchMode):
    """Bytes each ATen op reads (tensor inputs) and writes (outputs); views move nothing. Each
    op is also recorded as one launch in `launches`: (op, [M, N, K] of a matrix product or None,
    its output's dtype, its bytes)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.launches = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view, or an in-place op returning its input: counted where it is read
        leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
        nbytes = sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
        self.bytes += nbytes
        gemm = None
        if str(func) in _MATMULS:
            a, b = (args[1], args[2]) if str(func) == "aten.addmm.default" else (args[0], args[1])
            gemm = (a.shape[0] * a.shape[1] if a.dim() == 3 else a.shape[0], b.shape[-1], a.shape[-1])
        self.launches.append((str(func), gemm, out.dtype if isinstance(out, torch.Tensor) else None, nbytes))
        return out


@functools.lru_cache(maxsize=None)
def unfused_bytes(s: OpShape, dropout_p: float = 0.0) -> dict:
    """Eager PyTorch's bytes {forward, backward} at this shape (the reference chain on meta
    tensors); x, the adapters and the bottleneck weights require grad, the base weight does not."""
    dtype = {2: torch.bfloat16, 4: torch.float32}[s.element_bytes]
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(s.M, s.K, **meta, requires_grad=True)
    if s.op == "bottleneck":
        params = [torch.empty(s.r, s.K, **meta), torch.empty(s.r, **meta), torch.empty(s.K, s.r, **meta),
                  torch.empty(s.K, **meta)]
        params = [p.requires_grad_() for p in params]
        run = lambda: reference.bottleneck_adapter(x, *params, "gelu", 1.0, dropout_p)  # noqa: E731
        out_features = s.K
    else:
        W = torch.empty(s.N, s.K, **meta)
        if s.op == "nf4":
            run = lambda: torch.nn.functional.linear(x, W)  # noqa: E731
        else:
            A = torch.empty(s.r, s.K, **meta, requires_grad=True)
            B = torch.empty(s.N, s.r, **meta, requires_grad=True)
            if s.op in ("dora", "qdora"):
                m = torch.empty(s.N, **meta, requires_grad=True)
                run = lambda: reference.dora_linear(x, W, A, B, m, 2.0, None, dropout_p)  # noqa: E731
            else:
                run = lambda: reference.lora_linear(x, W, A, B, 2.0, None, dropout_p)  # noqa: E731
        out_features = s.N
    grad_out = torch.empty(s.M, out_features, **meta)  # made outside the count: not eager's traffic
    with CountBytes() as forward:
        y = run()
    with CountBytes() as backward:
        y.backward(grad_out)
    counted = {"forward": forward.bytes, "backward": backward.bytes}
    if s.op in NF4_OPS:  # bitsandbytes dequantizes before the forward and the backward matmul
        for phase in PHASES:
            counted[phase] += nf4_weight_bytes(s.N, s.K) + s.N * s.K * s.element_bytes
    return counted


def base_layer(s: OpShape, phase: str) -> tuple[int, int]:
    """(FLOPs, min bytes) of the frozen base layer alone — the dense bf16 x·Wᵀ (backward: dY·W)
    that LoRA and QLoRA are judged against."""
    dense = dataclasses.replace(s, op="nf4", r=0)  # the op without an adapter …
    e = s.element_bytes
    return flops(dense, phase), min_bytes(dense, phase) - nf4_weight_bytes(s.N, s.K) + s.N * s.K * e


def roofline_seconds(n_flops: float, n_bytes: float, gpu: dict) -> float:
    return max(n_flops / (gpu["bf16_TFLOPs"] * 1e12), n_bytes / (gpu["bandwidth_GBps"] * 1e9))

"""The two implementations behind every autograd Function, one interface per op:

- the Triton path: the launchers of ``peft_ops.kernels`` (``lora``, ``nf4``, ``bottleneck``);
- the PyTorch path: the same steps, roundings and saved tensors in PyTorch ops (fp32
  accumulation, each output rounded once). Not the reference: that is
  :mod:`peft_ops.reference`, plain PyTorch with autograd as is.

``eager_ops(op, impl)`` picks one; ``peft_ops.ops.custom_ops`` wraps either for torch.compile.
"""

from __future__ import annotations

import torch

from ..backend import kernel_modules
from ..nf4 import NF4Tensors, NF4Weight, code_tables, decode
from ..reference import activation_derivative, apply_activation
from . import checks, gemm_choice, workspace
from .autograd import mm32, pack_keep_bits, torch_keep_mask, unpack_keep_bits


def rank_dtype(dtype: torch.dtype, adapter_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the rank-r operands (xa, g, A, B) as the kernels feed them to the tensor
    cores: the compute dtype, or fp32 when the adapters are fp32 (RANK_FP32)."""
    return torch.float32 if adapter_dtype == torch.float32 else dtype


class TorchLoraOps:
    """The LoRA op's PyTorch path; same signatures as the launchers of ``peft_ops.kernels.lora``.
    Half-precision operands are widened to fp32 transiently.

    Rank-r operands (xa, g, A, B) are rounded to the compute dtype as the tensor cores' inputs
    are, except with fp32 adapters, where the kernels keep those products fp32 (RANK_FP32)."""

    @staticmethod
    def shrink(x, lora_A, dropout_p, seed):
        """(xa, keep): keep the mask bit-packed as the kernels keep it, or None without dropout."""
        if dropout_p <= 0:
            return mm32(x, lora_A.to(rank_dtype(x.dtype, lora_A.dtype)).t()), None
        keep = torch_keep_mask(seed, *x.shape, dropout_p, x.device)
        xa = mm32(x * keep, lora_A.to(rank_dtype(x.dtype, lora_A.dtype)).t())
        return xa.mul_(1.0 / (1.0 - dropout_p)), pack_keep_bits(keep)

    @staticmethod
    def forward(x, weight, xa, lora_B, scaling, bias):
        """xa None: the base layer alone (nf4_linear's PyTorch path)."""
        y = mm32(x, weight.t())
        if xa is not None:
            rank = rank_dtype(x.dtype, lora_B.dtype)
            y += mm32((xa * scaling).to(rank), lora_B.to(rank).t())
        if bias is not None:
            y += bias
        return y.to(x.dtype)

    @staticmethod
    def backward(dy, x, weight, lora_A, lora_B, xa, keep, scaling, dropout_p, need_dx, need_dA, need_dB, need_db,
                 dy_base=None):
        """dA, dB in fp32 (the Function casts them); `dy_base`: the base product's own dY (DoRA)."""
        rank = rank_dtype(dy.dtype, lora_A.dtype)
        lora_scale = scaling / (1.0 - dropout_p)
        keep = unpack_keep_bits(keep, x.shape[1]) if keep is not None else None
        dx = dA = dB = None
        if need_dB:
            dB = mm32(dy.t(), xa.to(rank)).mul_(scaling)
        if need_dx or need_dA:
            g = mm32(dy, lora_B.to(rank))
        if need_dx:
            lora = mm32((g * lora_scale).to(rank), lora_A.to(rank))
            if keep is not None:
                lora *= keep
            dx = (mm32(dy if dy_base is None else dy_base, weight) + lora).to(dy.dtype)
        if need_dA:
            x_kept = x if keep is None else x * keep
            dA = mm32(g.to(rank).t(), x_kept).mul_(lora_scale)
        return dx, dA, dB, (dy.sum(dim=0) if need_db else None)


class KernelLoraOps:
    """The LoRA op's Triton path: the launchers of ``peft_ops.kernels.lora``, each heavy product
    on the implementation ``gemm_choice`` picks for its shape (or `gemm`, pinned: tests)."""

    def __init__(self, gemm: str | None = None):
        self.gemm = gemm

    def _gemm(self, phase, t, dtype, M, N, K, r):
        return self.gemm or gemm_choice.choose(phase, dtype, M, N, K, r, t.device)

    @staticmethod
    def shrink(x, lora_A, dropout_p, seed):
        return kernel_modules().lora.shrink(x, lora_A, dropout_p, seed, scratch=workspace.split_k_scratch)

    def forward(self, x, weight, xa, lora_B, scaling, bias):
        gemm = self._gemm("forward", x, x.dtype, x.shape[0], weight.shape[0], x.shape[1], lora_B.shape[1])
        return kernel_modules().lora.forward(x, weight, xa, lora_B, scaling, bias, gemm=gemm)

    def backward(self, dy, x, weight, lora_A, lora_B, xa, keep, scaling, dropout_p, need_dx, need_dA, need_dB,
                 need_db, dy_base=None):
        gemm = self._gemm("dx", dy, dy.dtype, dy.shape[0], weight.shape[0], weight.shape[1], lora_A.shape[0])
        return kernel_modules().lora.backward(dy, x, weight, lora_A, lora_B, xa, keep, scaling, dropout_p, need_dx,
                                              need_dA, need_dB, need_db, gemm=gemm, dy_base=dy_base)


class TorchNF4Ops:
    """The NF4 ops' PyTorch path: W decoded transiently (never saved) in x's dtype — the
    tensor-core operand the kernels decode to — then the steps of TorchLoraOps."""

    shrink = staticmethod(TorchLoraOps.shrink)

    @staticmethod
    def forward(x, qw: NF4Tensors, xa, lora_B, scaling, bias):
        return TorchLoraOps.forward(x, decode(qw, x.dtype), xa, lora_B, scaling, bias)

    @staticmethod
    def backward_dx(dy, qw: NF4Tensors):
        return mm32(dy, decode(qw, dy.dtype)).to(dy.dtype)

    @staticmethod
    def qlora_backward(dy, x, qw: NF4Tensors, lora_A, lora_B, xa, keep, scaling, dropout_p, need_dx, need_dA,
                       need_dB, need_db, dy_base=None):
        return TorchLoraOps.backward(dy, x, decode(qw, dy.dtype), lora_A, lora_B, xa, keep, scaling, dropout_p,
                                     need_dx, need_dA, need_dB, need_db, dy_base)


class KernelNF4Ops:
    """The NF4 ops' Triton path, per phase on the path ``gemm_choice.choose_nf4`` picks for its
    shape (or `path`, pinned: tests): "fused", the launchers of ``peft_ops.kernels.nf4`` (W
    decoded tile by tile inside the GEMM or the decode GEMV); or "dequant", W decoded into a
    reusable buffer (``workspace``) and the dense LoRA path on it — decoded again in the
    backward, never saved. `regime` / `split_k` pin the fused forward's kernel (tests)."""

    def __init__(self, regime: str | None = None, split_k: int | None = None, path: str | None = None):
        self.regime, self.split_k, self.path = regime, split_k, path

    def _path(self, phase, t, M, N, K, r):
        return self.path or gemm_choice.choose_nf4(phase, t.dtype, M, N, K, r, t.device)

    @staticmethod
    def _dequantized(qw: NF4Tensors, dtype):
        """W in `dtype`, in this device's (and stream's) buffer for its shape."""
        buffer = workspace.dequant_buffer(qw.packed.device, dtype, (qw.out_features, qw.in_features))
        return kernel_modules().nf4.dequantize(qw, dtype, tables=code_tables(qw.packed.device), out=buffer)

    @staticmethod
    def shrink(x, lora_A, dropout_p, seed):
        return kernel_modules().lora.shrink(x, lora_A, dropout_p, seed, scratch=workspace.split_k_scratch)

    def forward(self, x, qw: NF4Tensors, xa, lora_B, scaling, bias):
        r = lora_B.shape[1] if lora_B is not None else 0
        if self._path("nf4-forward", x, x.shape[0], qw.out_features, qw.in_features, r) == "dequant":
            weight = self._dequantized(qw, x.dtype)
            if xa is not None:
                return KernelLoraOps().forward(x, weight, xa, lora_B, scaling, bias)
            # the base layer alone: a plain GEMM, cuBLAS's on a GPU (no LoRA term to fuse)
            return torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        return kernel_modules().nf4.forward(x, qw, xa, lora_B, scaling, bias, self.regime, self.split_k,
                                            tables=code_tables(x.device), scratch=workspace.split_k_scratch)

    def backward_dx(self, dy, qw: NF4Tensors):
        if self._path("nf4-dx", dy, dy.shape[0], qw.out_features, qw.in_features, 0) == "dequant":
            return torch.mm(dy, self._dequantized(qw, dy.dtype))
        return kernel_modules().nf4.backward_dx(dy, qw, tables=code_tables(dy.device))

    def qlora_backward(self, dy, x, qw: NF4Tensors, lora_A, lora_B, xa, keep, scaling, dropout_p, need_dx, need_dA,
                       need_dB, need_db, dy_base=None):
        if need_dx and self._path("nf4-dx", dy, dy.shape[0], qw.out_features, qw.in_features,
                                  lora_A.shape[0]) == "dequant":
            return KernelLoraOps().backward(dy, x, self._dequantized(qw, dy.dtype), lora_A, lora_B, xa, keep, scaling,
                                            dropout_p, need_dx, need_dA, need_dB, need_db, dy_base)
        return kernel_modules().nf4.qlora_backward(dy, x, qw, lora_A, lora_B, xa, keep, scaling, dropout_p, need_dx,
                                                   need_dA, need_dB, need_db, tables=code_tables(dy.device),
                                                   dy_base=dy_base)


def dropped_input(x: torch.Tensor, keep: torch.Tensor, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(xd, x − xd) in x's dtype, xd = x⊙keep/(1-p) for the bit-packed keep mask: DoRA's base
    term under dropout takes xd through the GEMM and x − xd through a second product."""
    kept = unpack_keep_bits(keep, x.shape[1])
    dropped = torch.where(kept, x.float() * (1.0 / (1.0 - dropout_p)), 0.0)
    return dropped.to(x.dtype), (x.float() - dropped).to(x.dtype)


def dora_dropout_dx(dx: torch.Tensor, dy_minus_scaled: torch.Tensor, keep: torch.Tensor,
                    dropout_p: float) -> torch.Tensor:
    """dX of DoRA under dropout from the LoRA backward's dX on dY' = dY⊙c (which holds
    dY'·W + s·(g·A)⊙keep/(1-p)) and `dy_minus_scaled` = (dY − dY')·W [M, K] (any float dtype):
    dX = that + (dY − dY')·W ⊙ (1 − keep/(1-p)), in dx's dtype."""
    kept = unpack_keep_bits(keep, dx.shape[1])
    complement = torch.where(kept, -dropout_p / (1.0 - dropout_p), 1.0)
    return (dx.float() + dy_minus_scaled.float() * complement).to(dx.dtype)


_SQ_NORM_CHUNK = 1 << 24  # elements of W widened to fp32 at a time: 64 MiB of transient


def squared_row_norms(weight: torch.Tensor | NF4Weight | NF4Tensors, dtype: torch.dtype | None = None) -> torch.Tensor:
    """‖W_n‖² per output row n, fp32 [out]: of `weight` [out, in] as it is, or of an NF4 weight
    decoded to `dtype` (default: its own; the compute dtype, the values its GEMM takes).
    Summed in fp32, a chunk of rows at a time (no fp32 copy of W). Compute it once per frozen
    weight and pass it to :func:`~peft_ops.dora_linear` / :func:`~peft_ops.qdora_linear`; the
    layers cache it."""
    if isinstance(weight, (NF4Weight, NF4Tensors)):
        q = weight.tensors() if isinstance(weight, NF4Weight) else weight
        return squared_row_norms(decode(q, dtype or q.dtype))
    checks.tensor("weight", weight, ndim=2)
    checks.float_dtype("weight", weight)
    rows = max(1, _SQ_NORM_CHUNK // max(1, weight.shape[1]))
    with torch.no_grad():
        return torch.cat([chunk.float().square().sum(dim=1) for chunk in weight.detach().split(rows)])


class TorchDoraOps:
    """The DoRA op's PyTorch path, with the steps and roundings of the Triton path
    (``peft_ops.kernels.dora`` and the LoRA kernels): the norm from ‖W‖² + 2s·B·(A·Wᵀ) +
    s²·B·(A·Aᵀ)·Bᵀ in fp32, pre = xd·Wᵀ + s·xa·Bᵀ kept in x's dtype, the LoRA backward on
    dY' = dY⊙c."""

    shrink = staticmethod(TorchLoraOps.shrink)

    @staticmethod
    def norm(weight, lora_A, lora_B, magnitude, scaling, weight_sq_norm):
        """(‖W + s·B·A‖, magnitude / it), fp32 [N]; ‖W_n‖² computed here when not given."""
        if weight_sq_norm is None:
            weight_sq_norm = squared_row_norms(weight)
        rank = rank_dtype(weight.dtype, lora_A.dtype)
        products = mm32(lora_A.to(rank), weight.to(rank).t())  # A·Wᵀ [r, N]
        return norm_from_products(products, lora_A, lora_B, magnitude, scaling, weight_sq_norm)

    @staticmethod
    def forward(x, weight, xa, keep, lora_B, scaling, bias, col_scale, dropout_p):
        """(y, pre): pre = xd·Wᵀ + s·xa·Bᵀ in x's dtype; y = pre⊙c + b [+ (x − xd)·Wᵀ]."""
        dropped, rest = dropped_input(x, keep, dropout_p) if keep is not None else (x, None)
        pre = TorchLoraOps.forward(dropped, weight, xa, lora_B, scaling, None)
        y = pre.float() * col_scale
        if bias is not None:
            y += bias
        if rest is not None:
            y += mm32(rest, weight.t())
        return y.to(x.dtype), pre

    @staticmethod
    def backward(dy, x, weight, lora_A, lora_B, xa, keep, pre, col_scale, norm, scaling, dropout_p, need_dx,
                 need_dA, need_dB, need_dmag, need_db):
        """(dx, dA, dB, d(magnitude), db): dA, dB, d(magnitude) in fp32."""
        dy32 = dy.float()
        scaled = (dy32 * col_scale).to(dy.dtype)
        dmag = (dy32 * pre.float()).sum(dim=0).div_(norm) if need_dmag else None
        db = dy.sum(dim=0) if need_db else None
        dx, dA, dB = dora_lora_backward(TorchLoraOps.backward, dy, scaled, x, weight, lora_A, lora_B, xa, keep,
                                        col_scale, scaling, dropout_p, need_dx, need_dA, need_dB)
        if need_dx and keep is not None:
            dx = dora_dropout_dx(dx, mm32(dy - scaled, weight).to(dy.dtype), keep, dropout_p)
        return dx, dA, dB, dmag, db


def folds_scale_into_B(dy: torch.Tensor, lora_B: torch.Tensor) -> bool:
    """Whether DoRA's backward takes its rank terms from dY with c folded into B (g = dY·(c⊙B),
    dB = c⊙(s·dYᵀ·xa)) rather than from dY' = dY⊙c rounded to dY's dtype: with fp32 adapters on
    a half-precision dY. There the rounding would leave dA and dB half-precision-accurate, where
    PEFT's are fp32 (it scales the fp32 LoRA output); with half adapters PEFT rounds dY' too."""
    return lora_B.dtype == torch.float32 and dy.dtype != torch.float32


def dora_lora_backward(lora_backward, dy, scaled, x, weight, lora_A, lora_B, xa, keep, col_scale, scaling, dropout_p,
                       need_dx, need_dA, need_dB):
    """(dx, dA, dB) of DoRA's LoRA part through `lora_backward` (a LoRA path's backward, or its
    NF4 one with `weight` its NF4 weight) on dY' = dY⊙c (`scaled`, dY's dtype): dX's base product
    takes dY', the rank terms dY' too, or dY and c⊙B where ``folds_scale_into_B`` (dB then
    scaled by c per row: c⊙(s·dYᵀ·xa) = s·dY'ᵀ·xa)."""
    if not folds_scale_into_B(dy, lora_B):
        return lora_backward(scaled, x, weight, lora_A, lora_B, xa, keep, scaling, dropout_p, need_dx, need_dA,
                             need_dB, False)[:3]
    column = col_scale[:, None]
    dx, dA, dB, _ = lora_backward(dy, x, weight, lora_A, lora_B * column, xa, keep, scaling, dropout_p, need_dx,
                                  need_dA, need_dB, False, scaled)
    return dx, dA, (dB.mul_(column) if dB is not None else None)


def norm_from_products(products, lora_A, lora_B, magnitude, scaling, weight_sq_norm):
    """(‖W + s·B·A‖, magnitude / it) fp32 [N] from A·Wᵀ [r, N]: the norm kernel's finishing
    step in PyTorch ops."""
    a32, b32 = lora_A.float(), lora_B.float()
    cross = (b32 * products.float().t()).sum(dim=1)
    quad = ((b32 @ (a32 @ a32.t())) * b32).sum(dim=1)
    norm = (weight_sq_norm + 2.0 * scaling * cross + scaling * scaling * quad).clamp_min_(0.0).sqrt_()
    return norm, magnitude.float() / norm


class KernelDoraOps:
    """The DoRA op's Triton path: the norm kernel, the LoRA shrink, the LoRA GEMM with the DoRA
    scale in its epilogue, the dY pass, then the LoRA backward on dY' (each GEMM on the
    implementation ``gemm_choice`` picks, or `gemm`, pinned: tests). Under dropout the second
    base product runs as a plain GEMM (``torch.mm``: cuBLAS on a GPU)."""

    def __init__(self, gemm: str | None = None):
        self.gemm = gemm
        self.lora = KernelLoraOps(gemm)

    @staticmethod
    def norm(weight, lora_A, lora_B, magnitude, scaling, weight_sq_norm):
        if weight_sq_norm is None:
            weight_sq_norm = squared_row_norms(weight)
        return kernel_modules().dora.weight_norm(lora_A, lora_B, magnitude, scaling, weight_sq_norm, weight=weight,
                                                 scratch=workspace.split_k_scratch)

    shrink = staticmethod(KernelLoraOps.shrink)

    def forward(self, x, weight, xa, keep, lora_B, scaling, bias, col_scale, dropout_p):
        dropped, rest = kernel_modules().dora.dropout_split(x, keep, dropout_p) if keep is not None else (x, None)
        gemm = self.lora._gemm("forward", x, x.dtype, x.shape[0], weight.shape[0], x.shape[1], lora_B.shape[1])
        y, pre = kernel_modules().lora.dora_forward(dropped, weight, xa, lora_B, scaling, bias, col_scale, gemm=gemm)
        if rest is not None:
            y = torch.addmm(y, rest, weight.t())
        return y, pre

    def backward(self, dy, x, weight, lora_A, lora_B, xa, keep, pre, col_scale, norm, scaling, dropout_p, need_dx,
                 need_dA, need_dB, need_dmag, need_db):
        need_lora = need_dx or need_dA or need_dB
        need_scaled = need_dx or (need_lora and not folds_scale_into_B(dy, lora_B))
        scaled, dmag, db = kernel_modules().dora.backward_dy(dy, pre, col_scale, norm, need_scaled, need_dmag,
                                                             need_db, scratch=workspace.split_k_scratch)
        dx = dA = dB = None
        if need_lora:
            dx, dA, dB = dora_lora_backward(self.lora.backward, dy, scaled, x, weight, lora_A, lora_B, xa, keep,
                                            col_scale, scaling, dropout_p, need_dx, need_dA, need_dB)
        if need_dx and keep is not None:  # (dY − dY')·W in dY's dtype: a tensor-core GEMM, not an fp32 one
            dx = kernel_modules().dora.dropout_dx(dx, torch.mm(dy - scaled, weight), keep, dropout_p)
        return dx, dA, dB, dmag, db


class TorchQDoraOps:
    """The QDoRA op's PyTorch path: W decoded transiently in x's dtype, then TorchDoraOps."""

    shrink = staticmethod(TorchLoraOps.shrink)

    @staticmethod
    def norm(qw: NF4Tensors, lora_A, lora_B, magnitude, scaling, weight_sq_norm, dtype):
        return TorchDoraOps.norm(decode(qw, dtype), lora_A, lora_B, magnitude, scaling, weight_sq_norm)

    @staticmethod
    def forward(x, qw: NF4Tensors, xa, keep, lora_B, scaling, bias, col_scale, dropout_p):
        return TorchDoraOps.forward(x, decode(qw, x.dtype), xa, keep, lora_B, scaling, bias, col_scale, dropout_p)

    @staticmethod
    def backward(dy, x, qw: NF4Tensors, lora_A, lora_B, xa, keep, pre, col_scale, norm, scaling, dropout_p, need_dx,
                 need_dA, need_dB, need_dmag, need_db):
        return TorchDoraOps.backward(dy, x, decode(qw, dy.dtype), lora_A, lora_B, xa, keep, pre, col_scale, norm,
                                     scaling, dropout_p, need_dx, need_dA, need_dB, need_dmag, need_db)


class KernelQDoraOps:
    """The QDoRA op's Triton path, per phase on the path ``gemm_choice.choose_nf4`` picks (or
    `path`, pinned: tests): "dequant", W decoded into the reusable buffer and KernelDoraOps on
    it; "fused", the NF4 kernels (the NF4 GEMM / decode GEMV storing pre and y = c·pre + b from
    its epilogue; the NF4 backward on dY'). The norm's A·Wᵀ always reads the 4-bit W."""

    def __init__(self, path: str | None = None):
        self.path = path
        self.nf4 = KernelNF4Ops(path=path)

    def _path(self, phase, t, M, qw, r):
        return self.nf4._path(phase, t, M, qw.out_features, qw.in_features, r)

    @staticmethod
    def norm(qw: NF4Tensors, lora_A, lora_B, magnitude, scaling, weight_sq_norm, dtype):
        """A·Wᵀ [r, N] (fp32) by the NF4 decode GEMV (r ≤ 16; the NF4 GEMM above): one pass over
        the 4-bit W, decoded in registers, whichever path the GEMMs take; then the norm kernel.
        fp32 adapters on a half-precision W: A enters as hi + lo, two rows each in W's dtype
        (A·Wᵀ to ~2⁻¹⁶ relative, as PEFT's fp32 A·Wᵀ; hi alone would round A to x's dtype), the
        2r rows in the same single pass over W, then one sum."""
        if weight_sq_norm is None:
            weight_sq_norm = squared_row_norms(qw, dtype)
        kernels = kernel_modules()
        r = lora_A.shape[0]
        split = lora_A.dtype == torch.float32 and dtype != torch.float32
        if split:
            rows = torch.empty((2 * r, lora_A.shape[1]), device=lora_A.device, dtype=dtype)
            rows[:r] = lora_A
            torch.sub(lora_A, rows[:r], out=rows[r:])
        else:
            rows = lora_A.to(dtype)
        products = kernels.nf4.forward(rows, qw, None, None, 0.0, None,
                                       tables=code_tables(qw.packed.device), scratch=workspace.split_k_scratch,
                                       out_dtype=torch.float32)
        if split:
            products = products[:r] + products[r:]
        return kernels.dora.weight_norm(lora_A, lora_B, magnitude, scaling, weight_sq_norm, products=products,
                                        scratch=workspace.split_k_scratch)

    shrink = staticmethod(KernelLoraOps.shrink)

    def forward(self, x, qw: NF4Tensors, xa, keep, lora_B, scaling, bias, col_scale, dropout_p):
        if self._path("nf4-forward", x, x.shape[0], qw, lora_B.shape[1]) == "dequant":
            return KernelDoraOps().forward(x, KernelNF4Ops._dequantized(qw, x.dtype), xa, keep, lora_B, scaling,
                                           bias, col_scale, dropout_p)
        kernels = kernel_modules()
        dropped, rest = kernels.dora.dropout_split(x, keep, dropout_p) if keep is not None else (x, None)
        tables = code_tables(x.device)
        y, pre = kernels.nf4.dora_forward(dropped, qw, xa, lora_B, scaling, bias, col_scale, self.nf4.regime,
                                          self.nf4.split_k, tables=tables, scratch=workspace.split_k_scratch)
        if rest is not None:  # the second base product in fp32, y added, one rounding (as addmm's)
            y = kernels.nf4.forward(rest, qw, None, None, 0.0, None, tables=tables, scratch=workspace.split_k_scratch,
                                    out_dtype=torch.float32).add_(y).to(x.dtype)
        return y, pre

    def backward(self, dy, x, qw: NF4Tensors, lora_A, lora_B, xa, keep, pre, col_scale, norm, scaling, dropout_p,
                 need_dx, need_dA, need_dB, need_dmag, need_db):
        if need_dx and self._path("nf4-dx", dy, dy.shape[0], qw, lora_A.shape[0]) == "dequant":
            return KernelDoraOps().backward(dy, x, KernelNF4Ops._dequantized(qw, dy.dtype), lora_A, lora_B, xa, keep,
                                            pre, col_scale, norm, scaling, dropout_p, need_dx, need_dA, need_dB,
                                            need_dmag, need_db)
        need_lora = need_dx or need_dA or need_dB
        need_scaled = need_dx or (need_lora and not folds_scale_into_B(dy, lora_B))
        scaled, dmag, db = kernel_modules().dora.backward_dy(dy, pre, col_scale, norm, need_scaled, need_dmag,
                                                             need_db, scratch=workspace.split_k_scratch)
        dx = dA = dB = None
        if need_lora:
            dx, dA, dB = dora_lora_backward(self.nf4.qlora_backward, dy, scaled, x, qw, lora_A, lora_B, xa, keep,
                                            col_scale, scaling, dropout_p, need_dx, need_dA, need_dB)
        if need_dx and keep is not None:
            dx = kernel_modules().dora.dropout_dx(dx, self.nf4.backward_dx(dy - scaled, qw), keep, dropout_p)
        return dx, dA, dB, dmag, db


class TorchBottleneckOps:
    """The bottleneck op's PyTorch path (act(h) and dh rounded to the compute dtype as the
    tensor cores' operands); same signatures as the launchers of ``peft_ops.kernels.bottleneck``."""

    @staticmethod
    def forward(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, dropout_p, seed, save_h):
        h = mm32(x, down_weight.t())
        if down_bias is not None:
            h += down_bias
        z = mm32(apply_activation(h, activation).to(x.dtype), up_weight.t())
        if up_bias is not None:
            z += up_bias
        if dropout_p > 0:
            z = torch.where(torch_keep_mask(seed, *x.shape, dropout_p, x.device), z * (1.0 / (1.0 - dropout_p)), 0.0)
        return (x.float() + scaling * z).to(x.dtype), (h if save_h else None)

    @staticmethod
    def backward(dy, x, h, down_weight, up_weight, activation, scaling, dropout_p, seed, need_dx, need_dw):
        branch_scale = scaling / (1.0 - dropout_p)
        dy_kept = dy
        if dropout_p > 0:
            dy_kept = torch.where(torch_keep_mask(seed, *x.shape, dropout_p, x.device), dy, 0.0)
        dh = (branch_scale * mm32(dy_kept, up_weight)) * activation_derivative(h, activation)
        dh_operand = dh.to(x.dtype)
        dx = (dy.float() + mm32(dh_operand, down_weight)).to(x.dtype) if need_dx else None
        if not need_dw:
            return dx, None, None, None, None
        act = apply_activation(h, activation).to(x.dtype)
        return (dx, mm32(dh_operand.t(), x), dh.sum(dim=0), mm32(dy_kept.t(), act).mul_(branch_scale),
                dy_kept.float().sum(dim=0).mul_(branch_scale))


class TorchEmbeddingOps:
    """The embedding LoRA op's PyTorch path (the steps of ``peft_ops.kernels.embedding``): xa the
    gathered columns of A in fp32, y = E[ids] + s·xa·Bᵀ rounded once; dA summed per id with
    ``index_add_`` (deterministic on a CPU; on a GPU as deterministic as PyTorch's setting)."""

    @staticmethod
    def forward(ids, weight, lora_A, lora_B, scaling):
        xa = lora_A.t().index_select(0, ids).float()
        rank = rank_dtype(weight.dtype, lora_B.dtype)
        y = weight.index_select(0, ids).float() + mm32((xa * scaling).to(rank), lora_B.to(rank).t())
        return y.to(weight.dtype), xa

    @staticmethod
    def backward(dy, ids, lora_A, lora_B, xa, scaling, padding_idx, need_dA, need_dB):
        rank = rank_dtype(dy.dtype, lora_A.dtype)
        dA = dB = None
        if need_dB:
            dB = mm32(dy.t(), xa.to(rank)).mul_(scaling)
        if need_dA:
            g = mm32(dy, lora_B.to(rank)).mul_(scaling)
            if padding_idx is not None:
                g[ids == padding_idx] = 0.0
            dA = torch.zeros(lora_A.shape[::-1], device=dy.device, dtype=torch.float32).index_add_(0, ids, g)
            dA = dA.t().contiguous()
        return dA, dB


class KernelEmbeddingOps:
    """The embedding LoRA op's Triton path: the launchers of ``peft_ops.kernels.embedding``."""

    @staticmethod
    def forward(ids, weight, lora_A, lora_B, scaling):
        return kernel_modules().embedding.forward(ids, weight, lora_A, lora_B, scaling)

    @staticmethod
    def backward(dy, ids, lora_A, lora_B, xa, scaling, padding_idx, need_dA, need_dB):
        return kernel_modules().embedding.backward(dy, ids, lora_A, lora_B, xa, scaling, padding_idx, need_dA,
                                                   need_dB)


def bottleneck_impl(impl: str, dtype: torch.dtype, bottleneck_size: int) -> str:
    """The path the bottleneck op takes for `impl`: the kernels, unless the bottleneck is wider
    than their tile tables hold (then the PyTorch path, cuBLAS GEMMs on a GPU)."""
    if impl == "triton" and bottleneck_size > kernel_modules().bottleneck.max_bottleneck(dtype):
        return "torch"
    return impl


def eager_ops(op: str, impl: str):
    """The implementation of `op` ("lora", "nf4", "dora", "qdora", "embedding", "bottleneck") for
    `impl` ("triton", "torch")."""
    if impl == "triton":
        return {"lora": KernelLoraOps, "nf4": KernelNF4Ops, "dora": KernelDoraOps, "qdora": KernelQDoraOps,
                "embedding": KernelEmbeddingOps, "bottleneck": lambda: kernel_modules().bottleneck}[op]()
    return {"lora": TorchLoraOps, "nf4": TorchNF4Ops, "dora": TorchDoraOps, "qdora": TorchQDoraOps,
            "embedding": TorchEmbeddingOps, "bottleneck": TorchBottleneckOps}[op]

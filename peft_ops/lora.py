"""The LoRA op: ``lora_linear`` and its autograd Function over the Triton or PyTorch path."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import _checks, reference
from .backend import resolve


def _check_lora_args(x, weight, lora_A, lora_B, scaling, bias, dropout_p) -> tuple[float, float]:
    """Validate every argument of lora_linear; returns (scaling, dropout_p) as floats."""
    _checks.tensor("x", x, min_ndim=1)
    _checks.tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    if in_features == 0 or out_features == 0:
        raise ValueError(f"weight has shape {tuple(weight.shape)}: in_features and out_features must be ≥ 1")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight "
                         f"{tuple(weight.shape)} expects in_features={in_features}")
    _checks.float_dtype("x", x)
    _checks.same_dtype("weight", weight, "x", x)
    check_bias(bias, out_features, x)
    return check_adapter_args(x, out_features, in_features, lora_A, lora_B, scaling, dropout_p,
                              {"weight": weight, "bias": bias})


def check_bias(bias, out_features: int, x: torch.Tensor) -> None:
    """bias: None, or [out_features] in x's dtype (lora_linear, nf4_linear, qlora_linear)."""
    _checks.optional_tensor("bias", bias, ndim=1)
    if bias is not None:
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must be [out_features] = [{out_features}], got {tuple(bias.shape)}")
        _checks.same_dtype("bias", bias, "x", x)


def check_adapter_args(x, out_features, in_features, lora_A, lora_B, scaling, dropout_p,
                       base_tensors: dict) -> tuple[float, float]:
    """The checks lora_linear and qlora_linear share once x, the base weight and the bias are
    checked: the adapters, scaling, dropout_p, and that every tensor (x, `base_tensors`, the
    adapters) is on one device. Returns (scaling, dropout_p)."""
    _checks.tensor("lora_A", lora_A, ndim=2)
    _checks.tensor("lora_B", lora_B, ndim=2)
    scaling = _checks.real_number("scaling", scaling)
    dropout_p = _checks.probability("dropout_p", dropout_p)
    r = lora_A.shape[0]
    if r <= 0:
        raise ValueError(f"lora_A has shape {tuple(lora_A.shape)}: the rank r (its first dimension) must be ≥ 1")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must be [r, in_features] = [{r}, {in_features}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_B must be [out_features, r] = [{out_features}, {r}], got {tuple(lora_B.shape)}")
    _checks.float_dtype("lora_A", lora_A)
    _checks.same_dtype("lora_B", lora_B, "lora_A", lora_A)
    if lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"lora_A has dtype {lora_A.dtype}: adapter weights must have x's dtype "
                        f"({x.dtype}) or float32")
    _checks.same_device({"x": x, **base_tensors, "lora_A": lora_A, "lora_B": lora_B})
    return scaling, dropout_p


def _draw_seed() -> int:
    # From PyTorch's default CPU generator: reproducible under torch.manual_seed, and no device
    # sync. In [2³¹, 2⁶²): the kernels' seed argument is always a 64-bit integer (one compiled
    # variant), and two layer-steps sharing a mask is a 2⁻⁶² event, not a 2⁻³¹ one.
    return int(torch.randint(2**31, 2**62, (), dtype=torch.int64).item())


def draw_seed(ops, dropout_p: float):
    """The dropout seed of one call: an int in eager mode; inside torch.compile a 0-d int64
    tensor drawn in the graph (ops.draw_seed, no .item()). 0 without dropout."""
    if dropout_p <= 0:
        return 0
    return ops.draw_seed() if hasattr(ops, "draw_seed") else _draw_seed()


def save_with_seed(ctx, tensors: tuple, seed) -> None:
    """save_for_backward, plus the seed: a tensor seed (compiled) is saved, an int kept on ctx."""
    saved = isinstance(seed, torch.Tensor)
    ctx.save_for_backward(*tensors, *((seed,) if saved else ()))
    ctx.seed = None if saved else seed  # None: the last saved tensor is the seed


def saved_with_seed(ctx) -> tuple[tuple, object]:
    saved = ctx.saved_tensors
    return (saved[:-1], saved[-1]) if ctx.seed is None else (saved, ctx.seed)


def compiled(ops, family: str):
    """Inside torch.compile, the same ops through torch.library custom ops (peft_ops.library)."""
    if not torch.compiler.is_compiling():
        return ops
    from . import library

    impl = "torch" if ops.__name__.startswith("Torch") else "triton"
    return {"lora": library.CompiledLoraOps, "nf4": library.CompiledNF4Ops,
            "adapter": library.CompiledAdapterOps}[family](impl)


def torch_keep_mask(seed: int, M: int, K: int, dropout_p: float, device) -> torch.Tensor:
    """The keep mask the PyTorch path uses for `seed` (a generator seeded per call). PyTorch's
    CPU generator (mt19937) keys on the low 32 bits of its seed alone, so there the seed's two
    halves are folded together first: every bit of the 64-bit seed changes the mask (the CUDA
    generator, Philox, takes all 64 bits as they are)."""
    device = torch.device(device)
    if device.type == "cpu":
        seed = (seed ^ (seed >> 32)) & 0xFFFFFFFF
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand((M, K), generator=gen, device=device) >= dropout_p


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b accumulated in fp32, as the kernels do (widening half-precision operands is exact)."""
    return torch.mm(a.float(), b.float())


class TorchLoraOps:
    """The PyTorch path: the same steps, roundings and saved tensors as the kernels, in PyTorch
    ops (fp32 accumulation, each output rounded once). Same signatures as the launchers of
    ``peft_ops.kernels.lora``. Half-precision operands are widened to fp32 transiently.

    Rank-r operands (xa, g, A, B) are rounded to the compute dtype as the tensor cores' inputs
    are, except with fp32 adapters, where the kernels keep those products fp32 (RANK_FP32)."""

    @staticmethod
    def shrink(x, lora_A, dropout_p, seed):
        if dropout_p > 0:
            x = x * torch_keep_mask(seed, *x.shape, dropout_p, x.device)
        xa = _mm32(x, lora_A.to(_rank_dtype(x.dtype, lora_A.dtype)).t())
        return xa.mul_(1.0 / (1.0 - dropout_p)) if dropout_p > 0 else xa

    @staticmethod
    def forward(x, weight, xa, lora_B, scaling, bias):
        """xa None: the base layer alone (nf4_linear's PyTorch path)."""
        y = _mm32(x, weight.t())
        if xa is not None:
            rank = _rank_dtype(x.dtype, lora_B.dtype)
            y += _mm32((xa * scaling).to(rank), lora_B.to(rank).t())
        if bias is not None:
            y += bias
        return y.to(x.dtype)

    @staticmethod
    def backward(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, need_dx, need_dA, need_dB):
        rank = _rank_dtype(dy.dtype, lora_A.dtype)
        lora_scale = scaling / (1.0 - dropout_p)
        keep = torch_keep_mask(seed, *x.shape, dropout_p, x.device) if dropout_p > 0 else None
        dx = dA = dB = None
        if need_dB:
            dB = _mm32(dy.t(), xa.to(rank)).mul_(scaling)
        if need_dx or need_dA:
            g = _mm32(dy, lora_B.to(rank))
        if need_dx:
            lora = _mm32((g * lora_scale).to(rank), lora_A.to(rank))
            if keep is not None:
                lora *= keep
            dx = (_mm32(dy, weight) + lora).to(dy.dtype)
        if need_dA:
            x_kept = x if keep is None else x * keep
            dA = _mm32(g.to(rank).t(), x_kept).mul_(lora_scale)
        return dx, dA, dB


def _rank_dtype(dtype: torch.dtype, adapter_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the rank-r operands (xa, g, A, B) as the kernels feed them to the tensor
    cores: the compute dtype, or fp32 when the adapters are fp32 (RANK_FP32)."""
    return torch.float32 if adapter_dtype == torch.float32 else dtype


def _kernel_ops():
    from .kernels import lora as lora_kernels  # imported late: TRITON_INTERPRET must be set first

    return lora_kernels


class LoraLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ + b, with drop(x) = x⊙keep/(1-p).

    Forward:  xa = drop(x)·Aᵀ              (shrink: [M, r], fp32)
              y  = x·Wᵀ + s·xa·Bᵀ + b      (GEMM, LoRA term and bias in its epilogue)
    Backward, with g = dY·B [M, r]:
              dX = dY·W + s·(g·A)⊙keep/(1-p)
              dA = s·gᵀ·drop(x)           = s/(1-p)·gᵀ·(x⊙keep)
              dB = s·dYᵀ·xa
              dW = dYᵀ·x                   (only when weight requires grad)
              db = Σ_m dY                  (only when bias requires grad)
    Saved: x itself (no copy), xa [M, r] fp32, the parameters, and the dropout seed as an int
    (inside torch.compile a 0-d tensor); the keep mask is regenerated from the seed in the
    backward, never stored.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling, dropout_p, ops):
        in_features = x.shape[-1]
        out_features = weight.shape[0]
        x2d = x.reshape(-1, in_features)  # a view unless x's strides forbid one
        seed = draw_seed(ops, dropout_p)
        xa = ops.shrink(x2d, lora_A, dropout_p, seed)
        y = ops.forward(x2d, weight, xa, lora_B, scaling, bias)
        save_with_seed(ctx, (x, weight, lora_A, lora_B, xa), seed)
        ctx.scaling, ctx.dropout_p, ctx.ops = scaling, dropout_p, ops
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    @once_differentiable  # the backward is not itself differentiable: say so, don't return wrong
    def backward(ctx, dy):
        (x, weight, lora_A, lora_B, xa), seed = saved_with_seed(ctx)
        need_dx, need_dW, need_dA, need_dB, need_db = ctx.needs_input_grad[:5]
        x2d = x.reshape(-1, x.shape[-1])
        dy2d = dy.reshape(-1, weight.shape[0])
        dx, dA, dB = ctx.ops.backward(dy2d, x2d, weight, lora_A, lora_B, xa, ctx.scaling, ctx.dropout_p,
                                      seed, need_dx, need_dA, need_dB)
        dW = torch.mm(dy2d.t(), x2d) if need_dW else None
        db = dy2d.sum(dim=0) if need_db else None
        return (
            dx.view(x.shape) if dx is not None else None,
            dW,
            dA.to(lora_A.dtype) if dA is not None else None,
            dB.to(lora_B.dtype) if dB is not None else None,
            db,
            None, None, None,
        )


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """``x·weightᵀ + scaling·(dropout(x)·lora_Aᵀ)·lora_Bᵀ + bias``, fused.

    Layouts as in PyTorch and PEFT: x [..., in] (any leading dims, any strides), weight
    [out, in], lora_A [r, in], lora_B [out, r], bias [out]; the result is [..., out] in x's
    dtype. x, weight and bias share one dtype (fp32, fp16 or bf16); lora_A and lora_B share
    x's dtype or float32 (PEFT's fp32 adapters on a half-precision base). ``dropout_p``
    applies inverted dropout to the LoRA input only. Gradients flow to every input that
    requires grad.
    """
    autocast = _checks.autocast_dtype(x)
    if autocast is not None:  # as F.linear under autocast: every operand in the autocast dtype
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(**_checks.cast_all(autocast, dict(
                x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, scaling=scaling, bias=bias, dropout_p=dropout_p)))
    scaling, dropout_p = _check_lora_args(x, weight, lora_A, lora_B, scaling, bias, dropout_p)
    impl = resolve(x.device)
    if impl == "reference":
        return reference.lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout_p)
    ops = compiled(_kernel_ops() if impl == "triton" else TorchLoraOps, "lora")
    return LoraLinearFunction.apply(x, weight, lora_A, lora_B, bias, scaling, dropout_p, ops)


def dropout_keep_mask(seed: int, shape: tuple[int, int], dropout_p: float, device, path: str) -> torch.Tensor:
    """The keep mask [M, K] that `path` ("triton" or "torch") regenerates from `seed`."""
    M, K = shape
    if path == "triton":
        return _kernel_ops().dropout_keep_mask(seed, M, K, dropout_p, device)
    return torch_keep_mask(seed, M, K, dropout_p, device)

"""How a kernel is judged against its float64 reference: one error metric, per-dtype
tolerances from a rounding analysis, and the case runners (LoRA, QLoRA, bottleneck) shared
by ``peft-ops check``, the tests and ``benchmarks/error_survey.py``.

Error metric, per element: ``|actual - expected| / scale``, where ``scale`` is the reference
evaluated on the absolute values of every input (for y: |x|·|W|ᵀ + |s|·|x|·|A|ᵀ·|B|ᵀ + |b|).
That is the standard forward-error bound of a sum of products: a result accumulated in fp32
and rounded k times to a dtype of unit roundoff u is off by at most k·u·scale (plus the fp32
accumulation error, ≤ K·2⁻²⁴·scale), however much its terms cancel. The scale is floored at
the dtype's smallest normal number: below it (fp16 subnormals, < 6.1e-5) a rounding is off by
up to half the subnormal spacing, which is u times that floor. Where no scale is given
the error is relative to |expected| floored at rms(expected) (used for single-rounding results).

Tolerance = ROUNDINGS·u + FP32_ACCUMULATION:
- ROUNDINGS = 2: each output is rounded once, and one fp32 intermediate is rounded to the
  compute dtype as a tensor-core operand on its way (xa·s in y, g in dx and dA, xa in dB).
- u: fp16 2⁻¹¹; bf16 2⁻⁷, because the Triton interpreter truncates fp32→bf16 (a whole ulp);
  a GPU or PyTorch rounds to nearest (2⁻⁸), so on a GPU bf16 sits at half its tolerance.
- FP32_ACCUMULATION = 1e-5: fp32 sums over the reduction lengths tested here (K ≤ 300 gives a
  worst case K·2⁻²⁴ = 1.8e-5; a random walk, √K·2⁻²⁴ ≈ 1e-6, is what happens).
- fp32 adapters on a half-precision base (PEFT's default): the rank-r products stay fp32, so
  y and dx are judged at x's dtype and dA, dB at fp32 (``tolerance(dtype, adapter_dtype, name)``).
Measured maxima are printed by ``peft-ops check`` and ``benchmarks/error_survey.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from .. import reference
from ..kernels import interface
from ..kernels.interface import DTYPE_NAMES
from ..nf4 import quantize
from ..ops.autograd import eager_seed, torch_keep_mask
from ..ops.bottleneck import BottleneckAdapterFunction
from ..ops.dora import DoraLinearFunction, QDoraLinearFunction, squared_row_norms
from ..ops.embedding import LoraEmbeddingFunction
from ..ops.lora import LoraLinearFunction
from ..ops.paths import (
    KernelDoraOps,
    KernelNF4Ops,
    KernelQDoraOps,
    TorchLoraOps,
    TorchNF4Ops,
    bottleneck_impl,
    eager_ops,
)
from ..ops.qlora import NF4LinearFunction, QLoraLinearFunction
from .launches import KernelsRan

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-7}
ROUNDINGS = 2
FP32_ACCUMULATION = 1e-5


TOLERANCES = {dtype: ROUNDINGS * u + FP32_ACCUMULATION for dtype, u in UNIT_ROUNDOFF.items()}


def tolerance(dtype: torch.dtype, adapter_dtype: torch.dtype | None = None, tensor: str = "y") -> float:
    """Tolerance of output `tensor` ("y", "dx", "dA", …) of a LoRA op with x in `dtype`."""
    if tensor in ("dA", "dB") and adapter_dtype == torch.float32:
        return TOLERANCES[torch.float32]  # fp32 adapters: their gradients are fp32 all the way
    return TOLERANCES[dtype]


def elementwise_error(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | None = None,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-element error (see the module docstring); `dtype`: the compute dtype (default: actual's)."""
    dtype = dtype or actual.dtype
    actual = actual.detach().double()
    expected = expected.detach().double()
    if actual.shape != expected.shape:
        raise ValueError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    diff = (actual - expected).abs()
    if scale is None:
        rms = expected.square().mean().sqrt() if expected.numel() else expected.new_zeros(())
        denom = rms + expected.abs()
    else:
        denom = scale.detach().double().abs() + torch.finfo(dtype).tiny
    err = diff / denom
    # A zero scale must be matched exactly; NaN/inf in actual always fail.
    err = torch.where(denom == 0, torch.where(diff == 0, 0.0, float("inf")), err)
    return torch.where(torch.isfinite(actual), err, float("inf"))


def max_error(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | None = None,
              dtype: torch.dtype | None = None) -> float:
    err = elementwise_error(actual, expected, scale, dtype)
    return float(err.max()) if err.numel() else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "result",
                 tol: float | None = None, scale: torch.Tensor | None = None) -> float:
    """Fail with how many elements are off, the worst one and where; returns the max error."""
    tol = TOLERANCES[dtype] if tol is None else tol
    err = elementwise_error(actual, expected, scale, dtype)
    if err.numel() == 0:
        return 0.0
    worst = float(err.max())
    if not worst <= tol:
        bad = int((err > tol).sum())
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{what}: {bad} of {err.numel()} elements exceed tolerance {tol:.2e} "
            f"(max error {worst:.3e} at {idx}: got {float(actual.detach()[idx]):.6g}, "
            f"expected {float(expected.detach()[idx]):.6g})")
    return worst


# Kernel against PyTorch path. The PyTorch path takes the kernels' steps and rounds at the
# same points (fp32 accumulation, one rounding per output and per tensor-core operand), so the
# two may differ only by fp32 summation order — which can tip a rounding by one unit — and, in
# the interpreter, by its truncating fp32→bf16 stores (one more unit). A kernel that rounds
# anywhere else (a half-precision accumulator, a rank product not kept in fp32, …) moves by
# many units on average; the rms bound sees that even where the largest error would hide.
ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def units_apart(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """How far `actual` is from `expected` in units of `dtype`'s roundoff u: (max over elements
    of |a − e| / (|e| + rms(e)), rms(a − e) / rms(e)), both divided by u. The rms floor keeps
    an element that cancels to near zero from counting its neighbours' rounding as its own."""
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        raise ValueError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if e.numel() == 0:
        return 0.0, 0.0
    if not torch.isfinite(a).all():
        return float("inf"), float("inf")
    diff = (a - e).abs()
    rms = e.square().mean().sqrt()
    if rms == 0:
        return (0.0, 0.0) if not diff.any() else (float("inf"), float("inf"))
    u = ROUNDOFF[dtype]
    return float((diff / (e.abs() + rms)).max()) / u, float(diff.square().mean().sqrt() / rms) / u


# (max, rms) bounds of units_apart, by the dtype of the compared tensor. Measured (triton 3.9
# interpreter with round-to-nearest bf16 conversions, tests/ops/test_half_precision.py shapes):
# fp16 and bf16 at most 0.85 / 0.11 units, most tensors exactly equal; fp32 gradients of fp32
# adapters 10.9 / 3.5 units (summation order). A tipped rounding is up to 2 units at the max.
# An fp16/bf16 accumulator rounded after every K-block of 32 lands at 1.4–6.6 / 0.65–1.6.
PATH_AGREEMENT = {torch.float16: (2.0, 0.25), torch.bfloat16: (2.0, 0.25), torch.float32: (64.0, 16.0)}


def assert_paths_agree(actual: torch.Tensor, expected: torch.Tensor, what: str = "result") -> tuple[float, float]:
    """`actual` (a kernel's result) rounds where `expected` (the PyTorch path's) does: within
    PATH_AGREEMENT of its dtype in ``units_apart``. Returns (max, rms) in units."""
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{what}: dtype {actual.dtype} != {expected.dtype}")
    worst, rms = units_apart(actual, expected, actual.dtype)
    max_bound, rms_bound = PATH_AGREEMENT[actual.dtype]
    if not (worst <= max_bound and rms <= rms_bound):
        raise AssertionError(f"{what}: {worst:.2f} units at most, {rms:.2f} rms from the PyTorch path "
                             f"(bounds {max_bound} / {rms_bound} units of {DTYPE_NAMES[actual.dtype]} roundoff)")
    return worst, rms


def saved_activation_bytes(fn, params) -> tuple[int, list[torch.Tensor], object]:
    """Run ``fn()`` and measure what autograd saves for the backward, ``params`` excluded
    (matched by data pointer): (bytes, saved tensors, fn's result). Each storage counts once,
    so several views of one tensor are one tensor."""
    param_ptrs = {p.data_ptr() for p in params if p is not None}
    saved = []

    def pack(t):
        if t.data_ptr() not in param_ptrs:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(storages.values()), saved, result


@contextlib.contextmanager
def kernels_must_run(path: str):
    """On the "triton" path, fail unless a Triton kernel ran inside the block: a case labelled
    "triton" must not silently take the PyTorch path. (Inside a caller's own launch hook, e.g.
    a count or a plan, the caller's hook sees the launches instead.)"""
    if path != "triton" or interface.active() is not None:
        yield
        return
    with KernelsRan() as ran:
        yield
    if not ran.names:
        raise AssertionError("the kernel path ran no kernel: it fell back to the PyTorch path")


# --------------------------------------------------------------------------------------
# LoRA cases
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LoraCase:
    M: int
    K: int  # in_features
    N: int  # out_features
    r: int
    dtype: torch.dtype
    dropout_p: float = 0.0
    bias: bool = True
    leading: tuple[int, ...] = ()  # x is [*leading, M, K] when set
    adapter_dtype: torch.dtype | None = None  # None: x's dtype
    train_base: bool = False  # weight and bias require grad too
    scaling: float = 0.75
    x_transposed: bool = False  # x a non-contiguous view (a transpose of its storage)
    weight_kn: bool = False  # W [N, K] stored [K, N] (GPT-2's Conv1D weight, passed as its .t())

    def tolerance(self, tensor: str = "y") -> float:
        return tolerance(self.dtype, self.adapter_dtype, tensor)

    def label(self) -> str:
        lead = "×".join(map(str, self.leading)) + "×" if self.leading else ""
        return f"{lead}{self.M}×{self.K}→{self.N} r{self.r}" + layout_label(self)


def layout_label(case) -> str:
    """The case label's note of non-contiguous operands."""
    return (" xᵀ" if case.x_transposed else "") + (" W[K,N]" if getattr(case, "weight_kn", False) else "")


def make_lora_inputs(case: LoraCase, device="cpu", seed: int = 0) -> dict:
    """Inputs of a LoRA case with unit-scale outputs; B is nonzero so every gradient is."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0, dtype=case.dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    adapter_dtype = case.adapter_dtype or case.dtype
    x = rand(*case.leading, case.M, case.K)
    return dict(
        x=x,
        weight=rand(case.N, case.K, scale=case.K ** -0.5),
        lora_A=rand(case.r, case.K, scale=case.K ** -0.5, dtype=adapter_dtype),
        lora_B=rand(case.N, case.r, scale=case.r ** -0.5, dtype=adapter_dtype),
        bias=rand(case.N) if case.bias else None,
        grad_out=rand(*case.leading, case.M, case.N),
    )


def expected_keep_mask(seed: int, rows: int, cols: int, dropout_p: float, path: str, device) -> torch.Tensor:
    """The keep mask [rows, cols] that a Function on `path` must have used after
    ``torch.manual_seed(seed)``, not read back from the implementation: on the kernels, the
    independent Philox4x32-10 of ``reference.dropout_keep_mask``; on the PyTorch path, PyTorch's
    generator seeded as that path documents (``torch_keep_mask``)."""
    torch.manual_seed(seed)  # the Function drew its seed right after this
    dropout_seed = eager_seed()
    if path == "triton":
        return reference.dropout_keep_mask(dropout_seed, cols, dropout_p, range(rows), range(cols)).to(device)
    return torch_keep_mask(dropout_seed, rows, cols, dropout_p, device)


GRAD_NAMES = {"x": "dx", "weight": "dW", "lora_A": "dA", "lora_B": "dB", "bias": "db"}


@dataclasses.dataclass
class Compared:
    name: str  # "y", "dx", "dW", "dA", "dB", "db"
    actual: torch.Tensor
    expected: torch.Tensor  # float64 reference
    scale: torch.Tensor  # float64 reference on |inputs|: the magnitude of the summed terms
    dtype: torch.dtype  # the compute dtype (x's)

    def error(self) -> float:
        return max_error(self.actual, self.expected, self.scale, self.dtype)

    def check(self, what: str, tol: float) -> float:
        return assert_close(self.actual, self.expected, self.dtype, f"{what} {self.name}", tol=tol, scale=self.scale)


def lora_reference_with_scale(inputs: dict, scaling: float, dropout_p: float, mask, grad_out, trainable):
    """Float64 reference values and error scales (the reference on |inputs|) of y and the
    gradients of `trainable`: {name: (expected, scale)}."""
    out = {}
    for kind, transform in (("value", lambda t: t), ("scale", torch.abs)):
        t = {k: transform(v.detach().double()).requires_grad_(k in trainable) if v is not None else None
             for k, v in inputs.items()}
        s = scaling if kind == "value" else abs(scaling)
        y = reference.lora_linear(t["x"], t["weight"], t["lora_A"], t["lora_B"], s, t["bias"], dropout_p,
                                  dropout_mask=mask)
        y.backward(transform(grad_out.double()))
        out[("y", kind)] = y.detach()
        for k in trainable:
            if t[k] is not None:
                out[(GRAD_NAMES[k], kind)] = t[k].grad
    return {name: (out[(name, "value")], out[(name, "scale")]) for name, kind in out if kind == "value"}


def non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x's values in column-major storage: a non-contiguous view, requiring grad."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_(True)


def stored_kn(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K]'s values in [K, N] storage (as a Conv1D holds them): a leaf view with strides
    (1, N), requiring grad as `weight` does."""
    out = torch.empty_strided(tuple(weight.shape), (1, weight.shape[0]), dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        out.copy_(weight)
    return out.requires_grad_(weight.requires_grad)


def laid_out(case: LoraCase, tensors: dict, inp: dict) -> None:
    """Put the case's non-contiguous operands in `tensors` (x transposed, W stored [K, N])."""
    if case.x_transposed:
        tensors["x"] = non_contiguous(inp["x"])
    if case.weight_kn:
        tensors["weight"] = stored_kn(tensors["weight"])


def run_lora_case(case: LoraCase, ops, device="cpu", seed: int = 0) -> list[Compared]:
    """Run lora_linear's autograd Function with `ops` (kernel launchers or TorchLoraOps) and the
    float64 reference on the same inputs and the same dropout mask: y and every gradient."""
    inp = make_lora_inputs(case, device, seed)
    trainable = ["x", "lora_A", "lora_B"] + (["weight", "bias"] if case.train_base else [])
    tensors = {k: v.clone().requires_grad_(k in trainable) if v is not None else None
               for k, v in inp.items() if k != "grad_out"}
    laid_out(case, tensors, inp)
    torch.manual_seed(seed)
    with kernels_must_run("torch" if ops is TorchLoraOps else "triton"):
        y = LoraLinearFunction.apply(tensors["x"], tensors["weight"], tensors["lora_A"], tensors["lora_B"],
                                     tensors["bias"], case.scaling, case.dropout_p, ops)
        y.backward(inp["grad_out"])

    inputs = {k: v for k, v in inp.items() if k != "grad_out"}
    return compare_with_reference(case, y, tensors, inputs, inp["grad_out"], trainable, case.scaling,
                                  "torch" if ops is TorchLoraOps else "triton", device, seed)


def compare_with_reference(case: LoraCase, y, tensors: dict, inputs: dict, grad_out, trainable: list[str],
                           scaling: float, path: str, device, seed: int) -> list[Compared]:
    """y and the gradients of `tensors` after a LoRA-type Function ran under
    ``torch.manual_seed(seed)``, against the float64 reference on `inputs` (dense weight),
    replaying the dropout mask that `path` ("triton" / "torch") drew."""
    mask = None
    if case.dropout_p > 0:
        x = tensors["x"]
        mask = expected_keep_mask(seed, x.numel() // case.K, case.K, case.dropout_p, path, device).view(x.shape)
    refs = lora_reference_with_scale(inputs, scaling, case.dropout_p, mask, grad_out, trainable)
    results = [Compared("y", y, *refs["y"], case.dtype)]
    for k in trainable:
        if tensors[k] is not None:
            results.append(Compared(GRAD_NAMES[k], tensors[k].grad, *refs[GRAD_NAMES[k]], case.dtype))
    return results


# --------------------------------------------------------------------------------------
# NF4 / QLoRA cases: the LoRA harness with the weight quantized to NF4. The float64
# reference uses the exact dequantized weight (its fp32 values), so the kernels' one extra
# rounding — W decoded to x's dtype as a tensor-core operand — falls in the same budget:
# each term of a sum is rounded once on its way in (W in x·Wᵀ, s·xa in the LoRA term) and
# the output once, so the bound stays 2 roundings of the scale.
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class QLoraCase(LoraCase):
    blocksize: int = 64
    double_quant: bool = True
    lora: bool = True  # False: nf4_linear (no adapter)
    regime: str | None = None  # "gemm" / "decode"; None: chosen by M
    split_k: int | None = None  # decode path's K slices (kernels only)
    nf4_path: str | None = None  # "fused" / "dequant" (kernels only); None: chosen by gemm_choice

    def label(self) -> str:
        extra = f" bs{self.blocksize}" + ("" if self.double_quant else " no-dq") + \
            (f" {self.regime}" if self.regime else "") + (f" split{self.split_k}" if self.split_k else "") + \
            (f" {self.nf4_path}" if self.nf4_path else "")
        base = LoraCase.label(dataclasses.replace(self, x_transposed=False))
        return (base if self.lora else base.rsplit(" r", 1)[0]) + extra + (" xᵀ" if self.x_transposed else "")


def qlora_ops(path: str, regime: str | None = None, split_k: int | None = None, nf4_path: str | None = None):
    """The ops behind the QLoRA Functions: "triton" (kernels, with an optional forced regime or
    NF4 path) or "torch" (the PyTorch path)."""
    return TorchNF4Ops if path == "torch" else KernelNF4Ops(regime, split_k, nf4_path)


def run_qlora_case(case: QLoraCase, path: str, device="cpu", seed: int = 0) -> list[Compared]:
    """qlora_linear's (or nf4_linear's) autograd Function on `path` against the float64
    reference on the exact dequantized weight: y and every gradient."""
    ops = qlora_ops(path, case.regime, case.split_k, case.nf4_path)
    inp = make_lora_inputs(case, device, seed)
    qweight = quantize(inp["weight"], case.blocksize, case.double_quant)
    q = qweight.tensors()
    meta = (q.out_features, q.in_features, q.blocksize, q.dtype)
    trainable = ["x"] + (["lora_A", "lora_B"] if case.lora else []) + (["bias"] if case.train_base else [])
    tensors = {k: v.clone().requires_grad_(k in trainable) if v is not None else None
               for k, v in inp.items() if k not in ("grad_out", "weight")}
    if case.x_transposed:
        tensors["x"] = non_contiguous(inp["x"])
    torch.manual_seed(seed)
    with kernels_must_run(path):
        if case.lora:
            y = QLoraLinearFunction.apply(tensors["x"], tensors["lora_A"], tensors["lora_B"], tensors["bias"],
                                          q.packed, q.absmax, q.absmax_scale, q.absmax_offset, meta, case.scaling,
                                          case.dropout_p, ops)
        else:
            y = NF4LinearFunction.apply(tensors["x"], tensors["bias"], q.packed, q.absmax, q.absmax_scale,
                                        q.absmax_offset, meta, ops)
        y.backward(inp["grad_out"])
    inputs = {k: v for k, v in inp.items() if k != "grad_out"}
    inputs["weight"] = reference.nf4_dequantize(qweight, torch.float32)
    scaling = case.scaling if case.lora else 0.0  # no adapter: the LoRA term is zero
    return compare_with_reference(case, y, tensors, inputs, inp["grad_out"], trainable, scaling, path, device, seed)


# --------------------------------------------------------------------------------------
# DoRA cases: the LoRA harness plus a magnitude vector, on a dense or an NF4 weight. The
# reference is PEFT's formula in float64 (``reference.dora_linear``). The error scale of each
# output is the same formula on |inputs| with every signed factor bounded by its magnitude:
# c = m/‖W + s·B·A‖ fixed at its true value, |c − 1| ≤ |c| + 1. Budget: one rounding more
# than LoRA's for every tensor downstream of dY' = dY⊙c (rounded to x's dtype as the LoRA
# backward's dY), and under dropout for y (the second base product's operand x − xd). fp32
# adapters on a half-precision x: dA and dB are fp32 all the way (c folded into fp32 B, never
# rounded: ``paths.folds_scale_into_B``), judged at fp32 as LoRA's.
# --------------------------------------------------------------------------------------

DORA_GRAD_NAMES = {"x": "dx", "weight": "dW", "lora_A": "dA", "lora_B": "dB", "magnitude": "dm", "bias": "db"}


@dataclasses.dataclass(frozen=True)
class DoraCase(LoraCase):
    nf4: bool = False  # the weight quantized to NF4 (qdora_linear)
    nf4_path: str | None = None  # "fused" / "dequant" (kernels only); None: chosen by gemm_choice
    gemm: str | None = None  # "triton" / "cublas" (dense kernels only); None: chosen by gemm_choice

    def tolerance(self, tensor: str = "y") -> float:
        if tensor in ("dA", "dB") and self.adapter_dtype == torch.float32:
            return TOLERANCES[torch.float32]
        extra = tensor in ("dx", "dA", "dB", "dW") or (tensor == "y" and self.dropout_p > 0)
        u = UNIT_ROUNDOFF[self.dtype]
        return (ROUNDINGS + (1 if extra else 0)) * u + FP32_ACCUMULATION

    def label(self) -> str:
        extra = (" nf4" if self.nf4 else "") + (f" {self.nf4_path}" if self.nf4_path else "") + \
            (f" {self.gemm}" if self.gemm else "")
        return LoraCase.label(dataclasses.replace(self, x_transposed=False, weight_kn=False)) + extra + \
            layout_label(self)


def dora_ops(path: str, nf4: bool, nf4_path: str | None = None, gemm: str | None = None):
    """The ops behind the DoRA Functions on `path` ("triton" / "torch")."""
    if path == "torch":
        return eager_ops("qdora" if nf4 else "dora", "torch")
    return KernelQDoraOps(nf4_path) if nf4 else KernelDoraOps(gemm)


def make_dora_inputs(case: DoraCase, device="cpu", seed: int = 0) -> dict:
    """The LoRA case's inputs and a magnitude vector near the column norms (as PEFT initializes
    it, then trained away from them): c = m/‖·‖ in [0.5, 1.5]."""
    inp = make_lora_inputs(case, device, seed)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    factor = 0.5 + torch.rand(case.N, generator=gen, dtype=torch.float64)
    norm = reference.dora_weight_norm(inp["weight"].double(), inp["lora_A"].double(), inp["lora_B"].double(),
                                      case.scaling)
    inp["magnitude"] = (factor * norm.cpu()).to(device=device, dtype=case.adapter_dtype or case.dtype)
    return inp


def dora_reference_with_scale(inputs: dict, scaling: float, dropout_p: float, mask, grad_out, trainable):
    """Float64 values and error scales of y and the gradients of `trainable`: {name: (value, scale)}."""
    value = {k: v.detach().double().requires_grad_(k in trainable) if v is not None else None
             for k, v in inputs.items()}
    y = reference.dora_linear(value["x"], value["weight"], value["lora_A"], value["lora_B"], value["magnitude"],
                              scaling, value["bias"], dropout_p, dropout_mask=mask)
    y.backward(grad_out.double())
    norm = reference.dora_weight_norm(value["weight"].detach(), value["lora_A"].detach(), value["lora_B"].detach(),
                                      scaling)
    t = {k: v.detach().double().abs().requires_grad_(k in trainable) if v is not None else None
         for k, v in inputs.items()}
    c = t["magnitude"] / norm
    x = t["x"]
    dropped = x if mask is None else x * mask.double() / (1.0 - dropout_p)
    lora = abs(scaling) * (dropped @ t["lora_A"].t()) @ t["lora_B"].t()
    if dropout_p > 0:
        scale = x @ t["weight"].t() + (c + 1) * (dropped @ t["weight"].t()) + c * lora
    else:
        scale = c * (x @ t["weight"].t() + lora)
    if t["bias"] is not None:
        scale = scale + t["bias"]
    scale.backward(grad_out.double().abs())
    out = {"y": (y.detach(), scale.detach())}
    for k in trainable:
        if value[k] is not None:
            out[DORA_GRAD_NAMES[k]] = (value[k].grad, t[k].grad)
    return out


def run_dora_case(case: DoraCase, path: str, device="cpu", seed: int = 0) -> list[Compared]:
    """dora_linear's (or qdora_linear's) autograd Function on `path` against the float64
    reference on the same inputs (the exact dequantized weight for NF4) and dropout mask."""
    ops = dora_ops(path, case.nf4, case.nf4_path, case.gemm)
    inp = make_dora_inputs(case, device, seed)
    trainable = ["x", "lora_A", "lora_B", "magnitude"] + (["bias"] + ([] if case.nf4 else ["weight"])
                                                            if case.train_base else [])
    tensors = {k: v.clone().requires_grad_(k in trainable) if v is not None else None
               for k, v in inp.items() if k != "grad_out"}
    laid_out(case, tensors, inp)
    torch.manual_seed(seed)
    with kernels_must_run(path):
        if case.nf4:
            qweight = quantize(inp["weight"], case.blocksize if hasattr(case, "blocksize") else 64)
            q = qweight.tensors()
            meta = (q.out_features, q.in_features, q.blocksize, q.dtype)
            sq_norm = squared_row_norms(qweight, case.dtype)
            y = QDoraLinearFunction.apply(tensors["x"], tensors["lora_A"], tensors["lora_B"], tensors["magnitude"],
                                          tensors["bias"], q.packed, q.absmax, q.absmax_scale, q.absmax_offset, meta,
                                          case.scaling, case.dropout_p, sq_norm, ops)
        else:
            y = DoraLinearFunction.apply(tensors["x"], tensors["weight"], tensors["lora_A"], tensors["lora_B"],
                                         tensors["magnitude"], tensors["bias"], case.scaling, case.dropout_p,
                                         squared_row_norms(tensors["weight"]), ops)
        y.backward(inp["grad_out"])
    inputs = {k: v for k, v in inp.items() if k != "grad_out"}
    if case.nf4:
        inputs["weight"] = reference.nf4_dequantize(qweight, case.dtype)  # the weight the GEMMs take
    mask = None
    if case.dropout_p > 0:
        x = tensors["x"]
        mask = expected_keep_mask(seed, x.numel() // case.K, case.K, case.dropout_p, path, device).view(x.shape)
    refs = dora_reference_with_scale(inputs, case.scaling, case.dropout_p, mask, inp["grad_out"], trainable)
    results = [Compared("y", y, *refs["y"], case.dtype)]
    for k in trainable:
        if tensors[k] is not None:
            results.append(Compared(DORA_GRAD_NAMES[k], tensors[k].grad, *refs[DORA_GRAD_NAMES[k]], case.dtype))
    return results


# --------------------------------------------------------------------------------------
# Bottleneck cases. The same metric and budget: act(h) is rounded to x's dtype on its
# way into the up projection and dh on its way into dX and dW_down (one rounding each), every
# output once; h and dh are fp32 sums of exact products. The scale is the reference on |inputs|
# (act and act′ at h evaluated there bound |act(h)| and, up to the 13 % overshoot of gelu′, |act′(h)|).
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BottleneckCase:
    M: int
    d: int  # hidden size
    m: int  # bottleneck size
    dtype: torch.dtype
    activation: str = "relu"
    dropout_p: float = 0.0
    bias: bool = True
    leading: tuple[int, ...] = ()  # x is [*leading, M, d] when set
    x_transposed: bool = False  # x a non-contiguous view
    scaling: float = 0.75

    def tolerance(self, tensor: str = "y") -> float:
        return TOLERANCES[self.dtype]

    def label(self) -> str:
        lead = "×".join(map(str, self.leading)) + "×" if self.leading else ""
        return f"{lead}{self.M}×{self.d} m{self.m} {self.activation}" + ("" if self.bias else " no-bias") + \
            (" xᵀ" if self.x_transposed else "")


BOTTLENECK_GRAD_NAMES = {"x": "dx", "down_weight": "dW_down", "down_bias": "db_down", "up_weight": "dW_up",
                      "up_bias": "db_up"}


def make_bottleneck_inputs(case: BottleneckCase, device="cpu", seed: int = 0) -> dict:
    """Inputs of a bottleneck case with unit-scale h and branch output; the up projection is
    nonzero (not the identity init) so that every gradient is."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=case.dtype)

    return dict(
        x=rand(*case.leading, case.M, case.d),
        down_weight=rand(case.m, case.d, scale=case.d ** -0.5),
        down_bias=rand(case.m, scale=0.5) if case.bias else None,
        up_weight=rand(case.d, case.m, scale=case.m ** -0.5),
        up_bias=rand(case.d, scale=0.5) if case.bias else None,
        grad_out=rand(*case.leading, case.M, case.d),
    )


def run_bottleneck_case(case: BottleneckCase, path: str, device="cpu", seed: int = 0) -> list[Compared]:
    """bottleneck_adapter's autograd Function on `path` ("triton" / "torch") against the float64
    reference on the same inputs and dropout mask: y and every gradient."""
    if bottleneck_impl(path, case.dtype, case.m) != path:
        raise ValueError(f"m = {case.m} is past the kernels' widest {DTYPE_NAMES[case.dtype]} tile: "
                         "bottleneck_adapter runs the PyTorch path there (use path='torch')")
    ops = eager_ops("bottleneck", path)
    inp = make_bottleneck_inputs(case, device, seed)
    names = [k for k in BOTTLENECK_GRAD_NAMES if inp[k] is not None]
    tensors = {k: inp[k].clone().requires_grad_(True) for k in names}
    if case.x_transposed:
        tensors["x"] = non_contiguous(inp["x"])
    torch.manual_seed(seed)
    with kernels_must_run(path):
        y = BottleneckAdapterFunction.apply(tensors["x"], tensors["down_weight"], tensors.get("down_bias"),
                                            tensors["up_weight"], tensors.get("up_bias"), case.activation,
                                            case.scaling, case.dropout_p, ops)
        y.backward(inp["grad_out"])

    mask = None
    if case.dropout_p > 0:
        mask = expected_keep_mask(seed, inp["x"].numel() // case.d, case.d, case.dropout_p, path, device)
        mask = mask.view(inp["x"].shape)
    out = {}
    for kind, transform in (("value", lambda t: t), ("scale", torch.abs)):
        t = {k: transform(inp[k].detach().double()).requires_grad_(True) for k in names}
        ref = reference.bottleneck_adapter(t["x"], t["down_weight"], t.get("down_bias"), t["up_weight"],
                                           t.get("up_bias"), case.activation,
                                           case.scaling if kind == "value" else abs(case.scaling), case.dropout_p,
                                           dropout_mask=mask)
        ref.backward(transform(inp["grad_out"].double()))
        out[kind] = {"y": ref.detach(), **{BOTTLENECK_GRAD_NAMES[k]: t[k].grad for k in names}}
    results = [Compared("y", y, out["value"]["y"], out["scale"]["y"], case.dtype)]
    for k in names:
        name = BOTTLENECK_GRAD_NAMES[k]
        results.append(Compared(name, tensors[k].grad, out["value"][name], out["scale"][name], case.dtype))
    return results


# --------------------------------------------------------------------------------------
# Embedding LoRA cases: ids with a repeated id (the scatter-add sums several rows) and, when
# given, padding_idx; the table frozen (PEFT's embedding LoRA trains A and B only).
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EmbeddingCase:
    M: int  # tokens
    V: int  # num_embeddings
    D: int  # embedding_dim
    r: int
    dtype: torch.dtype
    adapter_dtype: torch.dtype | None = None  # None: the table's dtype
    padding_idx: int | None = None
    scaling: float = 1.5
    dropout_p: float = 0.0  # always: PEFT applies no dropout to an embedding's adapter (a field the harnesses share)

    def tolerance(self, tensor: str = "y") -> float:
        return tolerance(self.dtype, self.adapter_dtype, tensor)

    def label(self) -> str:
        return f"embedding {self.M} of {self.V}×{self.D} r{self.r}" + \
            (f" pad{self.padding_idx}" if self.padding_idx is not None else "")


def make_embedding_inputs(case: EmbeddingCase, device="cpu", seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    adapter_dtype = case.adapter_dtype or case.dtype
    ids = torch.randint(0, case.V, (case.M,), generator=gen)
    ids[: min(6, case.M)] = min(7, case.V - 1)  # one id several times: its column of dA sums those rows
    return dict(ids=ids.to(device),
                weight=torch.randn(case.V, case.D, generator=gen).to(device=device, dtype=case.dtype),
                lora_A=(torch.randn(case.r, case.V, generator=gen) * 0.5).to(device=device, dtype=adapter_dtype),
                lora_B=(torch.randn(case.D, case.r, generator=gen) * case.r ** -0.5).to(device=device,
                                                                                       dtype=adapter_dtype),
                grad_out=torch.randn(case.M, case.D, generator=gen).to(device=device, dtype=case.dtype))


def run_embedding_case(case: EmbeddingCase, path: str, device="cpu", seed: int = 0) -> list[Compared]:
    """lora_embedding's autograd Function on `path` ("triton" / "torch") against the float64
    reference on the same inputs: y, dA, dB."""
    inp = make_embedding_inputs(case, device, seed)
    A, B = inp["lora_A"].clone().requires_grad_(), inp["lora_B"].clone().requires_grad_()
    with kernels_must_run(path):
        y = LoraEmbeddingFunction.apply(inp["ids"], inp["weight"], A, B, case.scaling, case.padding_idx,
                                        eager_ops("embedding", path))
        y.backward(inp["grad_out"])
    out = {}
    for kind, f in (("value", lambda t: t), ("scale", torch.abs)):
        a, b = f(inp["lora_A"].double()).requires_grad_(), f(inp["lora_B"].double()).requires_grad_()
        ref = reference.lora_embedding(inp["ids"], f(inp["weight"].double()), a, b,
                                       case.scaling if kind == "value" else abs(case.scaling), case.padding_idx)
        ref.backward(f(inp["grad_out"].double()))
        out[kind] = {"y": ref.detach(), "dA": a.grad, "dB": b.grad}
    return [Compared(name, actual, out["value"][name], out["scale"][name], case.dtype)
            for name, actual in (("y", y), ("dA", A.grad), ("dB", B.grad))]

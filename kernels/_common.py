"""What every kernel file shares: the target (which autotune list), dtype names, jit helpers."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..backend import interpreting

# @triton.jit reads TRITON_INTERPRET when it decorates a function, i.e. when this package is
# imported; remember the mode so a launch can refuse a mismatch instead of crashing obscurely.
INTERPRETED = interpreting()


def current_target() -> str:
    """The key of the autotune lists for this process: "interpreter", "sm80" or "sm90"."""
    if INTERPRETED:
        return "interpreter"
    if torch.cuda.is_available():
        return "sm90" if torch.cuda.get_device_capability()[0] >= 9 else "sm80"
    return "sm80"  # nothing launches here; any list will do


def configs_for_this_target(per_target: dict) -> list[triton.Config]:
    """All configs for this process's target: per_target[target] maps operand families
    ("half", "mixed" ⊂ "half", "fp32", …) to lists (each config once); for the interpreter,
    which cannot benchmark ("0 active drivers"), it is exactly one config."""
    entry = per_target[current_target()]
    if not isinstance(entry, dict):
        return entry
    unique = {id(c): c for configs in entry.values() for c in configs}
    return list(unique.values())


def by_dtype(per_target: dict, arg_name: str, general_when=None) -> dict | None:
    """Autotune pruning to the configs of the launch's operand family: "fp32" when tensor
    argument `arg_name` is fp32, "mixed" when the rank products are fp32 (RANK_FP32), else
    "half"; or "general" whenever `general_when(constexpr kwargs)` is true."""
    entry = per_target[current_target()]
    if not isinstance(entry, dict):
        return None
    family_ids = {family: {id(c) for c in configs} for family, configs in entry.items()}

    def prune(configs, named_args, **kwargs):
        if general_when is not None and general_when(kwargs):
            family = "general"
        elif named_args[arg_name].dtype == torch.float32:
            family = "fp32"
        else:
            family = "mixed" if kwargs.get("RANK_FP32") else "half"
        return [c for c in configs if id(c) in family_ids[family]]

    return {"early_config_prune": prune}


def fp32_dot_precision() -> str:
    """How fp32 operands meet the tensor cores, following PyTorch's switch for fp32 matmuls:
    "tf32" when the user allowed TF32, else "tf32x3" (three TF32 products, about fp32
    accuracy, still on tensor cores; plain "ieee" would run on FMA units and spill)."""
    matmul = torch.backends.cuda.matmul
    # torch ≥ 2.9 has fp32_precision ("none" = not set through it); reading the legacy
    # allow_tf32 after the new API was used raises, so ask the new API first.
    precision = getattr(matmul, "fp32_precision", "none")
    if precision == "none":
        try:
            precision = "tf32" if matmul.allow_tf32 else "ieee"
        except RuntimeError:
            precision = "ieee"
    return "tf32" if precision == "tf32" else "tf32x3"


def dot_flags(dtype: torch.dtype, rank_dtype: torch.dtype | None = None) -> dict:
    """Constexprs that every kernel with a `tl.dot` takes.

    dtype: the compute dtype (x's). rank_dtype: the adapters' dtype; when it is fp32 on a
    half-precision x (PEFT's default), the rank-r products are formed in fp32 (RANK_FP32), so
    the adapter branch keeps fp32 accuracy as in PEFT, at r/K of the GEMM's work."""
    return {
        # The interpreter matmuls bf16 as raw uint16 bits (silently wrong). Widening to fp32 is
        # exact (a bf16×bf16 product fits in fp32), so the result still equals a bf16 tensor-core
        # dot with fp32 accumulation. Never set on a GPU.
        "WIDEN_BF16_DOT": INTERPRETED and dtype == torch.bfloat16,
        "RANK_FP32": rank_dtype == torch.float32 and dtype != torch.float32,
        # Used only by dots whose operands are fp32; bf16/fp16 dots ignore it.
        "DOT_PRECISION": fp32_dot_precision(),
    }


def m_bucket(m: int) -> int:
    """Autotune key for the token count: one tuning per power of two, not one per batch shape."""
    return triton.next_power_of_2(max(int(m), 1))


def launch_guard(*tensors: torch.Tensor):
    """Check the kernels can run on these tensors here, and make their GPU the current one:
    Triton launches on the current device and stream, which need not be the tensors'."""
    for t in tensors:
        if t.device.type != "cuda" and not INTERPRETED:
            raise RuntimeError(
                "peft_ops Triton kernels got a CPU tensor, but they were imported without the "
                "Triton interpreter: set TRITON_INTERPRET=1 before importing peft_ops"
            )
        if t.device.type == "cuda" and INTERPRETED:
            raise RuntimeError("peft_ops Triton kernels were imported under TRITON_INTERPRET=1: "
                               "they cannot run on CUDA tensors in this process")
    device = tensors[0].device
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def mma(a, b, acc, WIDEN_BF16_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a·b with fp32 accumulation (see dot_flags for the two switches)."""
    if WIDEN_BF16_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile (pid_m, pid_n) of program `pid`, GROUP_M row-tiles at a time so that the tiles
    running together share their rows of the left operand in L2 (Triton's matmul tutorial)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


# --------------------------------------------------------------------------------------
# Ahead-of-time compilation for a named GPU (no GPU needed): what peft-ops compile and the
# compile test build. Each kernel file lists its builds in `compile_specs(target)`.
# --------------------------------------------------------------------------------------

GPU_TARGETS = {"sm80": 80, "sm90": 90}  # sm90 compiles for sm_90a (wgmma)


class KernelBuild:
    """One kernel at one autotune config, with the argument types of a realistic launch:
    pointers 16-byte aligned, unit inner strides (contiguous tensors), other integers
    divisible by 16 unless listed in `plain_ints` (what Triton's JIT specializes on)."""

    def __init__(self, name, kernel, config, pointer_dtypes, constexprs, unit_strides=(), float_args=(),
                 plain_ints=(), uses_tensor_cores=True, options=None):
        self.name = name
        # the @triton.jit function, from under its autotuner if it has one
        self.fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        self.uses_tensor_cores = uses_tensor_cores
        self.options = {"enable_fp_fusion": True, **(options or {})}
        self.config = config
        self.num_warps = config.num_warps
        self.num_stages = config.num_stages
        self.signature, self.constexprs, self.attrs = {}, dict(constexprs), {}
        all_constexprs = {**config.kwargs, **constexprs}
        for idx, arg in enumerate(self.fn.arg_names):
            if arg in all_constexprs:
                self.signature[arg] = "constexpr"
                self.constexprs[arg] = all_constexprs[arg]
            elif arg in unit_strides:
                self.signature[arg] = "constexpr"
                self.constexprs[arg] = 1
            elif arg in pointer_dtypes:
                self.signature[arg] = "*" + pointer_dtypes[arg]
                self.attrs[(idx,)] = [["tt.divisibility", 16]]
            elif arg in float_args:
                self.signature[arg] = "fp32"
            else:
                self.signature[arg] = "i32"
                if arg not in plain_ints:
                    self.attrs[(idx,)] = [["tt.divisibility", 16]]

    @property
    def config_label(self) -> str:
        tiles = ",".join(f"{k}={v}" for k, v in self.config.kwargs.items())
        return f"{tiles} w{self.num_warps} s{self.num_stages}"

    def compile(self, target: str):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        src = ASTSource(fn=self.fn, signature=self.signature, constexprs=self.constexprs, attrs=self.attrs)
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages, **self.options}
        return triton.compile(src, target=GPUTarget("cuda", GPU_TARGETS[target], 32), options=options)

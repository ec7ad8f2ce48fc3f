"""What every kernel file shares: the target (which autotune list), dtype names, jit helpers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import interpreting

# @triton.jit reads TRITON_INTERPRET when it decorates a function, i.e. when this package is
# imported; remember the mode so a launch can refuse a mismatch instead of crashing obscurely.
INTERPRETED = interpreting()

TARGETS = ("sm80", "sm90")

TRITON_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def current_target() -> str:
    """The key of the autotune lists for this process: "interpreter", "sm80" or "sm90"."""
    if INTERPRETED:
        return "interpreter"
    if torch.cuda.is_available():
        return "sm90" if torch.cuda.get_device_capability()[0] >= 9 else "sm80"
    return "sm80"  # nothing launches here; any list will do


def configs_for_this_target(per_target: dict[str, list[triton.Config]]) -> list[triton.Config]:
    # The interpreter cannot benchmark ("0 active drivers"): it gets exactly one config.
    return per_target[current_target()]


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexprs that every kernel with a `tl.dot` takes, from the compute dtype."""
    return {
        # The interpreter matmuls bf16 as raw uint16 bits (silently wrong). Widening to fp32 is
        # exact (a bf16×bf16 product fits in fp32), so the result still equals a bf16 tensor-core
        # dot with fp32 accumulation. Never set on a GPU.
        "WIDEN_BF16_DOT": INTERPRETED and dtype == torch.bfloat16,
        # fp32 inputs follow PyTorch's own switch: TF32 tensor cores only when the user allowed
        # them for matmuls (off by default), else exact fp32 FMA.
        "DOT_PRECISION": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
    }


def m_bucket(m: int) -> int:
    """Autotune key for the token count: one tuning per power of two, not one per batch shape."""
    return triton.next_power_of_2(max(int(m), 1))


def check_launchable(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not INTERPRETED:
            raise RuntimeError(
                "peft_ops Triton kernels got a CPU tensor, but they were imported without the "
                "Triton interpreter: set TRITON_INTERPRET=1 before importing peft_ops"
            )
        if t.device.type == "cuda" and INTERPRETED:
            raise RuntimeError("peft_ops Triton kernels were imported under TRITON_INTERPRET=1: "
                               "they cannot run on CUDA tensors in this process")


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
                 plain_ints=(), uses_tensor_cores=True):
        self.name = name
        # the @triton.jit function, from under its autotuner if it has one
        self.fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        self.uses_tensor_cores = uses_tensor_cores
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
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages, "enable_fp_fusion": True}
        return triton.compile(src, target=GPUTarget("cuda", GPU_TARGETS[target], 32), options=options)

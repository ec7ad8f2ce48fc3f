"""What every kernel file shares: the target (which autotune list), tile lists, jit helpers, and
the ahead-of-time (aot) builds for a named GPU."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import os
import re
import sys

import torch
import triton
import triton.language as tl
import triton.testing
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import interface

# (major, minor) of the installed triton: a few tile tables differ by version, where an older
# triton's register allocation spilled (ptxas) on a tile a newer one builds clean.
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
# Before 3.9 (the GPU image has 3.6), a few tiles spill that 3.9 builds clean: those tables drop them.
OLD_TRITON = TRITON_VERSION < (3, 9)

# @triton.jit reads TRITON_INTERPRET when it decorates a function, i.e. when this package is
# imported; remember the mode so a launch can refuse a mismatch instead of crashing obscurely.
INTERPRETED = interface.interpreting()


def current_target() -> str:
    """The key of the tile tables for the launch at hand: this process's target, or the one a
    launch plan is made for (see ``interface``)."""
    plan = interface.planning()
    return plan.plan_target if plan is not None else process_target()


def process_target() -> str:
    """The key of the autotune lists for this process: "interpreter", "sm80" or "sm90". (A kernel
    may be first imported while a plan is made: its autotuner must still get this process's.)"""
    if INTERPRETED:
        return "interpreter"
    if torch.cuda.is_available():
        return "sm90" if torch.cuda.get_device_capability()[0] >= 9 else "sm80"
    return "sm80"  # nothing launches here; any list will do


def configs_for_this_target(per_target: dict) -> list[triton.Config]:
    """All configs for this process's target: per_target[target] maps operand families
    ("half", "mixed" ⊂ "half", "fp32", …) to lists (each config once); for the interpreter,
    which cannot benchmark ("0 active drivers"), it is exactly one config."""
    entry = per_target[process_target()]
    if not isinstance(entry, dict):
        return entry
    unique = {id(c): c for configs in entry.values() for c in configs}
    return list(unique.values())


def dtype_family(arg_name: str, general_when=None):
    """The operand family of a launch, for pruning autotune lists: "fp32" when tensor argument
    `arg_name` is fp32, "mixed" when the rank products are fp32 (RANK_FP32), else "half"; or
    "general" whenever `general_when(constexprs)` is true."""
    def family(named_args: dict, constexprs: dict) -> str:
        if general_when is not None and general_when(constexprs):
            return "general"
        if named_args[arg_name].dtype == torch.float32:
            return "fp32"
        return "mixed" if constexprs.get("RANK_FP32") else "half"

    return family


# kernel function name → (its per-target autotune lists, its family function): what
# `candidate_configs` (and so a launch plan for another target) reads.
_TUNED: dict = {}


def candidate_configs(kernel_name: str, target: str, named_args: dict, constexprs: dict) -> list[triton.Config] | None:
    """The autotune configs a launch of `kernel_name` chooses from on `target`, after pruning
    to the launch's family; None for a kernel that is not autotuned."""
    if kernel_name not in _TUNED:
        return None
    per_target, family = _TUNED[kernel_name]
    entry = per_target[target]
    return entry[family(named_args, constexprs)] if isinstance(entry, dict) else list(entry)


# kernel function name → its triton.Autotuner (what `forced_config` pins).
_AUTOTUNERS: dict = {}


def tuned_kernels(modules=("lora", "nf4", "bottleneck", "embedding")) -> list[str]:
    """Names of the autotuned kernels of these kernel modules imported so far (import them
    first); `modules=None`: every module's, the calibration kernels' included."""
    return [name for name, tuner in _AUTOTUNERS.items()
            if modules is None or interface.python_function(tuner).__module__.rsplit(".", 1)[-1] in modules]


def tile_families(kernel_name: str, target: str) -> dict[str, list[triton.Config]]:
    """The autotune lists of `kernel_name` on `target` by operand family ({"": list} for a
    target with one list, e.g. the interpreter)."""
    entry = _TUNED[kernel_name][0][target]
    return dict(entry) if isinstance(entry, dict) else {"": list(entry)}


@contextlib.contextmanager
def forced_config(kernel_name: str, config: triton.Config):
    """Every launch of autotuned kernel `kernel_name` inside the block runs `config`, untuned
    and unpruned, whichever target's list it comes from: how the tests run production tiles
    in the interpreter (at small odd shapes) and every config of every family on a GPU."""
    tuner = _AUTOTUNERS[kernel_name]
    saved = tuner.configs
    tuner.configs = [config]  # one config: Triton runs it as is (no benchmark, no prune)
    try:
        yield
    finally:
        tuner.configs = saved


def autotuned(per_target: dict, family, key: list[str]):
    """``triton.autotune`` over this process's list in `per_target`, pruned at each launch to
    the list of its family (`family(named_args, constexprs)`, e.g. ``dtype_family``)."""
    entry = per_target[process_target()]
    prune = None
    if isinstance(entry, dict):
        family_ids = {name: {id(c) for c in configs} for name, configs in entry.items()}

        def early_config_prune(configs, named_args, **kwargs):
            ids = family_ids[family(named_args, kwargs)]
            kept = [c for c in configs if id(c) in ids]
            # PEFT_OPS_AUTOTUNE=first: the family's first config, no benchmarking (quick checks
            # over many shapes, where tuning each new shape would cost more than the check)
            return kept[:1] if os.environ.get("PEFT_OPS_AUTOTUNE") == "first" else kept

        prune = {"early_config_prune": early_config_prune}

    def decorate(kernel):
        name = interface.python_function(kernel).__name__
        _TUNED[name] = (per_target, family)
        tuner = triton.autotune(configs=configs_for_this_target(per_target), prune_configs_by=prune, key=key)(kernel)
        _AUTOTUNERS[name] = tuner
        return tuner

    return decorate


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
        # (A launch plan is for a GPU, whatever this process runs.)
        "WIDEN_BF16_DOT": INTERPRETED and interface.planning() is None and dtype == torch.bfloat16,
        "RANK_FP32": rank_dtype == torch.float32 and dtype != torch.float32,
        # Used only by dots whose operands are fp32; bf16/fp16 dots ignore it.
        "DOT_PRECISION": fp32_dot_precision(),
    }


def tile_configs(names: tuple[str, ...], rows) -> list[triton.Config]:
    """Autotune configs from rows (tile sizes in the order of `names`, then warps, stages)."""
    return [triton.Config(dict(zip(names, row[:-2])), num_warps=row[-2], num_stages=row[-1]) for row in rows]


def m_bucket(m: int) -> int:
    """Autotune key for the token count: one tuning per power of two, not one per batch shape."""
    return triton.next_power_of_2(max(int(m), 1))


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, through the launch hook when one is installed (it
    counts the launch, or records it without running while planning; see ``interface``)."""
    hook = interface.active()
    if hook is None:
        kernel[grid](*args, **kwargs)
    else:
        hook.triton_launch(kernel, grid, args, kwargs)


def multiprocessor_count(device: torch.device) -> int | None:
    """SMs of the GPU the launch goes to (of the planned GPU while planning); None on a CPU."""
    plan = interface.planning()
    if plan is not None:
        return plan.sm_count
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_guard(*tensors: torch.Tensor):
    """Check the kernels can run on these tensors here, and make their GPU the current one:
    Triton launches on the current device and stream, which need not be the tensors'."""
    if interface.planning() is not None:  # meta tensors, nothing runs
        return contextlib.nullcontext()
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
def split_k_total(acc, PARTIALS, COUNTERS, tile, pid_s, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """The sum over the SPLIT_K programs of one output tile of their fp32 partials `acc`
    ([BLOCK_M, BLOCK_N]), in the program that finishes last, and whether this is that program
    (the others return zeros and False). Deterministic: the last one adds the partials in
    slice order 0, 1, …, whichever order the programs finished in. Each program stores its
    partial, then (after a barrier: all its threads' stores issued) increments the tile's
    counter with release-acquire semantics, so the program that sees SPLIT_K - 1 sees every
    partial; it reads them past L1 (`.cg`: the buffer is reused across launches) and sets the
    counter back to 0 for the next launch (COUNTERS start zeroed, and every launch leaves them so)."""
    base = PARTIALS + (tile.to(tl.int64) * SPLIT_K) * (BLOCK_M * BLOCK_N)
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(base + pid_s * (BLOCK_M * BLOCK_N) + offs, acc)
    tl.debug_barrier()
    arrived = tl.atomic_add(COUNTERS + tile, 1, sem="acq_rel")
    last = arrived == SPLIT_K - 1
    total = tl.zeros_like(acc)
    if last:
        for s in tl.static_range(SPLIT_K):
            total += tl.load(base + s * (BLOCK_M * BLOCK_N) + offs, cache_modifier=".cg")
        tl.atomic_xchg(COUNTERS + tile, 0)
    return total, last


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
# Ahead-of-time (aot) builds for a named GPU (no GPU needed): what `peft-ops aot` and the aot
# tests build. Each kernel file lists its builds in `aot_specs(target)`.
# --------------------------------------------------------------------------------------

GPU_TARGETS = {"sm80": 80, "sm90": 90}  # sm90 builds for sm_90a (wgmma)


# Launch keywords that are build options, not constexpr arguments.
BUILD_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg")


class KernelBuild:
    """One kernel at one autotune config, with the argument types of a realistic launch:
    pointers 16-byte aligned, unit inner strides (contiguous tensors), other integers
    divisible by 16 unless listed in `plain_ints` (what Triton's JIT specializes on).

    Plain data (the kernel by module and name), so builds travel to aot worker processes.
    `vector_loads`: the build promises no synchronous global load narrower than 4 bytes in its
    main loop (`peft-ops aot` reports one as a problem: such loads wait a memory latency each)."""

    def __init__(self, name, kernel, config, pointer_dtypes, constexprs, unit_strides=(), float_args=(),
                 plain_ints=(), uses_tensor_cores=None, options=None, int64_args=(), vector_loads=False):
        self.name = name
        fn = interface.python_function(kernel)
        self.module, self.function = fn.__module__, fn.__name__
        self.uses_tensor_cores = _issues_dot(kernel) if uses_tensor_cores is None else uses_tensor_cores
        self.vector_loads = vector_loads
        self.options = {"enable_fp_fusion": True, **(options or {})}
        if getattr(config, "maxnreg", None):  # a config's register cap (the autotuner passes it on)
            self.options.setdefault("maxnreg", config.maxnreg)
        self.config_kwargs = dict(config.kwargs)
        self.num_warps = config.num_warps
        self.num_stages = config.num_stages
        self.signature, self.constexprs, self.attrs = {}, dict(constexprs), {}
        all_constexprs = {**config.kwargs, **constexprs}
        for idx, arg in enumerate(inspect.signature(fn).parameters):
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
                self.signature[arg] = "i64" if arg in int64_args else "i32"
                if arg not in plain_ints:
                    self.attrs[(idx,)] = [["tt.divisibility", 16]]

    @classmethod
    def from_launch(cls, name: str, kernel, args: dict, config) -> "KernelBuild":
        """The build a launch with these arguments (name → value, as recorded by a launch
        plan) compiles to under `config`, specialized as Triton's JIT does: integers equal to
        1 become constants, multiples of 16 are marked divisible, pointers aligned."""
        do_not_specialize = set(_jit_setting(kernel, "do_not_specialize") or ())
        constexpr_names = _constexpr_names(kernel)
        options = {k: v for k, v in args.items() if k in BUILD_OPTIONS}
        pointers, floats, plain, int64, constexprs, units = {}, [], [], [], {}, []
        for arg, value in args.items():
            if arg in BUILD_OPTIONS:
                continue
            if arg in constexpr_names:
                constexprs[arg] = value
            elif isinstance(value, torch.Tensor):
                pointers[arg] = interface.DTYPE_NAMES[value.dtype]
            elif isinstance(value, float):
                floats.append(arg)
            elif isinstance(value, int):
                if not -2**31 <= value < 2**31:
                    int64.append(arg)
                if arg in do_not_specialize:
                    plain.append(arg)
                elif value == 1:
                    units.append(arg)
                elif value % 16:
                    plain.append(arg)
        num_warps = options.pop("num_warps", config.num_warps)
        num_stages = options.pop("num_stages", config.num_stages)
        maxnreg = options.pop("maxnreg", getattr(config, "maxnreg", None))
        config = triton.Config(dict(config.kwargs), num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)
        return cls(name, kernel, config, pointers, constexprs, unit_strides=units, float_args=floats, plain_ints=plain,
                   int64_args=int64, options=options)

    def jit_function(self):
        kernel = getattr(importlib.import_module(self.module), self.function)
        return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel

    @property
    def config_label(self) -> str:
        """The autotune config's tiles, or for a kernel launched with fixed tiles its BLOCK_*."""
        shown = self.config_kwargs or {k: v for k, v in self.constexprs.items() if k.startswith("BLOCK_")}
        tiles = ",".join(f"{k}={v}" for k, v in shown.items())
        return f"{tiles} w{self.num_warps} s{self.num_stages}"

    def key(self) -> tuple:
        """What identifies the build (same key, same binary)."""
        return (self.module, self.function, tuple(sorted(self.signature.items())),
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
                tuple(sorted((k, repr(v)) for k, v in self.attrs.items())), self.num_warps, self.num_stages,
                tuple(sorted(self.options.items())))

    def build_with_ptxas_log(self, target: str):
        """(the compiled kernel, ptxas' -v report: registers and spills) for `target`."""
        triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v report, printed to stdout
        triton.knobs.compilation.always_compile = True  # a cached build would skip ptxas and its report
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = self.build(target)
        return compiled, log.getvalue()

    def build(self, target: str):
        """The compiled kernel for `target` (``triton.compile``: PTX, cubin, metadata)."""
        src = ASTSource(fn=self.jit_function(), signature=self.signature, constexprs=self.constexprs,
                        attrs=self.attrs)
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages, **self.options}
        return triton.compile(src, target=GPUTarget("cuda", GPU_TARGETS[target], 32), options=options)


def _jit_setting(kernel, name: str):
    """A @triton.jit setting (e.g. do_not_specialize) of a kernel, compiled or interpreted."""
    fn = kernel
    while fn is not None:
        if hasattr(fn, name):
            return getattr(fn, name)
        if isinstance(getattr(fn, "kwargs", None), dict) and name in fn.kwargs:
            return fn.kwargs[name]
        fn = getattr(fn, "fn", None)
    return None


def _issues_dot(kernel, seen: set | None = None) -> bool:
    """Whether a kernel, or a @triton.jit function it calls, issues ``tl.dot`` (a build
    whose PTX then lacks tensor-core instructions is broken; one without a dot is not)."""
    fn = interface.python_function(kernel)
    seen = set() if seen is None else seen
    if fn in seen:
        return False
    seen.add(fn)
    source = inspect.getsource(fn)
    if re.search(r"\btl\.dot\(", source):
        return True
    called = (fn.__globals__.get(name) for name in set(re.findall(r"\b(\w+)\(", source)))
    return any(_issues_dot(f, seen) for f in called if hasattr(f, "fn") and callable(getattr(f, "fn")))


def _constexpr_names(kernel) -> set[str]:
    """Parameters declared ``tl.constexpr`` (annotations may be strings under
    ``from __future__ import annotations``)."""
    params = inspect.signature(interface.python_function(kernel)).parameters
    return {name for name, p in params.items() if "constexpr" in str(p.annotation)}


def fixed_config(num_warps: int, num_stages: int) -> triton.Config:
    """The one config of a kernel launched with fixed tiles (not autotuned)."""
    return triton.Config({}, num_warps=num_warps, num_stages=num_stages)


def benchmark_ms(fn) -> float:
    """Median milliseconds of ``fn()`` on the current GPU (Triton's do_bench: warm-up, L2 flush)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def autotune_choices(modules=("lora", "nf4", "bottleneck")) -> list[dict]:
    """What every autotuner of these kernel modules chose so far, per kernel and launch key."""
    found = []
    for module_name in modules:
        module = sys.modules.get(f"{__package__}.{module_name}")
        for name, kernel in sorted(vars(module).items()) if module else ():
            if not isinstance(kernel, triton.runtime.Autotuner):
                continue
            for key, config in getattr(kernel, "cache", {}).items():
                found.append({"kernel": name, "key_names": list(getattr(kernel, "keys", [])),
                              "key": [str(k) for k in (key if isinstance(key, tuple) else (key,))],
                              "config": dict(config.kwargs), "num_warps": config.num_warps,
                              "num_stages": config.num_stages})
    return found

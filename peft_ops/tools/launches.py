"""Kernel launches per op call: counted where the op runs, or planned for a named GPU anywhere.

Every launch of this package's kernels passes through one hook (``peft_ops.kernels.interface``);
every PyTorch op the launchers and autograd Functions issue passes through a
``TorchDispatchMode``. A ``LaunchRecorder`` listens to both:

- ``count(fn)``: fn runs as usual; the result lists each Triton launch and each PyTorch op
  that launches a device kernel (sums, casts, zero-fills, copies, …: not views, not bare
  allocations) on the tensors' device.
- ``plan(fn, target, sm_count)``: nothing runs. fn builds its tensors on the ``meta`` device;
  the ops then take their Triton path, and the launchers choose what they would choose on a
  GPU of that target (sm_80 / sm_90 tile tables, split-K from ``sm_count``) and hand each
  launch (kernel, grid, arguments) to the recorder instead of running it. PyTorch ops on
  meta tensors are recorded with the bytes they would move. This gives the launch sequence
  of an op at a model's shape on a machine without a GPU (``peft_ops.tools.estimate`` times it).

Each recorded launch is a ``Launch``; ``summary()`` counts them by name.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..kernels import interface
from ..nf4 import ABSMAX_BLOCKSIZE, NF4Weight
from ..ops.bottleneck import bottleneck_adapter
from ..ops.dora import dora_linear, qdora_linear
from ..ops.lora import lora_linear
from ..ops.multi_lora import multi_lora_linear
from ..ops.qlora import nf4_linear, qlora_linear
from .roofline import OpShape

# ATen ops that only allocate (no kernel runs on the device).
_ALLOCATIONS = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.new_empty.default",
                "aten.new_empty_strided.default", "aten.empty_like.default", "aten.lift_fresh.default"}


@dataclasses.dataclass
class Launch:
    """One device launch: a Triton kernel or a PyTorch (ATen) op."""
    kind: str  # "triton" or "torch"
    name: str  # the kernel's function name, or the ATen overload ("aten.sum.dim_IntList")
    grid: object = None  # triton: a tuple, or a function of the config's META dict
    args: dict = dataclasses.field(default_factory=dict)  # triton: argument name → value (+ keyword constexprs)
    kernel: object = None  # triton: the kernel object as launched (autotuner or jit function)
    bytes: int = 0  # torch: bytes its tensors on the device hold (inputs read + outputs written)
    gemm: tuple | None = None  # torch matrix products: (M, N, K) of the [M, K]·[K, N] product


    def __str__(self) -> str:
        return self.name


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _launches_a_kernel(func, args, kwargs, out, device_type: str) -> bool:
    """Whether ATen op `func` runs a kernel on `device_type`: it touches a tensor there, it is
    not a bare allocation, and it is not a pure view (an alias returned, nothing written)."""
    if str(func) in _ALLOCATIONS:
        return False
    schema = func._schema
    writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    if not writes and any(r.alias_info is not None for r in schema.returns):
        return False
    return any(t.device.type == device_type for t in _tensors((args, kwargs, out)))


_MATRIX_PRODUCTS = {"aten.mm.default": 0, "aten.mm.out": 0, "aten.addmm.default": 1, "aten.addmm.out": 1,
                    "aten.addmm_.default": 1}


def _gemm_shape(func, args) -> tuple | None:
    """(M, N, K) of a matrix product op (its [M, K] and [K, N] operands), else None."""
    first = _MATRIX_PRODUCTS.get(str(func))
    if first is None:
        return None
    a, b = args[first], args[first + 1]
    return (a.shape[0], b.shape[1], a.shape[1])


class LaunchRecorder(TorchDispatchMode):
    """Records launches on `device_type`; with `plan_target` ("sm80", "sm90") it plans instead
    (meta tensors, nothing runs; ``sm_count`` is the planned GPU's multiprocessor count)."""

    def __init__(self, device_type: str, plan_target: str | None = None, sm_count: int | None = None):
        super().__init__()
        self.device_type = device_type
        self.plan_target = plan_target
        self.sm_count = sm_count
        self.launches: list[Launch] = []
        self.allocated: list[torch.Tensor] = []  # meta stand-ins of the tensors allocated on the device
        self._inside_kernel = False

    # the kernel launch hook (peft_ops.kernels.interface)
    def triton_launch(self, kernel, grid, args, kwargs) -> None:
        fn = interface.python_function(kernel)
        names = list(inspect.signature(fn).parameters)
        # The record keeps meta stand-ins (shape, strides, dtype), not the tensors: a reference
        # held here would change what autograd does (it copies a gradient it cannot steal).
        stand_ins = {}

        def record(value):
            if not isinstance(value, torch.Tensor):
                return value
            if id(value) not in stand_ins:  # one stand-in per tensor: bytes count each tensor once
                stand_ins[id(value)] = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                                           device="meta")
            return stand_ins[id(value)]

        self._inside_kernel = True  # the stand-ins are the recorder's, not the launcher's allocations
        try:
            recorded = {name: record(value) for name, value in {**dict(zip(names, args)), **kwargs}.items()}
        finally:
            self._inside_kernel = False
        self.launches.append(Launch("triton", fn.__name__, grid, recorded, kernel))
        if self.plan_target is None:
            # The interpreter (and the autotuner's first benchmark) run PyTorch ops of their own
            # inside a launch: they are not the launcher's.
            self._inside_kernel = True
            try:
                kernel[grid](*args, **kwargs)
            finally:
                self._inside_kernel = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (not self._inside_kernel and str(func) in _ALLOCATIONS and isinstance(out, torch.Tensor)
                and out.device.type == self.device_type):
            self.allocated.append(torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device="meta"))
        if not self._inside_kernel and _launches_a_kernel(func, args, kwargs, out, self.device_type):
            on_device = [t for t in _tensors((args, kwargs, out)) if t.device.type == self.device_type]
            self.launches.append(Launch("torch", str(func), bytes=sum(t.numel() * t.element_size() for t in on_device),
                                        gemm=_gemm_shape(func, args)))
        return out

    def __enter__(self):
        interface.install(self)
        try:
            return super().__enter__()
        except BaseException:
            interface.install(None)
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            interface.install(None)


def count(fn, device_type: str = "cuda") -> list[Launch]:
    """Run fn() and return the launches it made on `device_type` (run it once before, so
    that autotuning and first-call work stay out of the count)."""
    with LaunchRecorder(device_type) as recorder:
        fn()
    return recorder.launches


class KernelsRan:
    """``with KernelsRan() as ran:`` — the names of the Triton kernels launched inside the block,
    in order (``ran.names``), nothing else recorded: how a test proves that it exercised a
    kernel and not a fallback."""

    plan_target = None

    def __init__(self):
        self.names: list[str] = []

    def triton_launch(self, kernel, grid, args, kwargs) -> None:
        self.names.append(interface.python_function(kernel).__name__)
        kernel[grid](*args, **kwargs)

    def __enter__(self) -> "KernelsRan":
        interface.install(self)
        return self

    def __exit__(self, *exc) -> None:
        interface.install(None)


def plan(fn, target: str = "sm90", sm_count: int = 132) -> list[Launch]:
    """The launches fn() would make on a GPU of `target` with `sm_count` SMs; fn builds its
    tensors on the meta device, and nothing runs."""
    return planned_recorder(fn, target, sm_count).launches


def planned_recorder(fn, target: str = "sm90", sm_count: int = 132) -> LaunchRecorder:
    """The recorder of plan(fn, …): its launches, and the tensors allocated (``allocated``)."""
    if target not in ("sm80", "sm90"):
        raise ValueError(f"target must be 'sm80' or 'sm90', got {target!r}")
    with LaunchRecorder("meta", plan_target=target, sm_count=sm_count) as recorder:
        fn()
    return recorder


def summary(launches: list[Launch]) -> dict[str, int]:
    """{name: how many times}, in order of first launch."""
    return dict(collections.Counter(str(launch) for launch in launches))



# --------------------------------------------------------------------------------------
# One op call at a shape, on meta tensors
# --------------------------------------------------------------------------------------

def meta_nf4_weight(out_features: int, in_features: int, blocksize: int = 64, dtype=torch.bfloat16):
    """An NF4Weight [out, in] of meta buffers, double-quantized (bitsandbytes' default)."""
    meta = dict(device="meta")
    numel = out_features * in_features
    blocks = -(-numel // blocksize)
    return NF4Weight(torch.empty((numel + 1) // 2, dtype=torch.uint8, **meta),
                     torch.empty(blocks, dtype=torch.uint8, **meta), (out_features, in_features), dtype, blocksize,
                     torch.empty(-(-blocks // ABSMAX_BLOCKSIZE), dtype=torch.float32, **meta),
                     torch.empty((), dtype=torch.float32, **meta))


def op_call(s, dtype=torch.bfloat16, dropout_p: float = 0.0, bias: bool = False):
    """(forward function, output gradient) of one call of op `s` (a ``roofline.OpShape``) on
    meta tensors: x, the adapters (and the bottleneck weights) require grad, base weights do not."""
    meta = dict(device="meta", dtype=dtype)

    def leaf(*shape):
        return torch.empty(*shape, **meta).requires_grad_()

    x = leaf(s.M, s.K)
    if s.op == "bottleneck":
        params = (leaf(s.r, s.K), leaf(s.r) if bias else None, leaf(s.K, s.r), leaf(s.K) if bias else None)
        return (lambda: bottleneck_adapter(x, *params, "gelu", 1.0, dropout_p)), torch.empty(s.M, s.K, **meta)
    b = torch.empty(s.N, **meta) if bias else None
    base = torch.empty(s.N, s.K, **meta) if s.op in ("lora", "dora") else meta_nf4_weight(s.N, s.K, dtype=dtype)
    if s.op == "nf4":
        forward = lambda: nf4_linear(x, base, b)  # noqa: E731
    elif s.op in ("dora", "qdora"):  # ‖W‖² cached, as the layers hold it
        A, B, m = leaf(s.r, s.K), leaf(s.N, s.r), leaf(s.N)
        sq = torch.empty(s.N, device="meta", dtype=torch.float32)
        op = dora_linear if s.op == "dora" else qdora_linear
        forward = lambda: op(x, base, A, B, m, 2.0, b, dropout_p, weight_sq_norm=sq)  # noqa: E731
    else:
        A, B = leaf(s.r, s.K), leaf(s.N, s.r)
        op = lora_linear if s.op == "lora" else qlora_linear
        forward = lambda: op(x, base, A, B, 2.0, b, dropout_p)  # noqa: E731
    return forward, torch.empty(s.M, s.N, **meta)


def op_launches(s, target: str = "sm90", sm_count: int = 132, dtype=torch.bfloat16, dropout_p: float = 0.0,
                bias: bool = False) -> dict[str, list[Launch]]:
    """{"forward": […], "backward": […]}: the launches of one call of op `s` (forward, then
    the backward of its output) on a GPU of `target` with `sm_count` SMs, planned, in steady
    state (after a first call)."""
    return call_launches(*op_call(s, dtype, dropout_p, bias), target, sm_count)


def multi_lora_call(adapters: int, rows_per_adapter: int, d: int, r: int, dtype=torch.bfloat16,
                    dropout_p: float = 0.0):
    """(forward function, output gradient) of one ``multi_lora_linear`` call on meta tensors: a
    d → d base weight, `adapters` adapters of rank r, each over its own `rows_per_adapter` rows
    (contiguous runs; the ids on the CPU, as the layers pass them). x and the adapters require grad."""
    meta = dict(device="meta", dtype=dtype)
    M = adapters * rows_per_adapter
    x = torch.empty(M, d, **meta).requires_grad_()
    weight = torch.empty(d, d, **meta)
    lora_As = [torch.empty(r, d, **meta).requires_grad_() for _ in range(adapters)]
    lora_Bs = [torch.empty(d, r, **meta).requires_grad_() for _ in range(adapters)]
    ids = torch.arange(adapters).repeat_interleave(rows_per_adapter)
    return (lambda: multi_lora_linear(x, weight, lora_As, lora_Bs, [2.0] * adapters, ids,
                                      dropout_ps=[dropout_p] * adapters)), torch.empty(M, d, **meta)


def call_launches(forward, grad_out, target: str = "sm90", sm_count: int = 132) -> dict[str, list[Launch]]:
    """{"forward": […], "backward": […]}: the launches of `forward()` and of its output's backward,
    planned, in steady state (after a first call)."""
    # one call first, not recorded: what the first call alone does (the zero-fill of the decode
    # GEMVs' split-K counters, allocated once per device and stream) is not a per-call launch
    plan(forward, target, sm_count)
    out = []
    phases = {"forward": plan(lambda: out.append(forward()), target, sm_count)}
    phases["backward"] = plan(lambda: out[0].backward(grad_out), target, sm_count)
    return phases


# The calls `peft-ops aot` counts: the headline shapes of a 7-8B model, with each option
# that changes the launch sequence.
LAUNCH_TABLE_CALLS = (
    ("lora", 8192, 4096, 4096, 16, {}), ("lora", 8192, 4096, 4096, 16, {"dropout_p": 0.1}),
    ("lora", 8192, 4096, 4096, 16, {"bias": True}),
    ("qlora", 8192, 4096, 4096, 16, {}), ("qlora", 1, 4096, 4096, 16, {}),
    ("dora", 8192, 4096, 4096, 16, {}), ("dora", 8192, 4096, 4096, 16, {"dropout_p": 0.1}),
    ("qdora", 8192, 4096, 4096, 16, {}), ("qdora", 1, 4096, 4096, 16, {}),
    ("nf4", 1, 4096, 14336, 0, {}), ("nf4", 16, 4096, 14336, 0, {}), ("nf4", 8192, 4096, 14336, 0, {}),
    ("bottleneck", 8192, 4096, 4096, 64, {}), ("bottleneck", 8192, 4096, 4096, 64, {"dropout_p": 0.1}),
)


def launch_table(target: str = "sm90", sm_count: int = 132) -> list[dict]:
    """Launches per op call (forward, backward) for LAUNCH_TABLE_CALLS, planned."""
    rows = []
    for op, M, K, N, r, options in LAUNCH_TABLE_CALLS:
        s = OpShape(op, M, K, N, r)
        for phase, found in op_launches(s, target, sm_count, **options).items():
            torch_ops = summary([launch for launch in found if launch.kind == "torch"])
            rows.append({"op": op, "shape": s.label(), "options": ", ".join(f"{k}={v}" for k, v in options.items())
                         or "-", "phase": phase, "launches": len(found),
                         "triton": sum(launch.kind == "triton" for launch in found), "torch_ops": torch_ops,
                         "sequence": [str(launch) for launch in found]})
    return rows

"""What the layers above read from the kernels without importing triton: the interpreter
switch, the names the kernels' constexprs index (activations, dtypes), and the hook every
kernel launch passes through.

Importing a kernel module decorates its ``@triton.jit`` functions, which reads
``TRITON_INTERPRET`` once; this module never does, so it is safe to import at any time.

The launch hook
---------------

With no hook installed (the normal case) a launch is just ``kernel[grid](*args, **kwargs)``.
``peft_ops.tools.launches`` installs one for the length of a ``with`` block to

- count: every Triton launch runs, and is recorded beside the PyTorch ops the launchers
  issue (sums, casts, zero-fills, copies), so one op call's launches can be counted; or
- plan: nothing runs. The launchers see meta tensors and a named target ("sm80", "sm90")
  with its multiprocessor count, pick the tiles they would pick on that GPU and record each
  launch (kernel, grid, arguments) instead of running it. This is how the launch sequence
  of an op at a model's shape is known on a machine without a GPU.

One hook at a time, process-wide (not per thread: the autograd engine runs backward
functions on its own threads, which must see the hook too).
"""

from __future__ import annotations

import os

import torch

# The bottleneck kernels' constexpr ACTIVATION is an index into this tuple.
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")

# Short names of dtypes: Triton's pointer types, and how reports and records name a dtype.
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
               torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
               torch.bool: "i1"}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what every op computes in


def dtype_named(name: str) -> torch.dtype:
    """The dtype of a short name ("bf16" → torch.bfloat16); ValueError for an unknown one."""
    for dtype, short in DTYPE_NAMES.items():
        if short == name:
            return dtype
    raise ValueError(f"unknown dtype name {name!r}; expected one of {tuple(DTYPE_NAMES.values())}")


def interpreting() -> bool:
    """True when Triton kernels run in the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_active = None


def active():
    """The installed hook, or None."""
    return _active


def install(hook) -> None:
    global _active
    if _active is not None and hook is not None:
        raise RuntimeError("a peft_ops launch hook is already installed (one at a time)")
    _active = hook


def python_function(kernel):
    """The plain Python function under a Triton kernel object (autotuner → jit or interpreted
    function → function)."""
    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def planning():
    """The hook when it plans (records without running), else None."""
    return _active if _active is not None and _active.plan_target is not None else None

"""The hook every kernel launch of this package passes through (no triton import here).

With no hook installed (the normal case) a launch is just ``kernel[grid](*args, **kwargs)``.
``peft_ops.launches`` installs one for the length of a ``with`` block to

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

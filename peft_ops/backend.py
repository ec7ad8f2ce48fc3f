"""Which implementation an op runs: the Triton kernels, the PyTorch path, or the reference.

Backends (``set_backend`` / ``get_backend`` / env var ``PEFT_OPS_BACKEND``):

- ``"auto"`` (default): Triton kernels for CUDA tensors; for CPU tensors the kernels only
  when ``TRITON_INTERPRET=1`` (the Triton interpreter), else the PyTorch path.
- ``"triton"``: always the kernels; CPU tensors without the interpreter are an error.
- ``"torch"``: always the PyTorch path (below), on any device.
- ``"reference"``: the plain PyTorch references of :mod:`peft_ops.reference`.

The "PyTorch path" is not the reference: it is the same ``torch.autograd.Function`` as the
kernels, with the same saved tensors (memory-lean), doing its math with PyTorch ops.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch

from . import kernels  # the package alone: no kernel, no triton
from .kernels import interface  # no triton import: safe before TRITON_INTERPRET is set
from .kernels.interface import interpreting

BACKENDS = ("auto", "triton", "torch", "reference")
ENV_VAR = "PEFT_OPS_BACKEND"

_backend: str | None = None  # None: not set by set_backend, read the environment


def _validate(name: object, what: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, one of {BACKENDS}; got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}; got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for every op: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``."""
    global _backend
    _backend = _validate(name, "backend name")


def get_backend() -> str:
    """The selected backend: what ``set_backend`` set, else ``$PEFT_OPS_BACKEND``, else "auto"."""
    if _backend is not None:
        return _backend
    return _validate(os.environ.get(ENV_VAR, "auto"), f"environment variable {ENV_VAR}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the block with backend ``name``, then restore the previous one."""
    global _backend
    _validate(name, "backend name")
    previous = _backend
    _backend = name
    try:
        yield
    finally:
        _backend = previous


_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None  # once, at import (a plain value to torch.compile)


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def resolve(device: torch.device) -> str:
    """The implementation to run for tensors on ``device``: "triton", "torch" or "reference".

    Raises RuntimeError when the "triton" backend is asked for but cannot run here.
    """
    backend = get_backend()
    if backend in ("reference", "torch"):
        return backend
    if device.type == "meta" and interface.planning() is not None:
        return "triton"  # a launch plan (peft_ops.tools.launches): the kernels' launchers, nothing runs
    kernels_can_run = triton_available() and (device.type == "cuda" or interpreting())
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("peft_ops backend 'triton' needs the triton package, which is not installed")
        if not kernels_can_run:
            raise RuntimeError(
                f"peft_ops backend 'triton' cannot run on {device.type} tensors: Triton kernels need a "
                "CUDA device, or the Triton interpreter (set TRITON_INTERPRET=1 before importing "
                "peft_ops). Use backend 'auto' to fall back to the PyTorch path."
            )
        return "triton"
    return "triton" if kernels_can_run else "torch"


def kernel_modules():
    """The package ``peft_ops.kernels`` with its kernel modules imported (``.lora``, ``.nf4``,
    ``.bottleneck``, ``.dora``, ``.embedding``, ``.multi_lora``, ``.dropout``, ``.calibration``,
    ``.common``): on first use, never when
    peft_ops is imported. (A module, not a namespace object: torch.compile traces through it.)"""
    # The one import inside a function in peft_ops: @triton.jit reads TRITON_INTERPRET when a
    # kernel module is first imported, so the kernels must wait until an op runs, by which time
    # a script has set it (or not).
    from .kernels import (  # noqa: F401  (binds kernels.<name>)
        bottleneck,
        calibration,
        common,
        dora,
        dropout,
        embedding,
        lora,
        multi_lora,
        nf4,
    )

    return kernels

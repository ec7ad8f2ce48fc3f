"""Test set-up: Triton kernels run in the interpreter on CPU-only machines.

The tests are grouped by the package's layers — kernel/, ops/, nn/, peft/, tools/ — plus
reliability/ (determinism, large tensors, torch.compile, distributed, the GPU suite) and, at
the top, the package as a whole (its layering, the README's examples, examples/); helpers/
holds what several test files share.

TRITON_INTERPRET is read when @triton.jit decorates the kernels, i.e. when
peft_ops.kernels.* is first imported: it is set here, before any test module imports them.
On a CUDA machine the kernels run natively and the `gpu`-marked tests run too.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


def round_bf16_to_nearest_in_the_interpreter() -> None:
    """The interpreter converts fp32 → bf16 by truncation; a GPU (cvt.rn.bf16.f32) and PyTorch
    round to nearest even. Convert as they do, so that a bf16 kernel can be held to the
    PyTorch path's roundings (tests/ops/test_half_precision.py) instead of an extra unit per
    rounding that would hide a misplaced one."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    truncating = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            values = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits, dst_type.scalar)
        return truncating(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


def list_the_interpreters_builtins_once() -> None:
    """The interpreter patches triton.language's builtins again at every call of a @triton.jit
    helper (`_patch_builtin`: `inspect.getmembers` of four modules, ≈ 0.1 ms each), thousands
    of calls per test here. Listed once, before anything is patched, the builtins' names make
    each call a walk over those names, with the same patches (a member already patched is no
    builtin, and skipped, as before): 13–22 % less time per interpreted test.
    Left alone where the interpreter's helpers are not the ones this was written against."""
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    patch_builtin, patch_attr = getattr(interpreter, "_patch_builtin", None), getattr(interpreter, "_patch_attr", None)
    if patch_builtin is None or patch_attr is None or \
            list(inspect.signature(patch_builtin).parameters) != ["pkg", "builder", "scope"]:
        return
    packages = [tl, tl.core, tl.tensor, tl.math, getattr(tl.core, "tensor_descriptor_base", None)]
    names = {pkg: [name for name, member in inspect.getmembers(pkg) if tl.core.is_builtin(member)]
             for pkg in packages if pkg is not None}

    def _patch_builtin(pkg, builder, scope):
        if pkg not in names:
            return patch_builtin(pkg, builder, scope)
        for name in names[pkg]:
            member = getattr(pkg, name)
            if tl.core.is_builtin(member):
                patch_attr(pkg, name, member, builder, scope)

    interpreter._patch_builtin = _patch_builtin


if not HAS_CUDA:
    round_bf16_to_nearest_in_the_interpreter()
    list_the_interpreters_builtins_once()
os.environ.pop("PEFT_OPS_BACKEND", None)  # tests choose their backend explicitly

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


# The slowest files (subprocesses, compiles, spawned ranks) first among files with as many
# tests: pytest-xdist hands out whole files, those with the most tests first, then in this order.
SLOW_FIRST = ("test_aot.py", "test_estimate.py", "test_check_cli.py", "test_gpu_check.py", "test_bench_cli.py",
              "test_benchmarks.py", "test_examples.py", "test_distributed.py", "test_bottleneck_layer.py",
              "test_torch_compile.py", "test_nf4_format.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: file order kept otherwise
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _restore_backend():
    import peft_ops.backend as backend

    saved = backend._backend
    yield
    backend._backend = saved


def lora_ops(path: str):
    """The launchers behind LoraLinearFunction: "triton" (kernels, each product's implementation
    chosen as for a user), "cublas" (the kernels' LoRA pieces around torch.addmm, pinned) or
    "torch" (PyTorch path)."""
    from peft_ops.ops.paths import KernelLoraOps, eager_ops

    return KernelLoraOps("cublas") if path == "cublas" else eager_ops("lora", path)

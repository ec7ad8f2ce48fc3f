"""A pytest-benchmark suite over the fused ops and their baselines, for pytest's statistics and
comparisons between commits:

    pytest benchmarks/                                   # timings (CUDA: 7-8B shapes; CPU: small ones)
    pytest benchmarks/ --benchmark-autosave              # save, then later …
    pytest benchmarks/ --benchmark-compare               # … compare against the saved run

Every timed function synchronizes CUDA before it returns, so the GPU's work is inside the
measurement. The implementations are those of `peft-ops bench` (peft_ops.tools.bench).
"""

import pytest
import torch

from peft_ops.tools.bench import implementations
from peft_ops.tools.roofline import OpShape

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16
SHAPES = [
    OpShape("lora", 8192, 4096, 4096, 16), OpShape("qlora", 8192, 4096, 4096, 16), OpShape("nf4", 1, 4096, 14336),
    OpShape("nf4", 4096, 4096, 14336), OpShape("bottleneck", 8192, 4096, 4096, 64),
] if CUDA else [
    OpShape("lora", 128, 256, 192, 16), OpShape("qlora", 128, 256, 192, 16), OpShape("nf4", 1, 256, 512),
    OpShape("bottleneck", 128, 256, 256, 16),
]
IMPLS = ["fused", "eager", "base", "peft", "bitsandbytes", "lora (bf16 base)"]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _setup(shape, impl):
    impls, dy, leaves, _ = implementations(shape, DTYPE, DEVICE)
    if impl not in impls:
        pytest.skip(f"no {impl!r} baseline for {shape.op} here")
    return impls[impl], dy, leaves


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.op} {s.label()}")
def test_forward(benchmark, shape, impl):
    forward, _, _ = _setup(shape, impl)

    def run():
        with torch.no_grad():
            forward()
        _sync()

    benchmark(run)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s.op} {s.label()}")
def test_forward_backward(benchmark, shape, impl):
    forward, dy, leaves = _setup(shape, impl)

    def run():
        for t in leaves:
            t.grad = None
        forward().backward(dy)
        _sync()

    benchmark(run)

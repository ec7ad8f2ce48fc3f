"""The backward of every op is bitwise deterministic run to run: repeats of forward and
backward under the same torch.manual_seed give identical outputs and gradients, on the
kernels and on the PyTorch path.

What this can catch depends on the machine. On a GPU (20 repeats) it catches any
run-to-run order in a reduction (float atomics, a split-K or partial sum whose order
depends on scheduling). In the interpreter every launch runs its programs in order, so
there it catches only a dropout seed that does not come from torch.manual_seed (2 repeats,
and a different seed must give a different result)."""

import pytest
import torch

import peft_ops
from peft_ops.ops.bottleneck import BottleneckAdapterFunction
from peft_ops.ops.dora import DoraLinearFunction, QDoraLinearFunction, squared_row_norms
from peft_ops.ops.lora import LoraLinearFunction
from peft_ops.ops.paths import eager_ops
from peft_ops.ops.qlora import NF4LinearFunction, QLoraLinearFunction
from peft_ops.tools.accuracy import (
    BottleneckCase,
    DoraCase,
    LoraCase,
    QLoraCase,
    dora_ops,
    make_bottleneck_inputs,
    make_dora_inputs,
    make_lora_inputs,
    qlora_ops,
)

from conftest import DEVICE, lora_ops

REPEATS = 20 if torch.cuda.is_available() else 2
PATHS = ["triton", "torch"]


def _lora(path):
    inp = make_lora_inputs(LoraCase(M=70, K=48, N=40, r=8, dtype=torch.bfloat16), DEVICE)
    leaves = [inp["x"], inp["lora_A"], inp["lora_B"]]
    return lambda t: LoraLinearFunction.apply(t[0], inp["weight"], t[1], t[2], inp["bias"], 0.5, 0.2,
                                              lora_ops(path)), leaves, inp["grad_out"]


def _qlora(path, lora=True):
    inp = make_lora_inputs(QLoraCase(M=70, K=64, N=40, r=8, dtype=torch.bfloat16), DEVICE)
    q = peft_ops.nf4.quantize(inp["weight"]).tensors()
    meta = (q.out_features, q.in_features, q.blocksize, q.dtype)
    quantized = (q.packed, q.absmax, q.absmax_scale, q.absmax_offset, meta)
    if lora:
        return lambda t: QLoraLinearFunction.apply(t[0], t[1], t[2], inp["bias"], *quantized, 0.5, 0.2,
                                                   qlora_ops(path)), \
            [inp["x"], inp["lora_A"], inp["lora_B"]], inp["grad_out"]
    return lambda t: NF4LinearFunction.apply(t[0], inp["bias"], *quantized, qlora_ops(path)), [inp["x"]], \
        inp["grad_out"]


def _dora(path, nf4=False):
    """DoRA: the norm's split-K sum and the dY pass's row-slice sums (d(magnitude), db) too."""
    inp = make_dora_inputs(DoraCase(M=24, K=64, N=40, r=8, dtype=torch.bfloat16), DEVICE)  # 2 row slices here
    leaves = [inp["x"], inp["lora_A"], inp["lora_B"], inp["magnitude"]]
    ops = dora_ops(path, nf4)
    if nf4:
        qweight = peft_ops.nf4.quantize(inp["weight"])
        q = qweight.tensors()
        quantized = (q.packed, q.absmax, q.absmax_scale, q.absmax_offset,
                     (q.out_features, q.in_features, q.blocksize, q.dtype))
        sq = squared_row_norms(qweight, torch.bfloat16)
        return lambda t: QDoraLinearFunction.apply(*t, inp["bias"], *quantized, 0.5, 0.2, sq, ops), leaves, \
            inp["grad_out"]
    sq = squared_row_norms(inp["weight"])
    return lambda t: DoraLinearFunction.apply(t[0], inp["weight"], *t[1:], inp["bias"], 0.5, 0.2, sq, ops), leaves, \
        inp["grad_out"]


def _adapter(path):
    case = BottleneckCase(M=70, d=48, m=24, dtype=torch.bfloat16)
    inp = make_bottleneck_inputs(case, DEVICE)
    names = ("x", "down_weight", "down_bias", "up_weight", "up_bias")
    return lambda t: BottleneckAdapterFunction.apply(*t, "gelu", 0.5, 0.2, eager_ops("bottleneck", path)), \
        [inp[k] for k in names], inp["grad_out"]


OPS = {"lora_linear": _lora, "qlora_linear": _qlora, "nf4_linear": lambda path: _qlora(path, lora=False),
       "dora_linear": _dora, "qdora_linear": lambda path: _dora(path, nf4=True), "bottleneck_adapter": _adapter}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", OPS)
def test_backward_is_bitwise_deterministic(op, path):
    run, leaves, grad_out = OPS[op](path)
    first = None
    for _ in range(REPEATS):
        tensors = [t.detach().clone().requires_grad_(True) for t in leaves]
        torch.manual_seed(0)  # the dropout seed is drawn from it
        y = run(tensors)
        y.backward(grad_out)
        result = [y.detach()] + [t.grad for t in tensors]
        if first is None:
            first = result
        else:
            assert all(torch.equal(a, b) for a, b in zip(first, result))
    if op != "nf4_linear":  # the ops with dropout: another seed, another mask
        tensors = [t.detach().clone().requires_grad_(True) for t in leaves]
        torch.manual_seed(1)
        assert not torch.equal(run(tensors), first[0])

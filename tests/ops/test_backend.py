"""Backend selection: auto / triton / reference, the env var, and which code actually runs."""

import os
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch

import peft_ops
from peft_ops import backend
from peft_ops.tools.accuracy import LoraCase, make_lora_inputs


def test_default_is_auto_and_set_get(monkeypatch):
    monkeypatch.delenv("PEFT_OPS_BACKEND", raising=False)
    assert peft_ops.get_backend() == "auto"
    peft_ops.set_backend("reference")
    assert peft_ops.get_backend() == "reference"
    with peft_ops.use_backend("triton"):
        assert peft_ops.get_backend() == "triton"
    assert peft_ops.get_backend() == "reference"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("PEFT_OPS_BACKEND", "reference")
    assert peft_ops.get_backend() == "reference"
    monkeypatch.setenv("PEFT_OPS_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="PEFT_OPS_BACKEND"):
        peft_ops.get_backend()


def test_bad_backend_names():
    with pytest.raises(ValueError, match="backend name"):
        peft_ops.set_backend("fast")
    with pytest.raises(TypeError, match="backend name"):
        peft_ops.set_backend(3)
    assert peft_ops.get_backend() == "auto"  # unchanged


def test_resolution_rules(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.resolve(cpu) == "triton"
    assert backend.resolve(cuda) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert backend.resolve(cpu) == "torch"
    assert backend.resolve(cuda) == "triton"
    peft_ops.set_backend("reference")
    assert backend.resolve(cuda) == "reference"
    peft_ops.set_backend("torch")
    assert backend.resolve(cuda) == "torch" and backend.resolve(cpu) == "torch"
    peft_ops.set_backend("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.resolve(cpu)


def _inputs(device):
    inp = make_lora_inputs(LoraCase(M=6, K=16, N=8, r=2, dtype=torch.float32), device)
    return [inp[k] for k in ("x", "weight", "lora_A", "lora_B")] + [1.0, inp["bias"]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dispatch")
def test_auto_on_cpu_runs_the_kernels_under_the_interpreter(device):
    from peft_ops import reference
    from peft_ops.kernels import lora as kernels
    from peft_ops.ops.paths import TorchLoraOps
    args = _inputs(device)
    with mock.patch.object(kernels, "forward", wraps=kernels.forward) as kernel_forward, \
            mock.patch.object(TorchLoraOps, "forward", wraps=TorchLoraOps.forward) as torch_forward, \
            mock.patch.object(reference, "lora_linear", wraps=reference.lora_linear) as ref:
        peft_ops.lora_linear(*args)
        assert kernel_forward.call_count == 1 and torch_forward.call_count == 0
        with peft_ops.use_backend("reference"):
            peft_ops.lora_linear(*args)
        assert ref.call_count == 1 and kernel_forward.call_count == 1


def test_cpu_without_interpreter_takes_the_pytorch_path_or_fails_clearly(tmp_path):
    """A fresh process without TRITON_INTERPRET: auto → PyTorch path (kernels never imported);
    triton → a RuntimeError that says how to run the kernels on CPU."""
    script = textwrap.dedent("""
        import sys, torch, peft_ops
        x, W, A, B = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
        y = peft_ops.lora_linear(x, W, A, B, 0.5)
        assert torch.allclose(y, x @ W.t() + 0.5 * (x @ A.t()) @ B.t(), atol=1e-5)
        assert "peft_ops.kernels.lora" not in sys.modules
        peft_ops.set_backend("triton")
        try:
            peft_ops.lora_linear(x, W, A, B, 0.5)
        except RuntimeError as e:
            assert "TRITON_INTERPRET=1" in str(e), e
            print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PEFT_OPS_BACKEND")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _op_calls(device):
    """Each public op at a small shape, as a function of nothing: (name, call, reference call
    in the inputs' own dtype, the PyTorch path's Function call)."""
    from peft_ops import reference
    from peft_ops.nf4 import quantize
    from peft_ops.ops.bottleneck import BottleneckAdapterFunction
    from peft_ops.ops.lora import LoraLinearFunction
    from peft_ops.ops.paths import TorchBottleneckOps, TorchLoraOps, TorchNF4Ops
    from peft_ops.ops.qlora import NF4LinearFunction, QLoraLinearFunction
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 32, generator=gen).to(device)
    W, A, B, b = (torch.randn(*s, generator=gen).to(device) / 4 for s in ((12, 32), (4, 32), (12, 4), (12,)))
    qw = quantize(W)
    q = qw.tensors()
    qargs = (q.packed, q.absmax, q.absmax_scale, q.absmax_offset, (12, 32, q.blocksize, q.dtype))
    Wd, bd, Wu, bu = (torch.randn(*s, generator=gen).to(device) / 4 for s in ((6, 32), (6,), (32, 6), (32,)))
    return {
        "lora_linear": (lambda: peft_ops.lora_linear(x, W, A, B, 0.5, b),
                        lambda: reference.lora_linear(x, W, A, B, 0.5, b),
                        lambda: LoraLinearFunction.apply(x, W, A, B, b, 0.5, 0.0, TorchLoraOps)),
        "qlora_linear": (lambda: peft_ops.qlora_linear(x, qw, A, B, 0.5, b),
                         lambda: reference.qlora_linear(x, qw, A, B, 0.5, b),
                         lambda: QLoraLinearFunction.apply(x, A, B, b, *qargs, 0.5, 0.0, TorchNF4Ops)),
        "nf4_linear": (lambda: peft_ops.nf4_linear(x, qw, b),
                       lambda: reference.nf4_linear(x, qw, b),
                       lambda: NF4LinearFunction.apply(x, b, *qargs, TorchNF4Ops)),
        "bottleneck_adapter": (lambda: peft_ops.bottleneck_adapter(x, Wd, bd, Wu, bu, activation="gelu", scaling=0.5),
                               lambda: reference.bottleneck_adapter(x, Wd, bd, Wu, bu, "gelu", 0.5),
                               lambda: BottleneckAdapterFunction.apply(x, Wd, bd, Wu, bu, "gelu", 0.5, 0.0,
                                                                       TorchBottleneckOps)),
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dispatch (interpreter)")
@pytest.mark.parametrize("name", ["auto", "triton", "torch", "reference"])
@pytest.mark.parametrize("op", ["lora_linear", "qlora_linear", "nf4_linear", "bottleneck_adapter"])
def test_every_backend_runs_its_own_implementation(op, name, device):
    """Dispatch, proven by what ran: "auto" and "triton" launch kernels (here in the
    interpreter); "torch" launches none and gives the PyTorch path's result bit for bit;
    "reference" launches none and gives peft_ops.reference's result bit for bit. (Their values
    against float64 are the op tests' business.)"""
    from peft_ops import reference
    from peft_ops.tools.launches import KernelsRan

    call, reference_call, torch_path_call = _op_calls(device)[op]
    with peft_ops.use_backend(name), KernelsRan() as ran, \
            mock.patch.object(reference, op, wraps=getattr(reference, op)) as reference_op:
        y = call()
    if name in ("auto", "triton"):
        assert ran.names, "no kernel ran"
        assert reference_op.call_count == 0
        return
    assert not ran.names, ran.names
    assert reference_op.call_count == (name == "reference")
    assert torch.equal(y, reference_call() if name == "reference" else torch_path_call())

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
from peft_ops.testing import LoraCase, make_lora_inputs


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
    from peft_ops.lora import TorchLoraOps

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

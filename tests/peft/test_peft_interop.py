"""Against Hugging Face PEFT itself (skipped when peft is absent; CI installs it): the same
numbers from the same parameters, and fewer saved activations."""

import pytest
import torch
import torch.nn as nn

import peft_ops
from peft_ops.tools.accuracy import assert_close, saved_activation_bytes, tolerance

peft = pytest.importorskip("peft")


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 48)

    def forward(self, x):
        return self.proj(x)


def peft_model(dropout_p, dtype=torch.bfloat16, use_rslora=False):
    torch.manual_seed(0)
    model = peft.get_peft_model(OneLinear().to(dtype), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["proj"], lora_dropout=dropout_p, use_rslora=use_rslora))
    layer = model.base_model.model.proj
    with torch.no_grad():  # PEFT starts B at zero; make the adapter do something
        layer.lora_B["default"].weight.normal_(0, 0.3)
    return model, layer


@pytest.mark.parametrize("use_rslora", [False, True])
def test_same_output_and_gradients_as_peft(use_rslora, device):
    """PEFT's default layout on a bf16 base: fp32 adapters. lora_linear takes PEFT's own
    parameter tensors as they are; both are judged against float64: y at bf16 tolerance, the
    adapter gradients at fp32 tolerance (both keep the rank-r products in fp32)."""
    model, layer = peft_model(0.0, use_rslora=use_rslora)
    model.to(device).eval()
    base, A, B = layer.base_layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.dtype == torch.float32 and base.weight.dtype == torch.bfloat16
    scaling = layer.scaling["default"]
    assert scaling == (16 / 8 ** 0.5 if use_rslora else 2.0)

    x = torch.randn(3, 20, 64, device=device, dtype=torch.bfloat16)
    ours = peft_ops.lora_linear(x, base.weight, A, B, scaling, base.bias)
    theirs = model(x)
    xd, W, b = x.double(), base.weight.double(), base.bias.double()
    exact = xd @ W.t() + b + scaling * (xd @ A.double().t()) @ B.double().t()
    scale = xd.abs() @ W.abs().t() + b.abs() + scaling * (xd.abs() @ A.double().abs().t()) @ B.double().abs().t()
    tol = tolerance(torch.bfloat16, torch.float32, "y")
    assert_close(ours, exact, torch.bfloat16, "peft_ops", tol=tol, scale=scale)
    assert_close(theirs, exact, torch.bfloat16, "PEFT", tol=tol, scale=scale)
    tol = tolerance(torch.bfloat16, torch.float32, "dA")

    # gradients of the adapter, ours vs PEFT's autograd, both against float64
    grad_out = torch.randn_like(theirs)
    theirs.backward(grad_out)
    dA_peft, dB_peft = A.grad.clone(), B.grad.clone()
    A.grad = B.grad = None
    peft_ops.lora_linear(x, base.weight, A, B, scaling, base.bias).backward(grad_out)
    g = grad_out.double()
    dB_exact = scaling * g.reshape(-1, 48).t() @ (xd.reshape(-1, 64) @ A.double().t())
    dB_scale = scaling * g.abs().reshape(-1, 48).t() @ (xd.abs().reshape(-1, 64) @ A.double().abs().t())
    assert_close(B.grad, dB_exact, torch.bfloat16, "dB ours", tol=tol, scale=dB_scale)
    assert_close(dB_peft, dB_exact, torch.bfloat16, "dB PEFT", tol=tol, scale=dB_scale)
    dA_exact = scaling * (g.reshape(-1, 48) @ B.double()).t() @ xd.reshape(-1, 64)
    dA_scale = scaling * (g.abs().reshape(-1, 48) @ B.double().abs()).t() @ xd.abs().reshape(-1, 64)
    assert_close(A.grad, dA_exact, torch.bfloat16, "dA ours", tol=tol, scale=dA_scale)
    assert_close(dA_peft, dA_exact, torch.bfloat16, "dA PEFT", tol=tol, scale=dA_scale)


def test_layer_from_peft_weights_matches():
    """LoraLinear holding PEFT's tensors (cast to the base dtype) gives PEFT's numbers."""
    model, layer = peft_model(0.0, dtype=torch.float32)
    model.eval()
    ours = peft_ops.LoraLinear.from_linear(layer.base_layer, r=8, lora_alpha=16)
    with torch.no_grad():
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
    x = torch.randn(7, 64)
    assert_close(ours(x), model(x).double(), torch.float32)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_saves_less_than_peft(dropout_p, device):
    """Activation bytes kept for backward, parameters excluded (bf16 base, PEFT's fp32
    adapters): PEFT keeps an fp32 copy of x (and with dropout a mask and the dropped copy);
    lora_linear keeps x itself and x·Aᵀ."""
    model, layer = peft_model(dropout_p)
    model.to(device).train()
    base, A, B = layer.base_layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(4, 32, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    params = list(model.parameters())
    x_bytes = x.numel() * x.element_size()
    theirs, _, _ = saved_activation_bytes(lambda: model(x), params)
    ours, _, _ = saved_activation_bytes(
        lambda: peft_ops.lora_linear(x, base.weight, A, B, layer.scaling["default"], base.bias, dropout_p), params)
    tokens, r = 4 * 32, 8
    assert ours == x_bytes + tokens * r * 4 + (tokens * 2 * 4 if dropout_p else 0)  # + packed mask: 2 words a row
    assert theirs >= (4 if dropout_p else 2) * x_bytes, theirs / x_bytes  # PEFT: 2× x, 4× x with dropout

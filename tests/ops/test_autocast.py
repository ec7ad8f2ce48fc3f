"""Under torch.autocast (bf16, fp16) every layer runs in the autocast dtype, as nn.Linear does:
its output has that dtype and matches the reference computed under the same autocast; fp32
activations may meet bf16 weights; gradients reach fp32 parameters with the values of float64
at the inputs autocast computes with."""

import pytest
import torch
import torch.nn as nn

import peft_ops
from peft_ops import reference
from peft_ops.tools.accuracy import TOLERANCES, assert_close

from conftest import DEVICE

DTYPES = [torch.bfloat16, torch.float16]


def layers(dtype=torch.float32):
    torch.manual_seed(0)
    linear = nn.Linear(48, 40).to(dtype)
    lora = peft_ops.LoraLinear.from_linear(linear, r=8, lora_alpha=16)
    qlora = peft_ops.QLoraLinear.from_linear(nn.Linear(48, 40).to(dtype), r=8, lora_alpha=16)
    adapter = peft_ops.BottleneckAdapter(48, 12, "gelu", scaling=0.5, dtype=dtype)
    with torch.no_grad():
        for p in (lora.lora_B, qlora.lora_B, adapter.up_weight, adapter.up_bias):
            p.normal_(0, 0.3)
    return {"LoraLinear": lora.to(DEVICE), "QLoraLinear": qlora.to(DEVICE), "BottleneckAdapter": adapter.to(DEVICE)}


def reference_of(name, layer, x, cast=None, params=None):
    """The layer's reference math on x (its tensors cast to `cast` when given; `params`:
    tensors to use in place of the layer's, by name)."""
    c = (lambda t: t.to(cast) if t is not None else None) if cast else (lambda t: t)
    p = {k: getattr(layer, k, None) for k in ("weight", "bias", "lora_A", "lora_B", "down_weight", "down_bias",
                                              "up_weight", "up_bias")}
    p.update(params or {})
    if name == "LoraLinear":
        return reference.lora_linear(c(x), c(p["weight"]), c(p["lora_A"]), c(p["lora_B"]), layer.scaling,
                                     c(p["bias"]))
    if name == "QLoraLinear":
        weight = (params or {}).get("weight", layer.qweight.dequantize(torch.float32))
        return reference.lora_linear(c(x), c(weight), c(p["lora_A"]), c(p["lora_B"]), layer.scaling, c(p["bias"]))
    return reference.bottleneck_adapter(c(x), c(p["down_weight"]), c(p["down_bias"]), c(p["up_weight"]),
                                        c(p["up_bias"]), layer.activation, layer.scaling)


def exact_gradients(name, layer, x, dtype):
    """Gradients of sum(y) w.r.t. x and the trainable parameters, in float64 at the values
    autocast computes with (x and parameters rounded to `dtype`; the cast's backward is the
    identity), and their error scales (the same on |inputs|): {name: (expected, scale)}."""
    trainable = {k: v for k, v in layer.named_parameters() if v.requires_grad}
    out = {}
    for kind, transform in (("value", lambda t: t), ("scale", torch.abs)):
        xs = transform(x.detach().to(dtype).double()).requires_grad_()
        ps = {k: transform(v.detach().to(dtype).double()).requires_grad_() for k, v in trainable.items()}
        frozen = {k: transform(v.detach().to(dtype).double()) for k, v in layer.named_parameters()
                  if not v.requires_grad}
        if name == "QLoraLinear":  # the NF4 weight, decoded to the autocast dtype as the kernels do
            frozen["weight"] = transform(layer.qweight.dequantize(torch.float32).to(dtype).double())
        y = reference_of(name, layer, xs, params={**frozen, **ps})
        if kind == "scale" and name == "BottleneckAdapter":  # the residual x + s·z on |inputs|
            y = y.abs()
        y.sum().backward()
        out[kind] = {"x": xs.grad, **{k: v.grad for k, v in ps.items()}}
    return {k: (out["value"][k], out["scale"][k]) for k in out["value"]}


def scale_of(name, layer, x):
    """The reference on |inputs| (the error scale of the metric)."""
    with torch.no_grad():
        abs_layer = {k: v.detach().double().abs() for k, v in layer.named_parameters()}
    x = x.detach().double().abs()
    if name == "BottleneckAdapter":
        return reference.bottleneck_adapter(x, abs_layer["down_weight"], abs_layer["down_bias"],
                                            abs_layer["up_weight"], abs_layer["up_bias"], layer.activation,
                                            abs(layer.scaling))
    weight = layer.qweight.dequantize(torch.float32).double().abs() if name == "QLoraLinear" else abs_layer["weight"]
    return reference.lora_linear(x, weight, abs_layer["lora_A"], abs_layer["lora_B"], abs(layer.scaling),
                                 abs_layer["bias"])


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["LoraLinear", "QLoraLinear", "BottleneckAdapter"])
def test_layers_under_autocast_match_the_autocast_reference(name, dtype):
    layer = layers()[name]  # fp32 parameters, fp32 activations: autocast decides
    x = torch.randn(2, 9, 48, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=dtype):
        y = layer(x)
        expected_autocast = reference_of(name, layer, x)
    assert y.dtype == dtype
    # eager's residual sum x + s·z promotes back to x's fp32; ours stays in the autocast dtype
    assert expected_autocast.dtype == (torch.float32 if name == "BottleneckAdapter" else dtype)
    exact = reference_of(name, layer, x.detach().to(dtype).double(), cast=torch.float64)
    scale = scale_of(name, layer, x)
    tol = TOLERANCES[dtype]
    # both within the dtype's tolerance of the exact value on the autocast-rounded inputs …
    assert_close(y, exact, dtype, f"{name} under autocast", scale=scale, tol=tol)
    assert_close(expected_autocast, exact, dtype, "the reference under autocast", scale=scale, tol=tol)
    # … so within twice it of each other
    assert_close(y, expected_autocast.double(), dtype, f"{name} vs reference under autocast", scale=scale,
                 tol=2 * tol)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    trainable = dict((k, p) for k, p in layer.named_parameters() if p.requires_grad)
    assert trainable and all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())
    # the gradients' values: each within the dtype's tolerance of float64 at autocast's inputs
    grads = {"x": x.grad, **{k: p.grad for k, p in trainable.items()}}
    for k, (expected, grad_scale) in exact_gradients(name, layer, x, dtype).items():
        assert_close(grads[k], expected, dtype, f"{name} d{k} under autocast", scale=grad_scale, tol=tol)


@pytest.mark.parametrize("name", ["LoraLinear", "QLoraLinear", "BottleneckAdapter"])
def test_fp32_activations_meet_bf16_weights(name):
    layer = layers(torch.bfloat16)[name]
    x = torch.randn(5, 48, device=DEVICE)
    if name != "QLoraLinear":  # without autocast the dtypes must agree (QLoraLinear casts its bias only)
        with pytest.raises(TypeError):
            layer(x)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = layer(x)
        expected = reference_of(name, layer, x)
    assert y.dtype == torch.bfloat16
    assert_close(y, expected.double(), torch.bfloat16, name, scale=scale_of(name, layer, x),
                 tol=2 * TOLERANCES[torch.bfloat16])

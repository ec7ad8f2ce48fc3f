"""LoraLinear: a drop-in for nn.Linear with PEFT's semantics."""

import math

import pytest
import torch
import torch.nn as nn

import peft_ops
from peft_ops import LoraLinear
from peft_ops.tools.accuracy import assert_close


def make_linear(in_f=24, out_f=18, bias=True, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias, dtype=dtype, device=device)


def randomize_adapter(layer, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) / layer.in_features ** 0.5)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) / layer.r ** 0.5)


def float64_forward(layer, x):
    """The layer's math in float64 from its parameters."""
    W, A, B = layer.weight.double(), layer.lora_A.double(), layer.lora_B.double()
    y = x.double() @ W.t() + layer.scaling * (x.double() @ A.t()) @ B.t()
    return y + layer.bias.double() if layer.bias is not None else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_shares_parameters_and_equals_linear_at_init(bias, dtype, device):
    linear = make_linear(bias=bias, dtype=dtype, device=device)
    layer = LoraLinear.from_linear(linear, r=4, lora_alpha=8)
    assert layer.weight is linear.weight
    assert layer.bias is linear.bias
    assert not layer.weight.requires_grad and (layer.bias is None or not layer.bias.requires_grad)
    assert layer.lora_A.dtype == dtype and layer.lora_A.device.type == device.type
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))  # B = 0: identity at init
    x = torch.randn(5, 7, 24, dtype=dtype, device=device)
    expected = x.double() @ linear.weight.double().t() + (linear.bias.double() if bias else 0)
    assert_close(layer(x), expected, dtype, "layer at init")
    assert_close(linear(x), expected, dtype, "linear")


def test_constructor_shapes_init_and_trainable_parameters(device):
    layer = LoraLinear(40, 30, r=8, lora_alpha=16, device=device)
    assert layer.weight.shape == (30, 40) and layer.bias.shape == (30,)
    assert layer.lora_A.shape == (8, 40) and layer.lora_B.shape == (30, 8)
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lora_A", "lora_B"]
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    # kaiming-uniform with a = √5 has bound 1/√fan_in; B starts at zero
    bound = 1 / math.sqrt(40)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound
    assert layer.lora_A.detach().std().item() == pytest.approx(bound / math.sqrt(3), rel=0.2)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.scaling == 2.0
    assert LoraLinear(4, 4, bias=False).bias is None
    half = LoraLinear(8, 8, r=2, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_rslora_scaling():
    assert LoraLinear(8, 8, r=16, lora_alpha=8).scaling == 0.5
    assert LoraLinear(8, 8, r=16, lora_alpha=8, use_rslora=True).scaling == 2.0  # 8 / √16


def test_forward_and_only_adapter_gradients(device):
    layer = LoraLinear.from_linear(make_linear(device=device), r=4, lora_alpha=6)
    randomize_adapter(layer)
    x = torch.randn(3, 11, 24, device=device)
    y = layer(x)
    assert_close(y, float64_forward(layer, x), torch.float32)
    y.square().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_merge_unmerge_round_trip(device):
    layer = LoraLinear.from_linear(make_linear(device=device), r=4, lora_alpha=8)
    randomize_adapter(layer)
    original = layer.weight.detach().clone()
    x = torch.randn(9, 24, device=device)
    y_fused = layer(x)
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    expected_merged = original.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    assert_close(layer.weight, expected_merged, torch.float32, "merged weight")
    assert_close(layer(x), float64_forward_from(original, layer, x), torch.float32, "merged forward")
    assert_close(layer(x), y_fused.double(), torch.float32)
    layer.merge()  # merging twice is a no-op
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.weight, original.double(), torch.float32, "unmerged weight")
    assert_close(layer(x), y_fused.double(), torch.float32)


def float64_forward_from(weight, layer, x):
    lora = (x.double() @ layer.lora_A.double().t()) @ layer.lora_B.double().t()
    y = x.double() @ weight.double().t() + layer.scaling * lora
    return y + layer.bias.double()


def test_merge_in_bf16_rounds_once(device):
    """Half-precision merge: one rounding of W + ΔW per element (PEFT does the same)."""
    layer = LoraLinear.from_linear(make_linear(dtype=torch.bfloat16, device=device), r=4, lora_alpha=8)
    randomize_adapter(layer)
    original = layer.weight.detach().clone()
    layer.merge()
    expected = original.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    assert_close(layer.weight, expected, torch.bfloat16, "merged bf16 weight")


@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapter(merged, device):
    linear = make_linear(device=device)
    base_weight = linear.weight.detach().clone()
    layer = LoraLinear.from_linear(linear, r=4)
    randomize_adapter(layer)
    x = torch.randn(6, 24, device=device)
    y_adapted = layer(x)
    if merged:
        layer.merge()
    with layer.disable_adapter():
        y_base = layer(x)
        assert not layer.merged
        assert_close(layer.weight, base_weight.double(), torch.float32)
    expected_base = x.double() @ base_weight.double().t() + linear.bias.double()
    assert_close(y_base, expected_base, torch.float32, "disabled")
    assert layer.merged == merged  # state restored on exit
    assert_close(layer(x), y_adapted.double(), torch.float32, "re-enabled")


def test_dropout_only_in_training(device):
    layer = LoraLinear.from_linear(make_linear(device=device), r=4, lora_dropout=0.5)
    randomize_adapter(layer)
    x = torch.randn(16, 24, device=device)
    layer.eval()
    y_eval = layer(x)
    assert_close(y_eval, float64_forward(layer, x), torch.float32, "eval: no dropout")
    layer.train()
    torch.manual_seed(0)
    y_train = layer(x)
    assert not torch.allclose(y_train, y_eval)


def test_extra_repr():
    text = repr(LoraLinear(12, 10, r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=True))
    for part in ("in_features=12", "out_features=10", "r=4", "lora_alpha=8", "scaling=4", "lora_dropout=0.1",
                 "bias=True", "use_rslora=True", "merged=False"):
        assert part in text, (part, text)


def test_training_steps_reduce_the_loss(device):
    """A few SGD steps on a regression target reachable by a rank-2 update."""
    torch.manual_seed(0)
    base = make_linear(16, 12, device=device)
    target_delta = torch.randn(12, 2, device=device) @ torch.randn(2, 16, device=device) * 0.3
    layer = LoraLinear.from_linear(base, r=2, lora_alpha=2)
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=0.05)
    x = torch.randn(64, 16, device=device)
    target = x @ (base.weight.detach() + target_delta).t() + base.bias.detach()
    losses = []
    for _ in range(30):
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses


def test_layer_runs_on_every_backend(device):
    layer = LoraLinear.from_linear(make_linear(device=device), r=4)
    randomize_adapter(layer)
    x = torch.randn(5, 24, device=device)
    expected = float64_forward(layer, x)
    for name in ("auto", "torch"):  # the kernels and the PyTorch path (the reference is `expected`)
        with peft_ops.use_backend(name):
            assert_close(layer(x), expected, torch.float32, name)


def test_conv1d_layer_reads_its_weight_in_place_merges_and_unloads_to_conv1d():
    """transformers' Conv1D (weight [in, out], y = x·W + b) wrapped by LoraLinear.from_linear:
    the Parameters shared, fan_in_fan_out set, the forward equal to the Conv1D plus the LoRA
    term (float64 reference), merge / unmerge in the [in, out] layout, merge_and_unload back to a
    Conv1D with the merged weight; QLoraLinear quantizes W [out, in] as bitsandbytes holds it."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(40, 24)  # nf = out 40, nx = in 24
    nn.init.normal_(conv.bias)
    layer = peft_ops.LoraLinear.from_linear(conv, r=4, lora_alpha=8)
    assert layer.fan_in_fan_out and layer.weight is conv.weight and layer.bias is conv.bias
    assert (layer.in_features, layer.out_features) == (24, 40)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 24)
    W = conv.weight.double().t()
    expected = x.double() @ W.t() + conv.bias.double() + 2.0 * (x.double() @ layer.lora_A.double().t()) @ \
        layer.lora_B.double().t()
    assert_close(layer(x), expected, torch.float32, "Conv1D LoRA forward")
    with torch.no_grad():
        weight = conv.weight.clone()
        layer.merge()
        assert_close(layer(x), expected, torch.float32, "merged")
        assert_close(conv.weight.t(), W + 2.0 * layer.lora_B.double() @ layer.lora_A.double(), torch.float32,
                     "merged weight")
        layer.unmerge()
        assert_close(conv.weight, weight.double(), torch.float32, "unmerged weight")
    model = nn.Sequential(layer)
    merged = peft_ops.merge_and_unload(model)[0]
    assert type(merged) is Conv1D and merged.weight.shape == (24, 40)
    assert_close(merged(x), expected, torch.float32, "merge_and_unload → Conv1D")
    q = peft_ops.QLoraLinear.from_linear(conv, r=4)
    assert (q.in_features, q.out_features) == (24, 40)
    assert torch.equal(q.qweight.dequantize(torch.float32),
                       peft_ops.nf4.quantize(conv.weight.t().contiguous()).dequantize(torch.float32))

"""QLoraLinear: a drop-in QLoRA layer (NF4 base in bitsandbytes' format + LoRA)."""

import importlib.util

import pytest
import torch
import torch.nn as nn

import peft_ops
from peft_ops import QLoraLinear, reference
from peft_ops.nf4 import NF4Weight
from peft_ops.tools.accuracy import assert_close

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def make_linear(in_f=64, out_f=40, bias=True, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias, dtype=dtype, device=device)


def test_from_linear_equals_the_nf4_linear_at_init(device):
    linear = make_linear(device=device)
    before = linear.weight.detach().clone()
    layer = QLoraLinear.from_linear(linear, r=8, lora_alpha=16)
    assert torch.equal(linear.weight, before)  # the source layer is untouched
    assert isinstance(layer.qweight, NF4Weight) and layer.scaling == 2.0
    x = torch.randn(5, 64, device=device)
    y = layer(x)
    expected = reference.nf4_linear(x.double(), layer.qweight, linear.bias.double())
    assert_close(y, expected, torch.float32, "QLoraLinear at init")
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == {"lora_A", "lora_B"}
    assert set(layer.state_dict()) == {"bias", "lora_A", "lora_B", "qweight.packed", "qweight.absmax",
                                       "qweight.absmax_scale", "qweight.absmax_offset", "qweight.quant_meta"}


def test_training_reduces_the_loss_and_only_adapters_change(device):
    layer = QLoraLinear.from_linear(make_linear(device=device), r=4, lora_alpha=8, lora_dropout=0.1)
    frozen = {k: v.clone() for k, v in layer.state_dict().items() if not k.startswith("lora_")}
    torch.manual_seed(0)
    x, target = torch.randn(32, 64, device=device), torch.randn(32, 40, device=device)
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = ((layer(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]
    assert all(torch.equal(frozen[k], v) for k, v in layer.state_dict().items() if k in frozen)


def test_disable_adapter_dropout_and_merged_linear(device):
    layer = QLoraLinear.from_linear(make_linear(device=device), r=8, lora_alpha=8, lora_dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 64, device=device)
    layer.eval()
    y = layer(x)
    assert torch.equal(layer(x), y)  # no dropout in eval
    with layer.disable_adapter():
        base = layer(x)
    assert_close(base, reference.nf4_linear(x.double(), layer.qweight, layer.bias.double()), torch.float32, "base")
    assert (y - base).abs().max() > 1e-3
    merged = layer.merged_linear()
    assert isinstance(merged, nn.Linear) and merged.weight.dtype == torch.float32
    expected = reference.qlora_linear(x.double(), layer.qweight, layer.lora_A.double(), layer.lora_B.double(),
                                      layer.scaling, layer.bias.double())
    assert_close(merged(x), expected, torch.float32, "merged_linear")
    assert_close(y, expected, torch.float32, "eval forward")
    layer.train()
    torch.manual_seed(0)
    assert not torch.equal(layer(x), y)  # dropout on the adapter input in training


def test_safetensors_round_trip(tmp_path, device):
    from safetensors.torch import load_file, save_file

    layer = QLoraLinear.from_linear(make_linear(dtype=torch.bfloat16, device=device), r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    save_file(layer.state_dict(), tmp_path / "layer.safetensors")
    fresh = QLoraLinear.from_linear(make_linear(dtype=torch.bfloat16, device=device, seed=5), r=4)
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors", device=str(device)))
    x = torch.randn(3, 64, device=device, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (optional test dependency)")
def test_from_bnb_linear4bit():
    import bitsandbytes as bnb

    linear = make_linear(bias=True)
    bnb_layer = bnb.nn.Linear4bit(64, 40, bias=True, compute_dtype=torch.float32, compress_statistics=True,
                                  quant_type="nf4")
    bnb_layer.load_state_dict(linear.state_dict())
    bnb_layer = bnb_layer.to("cpu")  # quantizes on the move
    if getattr(bnb_layer.weight, "quant_state", None) is None:
        bnb_layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)._quantize("cpu")
    layer = QLoraLinear.from_bnb(bnb_layer, r=4)
    ours = QLoraLinear.from_linear(linear, r=4)
    assert torch.equal(layer.qweight.packed, ours.qweight.packed)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = bnb_layer(x)
    assert_close(layer(x), expected.double(), torch.float32, "QLoraLinear.from_bnb vs Linear4bit")


def test_bad_arguments_leave_nothing_changed():
    linear = make_linear()
    state = {k: v.clone() for k, v in linear.state_dict().items()}
    for kwargs, exc, word in [(dict(r=0), ValueError, "r"), (dict(blocksize=100), ValueError, "blocksize"),
                              (dict(lora_dropout=1.5), ValueError, "lora_dropout"),
                              (dict(double_quant=1), TypeError, "double_quant")]:
        with pytest.raises(exc, match=word):
            QLoraLinear.from_linear(linear, **kwargs)
    assert all(torch.equal(state[k], v) for k, v in linear.state_dict().items())
    assert linear.weight.requires_grad
    with pytest.raises(TypeError, match="linear"):
        QLoraLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="Linear4bit"):
        QLoraLinear.from_bnb(linear)
    with pytest.raises(TypeError, match="qweight"):
        QLoraLinear(linear.weight)


def test_public_api():
    """The names README documents are the implementations, and they work end to end."""
    from peft_ops import nf4, reference
    from peft_ops.nn import lora as layers
    from peft_ops.ops import qlora

    assert peft_ops.QLoraLinear is layers.QLoraLinear and peft_ops.NF4Weight is nf4.NF4Weight
    assert peft_ops.qlora_linear is qlora.qlora_linear and peft_ops.nf4_linear is qlora.nf4_linear
    assert peft_ops.nf4 is nf4
    torch.manual_seed(0)
    w = torch.randn(12, 40)
    q = peft_ops.nf4.quantize(w, blocksize=32)
    assert isinstance(q, peft_ops.NF4Weight)
    assert torch.equal(peft_ops.nf4.dequantize(q), reference.nf4_dequantize(q))


def test_trainable_parameters_count_nf4_weights_as_weights():
    torch.manual_seed(0)
    layer = peft_ops.QLoraLinear.from_linear(torch.nn.Linear(64, 32), r=4)
    trainable, total = peft_ops.trainable_parameters(layer)
    assert trainable == 4 * (64 + 32)
    assert total == 64 * 32 + 32 + trainable  # the NF4 weight as 64×32 weights, the bias, the adapter
    assert peft_ops.trainable_summary(layer).startswith("trainable params: 384 || all params: 2,464 ||")

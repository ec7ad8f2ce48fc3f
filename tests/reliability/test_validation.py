"""Bad input: a ValueError or TypeError naming the argument, before anything runs or changes."""

from unittest import mock

import pytest
import torch
import torch.nn as nn

import peft_ops
from peft_ops import LoraLinear
from peft_ops.tools.accuracy import LoraCase, make_lora_inputs


def good_args(device="cpu"):
    inp = make_lora_inputs(LoraCase(M=5, K=12, N=10, r=4, dtype=torch.float32), device)
    return dict(x=inp["x"], weight=inp["weight"], lora_A=inp["lora_A"], lora_B=inp["lora_B"], scaling=0.5,
                bias=inp["bias"], dropout_p=0.1)


def f32(*shape):
    return torch.zeros(*shape)


# (argument changed, new value, exception, words the message must contain)
BAD = [
    ("x", f32(5, 11), ValueError, "x"),
    ("weight", f32(10, 0), ValueError, "weight"),
    ("x", f32(()), ValueError, "x"),
    ("weight", f32(10, 12, 1), ValueError, "weight"),
    ("lora_A", f32(4, 13), ValueError, "lora_A"),
    ("lora_A", f32(0, 12), ValueError, "lora_A"),  # r = 0
    ("lora_B", f32(10, 3), ValueError, "lora_B"),
    ("lora_B", f32(11, 4), ValueError, "lora_B"),
    ("bias", f32(11), ValueError, "bias"),
    ("bias", f32(10, 1), ValueError, "bias"),
    ("x", torch.zeros(5, 12, dtype=torch.float64), TypeError, "x"),
    ("x", torch.zeros(5, 12, dtype=torch.int32), TypeError, "x"),
    ("weight", torch.zeros(10, 12, dtype=torch.float16), TypeError, "weight"),
    ("bias", torch.zeros(10, dtype=torch.bfloat16), TypeError, "bias"),
    ("lora_B", torch.zeros(10, 4, dtype=torch.float16), TypeError, "lora_B"),
    ("x", [[1.0] * 12] * 5, TypeError, "x"),
    ("weight", None, TypeError, "weight"),
    ("lora_A", 3.0, TypeError, "lora_A"),
    ("bias", "zeros", TypeError, "bias"),
    ("scaling", "1", TypeError, "scaling"),
    ("scaling", True, TypeError, "scaling"),
    ("scaling", float("nan"), ValueError, "scaling"),
    ("dropout_p", 1.0, ValueError, "dropout_p"),
    ("dropout_p", -0.1, ValueError, "dropout_p"),
    ("dropout_p", None, TypeError, "dropout_p"),
]


@pytest.mark.parametrize("name,value,exc,word", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_lora_linear_rejects(name, value, exc, word):
    args = good_args()
    args[name] = value
    from peft_ops.ops.lora import LoraLinearFunction

    with mock.patch.object(LoraLinearFunction, "apply") as launch, pytest.raises(exc, match=rf"\b{word}\b"):
        peft_ops.lora_linear(**args)
    assert not launch.called  # rejected before anything ran


def test_half_precision_adapters_on_fp32_x_rejected():
    args = good_args()
    args["lora_A"] = args["lora_A"].half()
    args["lora_B"] = args["lora_B"].half()
    with pytest.raises(TypeError, match="lora_A"):
        peft_ops.lora_linear(**args)


def test_tensors_on_different_devices():
    args = good_args()
    args["lora_B"] = args["lora_B"].to("meta")
    with pytest.raises(ValueError, match="lora_B.*device"):
        peft_ops.lora_linear(**args)


LAYER_BAD = [
    (dict(r=0), ValueError, "r"),
    (dict(r=-2), ValueError, "r"),
    (dict(r=2.0), TypeError, "r"),
    (dict(lora_alpha="8"), TypeError, "lora_alpha"),
    (dict(lora_dropout=1.5), ValueError, "lora_dropout"),
    (dict(use_rslora="yes"), TypeError, "use_rslora"),
]


@pytest.mark.parametrize("kwargs,exc,word", LAYER_BAD)
def test_layer_rejects_and_leaves_the_linear_untouched(kwargs, exc, word):
    linear = nn.Linear(8, 6)
    with pytest.raises(exc, match=rf"\b{word}\b"):
        LoraLinear.from_linear(linear, **kwargs)
    assert linear.weight.requires_grad and linear.bias.requires_grad  # not frozen by a failed wrap
    with pytest.raises(exc, match=rf"\b{word}\b"):
        LoraLinear(8, 6, **kwargs)


def test_layer_rejects_bad_sizes_and_modules():
    with pytest.raises(ValueError, match="in_features"):
        LoraLinear(0, 4)
    with pytest.raises(TypeError, match="out_features"):
        LoraLinear(4, "4")
    with pytest.raises(TypeError, match="linear"):
        LoraLinear.from_linear(nn.Conv1d(2, 2, 1))


# --------------------------------------------------------------------------------------
# bottleneck_adapter
# --------------------------------------------------------------------------------------

def good_adapter_args():
    from peft_ops.tools.accuracy import BottleneckCase, make_bottleneck_inputs

    inp = make_bottleneck_inputs(BottleneckCase(M=5, d=12, m=4, dtype=torch.float32))
    return dict(x=inp["x"], down_weight=inp["down_weight"], down_bias=inp["down_bias"], up_weight=inp["up_weight"],
                up_bias=inp["up_bias"], activation="gelu", scaling=0.5, dropout_p=0.1)


BAD_ADAPTER = [
    ("x", f32(5, 11), ValueError, "down_weight"),  # hidden size mismatch
    ("x", f32(()), ValueError, "x"),
    ("down_weight", f32(4, 13), ValueError, "down_weight"),
    ("down_weight", f32(0, 12), ValueError, "bottleneck"),
    ("down_weight", f32(4, 12, 1), ValueError, "down_weight"),
    ("up_weight", f32(12, 5), ValueError, "up_weight"),
    ("up_weight", f32(4, 12), ValueError, "up_weight"),
    ("down_bias", f32(5), ValueError, "down_bias"),
    ("up_bias", f32(11), ValueError, "up_bias"),
    ("up_bias", f32(12, 1), ValueError, "up_bias"),
    ("x", torch.zeros(5, 12, dtype=torch.float64), TypeError, "x"),
    ("down_weight", torch.zeros(4, 12, dtype=torch.float16), TypeError, "down_weight"),
    ("up_bias", torch.zeros(12, dtype=torch.bfloat16), TypeError, "up_bias"),
    ("x", [[1.0] * 12] * 5, TypeError, "x"),
    ("up_weight", None, TypeError, "up_weight"),
    ("down_bias", 1.0, TypeError, "down_bias"),
    ("activation", "tanh", ValueError, "activation"),
    ("activation", "GELU", ValueError, "activation"),
    ("activation", 1, TypeError, "activation"),
    ("scaling", "1", TypeError, "scaling"),
    ("scaling", float("inf"), ValueError, "scaling"),
    ("dropout_p", 1.0, ValueError, "dropout_p"),
]


@pytest.mark.parametrize("name,value,exc,word", BAD_ADAPTER, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_ADAPTER)])
def test_bottleneck_adapter_rejects(name, value, exc, word):
    args = good_adapter_args() | {name: value}
    with mock.patch("peft_ops.ops.bottleneck.BottleneckAdapterFunction.apply") as launched:
        with pytest.raises(exc, match=word):
            peft_ops.bottleneck_adapter(**args)
    launched.assert_not_called()


def test_bottleneck_adapter_tensors_on_different_devices():
    args = good_adapter_args()
    args["up_bias"] = args["up_bias"].to("meta")
    with pytest.raises(ValueError, match="up_bias"):
        peft_ops.bottleneck_adapter(**args)

"""An audit of the public API: every public callable rejects bad input — non-tensors, wrong
shapes, dtypes and devices, NaN-bearing configurations — with a ValueError or TypeError that
names the argument, before anything runs or changes. A public name missing from the table
fails the audit."""

import copy

import pytest
import torch
import torch.nn as nn

import peft_ops
from peft_ops.tools.accuracy import BottleneckCase, LoraCase, make_bottleneck_inputs, make_lora_inputs

NAN = float("nan")


def lora_args():
    inp = make_lora_inputs(LoraCase(M=5, K=16, N=12, r=4, dtype=torch.float32))
    return dict(x=inp["x"], weight=inp["weight"], lora_A=inp["lora_A"], lora_B=inp["lora_B"], scaling=0.5,
                bias=inp["bias"], dropout_p=0.1)


def multi_lora_args():
    inp = lora_args()
    return dict(x=inp["x"], weight=inp["weight"], lora_As=[inp["lora_A"], inp["lora_A"][:2].clone()],
                lora_Bs=[inp["lora_B"], inp["lora_B"][:, :2].clone()], scalings=[0.5, 2.0],
                adapter_ids=torch.tensor([0, 1, -1, 1, 0]), bias=inp["bias"], dropout_ps=[0.1, 0.0])


def qlora_args(lora=True):
    args = lora_args()
    args["qweight"] = peft_ops.nf4.quantize(args.pop("weight"))
    if not lora:
        return {k: args[k] for k in ("x", "qweight", "bias")}
    return args


def dora_args(nf4=False):
    args = lora_args()
    args["magnitude"] = torch.rand(12) + 0.5
    if nf4:
        args["qweight"] = peft_ops.nf4.quantize(args.pop("weight"))
    return args


def adapter_args():
    inp = make_bottleneck_inputs(BottleneckCase(M=5, d=16, m=4, dtype=torch.float32))
    return dict(x=inp["x"], down_weight=inp["down_weight"], down_bias=inp["down_bias"], up_weight=inp["up_weight"],
                up_bias=inp["up_bias"], activation="gelu", scaling=0.5, dropout_p=0.1)


def embedding_args():
    return dict(ids=torch.tensor([[1, 2, 2]]), weight=f32(10, 16), lora_A=f32(4, 10), lora_B=f32(16, 4), scaling=2.0,
                padding_idx=None)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.proj = nn.Linear(16, 16)

    def get_input_embeddings(self):
        return self.embed


def meta(t):
    return t.to("meta")


f32 = torch.zeros
# public name → (callable, good keyword arguments, [(argument, bad value, exception)])
AUDIT = {
    "lora_linear": (peft_ops.lora_linear, lora_args, [
        ("x", "tensor", TypeError), ("x", f32(5, 15), ValueError), ("weight", f32(12, 16).half(), TypeError),
        ("lora_A", meta(f32(4, 16)), ValueError), ("lora_B", f32(12, 5), ValueError), ("scaling", NAN, ValueError),
        ("dropout_p", NAN, ValueError), ("bias", [0.0] * 12, TypeError)]),
    "multi_lora_linear": (peft_ops.multi_lora_linear, multi_lora_args, [
        ("x", "tensor", TypeError), ("x", f32(5, 15), ValueError), ("weight", f32(12, 16).half(), TypeError),
        ("lora_As", "a", TypeError), ("lora_Bs", [f32(12, 4)], ValueError), ("scalings", [NAN, 1.0], ValueError),
        ("dropout_ps", [0.1, 1.5], ValueError), ("adapter_ids", torch.tensor([0, 2, 0, 0, 0]), ValueError),
        ("adapter_ids", torch.zeros(5), TypeError), ("bias", [0.0] * 12, TypeError)]),
    "lora_embedding": (peft_ops.lora_embedding, embedding_args, [
        ("ids", torch.tensor([10]), ValueError), ("ids", f32(3), TypeError), ("weight", f32(10), ValueError),
        ("lora_A", f32(4, 9), ValueError), ("lora_B", f32(16, 4).double(), TypeError), ("scaling", NAN, ValueError),
        ("padding_idx", 10, ValueError), ("padding_idx", "0", TypeError)]),
    "LoraEmbedding": (peft_ops.LoraEmbedding, lambda: dict(num_embeddings=10, embedding_dim=8), [
        ("num_embeddings", 0, ValueError), ("r", 2.5, TypeError), ("lora_alpha", NAN, ValueError),
        ("padding_idx", 10, ValueError), ("use_rslora", 1, TypeError)]),
    "qlora_linear": (peft_ops.qlora_linear, qlora_args, [
        ("qweight", f32(12, 16), TypeError), ("x", f32(5, 15), ValueError), ("lora_A", f32(4, 15), ValueError),
        ("lora_B", meta(f32(12, 4)), ValueError), ("scaling", NAN, ValueError), ("x", f32(5, 16).double(), TypeError)]),
    "nf4_linear": (peft_ops.nf4_linear, lambda: qlora_args(lora=False), [
        ("qweight", None, TypeError), ("x", f32(5, 17), ValueError), ("bias", f32(13), ValueError),
        ("x", f32(5, 16).to(torch.int32), TypeError)]),
    "dora_linear": (peft_ops.dora_linear, dora_args, [
        ("magnitude", f32(11), ValueError), ("magnitude", f32(12).half(), TypeError), ("magnitude", 1.0, TypeError),
        ("weight_sq_norm", f32(12).double(), TypeError), ("weight_sq_norm", meta(f32(12)), ValueError),
        ("lora_B", f32(12, 5), ValueError), ("x", f32(5, 15), ValueError), ("scaling", NAN, ValueError)]),
    "qdora_linear": (peft_ops.qdora_linear, lambda: dora_args(nf4=True), [
        ("qweight", f32(12, 16), TypeError), ("magnitude", f32(12, 1), ValueError), ("dropout_p", 1.0, ValueError),
        ("weight_sq_norm", f32(3), ValueError)]),
    "squared_row_norms": (peft_ops.squared_row_norms, lambda: dict(weight=torch.randn(8, 16)), [
        ("weight", [[1.0]], TypeError), ("weight", f32(8), ValueError), ("weight", f32(8, 16).long(), TypeError)]),
    "bottleneck_adapter": (peft_ops.bottleneck_adapter, adapter_args, [
        ("x", 3, TypeError), ("down_weight", f32(4, 15), ValueError), ("up_bias", meta(f32(16)), ValueError),
        ("activation", "tanh", ValueError), ("scaling", NAN, ValueError), ("up_weight", f32(16, 4).half(), TypeError)]),
    "LoraLinear": (peft_ops.LoraLinear, lambda: dict(in_features=16, out_features=8), [
        ("in_features", 0, ValueError), ("r", 2.5, TypeError), ("lora_alpha", NAN, ValueError),
        ("lora_dropout", 1.0, ValueError), ("bias", "yes", TypeError), ("use_dora", 1, TypeError),
        ("fan_in_fan_out", 1, TypeError)]),
    "QLoraLinear": (peft_ops.QLoraLinear, lambda: dict(qweight=peft_ops.nf4.quantize(torch.randn(8, 16))), [
        ("qweight", torch.randn(8, 16), TypeError), ("bias", f32(9), ValueError), ("r", 0, ValueError),
        ("lora_alpha", NAN, ValueError)]),
    "BottleneckAdapter": (peft_ops.BottleneckAdapter, lambda: dict(hidden_size=16, bottleneck_size=4), [
        ("bottleneck_size", 0, ValueError), ("hidden_size", "16", TypeError), ("scaling", NAN, ValueError),
        ("activation", "swish", ValueError)]),
    "WithAdapter": (peft_ops.WithAdapter, lambda: dict(base_layer=nn.Linear(4, 4),
                                                       adapter=peft_ops.BottleneckAdapter(4, 2)), [
        ("base_layer", lambda x: x, TypeError), ("adapter", nn.Linear(4, 4), TypeError)]),
    "PromptTuning": (peft_ops.PromptTuning, lambda: dict(num_virtual_tokens=4, hidden_size=16), [
        ("num_virtual_tokens", 0, ValueError), ("hidden_size", -1, ValueError), ("init", "zeros", ValueError)]),
    "PromptEncoder": (peft_ops.PromptEncoder, lambda: dict(num_virtual_tokens=4, hidden_size=16), [
        ("num_virtual_tokens", 0, ValueError), ("encoder_dropout", NAN, ValueError),
        ("reparameterization", "GRU", ValueError)]),
    "PrefixTuning": (peft_ops.PrefixTuning, lambda: dict(num_virtual_tokens=4, num_layers=2, num_key_value_heads=2,
                                                         head_dim=8), [
        ("num_layers", 0, ValueError), ("head_dim", 8.0, TypeError), ("prefix_projection", 1, TypeError)]),
    "PromptLearningModel": (peft_ops.PromptLearningModel, lambda: dict(
        base_model=Tiny(), method="prompt_tuning", prompt_encoder=peft_ops.PromptTuning(4, 16)), [
        ("base_model", nn.Linear(4, 4), ValueError), ("method", "lora", ValueError),
        ("prompt_encoder", nn.Linear(4, 4), TypeError)]),
    "NF4Weight": (peft_ops.NF4Weight.from_bnb, lambda: dict(packed=torch.zeros(8, 1, dtype=torch.uint8),
                                                            quant_state=None), [
        ("packed", "bytes", TypeError), ("quant_state", 3, TypeError)]),
    "nf4.quantize": (peft_ops.nf4.quantize, lambda: dict(weight=torch.randn(8, 16)), [
        ("weight", [[1.0]], TypeError), ("weight", torch.full((8, 16), NAN), ValueError),
        ("blocksize", 48, ValueError), ("double_quant", "no", TypeError)]),
    "nf4.dequantize": (peft_ops.nf4.dequantize, lambda: dict(qweight=peft_ops.nf4.quantize(torch.randn(8, 16))), [
        ("qweight", torch.randn(8, 16), TypeError), ("dtype", torch.int8, TypeError)]),
    "apply_adapters": (peft_ops.apply_adapters, lambda: dict(model=Tiny(), target_modules=["proj"],
                                                             bottleneck_size=4), [
        ("model", "model", TypeError), ("bottleneck_size", 0, ValueError), ("target_modules", 3, TypeError),
        ("scaling", NAN, ValueError), ("activation", "elu", ValueError)]),
    "apply_lora": (peft_ops.apply_lora, lambda: dict(model=Tiny(), target_modules=["proj"]), [
        ("model", None, TypeError), ("r", 0, ValueError), ("lora_alpha", NAN, ValueError),
        ("target_modules", ["nope"], ValueError), ("rank_pattern", {"proj": -1}, ValueError),
        ("quantize", "int4", ValueError), ("use_dora", "yes", TypeError), ("exclude_modules", 7, TypeError),
        ("layers_to_transform", "0", TypeError), ("layers_pattern", 3, TypeError),
        ("modules_to_save", 3, TypeError), ("modules_to_save", ["no_such_head"], ValueError),
        ("bias", "some", ValueError), ("adapter_name", "a.b", ValueError), ("adapter_name", 7, TypeError)]),
    "add_adapter": (peft_ops.add_adapter, lambda: dict(model=peft_ops.apply_lora(Tiny(), ["proj"]), adapter_name="b",
                                                       target_modules=["proj"]), [
        ("model", "m", TypeError), ("adapter_name", "default", ValueError), ("adapter_name", "", ValueError),
        ("adapter_name", "double", ValueError), ("target_modules", ["nope"], ValueError)]),
    "set_adapter": (peft_ops.set_adapter, lambda: dict(model=peft_ops.apply_lora(Tiny(), ["proj"]),
                                                       adapter_name="default"), [
        ("model", 1, TypeError), ("adapter_name", "other", ValueError), ("adapter_name", None, TypeError)]),
    "delete_adapter": (peft_ops.delete_adapter, lambda: dict(model=peft_ops.apply_lora(Tiny(), ["proj"]),
                                                             adapter_name="default"), [
        ("model", 1, TypeError), ("adapter_name", "other", ValueError)]),
    "disable_adapters": (lambda model: peft_ops.disable_adapters(model).__enter__(), lambda: dict(model=Tiny()), [
        ("model", "m", TypeError)]),
    "mixed_adapter_batch": (lambda model, adapter_names: peft_ops.mixed_adapter_batch(model, adapter_names).__enter__(),
                            lambda: dict(model=peft_ops.apply_lora(Tiny(), ["proj"]), adapter_names=["default"]), [
        ("model", 3, TypeError), ("adapter_names", "default", TypeError), ("adapter_names", [], ValueError),
        ("adapter_names", ["nope"], ValueError), ("adapter_names", ["a.b"], ValueError)]),
    "adapter_names": (peft_ops.adapter_names, lambda: dict(model=Tiny()), [("model", 2, TypeError)]),
    "active_adapter": (peft_ops.active_adapter, lambda: dict(model=Tiny()), [("model", 2, TypeError)]),
    "apply_prompt_learning": (peft_ops.apply_prompt_learning, lambda: dict(model=Tiny(), method="prompt_tuning",
                                                                           num_virtual_tokens=4), [
        ("model", nn.Linear(4, 4), ValueError), ("num_virtual_tokens", 0, ValueError), ("method", "x", ValueError)]),
    "save_peft_adapter": (peft_ops.save_peft_adapter, lambda: dict(model=peft_ops.apply_lora(Tiny(), ["proj"]),
                                                                   path="/nonexistent/never"), [
        ("model", 3, TypeError), ("adapter_name", "other", ValueError), ("adapter_name", 1, TypeError)]),
    "load_peft_adapter": (peft_ops.load_peft_adapter, lambda: dict(model=Tiny(), path="/nonexistent/never"), [
        ("model", 3, TypeError), ("quantize", "fp8", ValueError), ("adapter_name", "x.y", ValueError)]),
    "save_prompt_learning": (peft_ops.save_prompt_learning, lambda: dict(wrapper=Tiny(), path="/nonexistent/x"), [
        ("wrapper", Tiny(), TypeError)]),
    "load_prompt_learning": (peft_ops.load_prompt_learning, lambda: dict(model=Tiny(), path="/nonexistent/never"), [
        ("model", "m", TypeError)]),
    "from_peft": (peft_ops.from_peft, lambda: dict(peft_model=Tiny()), [("peft_model", 3, TypeError)]),
    "merge_and_unload": (peft_ops.merge_and_unload, lambda: dict(model=Tiny()), [("model", [], TypeError)]),
    "trainable_parameters": (peft_ops.trainable_parameters, lambda: dict(model=Tiny()), [("model", 1, TypeError)]),
    "trainable_summary": (peft_ops.trainable_summary, lambda: dict(model=Tiny()), [("model", 1, TypeError)]),
    "set_backend": (peft_ops.set_backend, lambda: dict(name="auto"), [("name", "cuda", ValueError),
                                                                    ("name", 1, TypeError)]),
    "use_backend": (lambda name: peft_ops.use_backend(name).__enter__(), lambda: dict(name="auto"), [
        ("name", "gpu", ValueError)]),
    "prepare_fsdp": (peft_ops.prepare_fsdp, lambda: dict(model=peft_ops.apply_lora(Tiny(), ["proj"], quantize="nf4"),
                                                         world_size=1), [
        ("model", 3, TypeError), ("world_size", 0, ValueError), ("world_size", 1.5, TypeError),
        ("world_size", 2, ValueError)]),
    "load_base_weights": (peft_ops.load_base_weights, lambda: dict(model=Tiny(), checkpoint="/nonexistent/never"), [
        ("model", 3, TypeError), ("checkpoint", "/nonexistent/never", FileNotFoundError)]),
    "save_sharded_checkpoint": (peft_ops.save_sharded_checkpoint, lambda: dict(model=Tiny(), path="/nonexistent/x"), [
        ("model", 3, TypeError)]),
    "load_sharded_checkpoint": (peft_ops.load_sharded_checkpoint, lambda: dict(model=Tiny(), path="/nonexistent/x"), [
        ("model", 3, TypeError), ("path", "/nonexistent/never", FileNotFoundError)]),
    "free_workspaces": (peft_ops.free_workspaces, lambda: dict(device="cpu"), [
        ("device", 2.5, TypeError), ("device", "gpu7", ValueError), ("device", True, TypeError)]),
    "workspace_bytes": (peft_ops.workspace_bytes, lambda: dict(device="cpu"), [
        ("device", [0], TypeError), ("device", "tpu:x", ValueError)]),
}
# Not audited, with the reason: the autograd Functions are the ops' internals (the public
# functions check their input, then call them); get_backend takes nothing; FromPeftReport is
# a result record; `reference` holds the unchecked float64 math the tests compare against;
# `nf4` is the module audited through nf4.quantize / nf4.dequantize.
EXEMPT = {"LoraLinearFunction", "MultiLoraLinearFunction", "NF4LinearFunction", "QLoraLinearFunction",
          "BottleneckAdapterFunction", "DoraLinearFunction", "QDoraLinearFunction", "LoraEmbeddingFunction",
          "get_backend", "FromPeftReport", "reference", "nf4"}

CASES = [(name, i) for name, (_, _, bad) in AUDIT.items() for i in range(len(bad))]


def test_every_public_name_is_audited():
    audited = {name.split(".")[0] for name in AUDIT} | EXEMPT
    assert set(peft_ops.__all__) <= audited, sorted(set(peft_ops.__all__) - audited)


@pytest.mark.parametrize("name, index", CASES, ids=[f"{n}-{AUDIT[n][2][i][0]}-{i}" for n, i in CASES])
def test_bad_input_names_the_argument(name, index):
    fn, good, bad = AUDIT[name]
    argument, value, exc = bad[index]
    kwargs = good() | {argument: value}
    models = [v for v in kwargs.values() if isinstance(v, nn.Module)]
    before = [copy.deepcopy(m.state_dict()) for m in models]
    trainable = [[p.requires_grad for p in m.parameters()] for m in models]
    with pytest.raises(exc) as raised:
        fn(**kwargs)
    message = str(raised.value)
    assert argument in message or (argument == "model" and "model" in message.lower()), message
    for model, state, flags in zip(models, before, trainable):  # nothing changed
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
        assert [p.requires_grad for p in model.parameters()] == flags

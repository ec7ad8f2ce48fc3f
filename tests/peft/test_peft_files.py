"""The model-level LoRA API against Hugging Face PEFT on a tiny Llama built from a config:
apply_lora, PEFT's files both ways, one training step's gradients, from_peft, merge_and_unload,
and damaged files that never change the model."""

import copy
import json

import pytest
import torch
import torch.nn as nn

import peft_ops
from peft_ops import LoraLinear, QLoraLinear, apply_lora, load_peft_adapter, save_peft_adapter
from peft_ops.tools.accuracy import assert_close

from helpers.tiny_llama import ids, llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
FP32_TOL = 1e-5  # the parity bound for fp32 logits


def randomize_lora(model, seed=1):
    """Nonzero B (PEFT and we both start it at zero), so the adapters change the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoraLinear, QLoraLinear))}


def peft_lora(base, **config):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=TARGETS, **config)).eval()
    randomize_lora(model)
    return model


def max_logit_error(ours, theirs):
    return (ours.double() - theirs.double()).abs().max().item() / theirs.double().abs().max().item()


CONFIGS = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                     alpha_pattern={"down_proj": 3}),
}


def test_apply_lora_replaces_the_targets_and_freezes_the_rest():
    model = llama()
    q_weight = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        before = model(ids()).logits
    assert apply_lora(model, TARGETS, r=4, lora_alpha=8) is model
    layers = lora_layers(model)
    assert sorted(layers) == sorted(f"model.layers.{i}.{part}" for i in range(2)
                                    for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    assert model.model.layers[0].self_attn.q_proj.weight is q_weight  # shared, not copied
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{p}" for name in layers for p in ("lora_A", "lora_B")}
    with torch.no_grad():  # B = 0: the model computes what it did
        assert_close(model(ids()).logits, before.double(), torch.float32, "logits at init")


def test_rank_and_alpha_patterns_follow_peft():
    base = llama()
    ours = apply_lora(copy.deepcopy(base), TARGETS, **CONFIGS["patterns"])
    theirs = peft_lora(base, **CONFIGS["patterns"])
    for name, layer in lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert layer.r == peft_layer.r["default"]
        assert layer.scaling == pytest.approx(peft_layer.scaling["default"])
    assert {layer.r for layer in lora_layers(ours).values()} == {2, 4, 6}


def test_apply_lora_with_nf4():
    model = apply_lora(llama(), ["q_proj"], r=4, quantize="nf4")
    assert all(isinstance(m, QLoraLinear) for m in lora_layers(model).values()) and len(lora_layers(model)) == 2
    assert torch.isfinite(model(ids()).logits).all()


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(target_modules=["nope"]), ValueError, "q_proj"),  # lists the linear layer names
    (dict(target_modules=["mlp"]), ValueError, "Linear"),  # a container, not a linear layer
    (dict(r=0), ValueError, "r"),
    (dict(lora_alpha=float("nan")), ValueError, "lora_alpha"),
    (dict(lora_dropout=1.5), ValueError, "lora_dropout"),
    (dict(quantize="int8"), ValueError, "quantize"),
    (dict(rank_pattern={"q_proj": 0}), ValueError, "rank_pattern"),
    (dict(rank_pattern=["q_proj"]), TypeError, "rank_pattern"),
    (dict(alpha_pattern={"(": 2}), ValueError, "alpha_pattern"),
    (dict(use_rslora="yes"), TypeError, "use_rslora"),
])
def test_apply_lora_rejects_and_changes_nothing(kwargs, exc, word):
    model = llama()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=word):
        apply_lora(model, **(dict(target_modules=TARGETS) | kwargs))
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("config", CONFIGS)
def test_peft_files_load_here_with_peft_logits(config, tmp_path):
    base = llama()
    theirs = peft_lora(base, **CONFIGS[config])
    theirs.save_pretrained(tmp_path)
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path)
    x = ids()
    with torch.no_grad():
        error = max_logit_error(ours(x).logits, theirs(input_ids=x).logits)
    assert error <= FP32_TOL, error
    assert len(lora_layers(ours)) == 6


@pytest.mark.parametrize("config", CONFIGS)
def test_peft_loads_our_files_with_our_logits(config, tmp_path):
    base = llama()
    ours = apply_lora(copy.deepcopy(base), TARGETS, **CONFIGS[config])
    randomize_lora(ours)
    save_peft_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    x = ids()
    with torch.no_grad():
        error = max_logit_error(ours(x).logits, theirs(input_ids=x).logits)
    assert error <= FP32_TOL, error


def test_one_training_step_has_peft_gradients(tmp_path):
    base = llama()
    theirs = peft_lora(base, **CONFIGS["patterns"])
    theirs.save_pretrained(tmp_path)
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path)
    x = ids()
    ours(x, labels=x).loss.backward()
    theirs(input_ids=x, labels=x).loss.backward()
    for name, layer in lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        for ours_grad, their_grad in ((layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad),
                                      (layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad)):
            scale = their_grad.abs().max().item()
            assert (ours_grad - their_grad).abs().max().item() <= FP32_TOL * scale, name


def spy(monkeypatch, module, name):
    """Count the calls of module.name (to prove the fused op ran, not PEFT's fallback)."""
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_from_peft_keeps_outputs_gradients_keys_and_files(tmp_path, monkeypatch):
    calls = spy(monkeypatch, peft_ops.peft.from_peft, "lora_linear")
    base = llama()
    reference_model = peft_lora(base, r=4, lora_alpha=8)
    fused = copy.deepcopy(reference_model)
    keys = list(fused.state_dict())
    params = {n: p for n, p in fused.named_parameters()}
    report = peft_ops.from_peft(fused)
    assert len(report.swapped) == 6 and not report.skipped
    assert list(fused.state_dict()) == keys  # same keys, same Parameter objects
    assert all(p is params[n] for n, p in fused.named_parameters())
    assert all(type(fused.get_submodule(n)).__name__.startswith("Fused") for n in report.swapped)
    x = ids()
    for model in (reference_model, fused):
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        model.eval()
    with torch.no_grad():
        assert max_logit_error(fused(input_ids=x).logits, reference_model(input_ids=x).logits) <= FP32_TOL
        with fused.disable_adapter(), reference_model.disable_adapter():
            assert torch.equal(fused(input_ids=x).logits, reference_model(input_ids=x).logits)
    assert len(calls) == 6 * 2  # every swapped layer, in the step and in the check; none under disable_adapter
    grads = dict(reference_model.named_parameters())
    for name, p in fused.named_parameters():
        if p.requires_grad:
            assert (p.grad - grads[name].grad).abs().max() <= FP32_TOL * grads[name].grad.abs().max(), name
    fused.save_pretrained(tmp_path / "fused")
    reference_model.save_pretrained(tmp_path / "reference")
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("fused", "reference"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_from_peft_reports_what_it_leaves():
    base = llama()
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj"], lora_bias=True))
    with pytest.warns(UserWarning, match="lora_bias"):
        report = peft_ops.from_peft(model)
    assert not report.swapped and set(report.skipped) == {f"base_model.model.model.layers.{i}.self_attn.q_proj"
                                                          for i in range(2)}
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        peft_ops.from_peft(llama())


def test_from_peft_over_bitsandbytes_4bit(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    calls = spy(monkeypatch, peft_ops.peft.from_peft, "qlora_linear")

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, compress_statistics=True,
                                        quant_type="nf4")

        def forward(self, x):
            return self.up(x)

    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    model = Two()
    model.up.load_state_dict(dense.state_dict())
    model = model.to("cpu")
    if getattr(model.up.weight, "quant_state", None) is None:
        model.up.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4",
                                            compress_statistics=True)._quantize("cpu")
    reference_model = peft.get_peft_model(model, peft.LoraConfig(target_modules=["up"], r=4, lora_alpha=8))
    randomize_lora(reference_model)
    fused = copy.deepcopy(reference_model)
    report = peft_ops.from_peft(fused)
    assert report.swapped == ["base_model.model.up"], report
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert_close(fused(x), reference_model(x).double(), torch.float32, "from_peft over Linear4bit")
    assert calls == [1]


def test_merge_and_unload_gives_plain_linears():
    model = apply_lora(llama(), TARGETS, r=4)
    randomize_lora(model)
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
        merged = peft_ops.merge_and_unload(model)
        assert not lora_layers(merged)
        assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
        assert_close(merged(x).logits, expected.double(), torch.float32, "merged logits")
    qmodel = apply_lora(llama(), ["q_proj"], r=4, quantize="nf4")
    randomize_lora(qmodel)
    with torch.no_grad():
        expected = qmodel(x).logits
        merged = peft_ops.merge_and_unload(qmodel)
        assert type(merged.model.layers[1].self_attn.q_proj) is nn.Linear
        assert_close(merged(x).logits, expected.double(), torch.float32, "merged NF4 logits")


def _damage(path, what):
    from safetensors.torch import load_file, save_file

    weights, config_path = path / "adapter_model.safetensors", path / "adapter_config.json"
    tensors, config = load_file(weights), json.loads(config_path.read_text())
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    if what == "missing key":
        del tensors[key]
    elif what == "extra key":
        tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    elif what == "wrong shape":
        tensors[key] = torch.zeros(5, 48)
    elif what == "int weights":
        tensors[key] = tensors[key].to(torch.int32)
    elif what == "nan":
        tensors[key] = tensors[key] * float("nan")
    elif what == "dora without magnitudes":
        config["use_dora"] = True
    elif what == "dora not a bool":
        config["use_dora"] = "yes"
    elif what == "prompt config":
        config["peft_type"] = "PROMPT_TUNING"
    elif what == "rank mismatch":
        config["r"] = 8
    elif what == "no target_modules":
        config["target_modules"] = None
    elif what == "modules_to_save":
        config["modules_to_save"] = ["lm_head"]
    elif what == "fan_in_fan_out not a bool":  # (true or false: each layer's layout comes from its module)
        config["fan_in_fan_out"] = "yes"
    elif what == "layers_to_transform":
        config["layers_to_transform"] = [1]
    elif what == "a variant's config":
        config["use_bdlora"] = {"target_modules_bd_a": ["q_proj"]}
    elif what == "unknown bias mode":
        config["bias"] = "some"
    if what == "truncated":
        weights.write_bytes(weights.read_bytes()[:-7])
    elif what == "pickle":
        weights.rename(path / "adapter_model.bin")
    elif what == "bad json":
        config_path.write_text("{")
    else:
        save_file(tensors, weights)
        config_path.write_text(json.dumps(config))


# what → a word the refusal must name (None: any ValueError)
DAMAGES = {"missing key": None, "extra key": None, "wrong shape": None, "int weights": None, "nan": None,
           "dora without magnitudes": "lora_magnitude_vector", "dora not a bool": "use_dora",
           "prompt config": "peft_type", "rank mismatch": None, "no target_modules": "target_modules",
           "modules_to_save": "lm_head", "fan_in_fan_out not a bool": "fan_in_fan_out",
           # (layers_to_transform is supported: here it leaves layer 0's weights in the file unexpected)
           "layers_to_transform": "unexpected", "unknown bias mode": "bias",
           "a variant's config": "use_bdlora", "truncated": None, "pickle": None,
           "bad json": None}


@pytest.mark.parametrize("what", DAMAGES)
def test_damaged_or_mismatched_files_change_nothing(what, tmp_path):
    base = llama()
    peft_lora(base, r=4, lora_alpha=8).save_pretrained(tmp_path)
    _damage(tmp_path, what)
    model = copy.deepcopy(base)
    state = copy.deepcopy(model.state_dict())
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=DAMAGES[what]):
        load_peft_adapter(model, tmp_path)
    assert [type(m) for m in model.modules()] == modules
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_load_with_nf4_matches_peft_on_the_dequantized_base(tmp_path):
    base = llama()
    theirs = peft_lora(base, r=4, lora_alpha=8)
    theirs.save_pretrained(tmp_path)
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path, quantize="nf4")
    layers = lora_layers(ours)
    assert len(layers) == 6 and all(isinstance(m, QLoraLinear) for m in layers.values())
    with torch.no_grad():  # PEFT's twin on the very weights NF4 keeps
        for name, layer in layers.items():
            theirs.base_model.model.get_submodule(name).base_layer.weight.copy_(layer.qweight.dequantize(torch.float32))
        x = ids()
        error = max_logit_error(ours(x).logits, theirs(input_ids=x).logits)
    assert error <= FP32_TOL, error


def test_exclude_modules_loads_as_peft_does(tmp_path):
    """A file with exclude_modules: the excluded layers stay plain, the logits are PEFT's."""
    base = llama()
    theirs = peft_lora(base, r=4, lora_alpha=8, exclude_modules=["model.layers.0.self_attn.q_proj"])
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["exclude_modules"]
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path)
    names = set(lora_layers(ours))
    assert "model.layers.0.self_attn.q_proj" not in names and "model.layers.1.self_attn.q_proj" in names
    assert type(ours.model.layers[0].self_attn.q_proj) is nn.Linear
    assert len(names) == 5  # 3 targets × 2 layers, less the excluded one
    x = ids()
    with torch.no_grad():
        assert max_logit_error(ours(input_ids=x).logits, theirs(input_ids=x).logits) <= FP32_TOL


def _forward_spy(monkeypatch):
    return spy(monkeypatch, peft_ops.peft.from_peft, "lora_linear")


def _swapped_and_reference(**config):
    base = llama()
    reference_model = peft_lora(base, **config)
    fused = copy.deepcopy(reference_model)
    report = peft_ops.from_peft(fused)
    assert report.swapped and not report.skipped
    return reference_model, fused


def test_from_peft_hands_merged_adapters_to_peft(monkeypatch):
    reference_model, fused = _swapped_and_reference(r=4, lora_alpha=8)
    calls = _forward_spy(monkeypatch)
    x = ids()
    with torch.no_grad():
        for model in (reference_model, fused):
            model.merge_adapter()
        assert torch.equal(fused(input_ids=x).logits, reference_model(input_ids=x).logits)
    assert not calls  # merged: the base layer already holds the adapter, PEFT's forward runs


def test_from_peft_runs_mixed_adapter_batches_as_peft_does(monkeypatch):
    """`adapter_names` (one adapter per row) runs the grouped op (not lora_linear), with PEFT's
    result: within fp32 rounding (measured worst over 5 seeds, kernels in the interpreter:
    2.3e-7 relative), the row without an adapter exactly the base model's."""
    reference_model, fused = _swapped_and_reference(r=4, lora_alpha=8)
    calls = _forward_spy(monkeypatch)
    x = ids()
    names = ["default", "__base__"]  # row 0 with the adapter, row 1 without
    with torch.no_grad():
        ours = fused(input_ids=x, adapter_names=names).logits
        theirs = reference_model(input_ids=x, adapter_names=names).logits
        assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-6
        with reference_model.disable_adapter():
            plain = reference_model(input_ids=x).logits
        assert torch.equal(ours[1], plain[1]) and not torch.equal(ours[0], plain[0])
    assert not calls


def test_from_peft_hands_mismatched_dtypes_to_peft(monkeypatch):
    """bf16 adapters on an fp32 model (the fused op takes adapters in x's dtype or fp32)."""
    reference_model, fused = _swapped_and_reference(r=4, lora_alpha=8)
    for model in (reference_model, fused):
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(torch.bfloat16)
    calls = _forward_spy(monkeypatch)
    x = ids()
    with torch.no_grad():
        assert torch.equal(fused(input_ids=x).logits, reference_model(input_ids=x).logits)
    assert not calls


@pytest.mark.parametrize("setting, reason", [
    ("two adapters", "active adapters"),
    ("lora_bias", "lora_bias"),
    ("DoRA on an embedding", "LoRA variant"),
])
def test_from_peft_reports_each_skip_reason(setting, reason):
    base = llama()
    if setting == "two adapters":
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj"]))
        model.add_adapter("second", peft.LoraConfig(target_modules=["q_proj"]))
        model.base_model.set_adapter(["default", "second"])
    elif setting == "lora_bias":
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj"], lora_bias=True))
    else:  # (plain LoRA on an embedding is swapped: tests/peft/test_embedding_lora.py)
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj", "embed_tokens"],
                                                                         use_dora=True))
    with pytest.warns(UserWarning, match="left these layers to PEFT"):
        report = peft_ops.from_peft(model)
    assert report.skipped and all(reason in why for why in report.skipped.values()), report.skipped
    if setting == "DoRA on an embedding":
        assert set(report.skipped) == {"base_model.model.model.embed_tokens"} and len(report.swapped) == 2


def test_from_peft_swaps_gpt2_conv1d_layers():
    """PEFT's LoRA over GPT-2's Conv1D (fan_in_fan_out): swapped, the [in, out] weight read in
    place, PEFT's logits and gradients; a layer whose flag contradicts its base is left to PEFT."""
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(transformers.GPT2LMHeadModel(config).eval(),
                                 peft.LoraConfig(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    randomize_lora(theirs)
    ours = copy.deepcopy(theirs)
    report = peft_ops.from_peft(ours)
    assert sorted(report.swapped) == ["base_model.model.transformer.h.0.attn.c_attn",
                                      "base_model.model.transformer.h.0.mlp.c_fc"] and not report.skipped
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    for model in (theirs, ours):
        model(input_ids=x, labels=x).loss.backward()
    with torch.no_grad():
        assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits.double(), torch.float32, "logits")
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, grads[name].grad.double(), torch.float32, name)
    contradicting = copy.deepcopy(theirs)
    contradicting.base_model.model.transformer.h[0].attn.c_attn.fan_in_fan_out = False
    with pytest.warns(UserWarning):
        report = peft_ops.from_peft(contradicting)
    assert list(report.skipped) == ["base_model.model.transformer.h.0.attn.c_attn"]
    assert "fan_in_fan_out" in report.skipped["base_model.model.transformer.h.0.attn.c_attn"]

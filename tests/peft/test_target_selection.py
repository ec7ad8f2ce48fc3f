"""Which layers get LoRA: PEFT's own selection is the oracle. On a tiny Llama built from a
config, apply_lora(model, ...) wraps exactly the modules peft.get_peft_model wraps for the same
target_modules ("all-linear" included), exclude_modules, layers_to_transform and layers_pattern;
PEFT's files with those fields load onto the same modules; bad values fail before the model
changes."""

import copy

import pytest
import torch
import torch.nn as nn

from peft_ops import LoraLinear, apply_lora, load_peft_adapter

from helpers.tiny_llama import llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SELECTIONS = {
    "all_linear": dict(target_modules="all-linear"),
    "all_linear_upper_case": dict(target_modules="ALL-LINEAR"),
    "all_linear_minus_mlp": dict(target_modules="all-linear", exclude_modules=["gate_proj", "up_proj"]),
    "all_linear_minus_regex": dict(target_modules="all-linear", exclude_modules=r".*\.self_attn\.[ko]_proj"),
    "layer_1_by_pattern": dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1],
                               layers_pattern="layers"),
    "layer_0_any_pattern": dict(target_modules=["v_proj", "o_proj"], layers_to_transform=0),
    "layer_1_two_patterns": dict(target_modules=["gate_proj", "o_proj"], layers_to_transform=1,
                                 layers_pattern=["blocks", "layers"]),
    "list_minus_suffix": dict(target_modules=["q_proj", "k_proj", "v_proj"],
                              exclude_modules=["layers.0.self_attn.k_proj"]),
}


def peft_targets(base, **selection):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **selection))
    prefix = "base_model.model."
    return {name.removeprefix(prefix) for name, module in model.named_modules()
            if isinstance(module, peft.tuners.lora.LoraLayer)}


def our_targets(model):
    return {name for name, module in model.named_modules() if isinstance(module, LoraLinear)}


@pytest.mark.parametrize("selection", SELECTIONS)
def test_apply_lora_selects_what_peft_selects(selection):
    base = llama()
    expected = peft_targets(base, **SELECTIONS[selection])
    ours = apply_lora(copy.deepcopy(base), r=4, lora_alpha=8, **SELECTIONS[selection])
    assert expected and our_targets(ours) == expected
    if "all_linear" in selection:  # never the LM head
        assert "lm_head" not in expected and isinstance(ours.lm_head, nn.Linear)
        assert not isinstance(ours.lm_head, LoraLinear)


@pytest.mark.parametrize("selection", ["all_linear_minus_mlp", "layer_1_by_pattern", "list_minus_suffix"])
def test_peft_files_with_these_fields_load_onto_the_same_modules(selection, tmp_path):
    """PEFT writes exclude_modules / layers_to_transform / layers_pattern into its config (and the
    resolved module names for "all-linear"); loading selects the same modules, same weights."""
    base = llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **SELECTIONS[selection]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    theirs.save_pretrained(tmp_path)
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path)
    assert our_targets(ours) == peft_targets(base, **SELECTIONS[selection])
    x = torch.randint(0, 64, (2, 5), generator=gen)
    with torch.no_grad():
        assert torch.allclose(ours(x).logits, theirs(input_ids=x).logits, rtol=1e-5, atol=1e-5)


class Plain(nn.Module):
    """No get_output_embeddings: "all-linear" takes every linear layer."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)


def test_all_linear_without_an_output_layer_takes_every_linear():
    model = apply_lora(Plain(), "all-linear", r=2)
    assert our_targets(model) == {"block.0", "block.2", "head"}


def test_all_linear_takes_gpt2_conv1d_layers_as_peft():
    """GPT-2's Conv1D ([in, out] weights): "all-linear" takes them as PEFT does (its lm_head left
    out), each wrapped in place with fan_in_fan_out."""
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    base = transformers.GPT2LMHeadModel(config)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules="all-linear",
                                                                       fan_in_fan_out=True))
    expected = {name.removeprefix("base_model.model.") for name, m in theirs.named_modules()
                if isinstance(m, peft.tuners.lora.LoraLayer)}
    model = apply_lora(copy.deepcopy(base), "all-linear")
    assert our_targets(model) == expected == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                              "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"}
    assert all(model.get_submodule(name).fan_in_fan_out for name in expected)


BAD = [
    (dict(layers_to_transform=[0]), ValueError, "cannot be used when target_modules is a string"),
    (dict(target_modules=["q_proj"], layers_to_transform=[0, -1]), TypeError, "layers_to_transform"),
    (dict(target_modules=["q_proj"], layers_to_transform="0"), TypeError, "layers_to_transform"),
    (dict(target_modules=["q_proj"], layers_to_transform=True), TypeError, "layers_to_transform"),
    (dict(target_modules=["q_proj"], layers_pattern="layers"), ValueError, "layers_pattern needs layers_to_transform"),
    (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=3), TypeError, "layers_pattern"),
    (dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="(layers"), ValueError,
     "layers_pattern"),
    (dict(exclude_modules=7), TypeError, "exclude_modules"),
    (dict(exclude_modules="(q"), ValueError, "exclude_modules is not a valid regular expression"),
    (dict(exclude_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
     ValueError, "matches no"),
    (dict(target_modules=["q_proj"], layers_to_transform=[5]), ValueError, "matches no"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_selection_is_refused_before_the_model_changes(case):
    kwargs, error, match = BAD[case]
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        apply_lora(model, **{"target_modules": "all-linear", **kwargs})
    assert not our_targets(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


# apply_lora(model, peft.LoraConfig(...)): the config's fields honoured or refused by name.
def test_apply_lora_takes_a_lora_config_as_peft_does():
    base = llama()
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                             rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 6}, lora_dropout=0.1,
                             exclude_modules=["layers.1.self_attn.q_proj"])
    theirs = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    for given in (config, config.to_dict(), {k: v for k, v in config.to_dict().items() if k != "peft_type"}):
        ours = apply_lora(copy.deepcopy(base), given)
        layers = {name: m for name, m in ours.named_modules() if isinstance(m, LoraLinear)}
        assert set(layers) == peft_targets(base, **{k: getattr(config, k) for k in (
            "target_modules", "exclude_modules")})
        for name, layer in layers.items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            assert layer.r == peft_layer.r["default"], name
            assert layer.scaling == pytest.approx(peft_layer.scaling["default"]), name
            assert layer.lora_dropout == pytest.approx(0.1) and layer.use_rslora


def test_all_linear_for_sequence_classification_leaves_the_head_out():
    """No output embeddings: with task_type "SEQ_CLS" PEFT leaves the classifier head (`score`)
    out of "all-linear", and so do we."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    base = transformers.LlamaForSequenceClassification(config)
    lora = peft.LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS")
    theirs = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(lora))
    expected = {name.removeprefix("base_model.model.") for name, m in theirs.named_modules()
                if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert "score" not in expected
    assert our_targets(apply_lora(copy.deepcopy(base), lora)) == expected


REFUSED = [
    (dict(modules_to_save=["no_such_head"]), ValueError, "modules_to_save"),
    (dict(modules_to_save=["q_proj"]), ValueError, "modules_to_save.*LoRA target"),
    (dict(init_lora_weights="gaussian"), ValueError, "init_lora_weights"),
    (dict(bias="some"), ValueError, "bias"),
    (dict(lora_bias=True), ValueError, "lora_bias"),
    (dict(layer_replication=[[0, 1]]), ValueError, "layer_replication"),
    (dict(use_dora="yes"), ValueError, "use_dora"),
]


@pytest.mark.parametrize("case", range(len(REFUSED)))
def test_config_fields_these_layers_do_not_do_are_refused_by_name(case):
    fields, error, match = REFUSED[case]
    config = {**peft.LoraConfig(r=4, target_modules=["q_proj"]).to_dict(), **fields}
    model = llama()
    with pytest.raises(error, match=match):
        apply_lora(model, config)
    assert not our_targets(model) and all(p.requires_grad for p in model.parameters())


def test_a_config_and_keyword_settings_together_are_refused():
    model = llama()
    with pytest.raises(TypeError, match="r"):
        apply_lora(model, peft.LoraConfig(target_modules=["q_proj"]), r=4)
    assert not our_targets(model)

"""Named adapters against PEFT's own (``add_adapter``, ``set_adapter``, ``delete_adapter``,
``disable_adapter``) on a tiny Llama: two adapters with different targets and ranks give PEFT's
logits whichever is active, only the active one trains (and two SGD steps on it equal PEFT's),
the files go both ways in PEFT's layout (``path/`` and ``path/<name>/``), from_peft runs the
active one of several; and bad names change nothing."""

import copy
import warnings

import pytest
import torch

import peft_ops
from peft_ops import (
    LoraLinear,
    active_adapter,
    adapter_names,
    add_adapter,
    apply_lora,
    delete_adapter,
    disable_adapters,
    load_peft_adapter,
    save_peft_adapter,
    set_adapter,
)

from helpers.tiny_llama import ids, llama

peft = pytest.importorskip("peft")

PREFIX = "base_model.model."
FP32_TOL = 1e-5  # fp32 on both sides, sums in different orders
SECOND = dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"])


def relative(ours, theirs):
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()


def logits(model, seed=3):
    with torch.no_grad():
        return model(input_ids=ids(seed)).logits


def peft_pair(base):
    """PEFT's model with "default" (q_proj, v_proj; r 4) and "b" (q_proj, k_proj; r 2), every B
    off zero; ours built the same way through our API, holding PEFT's values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8,
                                                                           target_modules=["q_proj", "v_proj"]))
        theirs.add_adapter("b", peft.LoraConfig(**SECOND))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    ours = apply_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    add_adapter(ours, "b", peft.LoraConfig(**SECOND))
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, LoraLinear):
                peft_layer = theirs.get_submodule(PREFIX + name)
                for adapter in layer.adapter_names:
                    held = layer.adapter(adapter)
                    held.lora_A.copy_(peft_layer.lora_A[adapter].weight)
                    held.lora_B.copy_(peft_layer.lora_B[adapter].weight)
    return theirs, ours


def test_switching_adapters_gives_peft_logits_and_trains_only_the_active_one():
    base = llama()
    theirs, ours = peft_pair(base)
    assert adapter_names(ours) == ["default", "b"] and active_adapter(ours) == "default"
    assert isinstance(ours.model.layers[0].self_attn.k_proj, LoraLinear)  # "b" alone: base until active
    for name in ("default", "b", "default"):
        theirs.set_adapter(name)
        set_adapter(ours, name)
        assert relative(logits(ours), logits(theirs)) <= FP32_TOL, name
        trained = [p for p in ours.parameters() if p.requires_grad]
        active = [p for m in ours.modules() if isinstance(m, LoraLinear) for p in m.adapter_parameters(name)]
        assert {id(p) for p in trained} == {id(p) for p in active} and trained, name
        assert sorted(p.shape for p in trained) == sorted(p.shape for p in theirs.parameters() if p.requires_grad)
    with disable_adapters(ours), theirs.disable_adapter():
        assert relative(logits(ours), logits(base)) == 0 and relative(logits(theirs), logits(base)) == 0


def test_two_steps_on_the_second_adapter_equal_peft():
    base = llama()
    theirs, ours = peft_pair(base)
    theirs.set_adapter("b")
    set_adapter(ours, "b")
    for model in (theirs, ours):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for seed in range(2):
            x = ids(seed)
            optimizer.zero_grad()
            model(input_ids=x, labels=x).loss.backward()
            optimizer.step()
    assert relative(logits(ours), logits(theirs)) <= FP32_TOL
    set_adapter(ours, "default")
    theirs.set_adapter("default")  # the default adapter did not move
    assert relative(logits(ours), logits(theirs)) <= FP32_TOL


def test_files_both_ways_in_peft_layout(tmp_path):
    base = llama()
    theirs, ours = peft_pair(base)
    save_peft_adapter(ours, tmp_path / "ours")
    assert (tmp_path / "ours" / "adapter_config.json").exists() and (tmp_path / "ours" / "b" /
                                                                     "adapter_model.safetensors").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        loaded.load_adapter(tmp_path / "ours" / "b", adapter_name="b")
        theirs.save_pretrained(tmp_path / "peft")
    mine = load_peft_adapter(copy.deepcopy(base), tmp_path / "peft")
    mine = load_peft_adapter(mine, tmp_path / "peft" / "b", adapter_name="b")
    assert adapter_names(mine) == ["default", "b"] and active_adapter(mine) == "default"
    assert not any(p.requires_grad for n, p in mine.named_parameters() if ".b." in n)  # loaded beside: frozen
    for name in ("default", "b"):
        loaded.set_adapter(name)
        theirs.set_adapter(name)
        set_adapter(ours, name)
        set_adapter(mine, name)
        assert relative(logits(loaded), logits(ours)) <= FP32_TOL, name
        assert relative(logits(mine), logits(theirs)) <= FP32_TOL, name
    save_peft_adapter(ours, tmp_path / "only_b", adapter_name="b")  # PEFT's place for it: the sub-folder
    assert (tmp_path / "only_b" / "b" / "adapter_config.json").exists()
    assert not (tmp_path / "only_b" / "adapter_config.json").exists()


def test_delete_adapter_as_peft():
    base = llama()
    theirs, ours = peft_pair(base)
    theirs.set_adapter("b")
    set_adapter(ours, "b")
    theirs.delete_adapter("b")
    delete_adapter(ours, "b")
    assert adapter_names(ours) == ["default"] and active_adapter(ours) == "default"
    assert relative(logits(ours), logits(theirs)) <= FP32_TOL
    delete_adapter(ours, "default")  # every layer left without adapters: the base model's numbers
    assert adapter_names(ours) == [] and relative(logits(ours), logits(base)) == 0
    assert not any(p.requires_grad for p in ours.parameters())


def test_from_peft_runs_the_active_one_of_several(monkeypatch):
    calls = []
    original = peft_ops.peft.from_peft.lora_linear
    monkeypatch.setattr(peft_ops.peft.from_peft, "lora_linear", lambda *a, **k: calls.append(a[2]) or original(*a, **k))
    theirs, _ = peft_pair(llama())
    fused = copy.deepcopy(theirs)
    report = peft_ops.from_peft(fused)
    assert len(report.swapped) == 6 and not report.skipped  # q, k, v of both layers
    for name in ("default", "b"):
        theirs.set_adapter(name)
        fused.set_adapter(name)
        calls.clear()
        assert relative(logits(fused), logits(theirs)) <= FP32_TOL, name
        assert calls and all(A.shape[0] == (4 if name == "default" else 2) for A in calls)


def test_second_adapter_on_qlora_and_dora_layers_starts_as_the_base():
    """add_adapter on QLoRA and DoRA layers: PEFT's initialization (B = 0, the magnitude ‖W‖), so
    switching to the new adapter gives the base layer's numbers; its own rank and scaling."""
    base = llama()
    for kw in (dict(quantize="nf4"), dict(use_dora=True)):
        model = apply_lora(copy.deepcopy(base), ["q_proj"], r=4, **kw)
        add_adapter(model, "second", ["q_proj"], r=2, lora_alpha=6, use_dora=True)
        layer = model.model.layers[0].self_attn.q_proj
        assert layer.adapter("second").lora_A.shape == (2, 32) and layer.adapter("second").scaling == 3.0
        with disable_adapters(model):
            expected = logits(model)
        set_adapter(model, "second")
        assert relative(logits(model), expected) <= FP32_TOL, kw


BAD = [
    (lambda m: set_adapter(m, "nope"), ValueError, "nope"),
    (lambda m: set_adapter(m, "a.b"), ValueError, "adapter_name"),
    (lambda m: delete_adapter(m, "nope"), ValueError, "nope"),
    (lambda m: add_adapter(m, "default", ["q_proj"]), ValueError, "already"),
    (lambda m: add_adapter(m, 3, ["q_proj"]), TypeError, "adapter_name"),
    (lambda m: add_adapter(m, "c", ["q_proj"], modules_to_save=["lm_head"]), ValueError, "several adapters"),
    (lambda m: save_peft_adapter(m, "/nonexistent/x", adapter_name="nope"), ValueError, "nope"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_names_change_nothing(case):
    call, error, match = BAD[case]
    _, ours = peft_pair(llama())
    before = copy.deepcopy(ours.state_dict())
    trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    with pytest.raises(error, match=match):
        call(ours)
    assert ours.state_dict().keys() == before.keys()
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before.items())
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == trained


def test_merge_and_unload_takes_the_active_adapter():
    """merge_and_unload folds the active adapter; a layer that does not hold it keeps its base
    weight (PEFT's merge of the active adapter)."""
    base = llama()
    theirs, ours = peft_pair(base)
    theirs.set_adapter("b")
    set_adapter(ours, "b")
    expected = logits(theirs)
    assert "adapters=['default', 'b']" in repr(ours.model.layers[0].self_attn.q_proj)
    merged = peft_ops.merge_and_unload(ours)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert relative(logits(merged), expected) <= FP32_TOL

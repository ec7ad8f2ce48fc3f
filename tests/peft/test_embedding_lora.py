"""LoRA on embeddings against PEFT's ``lora.Embedding`` on a tiny Llama: apply_lora with
``embed_tokens`` among the targets trains as PEFT does (three SGD steps, equal logits and
adapters), PEFT's files (``lora_embedding_A`` / ``lora_embedding_B``, and the table PEFT saves
beside them) both ways, from_peft, and the layer itself: initialization, padding, merge."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import peft_ops
from peft_ops import LoraEmbedding, apply_lora, load_peft_adapter, save_peft_adapter
from peft_ops.tools.accuracy import assert_close

from helpers.tiny_llama import ids, llama

peft = pytest.importorskip("peft")

TARGETS = ["embed_tokens", "q_proj", "v_proj"]
FP32_TOL = 1e-5  # fp32 on both sides, sums in different orders (measured ≤ 2.9e-7)


def relative(ours, theirs):
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()


def peft_model(base):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # A off zero (PEFT starts an embedding's A at zero), B off zero
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def ours_like(base, theirs):
    model = apply_lora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8)
    assert isinstance(model.model.embed_tokens, LoraEmbedding)
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                key = "base_model.model." + name.replace("lora_A", "lora_A.default.weight").replace(
                    "lora_B", "lora_B.default.weight").replace("lora_embedding_A", "lora_embedding_A.default").replace(
                    "lora_embedding_B", "lora_embedding_B.default")
                p.copy_(params[key])
    return model


def step(model, seed):
    x = ids(seed)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p -= 0.1 * p.grad
                p.grad = None


def test_three_steps_equal_peft():
    base = llama()
    theirs = peft_model(base)
    ours = ours_like(base, theirs)
    for seed in range(3):
        step(theirs, seed)
        step(ours, seed)
    with torch.no_grad():
        assert relative(ours(input_ids=ids(5)).logits, theirs(input_ids=ids(5)).logits) <= FP32_TOL
    peft_embedding = theirs.base_model.model.model.embed_tokens
    assert relative(ours.model.embed_tokens.lora_embedding_A, peft_embedding.lora_embedding_A["default"]) <= FP32_TOL
    assert relative(ours.model.embed_tokens.lora_embedding_B, peft_embedding.lora_embedding_B["default"]) <= FP32_TOL


def test_files_both_ways(tmp_path):
    base = llama()
    theirs = peft_model(base)
    ours = ours_like(base, theirs)
    x = ids(3)
    save_peft_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "peft")  # with the table itself (PEFT's save_embedding_layers)
    with torch.no_grad():
        assert relative(loaded(input_ids=x).logits, ours(input_ids=x).logits) <= FP32_TOL
        mine = load_peft_adapter(copy.deepcopy(base), tmp_path / "peft")
        assert isinstance(mine.model.embed_tokens, LoraEmbedding)
        assert relative(mine(input_ids=x).logits, theirs(input_ids=x).logits) <= FP32_TOL


def test_from_peft_swaps_the_embedding(monkeypatch):
    calls = []
    original = peft_ops.peft.from_peft.lora_embedding
    monkeypatch.setattr(peft_ops.peft.from_peft, "lora_embedding", lambda *a, **k: calls.append(1) or original(*a, **k))
    theirs = peft_model(llama())
    fused = copy.deepcopy(theirs)
    report = peft_ops.from_peft(fused)
    assert "base_model.model.model.embed_tokens" in report.swapped and not report.skipped
    x = ids(2)
    for model in (theirs, fused):
        model(input_ids=x, labels=x).loss.backward()
    assert calls == [1]
    with torch.no_grad():
        assert relative(fused(input_ids=x).logits, theirs(input_ids=x).logits) <= FP32_TOL
    grads = dict(theirs.named_parameters())
    for name, p in fused.named_parameters():
        if p.requires_grad:
            assert relative(p.grad, grads[name].grad) <= FP32_TOL, name


def test_layer_initialization_padding_merge_and_unload():
    torch.manual_seed(0)
    embedding = nn.Embedding(30, 12, padding_idx=2)
    layer = LoraEmbedding.from_embedding(embedding, r=4, lora_alpha=8)
    assert layer.weight is embedding.weight and not layer.weight.requires_grad
    assert torch.count_nonzero(layer.lora_embedding_A) == 0 and layer.lora_embedding_B.std() > 0.5  # PEFT's init
    x = torch.tensor([[2, 5, 5, 29]])
    assert torch.equal(layer(x), embedding(x))  # A = 0: the layer starts as the embedding
    with torch.no_grad():
        layer.lora_embedding_A.normal_()
    expected = embedding.weight.double()[x] + 2.0 * (layer.lora_embedding_A.double().t()[x]
                                                     @ layer.lora_embedding_B.double().t())
    layer(x).sum().backward()
    assert torch.count_nonzero(layer.lora_embedding_A.grad[:, 2]) == 0  # padding_idx
    with torch.no_grad():
        assert_close(layer(x), expected, torch.float32, "forward")
        layer.merge()
        assert_close(layer(x), expected, torch.float32, "merged")
        layer.unmerge()
        assert_close(layer.weight, embedding.weight.double(), torch.float32, "unmerged")
        merged = peft_ops.merge_and_unload(nn.Sequential(layer))[0]
        assert type(merged) is nn.Embedding and merged.padding_idx == 2
        assert_close(merged(x), expected, torch.float32, "merge_and_unload")


def test_refusals_change_nothing():
    model = llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="use_dora"):
        apply_lora(model, ["embed_tokens", "q_proj"], use_dora=True)
    assert not any(isinstance(m, (LoraEmbedding, peft_ops.LoraLinear)) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="max_norm"):
        LoraEmbedding.from_embedding(nn.Embedding(10, 4, max_norm=1.0))

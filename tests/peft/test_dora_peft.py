"""DoRA / QDoRA against Hugging Face PEFT's DoRA layers on a tiny Llama built from a config
(dense, and over a bitsandbytes 4-bit base): one training step with dropout — the same keep
masks replayed into PEFT — with equal logits and gradients; PEFT's DoRA files both ways;
from_peft on DoRA models; merge; the layers; and the bytes each saves for backward."""

import copy

import pytest
import torch
import torch.nn as nn

import peft_ops
from peft_ops import LoraLinear, QLoraLinear, apply_lora, load_peft_adapter, reference, save_peft_adapter
from peft_ops.ops import dora as dora_ops
from peft_ops.ops.autograd import torch_keep_mask
from peft_ops.tools.accuracy import saved_activation_bytes

from helpers.tiny_llama import ids, llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
FP32_TOL = 1e-5  # fp32 logits and gradients: PEFT's and ours differ by summation order only
PATHS = ["triton", "torch"]


def randomize(model, seed=1):
    """Nonzero B and a magnitude moved off the norms, so every DoRA term counts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))


def peft_dora(base, **config):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=TARGETS, use_dora=True,
                                                                     **config))
    randomize(model)
    return model


def dora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoraLinear, QLoraLinear))}


def relative(ours, theirs):
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()


class ReplayDropout(nn.Module):
    """PEFT's dropout replaced by the keep mask our op drew at the same call (in call order)."""

    def __init__(self, masks: list, p: float):
        super().__init__()
        self.masks, self.p = masks, p

    def forward(self, x):
        return x * self.masks.pop(0)(x).to(x.dtype) / (1 - self.p)


def record_masks(monkeypatch, path: str, p: float) -> list:
    """Record the dropout seed of every DoRA call; the list holds, in call order, a function
    of x that rebuilds that call's keep mask as `path` draws it."""
    masks = []
    original = dora_ops.draw_seed

    def draw(ops, dropout_p):
        seed = original(ops, dropout_p)

        def mask(x, seed=seed):
            K = x.shape[-1]
            M = x.numel() // K
            if path == "triton":
                keep = reference.dropout_keep_mask(seed, K, p, range(M), range(K))
            else:
                keep = torch_keep_mask(seed, M, K, p, x.device)
            return keep.view(x.shape)
        masks.append(mask)
        return seed
    monkeypatch.setattr(dora_ops, "draw_seed", draw)
    return masks


def replay_into_peft(peft_model, masks, p):
    for module in peft_model.modules():
        if hasattr(module, "lora_dropout") and "default" in getattr(module, "lora_dropout", {}):
            module.lora_dropout["default"] = ReplayDropout(masks, p)


@pytest.mark.parametrize("path", PATHS)
def test_one_training_step_with_dropout_matches_peft(path, monkeypatch, tmp_path):
    """Logits, loss and every adapter gradient (A, B, magnitude) of one training step with
    dropout 0.1, ours (PEFT's file loaded) against PEFT's DoRA, the same masks."""
    p = 0.1
    base = llama()
    theirs = peft_dora(base, r=4, lora_alpha=8, lora_dropout=p)
    theirs.save_pretrained(tmp_path)
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path)
    assert all(layer.use_dora for layer in dora_layers(ours).values()) and len(dora_layers(ours)) == 6
    masks = record_masks(monkeypatch, path, p)
    x = ids()
    ours.train()
    theirs.train()
    with peft_ops.use_backend(path):
        out = ours(x, labels=x)
    out.loss.backward()
    assert len(masks) == 6
    replay_into_peft(theirs, masks, p)
    ref = theirs(input_ids=x, labels=x)
    ref.loss.backward()
    assert not masks  # every mask replayed, in order
    assert relative(out.logits, ref.logits) <= FP32_TOL
    for name, layer in dora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        for ours_p, their_p in ((layer.lora_A, peft_layer.lora_A["default"].weight),
                                (layer.lora_B, peft_layer.lora_B["default"].weight),
                                (layer.lora_magnitude_vector, peft_layer.lora_magnitude_vector["default"].weight)):
            assert relative(ours_p.grad, their_p.grad) <= FP32_TOL, name


@pytest.mark.parametrize("path", PATHS)
def test_fp32_adapters_on_a_bf16_layer_get_fp32_gradients(path):
    """PEFT's default on a bf16 model: fp32 adapters (and magnitude). One layer, the same bf16 x
    and dY: dA and dB equal PEFT's to fp32 (both scale the rank terms by c in fp32; rounding dY⊙c
    to bf16 on the way would leave them ≈ 1.6e-3 apart), y and dX to bf16."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.lin = nn.Linear(96, 80, bias=True).to(torch.bfloat16)
    theirs = peft.get_peft_model(holder, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["lin"], use_dora=True))
    randomize(theirs)
    layer = theirs.base_model.model.lin
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    assert A.dtype == B.dtype == m.dtype == torch.float32
    x = torch.randn(40, 96).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(40, 80).to(torch.bfloat16)
    layer(x).backward(dy)
    ours = {name: t.detach().clone().requires_grad_() for name, t in (("x", x), ("A", A), ("B", B), ("m", m))}
    with peft_ops.use_backend(path):
        y = peft_ops.dora_linear(ours["x"], layer.base_layer.weight, ours["A"], ours["B"], ours["m"], 2.0,
                                 layer.base_layer.bias)
    y.backward(dy)
    assert relative(y, layer(x)) <= 2 * 2.0**-8
    assert relative(ours["x"].grad, x.grad) <= 2 * 2.0**-8
    assert relative(ours["A"].grad, A.grad) <= FP32_TOL
    assert relative(ours["B"].grad, B.grad) <= FP32_TOL
    assert relative(ours["m"].grad, m.grad) <= 2 * 2.0**-8  # Σ dY·pre: pre is in x's dtype on both sides


def test_bf16_logits_and_gradients_within_bf16_tolerance(tmp_path):
    """A bf16 model with PEFT's fp32 adapters (its default): within bf16's tolerance of PEFT."""
    base = llama(dtype=torch.bfloat16)
    theirs = peft_dora(base, r=4, lora_alpha=8)
    theirs.save_pretrained(tmp_path)
    ours = load_peft_adapter(copy.deepcopy(base), tmp_path)
    layer = next(iter(dora_layers(ours).values()))
    assert layer.lora_A.dtype == layer.lora_magnitude_vector.dtype == torch.float32
    x = ids()
    out = ours(x, labels=x)
    out.loss.backward()
    ref = theirs(input_ids=x, labels=x)
    ref.loss.backward()
    tol = 8 * 2.0**-8  # a 2-layer model: a few bf16 roundings of every activation, on both sides
    assert relative(out.logits, ref.logits) <= tol
    for name, layer in dora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert relative(layer.lora_magnitude_vector.grad, peft_layer.lora_magnitude_vector["default"].weight.grad) \
            <= tol, name
        assert relative(layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad) <= tol, name


def test_peft_loads_our_dora_files_with_our_logits(tmp_path):
    base = llama()
    ours = apply_lora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8, use_dora=True)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{p}" for name in dora_layers(ours)
                         for p in ("lora_A", "lora_B", "lora_magnitude_vector")}
    randomize(ours)
    save_peft_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert theirs.peft_config["default"].use_dora
    x = ids()
    with torch.no_grad():
        assert relative(ours(x).logits, theirs(input_ids=x).logits) <= FP32_TOL


def test_magnitude_starts_at_the_column_norms_as_in_peft():
    base = llama()
    ours = apply_lora(copy.deepcopy(base), TARGETS, r=4, use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=TARGETS, r=4, use_dora=True))
    for name, layer in dora_layers(ours).items():
        peft_m = theirs.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight
        assert relative(layer.lora_magnitude_vector, peft_m) <= FP32_TOL
    with torch.no_grad():  # B = 0 and m = ‖W‖: the model computes what it did
        assert relative(ours(ids()).logits, base(ids()).logits) <= FP32_TOL


def test_from_peft_swaps_dora_layers(monkeypatch):
    calls = []
    original = peft_ops.peft.from_peft.dora_linear
    monkeypatch.setattr(peft_ops.peft.from_peft, "dora_linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    reference_model = peft_dora(llama(), r=4, lora_alpha=8)
    fused = copy.deepcopy(reference_model)
    keys = list(fused.state_dict())
    report = peft_ops.from_peft(fused)
    assert len(report.swapped) == 6 and not report.skipped
    assert list(fused.state_dict()) == keys
    x = ids()
    for model in (reference_model, fused):
        model(input_ids=x, labels=x).loss.backward()
    assert len(calls) == 6
    with torch.no_grad():
        assert relative(fused(input_ids=x).logits, reference_model(input_ids=x).logits) <= FP32_TOL
    grads = dict(reference_model.named_parameters())
    for name, p in fused.named_parameters():
        if p.requires_grad:
            assert relative(p.grad, grads[name].grad) <= FP32_TOL, name


def llama_4bit(bnb, seed=0):
    """The tiny Llama (64 wide: rows of whole NF4 blocks, see `llama`) with its target layers as
    bitsandbytes 4-bit NF4 layers (quantized on CPU)."""
    model = llama(seed, hidden=64, intermediate=128)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)._quantize("cpu")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    return model


@pytest.mark.parametrize("path", PATHS)
def test_qdora_over_bitsandbytes_matches_peft_with_dropout(path, monkeypatch):
    """PEFT's DoRA over bitsandbytes 4-bit layers, swapped by from_peft to qdora_linear: one
    training step with dropout, the same masks, equal logits and gradients."""
    bnb = pytest.importorskip("bitsandbytes")
    p = 0.1
    theirs = peft_dora(llama_4bit(bnb), r=4, lora_alpha=8, lora_dropout=p)
    ours = copy.deepcopy(theirs)
    report = peft_ops.from_peft(ours)
    assert len(report.swapped) == 6, report
    assert all(type(ours.get_submodule(n)).__name__.startswith("FusedNF4") for n in report.swapped)
    masks = record_masks(monkeypatch, path, p)
    x = ids()
    ours.train()
    theirs.train()
    with peft_ops.use_backend(path):
        out = ours(input_ids=x, labels=x)
    out.loss.backward()
    assert len(masks) == 6
    replay_into_peft(theirs, masks, p)
    ref = theirs(input_ids=x, labels=x)
    ref.loss.backward()
    assert relative(out.logits, ref.logits) <= FP32_TOL
    grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if param.requires_grad:
            assert relative(param.grad, grads[name].grad) <= FP32_TOL, name


def test_merge_unmerge_and_merge_and_unload_match_peft():
    base = llama()
    theirs = peft_dora(base, r=4, lora_alpha=8)
    ours = copy.deepcopy(theirs)
    peft_ops.from_peft(ours)
    # our layers, loaded from the same weights
    layer = LoraLinear.from_linear(nn.Linear(32, 48), r=4, lora_alpha=8, use_dora=True)
    randomize(layer)
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = layer(x)
        weight = layer.weight.clone()
        layer.merge()
        assert relative(layer(x), expected) <= FP32_TOL
        layer.unmerge()
        assert relative(layer.weight, weight) <= FP32_TOL
        assert relative(layer(x), expected) <= FP32_TOL
        with layer.disable_adapter():
            assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    # a whole model: our merge_and_unload against PEFT's
    model = apply_lora(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8, use_dora=True)
    for name, ours_layer in dora_layers(model).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            ours_layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
            ours_layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
            ours_layer.lora_magnitude_vector.copy_(peft_layer.lora_magnitude_vector["default"].weight)
    merged_ours = peft_ops.merge_and_unload(model)
    merged_theirs = theirs.merge_and_unload()
    for name in TARGETS:
        a = merged_ours.model.layers[1].get_submodule({"q_proj": "self_attn.q_proj", "v_proj": "self_attn.v_proj",
                                                       "down_proj": "mlp.down_proj"}[name])
        b = merged_theirs.model.layers[1].get_submodule({"q_proj": "self_attn.q_proj", "v_proj": "self_attn.v_proj",
                                                         "down_proj": "mlp.down_proj"}[name])
        assert type(a) is nn.Linear and relative(a.weight, b.weight) <= FP32_TOL, name


def test_qlora_layer_with_dora_merged_linear():
    layer = QLoraLinear.from_linear(nn.Linear(64, 40), r=4, lora_alpha=8, use_dora=True)
    randomize(layer)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert relative(layer.merged_linear(torch.float32)(x), layer(x)) <= FP32_TOL


def test_saved_bytes_against_peft():
    """What each DoRA layer keeps for backward, measured (bf16 x, fp32 adapters, dropout 0.1,
    M = 64, 96 → 80, r = 8). Ours: x + xa (M·r fp32) + pre (M·N) + the packed mask + two [N]
    vectors. PEFT: x, the dropped-out x (two dtypes), W + s·B·A and its pieces, and more."""
    M, K, N, r = 64, 96, 80, 8
    torch.manual_seed(0)
    linear = nn.Linear(K, N).to(torch.bfloat16)
    ours = LoraLinear.from_linear(copy.deepcopy(linear), r=r, lora_dropout=0.1, adapter_dtype=torch.float32,
                                  use_dora=True).train()
    theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(linear)),
                                 peft.LoraConfig(target_modules=["0"], r=r, lora_dropout=0.1, use_dora=True)).train()
    x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    ours_bytes, _, _ = saved_activation_bytes(lambda: ours(x), [x, *ours.parameters()])
    theirs_bytes, _, _ = saved_activation_bytes(lambda: theirs(x), [x, *theirs.parameters()])
    budget = M * r * 4 + M * N * 2 + M * 3 * 4 + 2 * N * 4  # K = 96: 3 mask words per row
    assert ours_bytes == budget
    assert theirs_bytes > 3 * ours_bytes, (ours_bytes, theirs_bytes)

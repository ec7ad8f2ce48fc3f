"""The architecture matrix: the same LoRA config applied by PEFT (``get_peft_model``) and by us
(``apply_lora(model, config)``) to tiny models of seven architectures built from transformers
configs — Llama, Qwen2 (grouped-query attention, q/k/v biases), GPT-2 (Conv1D), GPT-NeoX, OPT,
BERT for sequence classification (a trained head: ``modules_to_save``) and T5
(encoder-decoder). From the same adapter weights, three SGD steps on three batches (dropout 0):
equal logits and adapter weights; our files load in PEFT and PEFT's in ours; QLoRA on Llama and
GPT-2 against PEFT over bitsandbytes' 4-bit layers."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import peft_ops
from peft_ops import apply_lora, load_peft_adapter, save_peft_adapter

from helpers.architectures import ARCHITECTURES

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PREFIX = "base_model.model."
STEPS, LR = 3, 0.1
# fp32 on both sides, sums in different orders; measured after three steps: ≤ 1.5e-6 (logits)
# and ≤ 5.2e-7 (adapter weights) across the matrix.
FP32_TOL = 1e-5
QLORA_TOL = 1e-5  # ours against the float64 oracle over the exact NF4 values (measured ≤ 2.8e-6)
BNB_TOL = 1e-3  # PEFT over bitsandbytes' CPU 4-bit matmul against that oracle (measured ≤ 1.7e-4)


def relative(ours, theirs, floor: float = 0.0) -> float:
    scale = max(theirs.double().abs().max().item(), floor)
    return (ours.double() - theirs.double()).abs().max().item() / scale


def lora_config(arch, **overrides):
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=arch.targets,
                           fan_in_fan_out=arch.conv1d, modules_to_save=list(arch.modules_to_save) or None,
                           **overrides)


def peft_model(arch, base, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and the like
        model = peft.get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B off zero, so the first step's gradients reach A too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def our_name(peft_name: str) -> str:
    """PEFT's parameter name as ours: no prefix, no adapter name, no ModulesToSaveWrapper or
    base-layer level."""
    name = peft_name.removeprefix(PREFIX)
    for part in ("lora_A", "lora_B"):
        name = name.replace(f".{part}.default.weight", f".{part}")
    return name.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def copy_adapters(theirs, ours) -> None:
    """Our trainable parameters set to PEFT's, name by name (both sets must be the same)."""
    mine = trainable(ours)
    names = {our_name(n): p for n, p in trainable(theirs).items()}
    assert sorted(mine) == sorted(names), (sorted(set(mine) ^ set(names)))
    with torch.no_grad():
        for name, p in mine.items():
            p.copy_(names[name])


def train(model, arch, steps=STEPS):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        loss = model(**arch.batch(gen)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def logits(model, arch):
    with torch.no_grad():
        return model(**arch.batch(torch.Generator().manual_seed(3))).logits


def assert_same_adapters(ours, theirs, tol=None):
    """Every trained parameter, relative to its largest value — at least 1e-3: a key projection's
    bias (bias="all") has no gradient in exact arithmetic (softmax ignores a shift shared by all
    keys), so from zero it only gathers rounding noise, different on each side."""
    names = {our_name(n): p for n, p in trainable(theirs).items()}
    for name, p in trainable(ours).items():
        assert relative(p, names[name], floor=1e-3) <= (tol or FP32_TOL), name


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_three_steps_equal_peft(name):
    arch = ARCHITECTURES[name]
    base = arch.build()
    config = lora_config(arch)
    theirs = peft_model(arch, base, config)
    ours = apply_lora(copy.deepcopy(base), config)
    swapped = [n for n, m in ours.named_modules() if isinstance(m, peft_ops.LoraLinear)]
    peft_layers = [n.removeprefix(PREFIX) for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert sorted(swapped) == sorted(peft_layers) and swapped
    assert all(ours.get_submodule(n).fan_in_fan_out == arch.conv1d for n in swapped)
    copy_adapters(theirs, ours)
    assert relative(logits(ours, arch), logits(theirs, arch)) <= FP32_TOL
    train(theirs, arch)
    train(ours, arch)
    assert relative(logits(ours, arch), logits(theirs, arch)) <= FP32_TOL
    assert_same_adapters(ours, theirs)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_files_both_ways(name, tmp_path):
    """Ours saved → ``PeftModel.from_pretrained`` gives our logits; PEFT's ``save_pretrained`` →
    ``load_peft_adapter`` gives PEFT's."""
    arch = ARCHITECTURES[name]
    base = arch.build()
    config = lora_config(arch)
    theirs = peft_model(arch, base, config)
    train(theirs, arch, steps=1)  # the head (modules_to_save) off its initial values too
    ours = apply_lora(copy.deepcopy(base), config)
    copy_adapters(theirs, ours)
    assert_files_both_ways(arch, base, ours, theirs, tmp_path)


def assert_files_both_ways(arch, base, ours, theirs, tmp_path):
    """Our folder → PEFT's model with our logits; PEFT's folder → ours with PEFT's logits, the
    same trained parameters."""
    save_peft_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert relative(logits(loaded, arch), logits(ours, arch)) <= FP32_TOL
    theirs.save_pretrained(tmp_path / "peft")
    mine = load_peft_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert relative(logits(mine, arch), logits(theirs, arch)) <= FP32_TOL
    assert sorted(trainable(mine)) == sorted(trainable(ours))
    assert_same_adapters(mine, theirs)


def quantized_4bit(bnb, model, targets):
    """`model` with its target layers as bitsandbytes 4-bit NF4 layers quantized on the CPU (a
    Conv1D's weight [in, out] quantized as W [out, in], as transformers quantizes GPT-2)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        weight = module.weight.data.t() if peft_ops.nn.lora.is_conv1d(module) else module.weight.data
        q = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=module.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)._quantize("cpu")
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    return model


def dequantized(model, targets, dtype=torch.float64):
    """`model` in `dtype` with each target weight replaced by its exact NF4 values (ours and
    bitsandbytes' are the same bytes): the float64 oracle of QLoRA."""
    model = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in targets:
                conv1d = peft_ops.nn.lora.is_conv1d(module)
                weight = module.weight.t() if conv1d else module.weight
                weight.copy_(peft_ops.nf4.quantize(weight.float()).dequantize(torch.float32))
    return model


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_qlora_three_steps_equal_peft_over_bitsandbytes(name):
    """QLoRA: ``apply_lora(model, config, quantize="nf4")`` against PEFT over the same weights
    quantized by bitsandbytes (the same NF4 bytes), and both against PEFT in float64 over the
    exact NF4 values, from the same adapters through three SGD steps. Ours stays at fp32
    accuracy; PEFT over bitsandbytes' CPU 4-bit matmul does not (a layer's output measured
    7.7e-4 off its exact product, ours ≤ 1e-7), so the two are held to that bound."""
    bnb = pytest.importorskip("bitsandbytes")
    arch = ARCHITECTURES[name]
    # width 64: every row a whole number of NF4 blocks. bitsandbytes' CPU dequantize_4bit (0.50)
    # decodes blocks that straddle rows wrongly (in_features 32: off by 0.3 from its own format)
    base = arch.build(hidden=64)
    config = lora_config(arch)
    config.fan_in_fan_out = False  # PEFT over Linear4bit: W [out, in]
    theirs = peft_model(arch, quantized_4bit(bnb, base, arch.targets), config)
    exact = peft_model(arch, dequantized(base, arch.targets), lora_config(arch))
    ours = apply_lora(copy.deepcopy(base), lora_config(arch), quantize="nf4")  # Conv1D: layout from the module
    assert sum(isinstance(m, peft_ops.QLoraLinear) for m in ours.modules()) == \
        sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in theirs.modules()) > 0
    copy_adapters(theirs, ours)
    with torch.no_grad():
        for (_, p), (_, q) in zip(trainable(theirs).items(), trainable(exact).items(), strict=True):
            q.copy_(p)
    for step in (0, STEPS):
        if step:
            for model in (theirs, exact, ours):
                train(model, arch)
        oracle = logits(exact, arch)
        assert relative(logits(ours, arch), oracle) <= QLORA_TOL, step
        assert relative(logits(theirs, arch), oracle) <= BNB_TOL, step
    assert_same_adapters(ours, exact, QLORA_TOL)
    assert_same_adapters(ours, theirs, BNB_TOL)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
@pytest.mark.parametrize("name", ["bert_seq_cls", "gpt2"])
def test_trained_biases_equal_peft(name, bias, tmp_path):
    """PEFT's ``bias="lora_only"`` (the LoRA layers' biases train) and ``"all"`` (every bias):
    the same parameters train, three steps equal PEFT's, and the files go both ways (PEFT keys a
    LoRA layer's bias ``<module>.base_layer.bias``)."""
    arch = ARCHITECTURES[name]
    base = arch.build()
    config = lora_config(arch, bias=bias)
    theirs = peft_model(arch, base, config)
    ours = apply_lora(copy.deepcopy(base), config)
    copy_adapters(theirs, ours)  # asserts the same trainable set, biases included
    assert any(n.endswith(".bias") for n in trainable(ours))
    train(theirs, arch)
    train(ours, arch)
    assert relative(logits(ours, arch), logits(theirs, arch)) <= FP32_TOL
    assert_same_adapters(ours, theirs)
    assert_files_both_ways(arch, base, ours, theirs, tmp_path)


def test_sequence_classification_task_type_trains_the_head_as_peft(tmp_path):
    """task_type="SEQ_CLS" without modules_to_save: PEFT's task model trains the classifier head
    too; so does apply_lora(model, config) — the same trainable set, three steps equal, and the
    files both ways (PEFT's config then lists "classifier" and "score")."""
    arch = ARCHITECTURES["bert_seq_cls"]
    base = arch.build()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=arch.targets, task_type="SEQ_CLS")
    ours = apply_lora(copy.deepcopy(base), copy.deepcopy(config))
    theirs = peft_model(arch, base, config)
    assert any(n.startswith("classifier.") for n in trainable(ours))
    copy_adapters(theirs, ours)  # asserts the same trainable set
    train(theirs, arch)
    train(ours, arch)
    assert relative(logits(ours, arch), logits(theirs, arch)) <= FP32_TOL
    assert_same_adapters(ours, theirs)
    assert_files_both_ways(arch, base, ours, theirs, tmp_path)

"""Mixed adapter batches in training: each sample runs its own named adapter (or the base alone)
through ``mixed_adapter_batch`` on our layers, and through PEFT's ``adapter_names=`` after
``from_peft``. Every logit and every adapter's gradient equals separate single-adapter runs on
that adapter's samples (a summed loss, so each sample's gradient lands where it belongs)."""

import copy
import importlib
import pathlib
import sys

import pytest
import torch

import peft_ops

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "helpers"))
from tiny_llama import llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
NAMES = ["t1", "t2", "__base__", "t3", "t1", "t2"]  # sample i runs NAMES[i]
TOL = 1e-5  # fp32: the grouped op against separate runs, relative to the largest value


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def batch():
    return torch.randint(0, 64, (len(NAMES), 7), generator=torch.Generator().manual_seed(3))


def summed_loss(model, ids):
    logits = model(ids).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="sum"), logits


def three_adapters(quantize=None, **size):
    model = peft_ops.apply_lora(llama(**size), TARGETS, r=4, lora_alpha=8, adapter_name="t1", quantize=quantize)
    peft_ops.add_adapter(model, "t2", TARGETS, r=8, lora_alpha=8)
    peft_ops.add_adapter(model, "t3", TARGETS[:2], r=16, lora_alpha=32)  # t3 on the attention layers only
    return train_every_adapter(model)


def train_every_adapter(model):
    """Every LoRA parameter trainable, each lora_B past its zero init (so every gradient is nonzero)."""
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
            if "lora_B" in name:
                with torch.no_grad():
                    param.normal_(0, 0.1)
    return model.train()


def adapter_grads(model, adapter):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and
            peft_ops_adapter_of(n) == adapter}


def peft_ops_adapter_of(name):
    """Which adapter a parameter of our layers belongs to: named_adapters.<name>.… or the first ("t1")."""
    parts = name.split(".")
    return parts[parts.index("named_adapters") + 1] if "named_adapters" in parts else "t1"


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_mixed_batch_trains_each_adapter_on_its_own_samples(quantize):
    size = dict(hidden=64, intermediate=128) if quantize else {}
    model = three_adapters(quantize, **size)
    ids = batch()
    with peft_ops.mixed_adapter_batch(model, NAMES):
        loss, logits = summed_loss(model, ids)
    loss.backward()
    with peft_ops.use_backend("torch"):  # the single runs on the PyTorch path too: fast (the op tests hold it)
        for adapter in ("t1", "t2", "t3", "__base__"):
            rows = [i for i, n in enumerate(NAMES) if n == adapter]
            single = copy.deepcopy(model)
            single.zero_grad()
            if adapter == "__base__":
                with peft_ops.disable_adapters(single):
                    _, alone = summed_loss(single, ids[rows])
                assert relative(logits[rows].detach(), alone.detach()) <= TOL
                continue
            peft_ops.set_adapter(single, adapter)
            loss_k, alone = summed_loss(single, ids[rows])
            loss_k.backward()
            assert relative(logits[rows].detach(), alone.detach()) <= TOL, adapter
            want = adapter_grads(single, adapter)
            got = {n: p.grad for n, p in model.named_parameters() if n in want}
            assert want and set(got) == set(want)
            for name in want:
                assert relative(got[name], want[name]) <= TOL, (adapter, name)


def test_mixed_batch_bad_input_and_reset():
    model = three_adapters()
    with pytest.raises(ValueError, match="'z'"):
        with peft_ops.mixed_adapter_batch(model, ["t1", "z"]):
            pass
    with pytest.raises(TypeError, match="adapter_names"):
        with peft_ops.mixed_adapter_batch(model, "t1"):
            pass
    with pytest.raises(ValueError, match="2 samples"):
        with peft_ops.mixed_adapter_batch(model, ["t1", "t2"]):
            model(batch())
    layers = [m for m in model.modules() if hasattr(m, "batch_adapters")]
    assert layers and all(m.batch_adapters is None for m in layers)  # reset after the error


def test_from_peft_mixed_batch_in_training_mode():
    """A PeftModel with three adapters (ranks 4, 8, 16) after from_peft: ``model(ids,
    adapter_names=[…])`` in training mode (PEFT alone refuses it) trains each adapter on its own
    samples through the grouped op."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(llama(), peft.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8), "t1")
    model.add_adapter("t2", peft.LoraConfig(target_modules=TARGETS, r=8, lora_alpha=8))
    model.add_adapter("t3", peft.LoraConfig(target_modules=TARGETS[:2], r=16, lora_alpha=32))
    train_every_adapter(model)
    reference = copy.deepcopy(model)
    report = peft_ops.from_peft(model)
    assert len(report.swapped) == 8 and not report.skipped
    calls = []
    module = importlib.import_module("peft_ops.peft.from_peft")
    original = module.multi_lora_linear

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    module.multi_lora_linear = spy
    try:
        ids = batch()
        logits = model(input_ids=ids, adapter_names=NAMES).logits
    finally:
        module.multi_lora_linear = original
    assert len(calls) == 8  # every LoRA layer ran the grouped op
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="sum")
    loss.backward()
    for adapter in ("t1", "t2", "t3"):
        rows = [i for i, n in enumerate(NAMES) if n == adapter]
        single = copy.deepcopy(reference)
        single.set_adapter(adapter)
        for name, param in single.named_parameters():
            param.requires_grad_("lora_" in name)
        out = single(input_ids=ids[rows]).logits
        torch.nn.functional.cross_entropy(out.flatten(0, 1), ids[rows].flatten(), reduction="sum").backward()
        assert relative(logits[rows].detach(), out.detach()) <= TOL, adapter
        suffix = f".{adapter}.weight"
        want = {n: p.grad for n, p in single.named_parameters() if n.endswith(suffix) and p.grad is not None}
        got = {n: p.grad for n, p in model.named_parameters() if n in want}
        assert want and set(got) == set(want)
        for name in want:
            assert relative(got[name], want[name]) <= TOL, (adapter, name)
    with pytest.raises(ValueError, match="'z'"):
        model(input_ids=batch(), adapter_names=["t1", "z", "t2", "t3", "t1", "t2"])


def test_mixed_batch_nests_casts_under_autocast_and_refuses_checkpointing():
    model = three_adapters()
    ids = batch()
    with peft_ops.use_backend("torch"):
        with peft_ops.mixed_adapter_batch(model, NAMES):
            outer = model(ids).logits
            with peft_ops.mixed_adapter_batch(model, ["t2"] * len(NAMES)):
                model(ids)
            assert torch.equal(model(ids).logits, outer)  # the outer names came back
        with torch.autocast("cpu", dtype=torch.bfloat16), peft_ops.mixed_adapter_batch(model, NAMES):
            cast = model(ids).logits  # as F.linear under autocast: the layers compute in bf16
        assert relative(cast.float(), outer) <= 0.1 and not torch.equal(cast.float(), outer)
    model.gradient_checkpointing_enable()
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        with peft_ops.mixed_adapter_batch(model, NAMES):
            pass


def test_from_peft_mixed_batch_with_modules_to_save_and_a_copy():
    """PEFT's modules_to_save wrappers get the names too (their per-sample copies), and a deep
    copy of the model binds its own hooks; in training mode, with dropout 0, the logits equal
    PEFT's own mixed batch in eval mode. Gradient checkpointing is refused, not run wrong."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], r=4, lora_alpha=8)
    model = peft.get_peft_model(llama(), peft.LoraConfig(**config), "t1")
    model.add_adapter("t2", peft.LoraConfig(**config))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save.t2" in name:
                param.add_(torch.randn_like(param) * 0.1)
    names = ["t1", "t2", "__base__", "t2", "t1", "t1"]
    ids = batch()
    with torch.no_grad():
        expected = model.eval()(input_ids=ids, adapter_names=names).logits  # PEFT's own, in eval mode
    peft_ops.from_peft(model)
    copied = copy.deepcopy(model).train()
    with torch.no_grad():
        got = copied(input_ids=ids, adapter_names=names).logits
    assert relative(got, expected) <= TOL
    copied.gradient_checkpointing_enable()
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        copied(input_ids=ids, adapter_names=names)

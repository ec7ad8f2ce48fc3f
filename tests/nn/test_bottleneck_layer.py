"""BottleneckAdapter and apply_adapters: identity at init, placements, freezing, training,
state dicts, and bad input rejected before anything changes."""

import copy

import pytest
import torch
import torch.nn as nn

from peft_ops import BottleneckAdapter, WithAdapter, apply_adapters, reference
from peft_ops.tools.accuracy import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
def test_identity_at_init(activation, dtype, device):
    adapter = BottleneckAdapter(40, 12, activation, scaling=2.0, device=device, dtype=dtype)
    x = torch.randn(3, 7, 40, device=device).to(dtype)
    assert torch.equal(adapter(x), x)
    assert adapter.up_weight.abs().sum() == 0 and adapter.down_weight.abs().sum() > 0


def test_layer_matches_reference_once_trained(device):
    adapter = BottleneckAdapter(24, 6, "gelu", scaling=0.5, device=device)
    with torch.no_grad():
        adapter.up_weight.normal_()
        adapter.up_bias.normal_()
    x = torch.randn(5, 24, device=device)
    expected = reference.bottleneck_adapter(x.double(), *(p.double() for p in (
        adapter.down_weight, adapter.down_bias, adapter.up_weight, adapter.up_bias)), "gelu", 0.5)
    assert_close(adapter(x), expected, torch.float32)


def test_dropout_only_in_training(device):
    adapter = BottleneckAdapter(32, 8, dropout=0.5, device=device)
    with torch.no_grad():
        adapter.up_weight.normal_()
    x = torch.randn(16, 32, device=device)
    adapter.eval()
    assert torch.equal(adapter(x), adapter(x))
    adapter.train()
    torch.manual_seed(0)
    first = adapter(x)
    assert not torch.equal(first, adapter(x))


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(bottleneck_size=0), ValueError, "bottleneck_size"),
    (dict(bottleneck_size=-3), ValueError, "bottleneck_size"),
    (dict(bottleneck_size=2.5), TypeError, "bottleneck_size"),
    (dict(hidden_size=0), ValueError, "hidden_size"),
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(activation=None), TypeError, "activation"),
    (dict(scaling=float("nan")), ValueError, "scaling"),
    (dict(dropout=1.0), ValueError, "dropout"),
])
def test_layer_rejects(kwargs, exc, word):
    args = dict(hidden_size=16, bottleneck_size=4) | kwargs
    with pytest.raises(exc, match=word):
        BottleneckAdapter(**args)


def test_layer_rejects_a_wrong_width_and_dtype(device):
    adapter = BottleneckAdapter(16, 4, device=device)
    with pytest.raises(ValueError, match="down_weight"):
        adapter(torch.randn(2, 17, device=device))
    with pytest.raises(TypeError, match="dtype"):
        adapter(torch.randn(2, 16, device=device, dtype=torch.float16))


def test_state_dict_round_trip(device, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = BottleneckAdapter(16, 4, "silu", device=device)
    with torch.no_grad():
        adapter.up_weight.normal_()
    save_file(adapter.state_dict(), tmp_path / "adapter.safetensors")
    again = BottleneckAdapter(16, 4, "silu", device=device)
    again.load_state_dict(load_file(tmp_path / "adapter.safetensors", device=str(device)))
    x = torch.randn(3, 16, device=device)
    assert torch.equal(again(x), adapter(x))


# --------------------------------------------------------------------------------------
# apply_adapters on a tiny transformer (attention returns a tuple, as Hugging Face's do)
# --------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, num_heads=2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)  # (output, None)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = Attention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.self_attn(self.norm1(x))[0]
        return x + self.mlp(self.norm2(x))


class TinyModel(nn.Module):
    def __init__(self, vocab=32, d=24, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def tiny_model(device):
    torch.manual_seed(0)
    return TinyModel().to(device)


def adapter_names(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, WithAdapter))


@pytest.mark.parametrize("placement, targets, wrapped", [
    ("houlsby", ["self_attn", "mlp"], ["layers.0.mlp", "layers.0.self_attn", "layers.1.mlp", "layers.1.self_attn"]),
    ("pfeiffer", ["mlp"], ["layers.0.mlp", "layers.1.mlp"]),
    ("regex", r"layers\.1\.(self_attn|mlp)", ["layers.1.mlp", "layers.1.self_attn"]),
])
def test_placements_freeze_and_keep_outputs(placement, targets, wrapped, device):
    model = tiny_model(device)
    for p in model.parameters():  # frozen first: MultiheadAttention takes another CPU path once frozen
        p.requires_grad_(False)
    ids = torch.randint(0, 32, (2, 9), device=device)
    before = model(ids)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.requires_grad_(True)
    assert apply_adapters(model, targets, bottleneck_size=6, activation="gelu") is model
    assert adapter_names(model) == wrapped
    assert torch.equal(model(ids), before)  # identity at init
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{w}.adapter.{p}" for w in wrapped
                         for p in ("down_weight", "down_bias", "up_weight", "up_bias")}
    for name, value in frozen.items():  # the base weights sit under base_layer now, unchanged
        owner = next(w for w in wrapped + [""] if name.startswith(w))
        new_name = f"{owner}.base_layer{name[len(owner):]}" if owner else name
        assert torch.equal(model.get_parameter(new_name), value)


def test_training_lowers_the_loss(device):
    model = tiny_model(device)
    apply_adapters(model, ["self_attn", "mlp"], bottleneck_size=8, activation="relu", scaling=1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.1)  # few steps (each runs the kernels in the interpreter), large ones
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (8, 12), generator=gen).to(device)
    target = (ids * 7 + 3) % 32  # a fixed token mapping to learn
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(bottleneck_size=0), ValueError, "bottleneck_size"),
    (dict(activation="swish"), ValueError, "activation"),
    (dict(target_modules=["nothing_here"]), ValueError, "layers.0.mlp"),  # lists the module names
    (dict(target_modules=r"(unclosed"), ValueError, "target_modules"),
    (dict(target_modules=[]), ValueError, "target_modules"),
    (dict(target_modules=7), TypeError, "target_modules"),
    (dict(dropout=-0.1), ValueError, "dropout"),
    (dict(target_modules=["embed"]), ValueError, "hidden_size"),  # an Embedding: width unknown
])
def test_apply_adapters_rejects_and_changes_nothing(kwargs, exc, word, device):
    model = tiny_model(device)
    state = copy.deepcopy(model.state_dict())
    args = dict(target_modules=["mlp"], bottleneck_size=4) | kwargs
    with pytest.raises(exc, match=word):
        apply_adapters(model, **args)
    assert not adapter_names(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_hidden_size_given_for_a_module_without_out_features(device):
    model = tiny_model(device)
    apply_adapters(model, ["embed"], bottleneck_size=4, hidden_size=24)
    assert isinstance(model.embed, WithAdapter) and model.embed.adapter.hidden_size == 24


def test_adapters_follow_the_target_dtype(device):
    model = tiny_model(device).to(torch.bfloat16)
    apply_adapters(model, ["mlp"], bottleneck_size=4)
    assert model.layers[0].mlp.adapter.up_weight.dtype == torch.bfloat16
    ids = torch.randint(0, 32, (2, 5), device=device)
    model(ids).float().sum().backward()
    assert model.layers[0].mlp.adapter.up_weight.grad is not None


def test_llama_houlsby_identity_and_training(device):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.2)  # a frozen head that can move the logits
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device)
    ids = torch.randint(0, 64, (2, 10), device=device)
    before = model(ids).logits
    apply_adapters(model, ["self_attn", "mlp"], bottleneck_size=8, activation="silu")
    assert len(adapter_names(model)) == 4
    assert torch.equal(model(ids).logits, before)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 4 * (2 * 32 * 8 + 8 + 32)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=6e-2)  # few, large steps
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

"""Prompt tuning, P-tuning and prefix tuning on tiny Hugging Face causal LMs built from configs
(a 2-layer Llama with grouped-query attention, and a GPT-2): what trains, the loss, left
padding, generate, parity with PEFT, PEFT's files both ways, bad input."""

import copy
import json

import pytest
import torch

import peft_ops
from peft_ops import apply_prompt_learning, load_prompt_learning, save_prompt_learning, trainable_parameters
from peft_ops.tools.accuracy import assert_close

transformers = pytest.importorskip("transformers")

N_VIRTUAL = 6
VOCAB = 64

# method name in the tests → (apply_prompt_learning method, options, PEFT config class name, PEFT options)
SETUPS = {
    "prompt_tuning": ("prompt_tuning", {}, "PromptTuningConfig", {}),
    "p_tuning_mlp": ("p_tuning", {"encoder_hidden_size": 32}, "PromptEncoderConfig", {"encoder_hidden_size": 32}),
    "p_tuning_lstm": ("p_tuning", {"encoder_hidden_size": 16, "encoder_reparameterization_type": "LSTM"},
                      "PromptEncoderConfig", {"encoder_hidden_size": 16, "encoder_reparameterization_type": "LSTM"}),
    # the documented encoder depth (its dropout: test_p_tuning_encoder_dropout)
    "p_tuning_lstm_deep": ("p_tuning", {"encoder_hidden_size": 16, "encoder_reparameterization_type": "LSTM",
                                        "encoder_num_layers": 3},
                           "PromptEncoderConfig", {"encoder_hidden_size": 16, "encoder_reparameterization_type": "LSTM",
                                                   "encoder_num_layers": 3}),
    "prefix_tuning": ("prefix_tuning", {}, "PrefixTuningConfig", {}),
    "prefix_projection": ("prefix_tuning", {"prefix_projection": True, "encoder_hidden_size": 24},
                          "PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 24}),
}


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      initializer_range=0.2,  # a frozen head that can move the logits
                                      bos_token_id=None, eos_token_id=None)  # generate() never stops early
    return transformers.LlamaForCausalLM(config)


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     initializer_range=0.2, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
                                     bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(config)


MODELS = {"llama": llama, "gpt2": gpt2}


def make(model_name, setup, seed=0):
    torch.manual_seed(seed)
    base = MODELS[model_name]().eval()
    method, options, _, _ = SETUPS[setup]
    torch.manual_seed(seed + 1)
    return base, apply_prompt_learning(copy.deepcopy(base), method, N_VIRTUAL, **options)


def batch(seed=0, rows=2, length=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (rows, length), generator=gen)


def peft_twin(base, wrapped, setup):
    """PEFT's model for the same base and the same prompt tensors (copied by parameter name)."""
    peft = pytest.importorskip("peft")
    _, _, config_class, options = SETUPS[setup]
    config = getattr(peft, config_class)(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, **options)
    twin = peft.get_peft_model(copy.deepcopy(base), config).eval()
    twin.prompt_encoder["default"].load_state_dict(wrapped.prompt_encoder.state_dict())
    return twin


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("setup", SETUPS)
def test_only_the_prompt_trains(model_name, setup):
    base, wrapped = make(model_name, setup)
    trainable = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("prompt_encoder.") for name in trainable)
    n_trainable, total = trainable_parameters(wrapped)
    n_prompt = sum(p.numel() for p in wrapped.prompt_encoder.parameters())
    assert total == sum(p.numel() for p in base.parameters()) + n_prompt
    assert n_trainable == n_prompt
    assert peft_ops.trainable_summary(wrapped) == (
        f"trainable params: {n_trainable:,d} || all params: {total:,d} || trainable%: {100 * n_trainable / total:.4f}")


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("setup", SETUPS)
def test_matches_peft_for_the_same_prompt(model_name, setup):
    base, wrapped = make(model_name, setup)
    twin = peft_twin(base, wrapped, setup)
    ids = batch()
    mask = torch.ones_like(ids)
    ours = wrapped(ids, attention_mask=mask, labels=ids)
    theirs = twin(input_ids=ids, attention_mask=mask, labels=ids)
    their_logits = theirs.logits if setup.startswith("prefix") else theirs.logits[:, N_VIRTUAL:]
    assert ours.logits.shape == (2, 7, VOCAB)
    assert_close(ours.logits, their_logits.double(), torch.float32, "logits")
    assert abs(ours.loss.item() - theirs.loss.item()) <= 1e-5 * abs(theirs.loss.item())


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("setup", SETUPS)
def test_left_padding_gives_the_unpadded_logits(model_name, setup):
    _, wrapped = make(model_name, setup)
    ids = batch(length=5)
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], dim=1)
    padded[0, :3] = ids[0, :3]  # row 0: 8 real tokens, no padding; row 1: 3 pads then 5 tokens
    padded[0, 3:] = ids[0]
    mask = torch.ones_like(padded)
    mask[1, :3] = 0
    with torch.no_grad():
        both = wrapped(padded, attention_mask=mask).logits
        alone = wrapped(ids[1:]).logits
        row0 = wrapped(padded[:1]).logits
    assert_close(both[1, 3:], alone[0].double(), torch.float32, "left-padded row")
    assert_close(both[0], row0[0].double(), torch.float32, "unpadded row")


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("setup", ["prompt_tuning", "p_tuning_mlp", "prefix_tuning"])
def test_loss_falls(model_name, setup):
    _, wrapped = make(model_name, setup)
    ids = batch(seed=3, rows=4, length=8)
    lr = 0.05 if setup.startswith("prefix") else 0.1
    opt = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=lr)
    wrapped.train()
    losses = []
    for _ in range(30):
        loss = wrapped(ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.grad is None for p in wrapped.base_model.parameters())


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("setup", ["prompt_tuning", "p_tuning_lstm", "prefix_projection"])
def test_generate_is_greedy_decoding_of_forward(model_name, setup):
    _, wrapped = make(model_name, setup)
    ids = batch(length=5)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in row 1
    out = wrapped.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 8) and torch.equal(out[:, :5], ids)
    seq, seq_mask = ids, mask
    with torch.no_grad():
        for _ in range(3):
            next_token = wrapped(seq, attention_mask=seq_mask).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, next_token], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(next_token)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("setup", SETUPS)
def test_files_load_in_peft_with_the_same_logits(model_name, setup, tmp_path):
    peft = pytest.importorskip("peft")
    base, wrapped = make(model_name, setup)
    with torch.no_grad():  # a trained-looking prompt, not the initial one
        for p in wrapped.prompt_encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_prompt_learning(wrapped, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = batch()
    with torch.no_grad():
        ours, theirs = wrapped(ids).logits, loaded(input_ids=ids).logits
    their_logits = theirs if setup.startswith("prefix") else theirs[:, N_VIRTUAL:]
    assert_close(ours, their_logits.double(), torch.float32, "logits after PEFT loads our files")


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("setup", SETUPS)
def test_peft_files_load_here_with_the_same_logits(model_name, setup, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = MODELS[model_name]().eval()
    _, _, config_class, options = SETUPS[setup]
    torch.manual_seed(5)
    twin = peft.get_peft_model(copy.deepcopy(base), getattr(peft, config_class)(
        task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, **options)).eval()
    twin.save_pretrained(tmp_path)
    wrapped = load_prompt_learning(copy.deepcopy(base), tmp_path)
    assert wrapped.method == SETUPS[setup][0]
    ids = batch()
    with torch.no_grad():
        ours, theirs = wrapped(ids).logits, twin(input_ids=ids).logits
    their_logits = theirs if setup.startswith("prefix") else theirs[:, N_VIRTUAL:]
    assert_close(ours, their_logits.double(), torch.float32, "logits after we load PEFT's files")
    # and back: what we write from it is what PEFT wrote
    save_prompt_learning(wrapped, tmp_path / "again")
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "again" / "adapter_model.safetensors")["prompt_embeddings"],
                       load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"])


def test_prefix_shapes_follow_the_kv_heads(tmp_path):
    _, wrapped = make("llama", "prefix_tuning")
    save_prompt_learning(wrapped, tmp_path)
    from safetensors.torch import load_file

    # 2 layers × (key, value) × 2 KV heads × head_dim 16 (formats.md)
    assert load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"].shape == (N_VIRTUAL, 128)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["token_dim"], config["num_attention_heads"]) == ("PREFIX_TUNING", 32, 2)


def test_prompt_tuning_inits():
    torch.manual_seed(0)
    base = llama()
    embed = base.get_input_embeddings().weight
    wrapped = apply_prompt_learning(base, "prompt_tuning", 5, init="text", init_token_ids=[7, 9])
    assert torch.equal(wrapped.prompt_encoder.prompt(), embed[[7, 9, 7, 9, 7]].float())
    wrapped = apply_prompt_learning(llama(), "prompt_tuning", 4, init="vocab")
    rows = wrapped.base_model.get_input_embeddings().weight
    assert all((rows == v).all(dim=1).any() for v in wrapped.prompt_encoder.prompt())
    assert wrapped.prompt_encoder.prompt().dtype == torch.float32


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(num_virtual_tokens=0), ValueError, "num_virtual_tokens"),
    (dict(num_virtual_tokens=-2), ValueError, "num_virtual_tokens"),
    (dict(method="lora"), ValueError, "method"),
    (dict(method=None), TypeError, "method"),
    (dict(method="prompt_tuning", init="zeros"), ValueError, "init"),
    (dict(method="prompt_tuning", init="text"), ValueError, "init_token_ids"),
    (dict(method="prompt_tuning", init="text", init_token_ids=[VOCAB]), ValueError, "init_token_ids"),
    (dict(method="p_tuning", encoder_reparameterization_type="GRU"), ValueError, "encoder_reparameterization_type"),
    (dict(method="p_tuning", encoder_hidden_size=0), ValueError, "encoder_hidden_size"),
    (dict(method="prefix_tuning", prefix_projection="yes"), TypeError, "prefix_projection"),
    (dict(method="prefix_tuning", encoder_reparameterization_type="MLP"), TypeError, "option"),
])
def test_bad_input_is_rejected_and_changes_nothing(kwargs, exc, word):
    model = llama()
    args = dict(method="prompt_tuning", num_virtual_tokens=4) | kwargs
    with pytest.raises(exc, match=word):
        apply_prompt_learning(model, **args)
    assert all(p.requires_grad for p in model.parameters())


def test_a_model_without_input_embeddings_is_rejected():
    with pytest.raises(ValueError, match="model"):
        apply_prompt_learning(torch.nn.Linear(4, 4), "prompt_tuning", 4)


def _damage(path, what):
    from safetensors.torch import load_file, save_file

    weights = path / "adapter_model.safetensors"
    config_path = path / "adapter_config.json"
    if what == "wrong shape":
        save_file({"prompt_embeddings": torch.zeros(N_VIRTUAL, 63)}, weights)
    elif what == "extra key":
        save_file({**load_file(weights), "other": torch.zeros(1)}, weights)
    elif what == "truncated":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif what == "nan":
        save_file({"prompt_embeddings": torch.full((N_VIRTUAL, 64), float("nan"))}, weights)
    elif what == "pickle":
        weights.rename(path / "adapter_model.bin")
    elif what == "bad json":
        config_path.write_text("{not json")
    elif what == "other method":
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "peft_type": "LORA"}))
    elif what == "other model":
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "token_dim": 32}))


@pytest.mark.parametrize("what", ["wrong shape", "extra key", "truncated", "nan", "pickle", "bad json",
                                  "other method", "other model"])
def test_damaged_files_are_refused_and_change_nothing(what, tmp_path):
    _, wrapped = make("llama", "prompt_tuning")
    save_prompt_learning(wrapped, tmp_path)
    _damage(tmp_path, what)
    model = llama()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError):
        load_prompt_learning(model, tmp_path)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("setup", ["prompt_tuning", "prefix_tuning"])
def test_bf16_model_with_fp32_prompt(setup):
    torch.manual_seed(0)
    model = llama().to(torch.bfloat16)
    method, options, _, _ = SETUPS[setup]
    wrapped = apply_prompt_learning(model, method, N_VIRTUAL, **options)
    ids = batch()
    out = wrapped(ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in wrapped.prompt_encoder.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


def test_p_tuning_encoder_dropout(tmp_path):
    """encoder_dropout: between the LSTM's layers as PEFT puts it, active in training only,
    kept in the files both ways."""
    peft = pytest.importorskip("peft")
    options = {"encoder_hidden_size": 16, "encoder_reparameterization_type": "LSTM", "encoder_num_layers": 2,
               "encoder_dropout": 0.4}
    torch.manual_seed(0)
    base = llama().eval()
    wrapped = apply_prompt_learning(copy.deepcopy(base), "p_tuning", N_VIRTUAL, **options)
    lstm = wrapped.prompt_encoder.lstm_head
    assert (lstm.num_layers, lstm.dropout) == (2, 0.4)
    ids = batch()
    wrapped.train()
    torch.manual_seed(1)
    first = wrapped(ids).logits
    torch.manual_seed(2)
    assert not torch.equal(first, wrapped(ids).logits)  # dropout is on in training
    wrapped.eval()
    with torch.no_grad():
        assert torch.equal(wrapped(ids).logits, wrapped(ids).logits)  # and off in eval
        save_prompt_learning(wrapped, tmp_path)
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        assert (config["encoder_num_layers"], config["encoder_dropout"]) == (2, 0.4)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        assert_close(wrapped(ids).logits, loaded(input_ids=ids).logits[:, N_VIRTUAL:].double(), torch.float32,
                     "eval logits after PEFT loads our files")
        back = load_prompt_learning(copy.deepcopy(base), tmp_path).eval()
        assert (back.prompt_encoder.encoder_num_layers, back.prompt_encoder.encoder_dropout) == (2, 0.4)
        assert torch.equal(back(ids).logits, wrapped(ids).logits)

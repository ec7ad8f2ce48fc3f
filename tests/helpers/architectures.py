"""Tiny models of the architectures PEFT users bring, built from transformers configs (no
download), each with the LoRA targets a user would name for it, a batch and its loss."""

import dataclasses

import torch

VOCAB = 64


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    build: object  # (hidden=32) -> model, fp32, eval mode (no dropout of its own)
    targets: object  # target_modules as a user writes them
    batch: object  # (generator) -> model keyword arguments, labels included
    conv1d: bool = False  # GPT-2 style Conv1D layers (PEFT's fan_in_fan_out)
    modules_to_save: tuple = ()


def _causal_batch(gen):
    ids = torch.randint(0, VOCAB, (2, 7), generator=gen)
    return {"input_ids": ids, "labels": ids}


def _seq2seq_batch(gen):
    return {"input_ids": torch.randint(1, VOCAB, (2, 7), generator=gen),
            "labels": torch.randint(1, VOCAB, (2, 5), generator=gen)}


def _classification_batch(gen):
    return {"input_ids": torch.randint(0, VOCAB, (2, 7), generator=gen),
            "labels": torch.randint(0, 3, (2,), generator=gen)}


def _built(model_class, config, seed=0):
    torch.manual_seed(seed)
    return model_class(config).float().eval()


def llama(hidden=32):
    import transformers
    return _built(transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None))


def qwen2(hidden=32):  # grouped-query attention, biases on q/k/v
    import transformers
    return _built(transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None))


def gpt2(hidden=32):  # Conv1D layers: weights stored [in, out]
    import transformers
    return _built(transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=hidden, n_layer=2, n_head=4, n_positions=64, bos_token_id=None, eos_token_id=None,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def gpt_neox(hidden=32):
    import transformers
    return _built(transformers.GPTNeoXForCausalLM, transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64, bos_token_id=None, eos_token_id=None))


def opt(hidden=32):
    import transformers
    return _built(transformers.OPTForCausalLM, transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=hidden, bos_token_id=None, eos_token_id=None, pad_token_id=1,
        dropout=0.0, attention_dropout=0.0))


def bert_classifier(hidden=32):
    import transformers
    return _built(transformers.BertForSequenceClassification, transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def t5(hidden=32):  # encoder-decoder
    import transformers
    return _built(transformers.T5ForConditionalGeneration, transformers.T5Config(
        vocab_size=VOCAB, d_model=hidden, d_kv=hidden // 4, d_ff=2 * hidden, num_layers=2, num_decoder_layers=2,
        num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0))


ARCHITECTURES = {a.name: a for a in (
    Architecture("llama", llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                 _causal_batch),
    Architecture("qwen2", qwen2, "all-linear", _causal_batch),
    Architecture("gpt2", gpt2, ["c_attn", "c_proj", "c_fc"], _causal_batch, conv1d=True),
    Architecture("gpt_neox", gpt_neox, "all-linear", _causal_batch),
    Architecture("opt", opt, ["q_proj", "v_proj", "out_proj", "fc1", "fc2"], _causal_batch),
    Architecture("bert_seq_cls", bert_classifier, ["query", "value"], _classification_batch,
                 modules_to_save=("classifier",)),
    Architecture("t5", t5, ["q", "k", "v", "o", "wi", "wo"], _seq2seq_batch),
)}

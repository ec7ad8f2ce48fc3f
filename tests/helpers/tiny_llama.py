"""The tiny Llama the PEFT interop tests build from a config (no download), and its input ids."""

import torch


def llama(seed=0, dtype=torch.float32):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=None, eos_token_id=None)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def ids(seed=0):
    return torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(seed))

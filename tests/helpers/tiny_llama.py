"""The tiny Llama the PEFT interop tests build from a config (no download), and its input ids."""

import torch


def llama(seed=0, dtype=torch.float32, hidden=32, intermediate=48):
    """hidden=64, intermediate=128 for bitsandbytes' 4-bit layers on a CPU: its dequantize_4bit
    there (0.50) decodes NF4 blocks that straddle two rows wrongly (in_features 32 or 48)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=None, eos_token_id=None)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def ids(seed=0):
    return torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(seed))

"""Prompt encoders, the trainable part of the prompt methods (the wrapper around a model and
PEFT's files are in ``peft_ops.peft.prompt``):

- ``PromptTuning``: soft prompt vectors [n, hidden] prepended to the input embeddings.
- ``PromptEncoder`` (P-tuning): the same, reparameterized by an MLP or an LSTM head.
- ``PrefixTuning``: a key and a value prefix [n, kv_heads, head_dim] for every attention
  layer (grouped-query attention included), optionally through a projection MLP.

Module and parameter names follow PEFT's (``embedding``, ``mlp_head``, ``lstm_head``,
``transform``), so PEFT's weights copy over by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops import checks

PROMPT_TUNING_INITS = ("random", "vocab", "text")
REPARAMETERIZATIONS = ("MLP", "LSTM")


class PromptTuning(nn.Module):
    """Soft prompt: ``num_virtual_tokens`` trainable vectors of ``hidden_size`` (fp32).

    init: "random" (N(0, 1), nn.Embedding's default), "vocab" (random rows of
    ``word_embeddings``, PEFT's SAMPLE_VOCAB) or "text" (the embeddings of ``init_token_ids``,
    repeated or cut to length, as PEFT's TEXT init; the caller tokenizes)."""

    def __init__(self, num_virtual_tokens: int, hidden_size: int, init: str = "random",
                 word_embeddings: nn.Embedding | None = None, init_token_ids=None, device=None) -> None:
        super().__init__()
        self.num_virtual_tokens = checks.positive_int("num_virtual_tokens", num_virtual_tokens)
        self.hidden_size = checks.positive_int("hidden_size", hidden_size)
        checks.one_of("init", init, PROMPT_TUNING_INITS)
        if init != "random" and not isinstance(word_embeddings, nn.Embedding):
            raise ValueError(f"init={init!r} needs word_embeddings, the model's input nn.Embedding")
        if init == "vocab":
            token_ids = torch.randint(0, word_embeddings.num_embeddings, (self.num_virtual_tokens,))
        elif init == "text":
            token_ids = _text_init_ids(init_token_ids, self.num_virtual_tokens, word_embeddings.num_embeddings)
        self.init = init
        self.embedding = nn.Embedding(self.num_virtual_tokens, self.hidden_size, device=device)
        if init != "random":
            if word_embeddings.embedding_dim != self.hidden_size:
                raise ValueError(f"word_embeddings have dimension {word_embeddings.embedding_dim}, not "
                                 f"hidden_size={self.hidden_size}")
            with torch.no_grad():
                weight = word_embeddings.weight[token_ids.to(word_embeddings.weight.device)]
                self.embedding.weight.copy_(weight.float())

    def prompt(self) -> torch.Tensor:
        """The virtual token embeddings [num_virtual_tokens, hidden_size]."""
        return self.embedding.weight


def _text_init_ids(init_token_ids, n: int, vocab_size: int) -> torch.Tensor:
    if init_token_ids is None:
        raise ValueError("init='text' needs init_token_ids (the token ids of the initialization text)")
    ids = torch.as_tensor(init_token_ids).flatten()
    if ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError("init_token_ids must be a non-empty sequence of integer token ids")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"init_token_ids must lie in [0, {vocab_size}) (the vocabulary)")
    return ids.long().repeat(math.ceil(n / ids.numel()))[:n]  # repeated or cut to n, as PEFT


class PromptEncoder(nn.Module):
    """P-tuning: virtual-token embeddings passed through a reparameterization head, as PEFT's
    ``PromptEncoder``: "MLP" (Linear-ReLU-Linear-ReLU-Linear through ``encoder_hidden_size``)
    or "LSTM" (a bidirectional LSTM of ``encoder_num_layers`` layers, then Linear-ReLU-Linear).
    ``reparameterization=None``: the embeddings are the prompt (what a saved file holds)."""

    def __init__(self, num_virtual_tokens: int, hidden_size: int, encoder_hidden_size: int | None = None,
                 reparameterization: str | None = "MLP", encoder_num_layers: int = 2, encoder_dropout: float = 0.0,
                 device=None) -> None:
        super().__init__()
        self.num_virtual_tokens = checks.positive_int("num_virtual_tokens", num_virtual_tokens)
        self.hidden_size = checks.positive_int("hidden_size", hidden_size)
        self.encoder_hidden_size = checks.positive_int(
            "encoder_hidden_size", hidden_size if encoder_hidden_size is None else encoder_hidden_size)
        if reparameterization is not None:
            reparameterization = str(reparameterization).upper()
            if reparameterization not in REPARAMETERIZATIONS:
                raise ValueError(f"encoder_reparameterization_type must be one of {REPARAMETERIZATIONS}; "
                                 f"got {reparameterization!r}")
        self.reparameterization = reparameterization
        self.file_reparameterization = reparameterization or "MLP"  # what save_prompt_learning records
        self.encoder_num_layers = checks.positive_int("encoder_num_layers", encoder_num_layers)
        self.encoder_dropout = checks.probability("encoder_dropout", encoder_dropout)
        h, d = self.encoder_hidden_size, self.hidden_size
        self.embedding = nn.Embedding(self.num_virtual_tokens, d, device=device)
        if reparameterization == "MLP":
            self.mlp_head = nn.Sequential(nn.Linear(d, h, device=device), nn.ReLU(), nn.Linear(h, h, device=device),
                                          nn.ReLU(), nn.Linear(h, d, device=device))
        elif reparameterization == "LSTM":
            self.lstm_head = nn.LSTM(d, h, num_layers=self.encoder_num_layers, dropout=self.encoder_dropout,
                                     bidirectional=True, batch_first=True, device=device)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, device=device), nn.ReLU(),
                                          nn.Linear(2 * h, d, device=device))

    def prompt(self) -> torch.Tensor:
        embeds = self.embedding.weight
        if self.reparameterization == "MLP":
            return self.mlp_head(embeds)
        if self.reparameterization == "LSTM":
            return self.mlp_head(self.lstm_head(embeds[None])[0])[0]
        return embeds


class PrefixTuning(nn.Module):
    """Deep prompts (prefix tuning, P-tuning v2): for each of ``num_layers`` attention layers a
    key and a value prefix of ``num_virtual_tokens`` positions, ``num_key_value_heads`` heads of
    ``head_dim`` (grouped-query attention: the KV heads, not the query heads).

    The trainable tensor is PEFT's flattened layout [n, num_layers·2·kv_heads·head_dim] (index
    ((layer·2 + key/value)·kv_heads + head)·head_dim + d), or with ``prefix_projection`` an
    embedding [n, kv_heads·head_dim] through Linear-Tanh-Linear (``encoder_hidden_size``)."""

    def __init__(self, num_virtual_tokens: int, num_layers: int, num_key_value_heads: int, head_dim: int,
                 prefix_projection: bool = False, encoder_hidden_size: int | None = None, device=None) -> None:
        super().__init__()
        self.num_virtual_tokens = checks.positive_int("num_virtual_tokens", num_virtual_tokens)
        self.num_layers = checks.positive_int("num_layers", num_layers)
        self.num_key_value_heads = checks.positive_int("num_key_value_heads", num_key_value_heads)
        self.head_dim = checks.positive_int("head_dim", head_dim)
        if not isinstance(prefix_projection, bool):
            raise TypeError(f"prefix_projection must be a bool, got {type(prefix_projection).__name__}")
        self.prefix_projection = prefix_projection
        self.token_dim = self.num_key_value_heads * self.head_dim
        self.encoder_hidden_size = checks.positive_int(
            "encoder_hidden_size", self.token_dim if encoder_hidden_size is None else encoder_hidden_size)
        flat = self.num_layers * 2 * self.token_dim
        if prefix_projection:
            self.embedding = nn.Embedding(self.num_virtual_tokens, self.token_dim, device=device)
            self.transform = nn.Sequential(nn.Linear(self.token_dim, self.encoder_hidden_size, device=device),
                                           nn.Tanh(), nn.Linear(self.encoder_hidden_size, flat, device=device))
        else:
            self.embedding = nn.Embedding(self.num_virtual_tokens, flat, device=device)

    def prompt(self) -> torch.Tensor:
        """The flattened prefixes [num_virtual_tokens, num_layers·2·kv_heads·head_dim]."""
        return self.transform(self.embedding.weight) if self.prefix_projection else self.embedding.weight

    def key_values(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value), each [batch, kv_heads, num_virtual_tokens, head_dim]."""
        n, kv = self.num_virtual_tokens, self.num_key_value_heads
        prefix = self.prompt().to(dtype).view(n, self.num_layers * 2, kv, self.head_dim).permute(1, 2, 0, 3)
        prefix = prefix.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # [layers·2, batch, kv, n, head_dim]
        return [(prefix[2 * i], prefix[2 * i + 1]) for i in range(self.num_layers)]

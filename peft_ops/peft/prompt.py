"""Prompt-based methods for causal language models: prompt tuning, P-tuning, and deep prompts
(prefix tuning / P-tuning v2). The base model's weights stay frozen; only virtual tokens train.
The prompt encoders are in ``peft_ops.nn.prompt``; here:

- ``apply_prompt_learning(model, method, num_virtual_tokens, **options)`` wraps a Hugging
  Face–style causal LM in a ``PromptLearningModel`` whose ``forward`` / ``generate`` take the
  model's usual arguments.

Module and parameter names follow PEFT's (``embedding``, ``mlp_head``, ``lstm_head``,
``transform``), so PEFT's weights copy over by name; files are PEFT's
(``save_prompt_learning`` / ``load_prompt_learning``).
"""

from __future__ import annotations

import inspect
import os

import torch
import torch.nn as nn

from ..nn.prompt import REPARAMETERIZATIONS, PrefixTuning, PromptEncoder, PromptTuning
from ..ops import checks
from .files import CONFIG_NAME, WEIGHTS_NAME, base_model_name, read_folder, write_folder

METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")
PEFT_TYPES = {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING"}


# --------------------------------------------------------------------------------------
# The model wrapper
# --------------------------------------------------------------------------------------

def _model_dims(model: nn.Module) -> dict:
    """hidden size, layers, heads, KV heads and head_dim from a Hugging Face–style config."""
    config = getattr(model, "config", None)

    def first(*names):
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return None

    hidden = first("hidden_size", "n_embd", "d_model") or model.get_input_embeddings().embedding_dim
    heads = first("num_attention_heads", "n_head", "num_heads")
    return {"hidden_size": hidden, "num_layers": first("num_hidden_layers", "n_layer", "num_layers"),
            "num_attention_heads": heads, "num_key_value_heads": first("num_key_value_heads") or heads,
            "head_dim": first("head_dim") or (hidden // heads if heads else None)}


def _input_embeddings(model: object, name: str = "model") -> nn.Embedding:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, nn.Embedding):
        raise ValueError(f"{name} ({type(model).__name__}) has no input embeddings: prompt learning needs a model "
                         "whose get_input_embeddings() returns an nn.Embedding and whose forward accepts inputs_embeds")
    return embeddings


class PromptLearningModel(nn.Module):
    """A frozen causal LM with a learned prompt. ``forward(input_ids, attention_mask=None,
    labels=None, ...)`` prepends the virtual tokens (prompt tuning, P-tuning) or the per-layer
    key/value prefixes (prefix tuning), extends the attention mask, gives positions that skip
    left padding, pads ``labels`` with -100 over the virtual positions, and returns the model's
    output with ``logits`` for the real positions only. ``generate`` takes the model's
    generation arguments and returns the prompt ids followed by the new ones."""

    def __init__(self, base_model: nn.Module, method: str, prompt_encoder: nn.Module) -> None:
        checks.module("base_model", base_model)
        _input_embeddings(base_model, "base_model")
        method = checks.one_of("method", method, METHODS)
        expected = PrefixTuning if method == "prefix_tuning" else (PromptTuning, PromptEncoder)
        if not isinstance(prompt_encoder, expected):
            raise TypeError(f"prompt_encoder for method={method!r} must be a {expected}, "
                            f"got {type(prompt_encoder).__name__}")
        super().__init__()
        self.base_model = base_model
        self.method = method
        self.prompt_encoder = prompt_encoder
        params = inspect.signature(base_model.forward).parameters
        # transformers ≥ 5.2x names the cache argument `cache` (past_key_values is deprecated)
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._takes_position_ids = "position_ids" in params

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_encoder.num_virtual_tokens

    @property
    def config(self):
        return getattr(self.base_model, "config", None)

    def _embed_dtype(self) -> torch.dtype:
        return _input_embeddings(self.base_model).weight.dtype

    def _prefix_cache(self, batch_size: int):
        from transformers import DynamicCache

        return DynamicCache(self.prompt_encoder.key_values(batch_size, self._embed_dtype()))

    def _batch(self, input_ids, inputs_embeds) -> tuple[int, int, torch.device]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        source = input_ids if input_ids is not None else inputs_embeds
        return source.shape[0], source.shape[1], source.device

    def _extended_mask(self, attention_mask, batch_size, device):
        ones = torch.ones(batch_size, self.num_virtual_tokens, dtype=attention_mask.dtype, device=device)
        return torch.cat([ones, attention_mask.to(device)], dim=1)

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, **kwargs):
        batch_size, length, device = self._batch(input_ids, inputs_embeds)
        n = self.num_virtual_tokens
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch_size, length):
                raise ValueError(f"attention_mask must be [batch, length] = [{batch_size}, {length}], "
                                 f"got {tuple(attention_mask.shape)}")
            attention_mask = self._extended_mask(attention_mask, batch_size, device)
            if self._takes_position_ids and "position_ids" not in kwargs:
                # Real tokens count from the first one, whatever left padding precedes them.
                positions = (attention_mask.long().cumsum(dim=1) - 1).clamp_(min=0)
                kwargs["position_ids"] = positions[:, n:] if self.method == "prefix_tuning" else positions
        if self.method == "prefix_tuning":
            kwargs[self._cache_arg] = self._prefix_cache(batch_size)
            return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   labels=labels, **kwargs)
        if inputs_embeds is None:
            inputs_embeds = _input_embeddings(self.base_model)(input_ids)
        prompt = self.prompt_encoder.prompt().to(inputs_embeds.dtype)
        inputs_embeds = torch.cat([prompt.unsqueeze(0).expand(batch_size, -1, -1), inputs_embeds], dim=1)
        if labels is not None:
            ignored = torch.full((batch_size, n), -100, dtype=labels.dtype, device=labels.device)
            labels = torch.cat([ignored, labels], dim=1)
        output = self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)
        output["logits"] = output["logits"][:, n:]  # the real positions only
        return output

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """The base model's ``generate`` with the prompt in place; returns [batch, length + new]."""
        batch_size, length, device = self._batch(input_ids, None)
        n = self.num_virtual_tokens
        mask = torch.ones(batch_size, length, dtype=torch.long, device=device) if attention_mask is None \
            else attention_mask
        mask = self._extended_mask(mask, batch_size, device)
        if self.method == "prefix_tuning":
            # generate() takes a filled cache to hold the first tokens of input_ids: stand n
            # placeholder ids in front for the prefix positions, and drop them from the result.
            placeholders = torch.zeros(batch_size, n, dtype=input_ids.dtype, device=device)
            kwargs[self._cache_arg] = self._prefix_cache(batch_size)
            out = self.base_model.generate(torch.cat([placeholders, input_ids], dim=1), attention_mask=mask, **kwargs)
            return out[:, n:]
        embeds = _input_embeddings(self.base_model)(input_ids)
        prompt = self.prompt_encoder.prompt().to(embeds.dtype).unsqueeze(0).expand(batch_size, -1, -1)
        # from inputs_embeds alone, generate() returns the new tokens only
        new = self.base_model.generate(inputs_embeds=torch.cat([prompt, embeds], dim=1), attention_mask=mask, **kwargs)
        return torch.cat([input_ids, new], dim=1)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """PEFT's files: see :func:`save_prompt_learning`."""
        save_prompt_learning(self, path)


_OPTIONS = {
    "prompt_tuning": {"init", "init_token_ids"},
    "p_tuning": {"encoder_hidden_size", "encoder_reparameterization_type", "encoder_num_layers", "encoder_dropout"},
    "prefix_tuning": {"prefix_projection", "encoder_hidden_size"},
}


def _build_prompt_encoder(model: nn.Module, method: str, num_virtual_tokens: int, options: dict) -> nn.Module:
    unknown = set(options) - _OPTIONS[method]
    if unknown:
        raise TypeError(f"unknown option(s) for method={method!r}: {sorted(unknown)}; "
                        f"it takes {sorted(_OPTIONS[method])}")
    embeddings = _input_embeddings(model)
    dims = _model_dims(model)
    device = embeddings.weight.device
    if method == "prompt_tuning":
        return PromptTuning(num_virtual_tokens, dims["hidden_size"], options.get("init", "random"), embeddings,
                            options.get("init_token_ids"), device=device)
    if method == "p_tuning":
        return PromptEncoder(num_virtual_tokens, dims["hidden_size"], options.get("encoder_hidden_size"),
                             options.get("encoder_reparameterization_type", "MLP"),
                             options.get("encoder_num_layers", 2), options.get("encoder_dropout", 0.0), device=device)
    missing = [k for k in ("num_layers", "num_key_value_heads", "head_dim") if dims[k] is None]
    if missing:
        raise ValueError(f"model.config does not say {', '.join(missing)}: prefix tuning needs them")
    return PrefixTuning(num_virtual_tokens, dims["num_layers"], dims["num_key_value_heads"], dims["head_dim"],
                        options.get("prefix_projection", False), options.get("encoder_hidden_size"), device=device)


def apply_prompt_learning(model: nn.Module, method: str = "prompt_tuning", num_virtual_tokens: int = 20,
                          **options) -> PromptLearningModel:
    """Freeze `model` (a Hugging Face–style causal LM: ``get_input_embeddings()``, and a forward
    taking ``inputs_embeds``, ``attention_mask``, a KV cache and ``labels``) and return it
    wrapped with a trainable prompt.

    method "prompt_tuning": options ``init`` ("random", "vocab", "text") and
    ``init_token_ids`` (for "text"). "p_tuning": ``encoder_hidden_size`` (default: the hidden
    size), ``encoder_reparameterization_type`` ("MLP" or "LSTM"), ``encoder_num_layers``,
    ``encoder_dropout``. "prefix_tuning": ``prefix_projection``, ``encoder_hidden_size``.
    Everything is checked before the model is frozen.
    """
    checks.module("model", model)
    method = checks.one_of("method", method, METHODS)
    num_virtual_tokens = checks.positive_int("num_virtual_tokens", num_virtual_tokens)
    prompt_encoder = _build_prompt_encoder(model, method, num_virtual_tokens, options)
    model.requires_grad_(False)
    return PromptLearningModel(model, method, prompt_encoder)


# --------------------------------------------------------------------------------------
# PEFT's files
# --------------------------------------------------------------------------------------

def _peft_config(wrapper: PromptLearningModel) -> dict:
    dims = _model_dims(wrapper.base_model)
    encoder = wrapper.prompt_encoder
    config = {
        "peft_type": PEFT_TYPES[wrapper.method], "task_type": "CAUSAL_LM", "inference_mode": True,
        "num_virtual_tokens": wrapper.num_virtual_tokens, "num_transformer_submodules": 1,
        "num_layers": dims["num_layers"], "token_dim": dims["hidden_size"],
        "num_attention_heads": dims["num_attention_heads"],
        "base_model_name_or_path": base_model_name(wrapper.base_model),
        "revision": None, "modules_to_save": None, "auto_mapping": None,
    }
    if wrapper.method == "prompt_tuning":
        # PEFT's TEXT init needs a tokenizer name to load; the values are what matter, so a
        # text-initialized prompt is recorded as RANDOM.
        config.update(prompt_tuning_init="SAMPLE_VOCAB" if encoder.init == "vocab" else "RANDOM",
                      prompt_tuning_init_text=None, tokenizer_name_or_path=None, tokenizer_kwargs=None)
    elif wrapper.method == "p_tuning":
        # a prompt loaded from a file has no head left; its config keeps the file's head type
        config.update(encoder_reparameterization_type=encoder.reparameterization or encoder.file_reparameterization,
                      encoder_hidden_size=encoder.encoder_hidden_size, encoder_num_layers=encoder.encoder_num_layers,
                      encoder_dropout=encoder.encoder_dropout)
    else:  # PEFT describes the prefix by its KV heads (grouped-query attention)
        config.update(token_dim=encoder.token_dim, num_attention_heads=encoder.num_key_value_heads,
                      prefix_projection=encoder.prefix_projection, encoder_hidden_size=encoder.encoder_hidden_size,
                      init_weights=None)
    return config


def save_prompt_learning(wrapper: PromptLearningModel, path: str | os.PathLike) -> None:
    """Write PEFT's files to folder `path`: adapter_config.json and adapter_model.safetensors
    holding ``prompt_embeddings`` — the prompt itself ([n, hidden]; for P-tuning the encoder's
    output, for prefix tuning the flattened prefixes [n, layers·2·kv_heads·head_dim])."""
    if not isinstance(wrapper, PromptLearningModel):
        raise TypeError(f"wrapper must be a PromptLearningModel, got {type(wrapper).__name__}")
    with torch.no_grad():
        prompt = wrapper.prompt_encoder.prompt().float()
    write_folder(path, _peft_config(wrapper), {"prompt_embeddings": prompt})


def load_prompt_learning(model: nn.Module, path: str | os.PathLike) -> PromptLearningModel:
    """Read PEFT's prompt-learning files from folder `path` (written by PEFT or by
    :func:`save_prompt_learning`) and return `model` wrapped with that prompt. Every field,
    key and shape is checked against `model` before the model is frozen; safetensors only."""
    checks.module("model", model)
    config, tensors = read_folder(path)
    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    method = {v: k for k, v in PEFT_TYPES.items()}.get(config.get("peft_type"))
    if method is None:
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not one of "
                         f"{sorted(PEFT_TYPES.values())}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"{config_path}: num_transformer_submodules must be 1 (a decoder-only model)")
    n = checks.positive_int("num_virtual_tokens", config.get("num_virtual_tokens"))
    if set(tensors) != {"prompt_embeddings"}:
        raise ValueError(f"{weights_path} must hold exactly 'prompt_embeddings', found {sorted(tensors)}")
    prompt = tensors["prompt_embeddings"]

    embeddings = _input_embeddings(model)
    dims = _model_dims(model)
    if method == "prefix_tuning":
        encoder = _build_prompt_encoder(model, method, n, {})  # the flat prefix, as PEFT's inference mode
        expected = (n, encoder.num_layers * 2 * encoder.token_dim)
        if config.get("num_layers") != encoder.num_layers or config.get("token_dim") != encoder.token_dim:
            raise ValueError(f"{config_path}: num_layers={config.get('num_layers')}, token_dim="
                             f"{config.get('token_dim')} do not fit this model ({encoder.num_layers} layers, "
                             f"KV width {encoder.token_dim})")
    else:
        encoder = PromptTuning(n, dims["hidden_size"], device=embeddings.weight.device) if method == "prompt_tuning" \
            else PromptEncoder(n, dims["hidden_size"], config.get("encoder_hidden_size"), reparameterization=None,
                               encoder_num_layers=config.get("encoder_num_layers", 2),
                               encoder_dropout=config.get("encoder_dropout", 0.0), device=embeddings.weight.device)
        if method == "p_tuning" and config.get("encoder_reparameterization_type") in REPARAMETERIZATIONS:
            encoder.file_reparameterization = config["encoder_reparameterization_type"]
        expected = (n, dims["hidden_size"])
        if config.get("token_dim") != dims["hidden_size"]:
            raise ValueError(f"{config_path}: token_dim={config.get('token_dim')} is not this model's hidden size "
                             f"{dims['hidden_size']}")
    if tuple(prompt.shape) != expected:
        raise ValueError(f"prompt_embeddings has shape {tuple(prompt.shape)}; this config and model need {expected}")
    with torch.no_grad():
        encoder.embedding.weight.copy_(prompt)
    model.requires_grad_(False)
    return PromptLearningModel(model, method, encoder)

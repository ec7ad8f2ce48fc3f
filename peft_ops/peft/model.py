"""Model-level API: find target modules as PEFT does, insert adapters, freeze the rest."""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
import torch.nn as nn

from ..nf4 import NF4Weight
from ..nn.bottleneck import BottleneckAdapter, WithAdapter
from ..nn.lora import (
    BASE_ADAPTER,
    LoraEmbedding,
    LoraLinear,
    QLoraLinear,
    check_adapter_name,
    checked_settings,
    linear_features,
)
from ..ops import checks
from ..ops.bottleneck import check_activation
from .config import BIAS_MODES, TASK_HEADS, config_dict, is_config, lora_settings
from .targets import check_patterns, find_targets, is_lora_target, pattern_value


def _hidden_size_of(name: str, module: nn.Module, model: nn.Module, hidden_size: int | None) -> int:
    if hidden_size is not None:
        return hidden_size
    if isinstance(getattr(module, "out_features", None), int):
        return module.out_features
    config_hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(config_hidden, int):
        return config_hidden
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if linears:  # an MLP or attention block ends in its output projection
        return linears[-1].out_features
    raise ValueError(f"cannot tell the output size of {name} ({type(module).__name__}): pass hidden_size=")


def _factory_of(module: nn.Module, model: nn.Module) -> dict:
    for source in (module, model):
        for tensor in [*source.parameters(), *source.buffers()]:
            if tensor.is_floating_point():
                return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def apply_adapters(model: nn.Module, target_modules, bottleneck_size: int, activation: str = "relu",
                   scaling: float = 1.0, dropout: float = 0.0, hidden_size: int | None = None) -> nn.Module:
    """Put a :class:`BottleneckAdapter` on the output of every module `target_modules` names,
    freeze every other parameter, and return `model` (changed in place).

    ``target_modules``: PEFT's matching rules — a list of module-name suffixes, or one regex
    string matched against the full module name. Each target is replaced by
    ``WithAdapter(target, adapter)``. Placements:

    - Houlsby: after the attention block's output and after the MLP, e.g.
      ``["self_attn", "mlp"]`` (Llama) or ``["attn", "mlp"]`` (GPT-2);
    - Pfeiffer: after the MLP only, e.g. ``["mlp"]``.

    The adapter's width is `hidden_size` when given, else the target's ``out_features``, else
    ``model.config.hidden_size`` (Hugging Face models), else the ``out_features`` of the last
    ``nn.Linear`` registered inside the target (its output projection); its device and dtype
    are the target's.
    Every argument is checked and every adapter built before the model is touched.
    """
    checks.module("model", model)
    bottleneck_size = checks.positive_int("bottleneck_size", bottleneck_size)
    activation = check_activation(activation)
    scaling = checks.real_number("scaling", scaling)
    dropout = checks.probability("dropout", dropout)
    if hidden_size is not None:
        hidden_size = checks.positive_int("hidden_size", hidden_size)
    targets = [(name, module) for name, module in find_targets(model, target_modules)
               if not isinstance(module, (WithAdapter, BottleneckAdapter))]
    if not targets:
        raise ValueError(f"target_modules {target_modules!r} names only adapters already in place")
    # Deepest first, so that wrapping a module never moves one still to be wrapped.
    targets.sort(key=lambda item: item[0].count("."), reverse=True)
    wrapped = [(name, WithAdapter(module, BottleneckAdapter(
        _hidden_size_of(name, module, model, hidden_size), bottleneck_size, activation, scaling, dropout,
        **_factory_of(module, model)))) for name, module in targets]

    for param in model.parameters():
        param.requires_grad_(False)
    for name, wrapper in wrapped:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of `model`. An NF4-quantized weight counts as its
    out×in weights, though it is stored as buffers (PEFT counts bitsandbytes' 4-bit weights
    the same way), so the share is comparable across LoRA and QLoRA."""
    checks.module("model", model)
    trainable = total = 0
    nf4 = [m for m in model.modules() if isinstance(m, NF4Weight)]
    nf4_params = {id(p) for m in nf4 for p in m.parameters(recurse=False)}  # parameter storage (FSDP2)
    for param in model.parameters():
        if id(param) in nf4_params:
            continue
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    total += sum(m.numel() for m in nf4)
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """One line, as PEFT's ``print_trainable_parameters``:
    ``trainable params: 8,192 || all params: 1,024,000 || trainable%: 0.8000``."""
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"


# --------------------------------------------------------------------------------------
# LoRA / QLoRA on a whole model
# --------------------------------------------------------------------------------------

LORA_LAYERS = (LoraLinear, QLoraLinear, LoraEmbedding)


def replace_linears(model: nn.Module, layers: list, quantize: str | None) -> nn.Module:
    """Put adapter ``kw["adapter_name"]`` (default "default") on each layer named in `layers` =
    [(name, layer keyword arguments, (lora_A, lora_B[, magnitude]) or None)]: a LoraLinear
    (QLoraLinear when quantize == "nf4") in place of an nn.Linear / Conv1D, a LoraEmbedding in
    place of an nn.Embedding, or one more named adapter on one of our LoRA layers. Then every
    other parameter is frozen, and of the adapters only the active one trains (PEFT's rule).
    Each configuration is checked before anything changes. A DoRA layer given adapters but no
    magnitude starts it at ‖W + s·B·A‖, as PEFT does."""
    layer_class = QLoraLinear if quantize == "nf4" else LoraLinear
    for name, kw, _ in layers:
        module = model.get_submodule(name)
        adapter_name = check_adapter_name(kw.get("adapter_name", "default"))
        if isinstance(module, (nn.Embedding, LoraEmbedding)) and kw.get("use_dora"):
            raise ValueError(f"use_dora: {name} is an embedding; DoRA here is for linear layers")
        if isinstance(module, LORA_LAYERS):
            if adapter_name in module.adapter_names:
                raise ValueError(f"adapter_name {adapter_name!r} is already on {name}")
            checked_settings(kw["r"], kw["lora_alpha"], kw["lora_dropout"], kw["use_rslora"], kw.get("use_dora", False))
        elif isinstance(module, nn.Embedding):
            LoraEmbedding._checked_config(module.num_embeddings, module.embedding_dim, kw["r"], kw["lora_alpha"],
                                          kw["lora_dropout"], kw["use_rslora"], module.padding_idx)
            for option in ("max_norm", "scale_grad_by_freq", "sparse"):
                if getattr(module, option):
                    raise ValueError(f"{name} has {option}={getattr(module, option)!r}: LoraEmbedding takes a plain "
                                     "lookup")
        else:
            in_features, out_features, _ = linear_features(module, name)
            layer_class._checked_config(in_features, out_features, kw["r"], kw["lora_alpha"],
                                        kw["lora_dropout"], kw["use_rslora"], kw.get("use_dora", False))
    existing = [m for m in model.modules() if isinstance(m, LORA_LAYERS)]
    active = existing[0].active_adapter if existing else None  # the model's active adapter stays active
    built = []
    for name, kw, weights in layers:
        module = model.get_submodule(name)
        adapter_name = kw.get("adapter_name", "default")
        if isinstance(module, LORA_LAYERS):
            module.add_adapter(adapter_name, **{k: v for k, v in kw.items() if k != "adapter_name"})
            layer = module
        elif isinstance(module, nn.Embedding):
            layer = LoraEmbedding.from_embedding(module, **{k: v for k, v in kw.items() if k != "use_dora"})
            built.append((name, layer))
        else:
            layer = layer_class.from_linear(module, **kw)
            built.append((name, layer))
        if weights is not None:
            adapter = layer.adapter(adapter_name)
            with torch.no_grad():
                for param, value in zip(layer.adapter_parameters(adapter_name), weights):
                    param.copy_(value)
                if isinstance(layer, (LoraLinear, QLoraLinear)) and adapter.use_dora and len(weights) < 3:
                    layer.reset_magnitude(adapter_name)
        if active is not None:
            layer.set_adapter(active)
    model.requires_grad_(False)
    for name, layer in built:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    mark_active_trainable(model)
    return mark_extras_trainable(model, {"modules_to_save": None, "bias": "none"})


def mark_active_trainable(model: nn.Module) -> None:
    """Of every LoRA layer's adapters, the active one trains and the others are frozen (PEFT's
    set_adapter rule)."""
    for layer in model.modules():
        if isinstance(layer, LORA_LAYERS):
            for name in layer.adapter_names:
                for param in layer.adapter_parameters(name):
                    param.requires_grad_(name == layer.active_adapter)


# --------------------------------------------------------------------------------------
# Named adapters on a model (PEFT's add_adapter / set_adapter / delete_adapter / disable_adapter)
# --------------------------------------------------------------------------------------

def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LORA_LAYERS)]


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters on `model`'s LoRA layers, in the order they were added."""
    checks.module("model", model)
    return list(dict.fromkeys(n for _, layer in lora_layers(model) for n in layer.adapter_names))


def active_adapter(model: nn.Module) -> str | None:
    """The adapter `model`'s LoRA layers run (None without LoRA layers)."""
    checks.module("model", model)
    layers = lora_layers(model)
    return layers[0][1].active_adapter if layers else None


def add_adapter(model: nn.Module, adapter_name: str, target_modules, **settings) -> nn.Module:
    """PEFT's ``add_adapter``: a new named adapter on the modules `target_modules` names (a
    ``peft.LoraConfig`` or its dict, or target names with :func:`apply_lora`'s settings),
    beside the adapters already there; the active adapter does not change (the new one trains
    once :func:`set_adapter` makes it active). Returns the model."""
    checks.module("model", model)
    if check_adapter_name(adapter_name) in adapter_names(model):
        raise ValueError(f"adapter_name {adapter_name!r} is already on the model (delete_adapter it first)")
    return apply_lora(model, target_modules, adapter_name=adapter_name, **settings)


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name` the active adapter of every LoRA layer (a layer without it runs its
    base alone) and the only one that trains, as PEFT's ``set_adapter``."""
    checks.module("model", model)
    adapter_name = check_adapter_name(adapter_name)
    layers = lora_layers(model)
    if adapter_name not in adapter_names(model):
        raise ValueError(f"adapter_name {adapter_name!r} is not on the model; its adapters: {adapter_names(model)}")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise RuntimeError(f"set_adapter with merged layers ({merged[0]}, …): unmerge them first")
    for _, layer in layers:
        layer.set_adapter(adapter_name)
    mark_active_trainable(model)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter `adapter_name` from every LoRA layer (a layer left without adapters runs
    its base alone, as PEFT's); if it was active, the first remaining adapter becomes active."""
    checks.module("model", model)
    adapter_name = check_adapter_name(adapter_name)
    names = adapter_names(model)
    if adapter_name not in names:
        raise ValueError(f"adapter_name {adapter_name!r} is not on the model; its adapters: {names}")
    layers = lora_layers(model)
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise RuntimeError(f"delete_adapter with merged layers ({merged[0]}, …): unmerge them first")
    was_active = active_adapter(model) == adapter_name
    for _, layer in layers:
        if adapter_name in layer.adapter_names:
            layer.delete_adapter(adapter_name)
    remaining = [n for n in names if n != adapter_name]
    if was_active and remaining:
        set_adapter(model, remaining[0])


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run every LoRA layer's base alone inside the block (merged layers unmerged for its
    duration), as PEFT's ``disable_adapter`` context."""
    checks.module("model", model)
    with contextlib.ExitStack() as stack:
        for _, layer in lora_layers(model):
            stack.enter_context(layer.disable_adapter())
        yield model


@contextlib.contextmanager
def mixed_adapter_batch(model: nn.Module, adapter_names) -> Iterator[nn.Module]:
    """Inside the block, sample i of every batch (the first dimension of each LoRA layer's
    input) runs adapter ``adapter_names[i]``, in training as in inference — PEFT's
    ``adapter_names=`` argument, which PEFT itself refuses in training mode. ``"__base__"``, or
    an adapter a layer does not hold, runs that layer's base alone. Every linear LoRA layer makes
    one :func:`peft_ops.multi_lora_linear` call: the base weight once for all the adapters. Each
    adapter trains on its own samples (make their parameters trainable: only the active
    adapter's are after ``apply_lora`` / ``add_adapter``). DoRA adapters and embedding LoRA
    layers are refused in a mixed batch, and so is gradient checkpointing in training (its
    backward recompute would run outside the block). Blocks nest: the outer names come back."""
    checks.module("model", model)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"adapter_names must be a list of adapter names, one per sample, got "
                        f"{type(adapter_names).__name__}")
    if not adapter_names:
        raise ValueError("adapter_names must name at least one sample's adapter")
    names = [n if n == BASE_ADAPTER else check_adapter_name(n, "adapter_names") for n in adapter_names]
    layers = lora_layers(model)
    known = {n for _, layer in layers for n in layer.adapter_names}
    unknown = sorted({n for n in names if n != BASE_ADAPTER} - known)
    if unknown:
        raise ValueError(f"adapter_names names adapters no layer holds: {unknown} (the model's: {sorted(known)})")
    embeddings = [name for name, layer in layers if isinstance(layer, LoraEmbedding)]
    if embeddings:
        raise NotImplementedError(f"mixed adapter batches over embedding LoRA layers are not supported: {embeddings}")
    checkpointed = [name for name, m in model.named_modules() if getattr(m, "gradient_checkpointing", False)]
    if checkpointed and model.training:  # a backward recompute would run outside the block
        raise NotImplementedError(f"mixed adapter batches in training under gradient checkpointing are not supported "
                                  f"(checkpointed: {checkpointed[:3]})")
    previous = [layer.batch_adapters for _, layer in layers]  # nested blocks: the outer names come back
    try:
        for _, layer in layers:
            layer.batch_adapters = names
        yield model
    finally:
        for (_, layer), before in zip(layers, previous):
            layer.batch_adapters = before


def apply_lora(model: nn.Module, target_modules, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
               use_rslora: bool = False, quantize: str | None = None, rank_pattern: dict | None = None,
               alpha_pattern: dict | None = None, use_dora: bool = False, exclude_modules=None,
               layers_to_transform=None, layers_pattern=None, modules_to_save=None, bias: str = "none",
               adapter_name: str = "default") -> nn.Module:
    """Replace each ``nn.Linear`` (or transformers ``Conv1D``: GPT-2) of `model` that
    `target_modules` names with a :class:`LoraLinear` sharing its weight and bias (a Conv1D's
    [in, out] weight read in place: ``fan_in_fan_out``; a :class:`QLoraLinear` holding its NF4
    quantization with ``quantize="nf4"``), freeze every other parameter, return the model.

    Matching is PEFT's: a list of module-name suffixes, or one regex string matched against the
    full name; only ``nn.Linear`` / ``Conv1D`` modules are candidates, and a target list that
    matches none is a ValueError listing the model's linear layer names. ``target_modules="all-linear"`` (PEFT's
    shorthand): every linear layer but the output layer (a transformers model's
    ``get_output_embeddings()``). ``exclude_modules`` (suffixes or a regex) leaves modules out;
    ``layers_to_transform`` (an index or a list) with ``layers_pattern`` (e.g. "layers") keeps
    only those layers, PEFT's rules for each. ``rank_pattern`` / ``alpha_pattern``
    ({regex: value}) override ``r`` / ``lora_alpha`` per module as in PEFT (the first key that
    matches the end of the name). ``use_dora=True``: DoRA layers (QDoRA with
    ``quantize="nf4"``), each magnitude starting at its column norms ‖W‖ as in PEFT.
    Everything is checked before the model changes.

    ``modules_to_save`` (PEFT's: module names, each matching every module whose full name ends
    with it): those modules train whole beside the adapters — a classification head — and are
    saved with them. ``bias``: "none", "lora_only" (the biases of the LoRA layers train) or "all"
    (every parameter named ``bias``), as PEFT.

    ``adapter_name`` (default "default"): the adapter's name; on a model that already has LoRA
    layers it is added beside theirs (:func:`add_adapter`, :func:`set_adapter`), and layers that
    already hold it are left as they are.

    ``apply_lora(model, config)``: a ``peft.LoraConfig`` (or its dict) in place of
    `target_modules` and the settings, each field honoured (those above, and ``task_type``:
    "all-linear"'s output layer, and the head PEFT's task models train — ``classifier`` /
    ``score`` for SEQ_CLS and TOKEN_CLS, ``qa_outputs`` for QUESTION_ANS) or refused by name
    (``lora_bias``, ``init_lora_weights`` other than PEFT's default, …); the keyword settings
    then stay at their defaults.
    """
    checks.module("model", model)
    if is_config(target_modules):
        settings = dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_dora=use_dora,
                        exclude_modules=exclude_modules, layers_to_transform=layers_to_transform,
                        layers_pattern=layers_pattern, modules_to_save=modules_to_save, bias=bias)
        defaults = inspect.signature(apply_lora).parameters
        given = {k: v for k, v in settings.items() if v != defaults[k].default}
        if given:
            raise TypeError(f"apply_lora got a config and {sorted(given)} too: set them in the config")
        cfg = lora_settings(config_dict(target_modules), "config", creating=True)
        task_type = cfg.pop("task_type")
        return _apply_lora(model, quantize=quantize, task_type=task_type, adapter_name=adapter_name, **cfg)
    return _apply_lora(model, target_modules, r, lora_alpha, lora_dropout, use_rslora, quantize, rank_pattern,
                       alpha_pattern, use_dora, exclude_modules, layers_to_transform, layers_pattern,
                       modules_to_save=modules_to_save, bias=bias, adapter_name=adapter_name)


def _apply_lora(model, target_modules, r, lora_alpha, lora_dropout, use_rslora, quantize, rank_pattern, alpha_pattern,
                use_dora, exclude_modules, layers_to_transform, layers_pattern, task_type=None, modules_to_save=None,
                bias="none", adapter_name="default"):
    adapter_name = check_adapter_name(adapter_name)
    settings = checked_settings(r, lora_alpha, lora_dropout, use_rslora, use_dora)
    r, lora_alpha, lora_dropout = settings["r"], settings["lora_alpha"], settings["lora_dropout"]
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    rank_pattern, alpha_pattern = check_patterns(rank_pattern, alpha_pattern)
    targets = [(name, m) for name, m in find_targets(model, target_modules, is_lora_target,
                                                       exclude_modules=exclude_modules,
                                                       layers_to_transform=layers_to_transform,
                                                       layers_pattern=layers_pattern, task_type=task_type)
               if not (isinstance(m, LORA_LAYERS) and adapter_name in m.adapter_names)]  # (already there: kept)
    layers = [(name, dict(r=pattern_value(rank_pattern, name, r),
                          lora_alpha=pattern_value(alpha_pattern, name, lora_alpha),
                          lora_dropout=lora_dropout, use_rslora=use_rslora, use_dora=use_dora,
                          adapter_name=adapter_name), None)
              for name, _ in targets]
    extras = check_extras(model, modules_to_save, bias, task_type, [name for name, _, _ in layers])
    others = [n for n in adapter_names(model) if n != adapter_name]
    recorded = getattr(model, EXTRAS, None) or {"modules_to_save": None, "bias": "none"}
    if others and (extras["modules_to_save"] or extras["bias"] != "none" or recorded["modules_to_save"]
                   or recorded["bias"] != "none"):
        raise ValueError("modules_to_save and trained biases (bias != 'none') with several adapters are not "
                         f"supported (the model has {others}): PEFT keeps a copy of each per adapter")
    replace_linears(model, layers, quantize)
    return mark_extras_trainable(model, extras)


# --------------------------------------------------------------------------------------
# PEFT's modules_to_save and bias: what trains (and is saved) beside the adapters
# --------------------------------------------------------------------------------------

EXTRAS = "peft_ops_extras"  # attribute of the model root: {"modules_to_save": names or None, "bias": mode}


def saved_module_names(model: nn.Module, modules_to_save) -> list[str]:
    """PEFT's rule for modules_to_save: every module whose full name ends with one of the names
    (a plain suffix)."""
    return [name for name, _ in model.named_modules() if name and any(name.endswith(k) for k in modules_to_save)]


def check_extras(model: nn.Module, modules_to_save, bias: str, task_type, lora_names: list[str]) -> dict:
    """{"modules_to_save", "modules", "bias", "lora_names"} checked against `model` before it
    changes: the names (a task type's head added, as PEFT's task models add it), the modules they
    match — each name given must match one, and none may hold or sit inside a LoRA target."""
    if modules_to_save is not None:
        if isinstance(modules_to_save, str):
            modules_to_save = [modules_to_save]
        if not isinstance(modules_to_save, (list, tuple)) or not all(isinstance(m, str) and m
                                                                     for m in modules_to_save):
            raise TypeError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
    checks.one_of("bias", bias, BIAS_MODES)
    given = list(modules_to_save or [])
    heads = TASK_HEADS.get(task_type, ())
    for name in given:  # (a task's head names may match nothing: PEFT lists both "classifier" and "score")
        if name not in heads and not saved_module_names(model, [name]):
            raise ValueError(f"modules_to_save: {name!r} names no module of {type(model).__name__}")
    names = given + [h for h in heads if h not in given and saved_module_names(model, [h])]
    modules = saved_module_names(model, names)
    for module in modules:
        clash = [t for t in lora_names if t == module or t.startswith(module + ".") or module.startswith(t + ".")]
        if clash:
            raise ValueError(f"modules_to_save: {module} is (or holds) LoRA target {clash[0]}: a module either trains "
                             "whole or takes an adapter")
    return {"modules_to_save": names or None, "modules": modules, "bias": bias, "lora_names": list(lora_names)}


def mark_extras_trainable(model: nn.Module, extras: dict) -> nn.Module:
    """Make the modules_to_save and the `bias` mode's biases trainable (after the adapters went
    in, everything else frozen) — with those of an earlier ``apply_lora`` on the model — and
    record them on the model for ``save_peft_adapter``."""
    before = getattr(model, EXTRAS, None) or {"modules_to_save": None, "bias": "none"}
    names = list(dict.fromkeys((before["modules_to_save"] or []) + (extras["modules_to_save"] or [])))
    bias = extras["bias"] if extras["bias"] != "none" else before["bias"]
    for name in saved_module_names(model, names):
        model.get_submodule(name).requires_grad_(True)
    if bias == "all":  # PEFT's rule: every parameter with "bias" in its name
        for name, param in model.named_parameters():
            if "bias" in name:
                param.requires_grad_(True)
    elif bias == "lora_only":
        for layer in model.modules():
            if isinstance(layer, (LoraLinear, QLoraLinear)) and layer.bias is not None:
                layer.bias.requires_grad_(True)
    setattr(model, EXTRAS, {"modules_to_save": names or None, "bias": bias})
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """For export (the active adapter; a layer without it keeps its base weight): replace each
    :class:`LoraLinear` by an ``nn.Linear`` whose weight is
    W + scaling·B·A (summed in fp32, rounded once; a ``Conv1D`` for a ``fan_in_fan_out`` layer),
    each :class:`LoraEmbedding` by an ``nn.Embedding`` with E + scaling·(B·A)ᵀ, and each
    :class:`QLoraLinear` by an ``nn.Linear`` with
    dequant(W) + scaling·B·A, in place; return the model. A Hugging Face ``PeftModel``
    (including one passed through :func:`peft_ops.from_peft`) is merged by PEFT's own
    ``merge_and_unload``. Bottleneck adapters (``WithAdapter``) are nonlinear: they cannot
    fold into a weight and stay as they are."""
    checks.module("model", model)
    if callable(getattr(model, "merge_and_unload", None)) and hasattr(model, "peft_config"):
        return model.merge_and_unload()
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LORA_LAYERS)]:
        if isinstance(layer, QLoraLinear):
            merged = layer.merged_linear()
        elif isinstance(layer, LoraEmbedding):
            merged = nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx,
                                  device=layer.weight.device, dtype=layer.weight.dtype)
            with torch.no_grad():
                weight = layer.weight.float()
                if not layer.merged and not layer._adapter_disabled and layer.adapter() is not None:
                    weight = weight + layer.delta_weight().float()
                merged.weight.copy_(weight)
        else:
            merged = _plain_layer(layer)
            with torch.no_grad():
                weight = layer.base_weight.float()
                if not layer.merged and not layer._adapter_disabled and layer.adapter() is not None:
                    weight = layer.merged_weight_fp32()
                (merged.weight.t() if layer.fan_in_fan_out else merged.weight).copy_(weight)
                if layer.bias is not None:
                    merged.bias.copy_(layer.bias)
        merged.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, merged)
    return model


def _plain_layer(layer: LoraLinear) -> nn.Module:
    """The layer type a LoraLinear wrapped, empty: ``nn.Linear``, or transformers' ``Conv1D``
    (weight [in, out]) for a ``fan_in_fan_out`` layer, so the merged model's keys and shapes are
    the original's."""
    factory = dict(device=layer.weight.device, dtype=layer.weight.dtype)
    if not layer.fan_in_fan_out:
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, **factory)
    from transformers.pytorch_utils import Conv1D  # a fan_in_fan_out layer wrapped one: transformers is there

    conv = Conv1D(layer.out_features, layer.in_features).to(**factory)
    if layer.bias is None:
        conv.bias = None
    return conv

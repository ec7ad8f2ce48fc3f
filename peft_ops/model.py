"""Model-level API: find target modules as PEFT does, insert adapters, freeze the rest."""

from __future__ import annotations

import re

import torch.nn as nn

from . import _checks
from .adapter import check_activation
from .layers import BottleneckAdapter, WithAdapter
from .nf4 import NF4Weight


def _check_target_modules(target_modules: object) -> str | tuple[str, ...]:
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules is not a valid regular expression: {err}") from None
        return target_modules
    if not isinstance(target_modules, (list, tuple, set, frozenset)) or \
            not all(isinstance(t, str) for t in target_modules):
        raise TypeError("target_modules must be a list of module-name suffixes or one regex string, got "
                        f"{type(target_modules).__name__}")
    if not target_modules:
        raise ValueError("target_modules is empty: name at least one module")
    return tuple(target_modules)


def matches_target(name: str, target_modules: str | tuple[str, ...]) -> bool:
    """PEFT's rule: a regex string must match the whole module name; a list entry matches a
    module whose name is the entry or ends with "." + the entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_targets(model: nn.Module, target_modules) -> list[tuple[str, nn.Module]]:
    """(name, module) of every submodule of `model` that `target_modules` names; a target list
    that matches nothing is a ValueError listing the model's module names."""
    target_modules = _check_target_modules(target_modules)
    found = [(name, module) for name, module in model.named_modules()
             if name and matches_target(name, target_modules)]
    if not found:
        names = [name for name, _ in model.named_modules() if name]
        shown = ", ".join(names[:40]) + (f", … ({len(names)} in all)" if len(names) > 40 else "")
        raise ValueError(f"target_modules {target_modules!r} matches no module of {type(model).__name__}; "
                         f"its modules are: {shown}")
    return found


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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    bottleneck_size = _checks.positive_int("bottleneck_size", bottleneck_size)
    activation = check_activation(activation)
    scaling = _checks.real_number("scaling", scaling)
    dropout = _checks.probability("dropout", dropout)
    if hidden_size is not None:
        hidden_size = _checks.positive_int("hidden_size", hidden_size)
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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    total += sum(m.numel() for m in model.modules() if isinstance(m, NF4Weight))
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """One line, as PEFT's ``print_trainable_parameters``:
    ``trainable params: 8,192 || all params: 1,024,000 || trainable%: 0.8000``."""
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"

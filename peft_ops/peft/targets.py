"""PEFT's rules for naming modules: which modules ``target_modules`` selects, and the
per-module rank / alpha of ``rank_pattern`` / ``alpha_pattern``."""

from __future__ import annotations

import re

import torch.nn as nn

from ..nn.lora import LoraEmbedding, LoraLinear, QLoraLinear, is_conv1d
from ..ops import checks


def check_target_modules(target_modules: object, arg: str = "target_modules") -> str | tuple[str, ...]:
    """A regex string, or a tuple of module-name suffixes (`arg`: the argument's name in errors)."""
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"{arg} is not a valid regular expression: {err}") from None
        return target_modules
    if not isinstance(target_modules, (list, tuple, set, frozenset)) or \
            not all(isinstance(t, str) for t in target_modules):
        raise TypeError(f"{arg} must be a list of module-name suffixes or one regex string, got "
                        f"{type(target_modules).__name__}")
    if not target_modules:
        raise ValueError(f"{arg} is empty: name at least one module")
    return tuple(target_modules)


def matches_target(name: str, target_modules: str | tuple[str, ...]) -> bool:
    """PEFT's rule: a regex string must match the whole module name; a list entry matches a
    module whose name is the entry or ends with "." + the entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


ALL_LINEAR = "all-linear"  # PEFT's shorthand (any case)


def is_all_linear(target_modules: object) -> bool:
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def is_linear_layer(module: nn.Module) -> bool:
    """A linear layer LoRA wraps: ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2, weight [in, out])."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_lora_target(module: nn.Module) -> bool:
    """A layer ``target_modules`` may name: a linear layer, an ``nn.Embedding`` (PEFT's embedding
    LoRA; "all-linear" never takes one), or one of our LoRA layers (another named adapter)."""
    return is_linear_layer(module) or isinstance(module, (nn.Embedding, LoraLinear, QLoraLinear, LoraEmbedding))


SEQ_CLS_HEADS = ("score", "classifier")  # PEFT's names for a sequence classifier's head


def all_linear_names(model: nn.Module, task_type: str | None = None) -> tuple[str, ...]:
    """PEFT's "all-linear": the full names of every ``nn.Linear`` and ``Conv1D`` of `model`
    except its output layer (a transformers model's ``get_output_embeddings()``: the LM head;
    without one and with task_type "SEQ_CLS", the classifier head ``score`` / ``classifier``)."""
    names = [name for name, module in model.named_modules()
             if name and (is_linear_layer(module) or isinstance(module, (LoraLinear, QLoraLinear)))]
    head = None
    if callable(getattr(model, "get_output_embeddings", None)):
        try:
            head = model.get_output_embeddings()
        except NotImplementedError:
            head = None
    if head is None and task_type == "SEQ_CLS" and callable(getattr(model, "get_output_embeddings", None)):
        head = next((getattr(model, n) for n in SEQ_CLS_HEADS if getattr(model, n, None) is not None), None)
    if head is not None:
        excluded = next((name for name, module in model.named_modules() if module is head), None)
        names = [name for name in names if name != excluded]
    return tuple(names)


def check_layer_selection(exclude_modules, layers_to_transform, layers_pattern):
    """Validated (exclude_modules, layers_to_transform, layers_pattern) as PEFT takes them:
    a regex string or a list of name suffixes; a layer index or a list of them; a name or list."""
    if exclude_modules is not None:
        exclude_modules = check_target_modules(exclude_modules, "exclude_modules") if exclude_modules != [] else None
    if layers_to_transform is not None:
        indices = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
        if not isinstance(indices, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            raise TypeError("layers_to_transform must be a layer index or a list of indices (ints ≥ 0), got "
                            f"{layers_to_transform!r}")
        layers_to_transform = layers_to_transform if isinstance(layers_to_transform, int) else tuple(indices)
    if layers_pattern is not None:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"layers_pattern must be a string or a list of strings, got {layers_pattern!r}")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"layers_pattern {pattern!r} is not a valid regular expression: {err}") from None
        layers_pattern = tuple(patterns)
        if layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform (the layer indices to adapt)")
    return exclude_modules, layers_to_transform, layers_pattern


def layer_index(name: str, layers_pattern: tuple[str, ...] | None) -> int | None:
    """PEFT's layer index of a module name: the first number after a segment named by a layers
    pattern ("model.layers.3.mlp" → 3), or after any segment when none is given; None if none."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def selected(name: str, target_modules, exclude_modules=None, layers_to_transform=None,
             layers_pattern=None) -> bool:
    """PEFT's rule for one module name: excluded by `exclude_modules` first; then named by
    `target_modules` (a list: `layers_to_transform` applies to it)."""
    if exclude_modules is not None and matches_target(name, exclude_modules):
        return False
    if not matches_target(name, target_modules):
        return False
    if layers_to_transform is None:
        return True
    index = layer_index(name, layers_pattern)
    if index is None:
        return False
    return index == layers_to_transform if isinstance(layers_to_transform, int) else index in layers_to_transform


def find_targets(model: nn.Module, target_modules, kind=None, *, exclude_modules=None,
                 layers_to_transform=None, layers_pattern=None, task_type=None) -> list[tuple[str, nn.Module]]:
    """(name, module) of every submodule of `model` (of type `kind`, or for which the predicate
    `kind` holds — ``is_linear_layer`` —, when given) that
    `target_modules` names ("all-linear": :func:`all_linear_names`, for `task_type`), PEFT's
    `exclude_modules`, `layers_to_transform` and `layers_pattern` applied; none is a ValueError
    listing the names of the candidates."""
    exclude_modules, layers_to_transform, layers_pattern = check_layer_selection(
        exclude_modules, layers_to_transform, layers_pattern)
    if isinstance(target_modules, str) and layers_to_transform is not None:  # PEFT's LoraConfig refuses it too
        raise ValueError("layers_to_transform (and layers_pattern) cannot be used when target_modules is a string "
                         f"({target_modules!r}): name the modules as a list")
    if is_all_linear(target_modules):
        target_modules = all_linear_names(model, task_type)
        if not target_modules:
            raise ValueError(f"target_modules 'all-linear': {type(model).__name__} has no linear layer")
    target_modules = check_target_modules(target_modules)
    accepts = (lambda m: isinstance(m, kind)) if isinstance(kind, type) else kind
    candidates = [(name, module) for name, module in model.named_modules()
                  if name and (accepts is None or accepts(module))]
    found = [(name, module) for name, module in candidates
             if selected(name, target_modules, exclude_modules, layers_to_transform, layers_pattern)]
    if not found:
        names = [name for name, _ in candidates]
        what = "module" if kind is None else f"{kind.__module__}.{kind.__name__} layer" if isinstance(kind, type) \
            else "layer LoRA takes (nn.Linear, transformers' Conv1D, nn.Embedding)"
        shown = ", ".join(names[:40]) + (f", … ({len(names)} in all)" if len(names) > 40 else "")
        raise ValueError(f"target_modules {target_modules!r} matches no {what} of {type(model).__name__}; "
                         f"its {what} names are: {shown or '(none)'}")
    return found


def pattern_value(patterns: dict | None, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that, as a regex, matches the
    end of the module name at a dot boundary."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def check_patterns(rank_pattern, alpha_pattern) -> tuple[dict, dict]:
    """Validated copies: rank_pattern {regex: r ≥ 1}, alpha_pattern {regex: real}."""
    out = []
    for arg, patterns, check in (("rank_pattern", rank_pattern, checks.positive_int),
                                 ("alpha_pattern", alpha_pattern, checks.real_number)):
        if patterns is None:
            out.append({})
            continue
        if not isinstance(patterns, dict):
            raise TypeError(f"{arg} must be a dict of module-name regex → value, got {type(patterns).__name__}")
        checked = {}
        for key, value in patterns.items():
            if not isinstance(key, str):
                raise TypeError(f"{arg} keys must be strings, got {key!r}")
            try:
                re.compile(key)
            except re.error as err:
                raise ValueError(f"{arg} key {key!r} is not a valid regular expression: {err}") from None
            checked[key] = check(f"{arg}[{key!r}]", value)
        out.append(checked)
    return out[0], out[1]

"""PEFT's rules for naming modules: which modules ``target_modules`` selects, and the
per-module rank / alpha of ``rank_pattern`` / ``alpha_pattern``."""

from __future__ import annotations

import re

import torch.nn as nn

from ..ops import checks


def check_target_modules(target_modules: object) -> str | tuple[str, ...]:
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


def find_targets(model: nn.Module, target_modules, kind: type | None = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of every submodule of `model` (of type `kind`, when given) that
    `target_modules` names; none is a ValueError listing the names of the candidates."""
    target_modules = check_target_modules(target_modules)
    candidates = [(name, module) for name, module in model.named_modules()
                  if name and (kind is None or isinstance(module, kind))]
    found = [(name, module) for name, module in candidates if matches_target(name, target_modules)]
    if not found:
        names = [name for name, _ in candidates]
        what = f"{kind.__module__}.{kind.__name__} layer" if kind is not None else "module"
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

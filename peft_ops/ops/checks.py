"""Argument checks shared by every op: each error names the argument, and runs before any
kernel launch or state change."""

from __future__ import annotations

import math
import numbers

import torch

from ..kernels.interface import FLOAT_DTYPES


def tensor(name: str, value: object, *, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(value.shape)}")
    return value


def optional_tensor(name: str, value: object, **kw) -> torch.Tensor | None:
    return None if value is None else tensor(name, value, **kw)


def float_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}: they must match")


def same_device(named: dict[str, torch.Tensor | None]) -> None:
    items = [(n, t) for n, t in named.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: "
                             "all tensors must be on one device")


def real_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (int or float), got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def probability(name: str, value: object) -> float:
    value = real_number(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be ≥ 1, got {value}")
    return int(value)


def one_of(name: str, value: object, choices: tuple[str, ...]) -> str:
    """A string option: TypeError if not a str, ValueError if not one of `choices`."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


def module(name: str, value: object, kind: type = torch.nn.Module) -> torch.nn.Module:
    """A module argument: TypeError unless `value` is an instance of `kind` (nn.Module, nn.Linear …)."""
    if not isinstance(value, kind):
        where = "torch.nn" if kind.__module__.startswith("torch.nn") else kind.__module__
        raise TypeError(f"{name} must be a {where}.{kind.__qualname__}, got {type(value).__name__}")
    return value


def adapter_factors(lora_A, lora_B, in_features: int, out_features: int, base_dtype: torch.dtype,
                    names: tuple[str, str, str] = ("in_features", "out_features", "x's"),
                    factors: tuple[str, str] = ("lora_A", "lora_B")) -> int:
    """lora_A [r, in] and lora_B [out, r] of one adapter, in `base_dtype` or float32 (PEFT's fp32
    adapters); `names`: how the errors call in, out and the base dtype's owner; `factors`: how
    they call the two tensors. Returns r."""
    a_name, b_name = factors
    tensor(a_name, lora_A, ndim=2)
    tensor(b_name, lora_B, ndim=2)
    in_name, out_name, owner = names
    r = lora_A.shape[0]
    if r <= 0:
        raise ValueError(f"{a_name} has shape {tuple(lora_A.shape)}: the rank r (its first dimension) must be ≥ 1")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"{a_name} must be [r, {in_name}] = [{r}, {in_features}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"{b_name} must be [{out_name}, r] = [{out_features}, {r}], got {tuple(lora_B.shape)}")
    float_dtype(a_name, lora_A)
    same_dtype(b_name, lora_B, a_name, lora_A)
    if lora_A.dtype not in (base_dtype, torch.float32):
        raise TypeError(f"{a_name} has dtype {lora_A.dtype}: adapter weights must have {owner} dtype "
                        f"({base_dtype}) or float32")
    return r

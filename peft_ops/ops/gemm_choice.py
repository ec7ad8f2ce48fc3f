"""Which implementation of the LoRA ops' heavy products runs on the Triton backend:

- ``"triton"``: the fused GEMMs (``peft_ops.kernels.lora``): x·Wᵀ with the LoRA term and bias in
  its epilogue; dY·W with the LoRA term in its accumulator. Fewest launches and bytes.
- ``"cublas"``: ``torch.addmm`` (cuBLAS on a GPU) for x·Wᵀ and dY·W, the LoRA pieces in
  memory-bound Triton kernels written as addmm's C: one more launch per phase and one more
  M×N (M×K) write and read, against cuBLAS's GEMM where it beats ours.

The choice is per GPU, dtype and shape, made by measurement: ``peft-ops tune`` times both on
the GPU at hand and caches the winners as JSON in the user's cache folder
(``$PEFT_OPS_CACHE_DIR`` or ``~/.cache/peft-ops``, then ``tune/``), one file per device name,
torch version and triton version (a new driver stack or GPU measures again). Without a cached
entry the default rule decides: ``"triton"`` from 64 rows up (the fused GEMMs' tiles are 64-128
rows), ``"cublas"`` below (a decode-sized M fills few of the fused GEMMs' tiles; cuBLAS has
split-K and GEMV kernels for it). ``PEFT_OPS_GEMM=triton|cublas`` forces one.

The NF4 ops (QLoRA) choose the same way between two paths per phase ("nf4-forward",
"nf4-dx"): ``"fused"``, the NF4 kernels that decode W tile by tile inside the GEMM (or the
decode GEMV), and ``"dequant"``, W decoded once into a reusable buffer
(``peft_ops.ops.workspace``) and the dense LoRA path above on it. The default rule: the fused
kernels below DEFAULT_DEQUANT_MIN_ROWS rows (the decode GEMV reads 0.5 byte per weight; a
decoded copy would write and read 4 more, and the fused GEMMs decode each W tile in
registers once per 64-128 rows), the dense path from there (its GEMMs are the LoRA layer's;
the decode adds 2.5 bytes per weight, twice per step). The threshold is the static estimate's
crossover on an H200 (bf16, r = 16, layers 4096→4096, 4096→14336, 14336→4096, 4096→1024):
QLoRA fwd+bwd is faster fused at every M ≤ 256 (e.g. M = 128, 4096→4096: 84 against 89 µs),
dense at M = 512 on three of the four (4096→4096: 105 µs dense against 115 fused) and far beyond
(M = 8192: 1,296 against 788 µs). ``PEFT_OPS_NF4=fused|dequant`` forces one.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import pathlib
import re

import torch

GEMMS = ("triton", "cublas")
PHASES = ("forward", "dx")  # x·Wᵀ [M, N, K] and dY·W [M, K, N]
ENV_VAR = "PEFT_OPS_GEMM"
DEFAULT_MIN_ROWS = 64  # the default rule: the fused GEMMs from this many rows up
NF4_PATHS = ("fused", "dequant")
NF4_PHASES = ("nf4-forward", "nf4-dx")  # x·dequant(W)ᵀ [M, N, K] and dY·dequant(W) [M, K, N]
NF4_ENV_VAR = "PEFT_OPS_NF4"
DEFAULT_DEQUANT_MIN_ROWS = 512  # the NF4 default rule: the dense path from this many rows up (the estimate's crossover)


def cache_root() -> pathlib.Path:
    """The user's cache folder for this package (builds, tunings)."""
    return pathlib.Path(os.environ.get("PEFT_OPS_CACHE_DIR") or pathlib.Path.home() / ".cache" / "peft-ops")


def versions() -> dict:
    """The torch and triton versions tunings are keyed by (triton's read from its metadata: this
    module does not import triton, see ``peft_ops.backend``)."""
    return {"torch": torch.__version__, "triton": importlib.metadata.version("triton")}


def cache_file(device_name: str, versions: dict) -> pathlib.Path:
    """The tuning file of one GPU (by name) under one torch / triton pair."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", device_name).strip("-")
    return cache_root() / "tune" / f"{slug}-torch{versions['torch']}-triton{versions['triton']}.json"


def shape_key(phase: str, dtype: torch.dtype, M: int, N: int, K: int, r: int) -> str:
    """The key of one tuned case: M and r by powers of two (one tuning per bucket), the layer's
    sizes exact. For "dx", N and K are those of the layer (the GEMM is dY [M, N] · W [N, K])."""
    bucket = 1 << max(int(M) - 1, 0).bit_length()
    rank = 1 << max(int(r) - 1, 0).bit_length()
    return f"{phase}|{str(dtype).removeprefix('torch.')}|M{bucket}|N{N}|K{K}|r{rank}"


def default_rule(M: int) -> str:
    return "triton" if M >= DEFAULT_MIN_ROWS else "cublas"


@functools.lru_cache(maxsize=None)
def _choices(device_name: str) -> dict:
    """The tuning file's choices for a GPU, read once per process (a per-call file check would
    cost every layer call a system call); ``write`` clears this."""
    try:
        choices = json.loads(cache_file(device_name, versions()).read_text()).get("choices", {})
    except (OSError, ValueError):
        return {}  # no tuning, or an unreadable one: the default rule decides
    return choices if isinstance(choices, dict) else {}


def default_nf4_rule(M: int) -> str:
    return "dequant" if M >= DEFAULT_DEQUANT_MIN_ROWS else "fused"


def tuned(device_name: str, key: str, field: str = "gemm", options: tuple = GEMMS) -> str | None:
    """The cached winner for `key` on GPU `device_name` under this torch / triton, or None
    (`field` / `options`: "gemm" among GEMMS for the LoRA products, "path" among NF4_PATHS)."""
    entry = _choices(device_name).get(key)
    return entry.get(field) if isinstance(entry, dict) and entry.get(field) in options else None


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _decide(env_var: str, options: tuple, field: str, rule, phase: str, dtype: torch.dtype, M: int, N: int,
            K: int, r: int, device: torch.device) -> str:
    """One of `options` for one product on `device`: `env_var` if set; on a GPU the tuned winner
    (cached under `field`), else `rule(M)`; for a launch plan (meta tensors, planned for a GPU)
    `rule(M)`; off a GPU (the Triton interpreter) the first option, the fused kernels it tests."""
    forced = os.environ.get(env_var, "auto")
    if forced in options:
        return forced
    if forced != "auto":
        raise ValueError(f"{env_var} must be one of {options + ('auto',)}; got {forced!r}")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        found = tuned(_device_name(index), shape_key(phase, dtype, M, N, K, r), field, options)
        return found if found is not None else rule(M)
    return rule(M) if device.type == "meta" else options[0]


def choose(phase: str, dtype: torch.dtype, M: int, N: int, K: int, r: int, device: torch.device) -> str:
    """"triton" or "cublas" for one LoRA product on `device` (PEFT_OPS_GEMM, a tuning, or
    `default_rule`; see `_decide`)."""
    return _decide(ENV_VAR, GEMMS, "gemm", default_rule, phase, dtype, M, N, K, r, device)


def choose_nf4(phase: str, dtype: torch.dtype, M: int, N: int, K: int, r: int, device: torch.device) -> str:
    """"fused" or "dequant" for one NF4 product on `device` (PEFT_OPS_NF4, a tuning, or
    `default_nf4_rule`; off a GPU the fused kernels: the dense path is tested pinned)."""
    return _decide(NF4_ENV_VAR, NF4_PATHS, "path", default_nf4_rule, phase, dtype, M, N, K, r, device)


def write(device_name: str, versions: dict, choices: dict) -> pathlib.Path:
    """Merge `choices` ({key: {"gemm" or "path": …, "ms": {option: ms}}}) into the tuning file; atomic."""
    path = cache_file(device_name, versions)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = {}
    if path.exists():
        try:
            old = json.loads(path.read_text()).get("choices", {})
        except ValueError:
            old = {}
    record = {"device": device_name, **versions, "choices": {**old, **choices}}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(path)
    _choices.cache_clear()  # this process sees the new choices
    return path

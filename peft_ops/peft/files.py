"""Hugging Face PEFT's adapter folders (adapter_config.json + adapter_model.safetensors): the
checked reading and writing that LoRA and the prompt methods share, and the LoRA files
(``save_peft_adapter`` / ``load_peft_adapter``). safetensors only: nothing is unpickled."""

from __future__ import annotations

import collections
import json
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..nn.lora import LoraEmbedding, LoraLinear, QLoraLinear, check_adapter_name, linear_features
from ..ops import checks
from .config import lora_settings
from .model import (
    EXTRAS,
    LORA_LAYERS,
    adapter_names,
    check_extras,
    lora_layers,
    mark_extras_trainable,
    replace_linears,
    saved_module_names,
)
from .targets import find_targets, is_lora_target, pattern_value

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PEFT's prefix of every saved key (the adapter name is stripped)


# --------------------------------------------------------------------------------------
# Reading and writing a folder
# --------------------------------------------------------------------------------------

def read_folder(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a PEFT adapter folder, or a ValueError / FileNotFoundError that
    says what is wrong. A pickled adapter_model.bin is refused, never opened."""
    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise ValueError(f"{path} holds adapter_model.bin (a pickle, which can run code when loaded): only "
                             "safetensors files are read. Convert it where you trust it, or save it again with "
                             "safe_serialization=True")
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {config_path}: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} does not hold a JSON object")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"cannot read {weights_path} (damaged or not safetensors): {err}") from None
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{weights_path}: {key} has dtype {tensor.dtype}, not floating point")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{weights_path}: {key} holds NaN or infinite values")
    return config, tensors


def write_folder(path: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    os.makedirs(path, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(path, WEIGHTS_NAME))
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def base_model_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "name_or_path", None) or None


# --------------------------------------------------------------------------------------
# LoRA files
# --------------------------------------------------------------------------------------

def _most_common(values):
    return collections.Counter(values).most_common(1)[0][0]


def save_peft_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Write the LoRA layers of `model` (``LoraLinear`` / ``QLoraLinear`` / ``LoraEmbedding``) as
    a PEFT adapter folder that ``peft.PeftModel.from_pretrained`` loads: keys
    ``base_model.model.<module>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r] in the
    adapters' dtype (an embedding's ``...lora_embedding_A`` [r, V] and ``...lora_embedding_B``
    [D, r]; DoRA layers: ``...lora_magnitude_vector`` [out] too, and ``use_dora``);
    ``target_modules`` the exact module names; the most common r and lora_alpha as ``r`` /
    ``lora_alpha``, the others in ``rank_pattern`` / ``alpha_pattern``.

    Several named adapters are written as PEFT's ``save_pretrained`` writes them: "default" in
    `path`, any other in ``path/<name>``; ``adapter_name`` writes that one alone (in the same
    place).

    In a process group (DDP, FSDP2) every rank calls it and rank 0 writes; FSDP2-sharded
    adapters are gathered first."""
    checks.module("model", model)
    names = adapter_names(model)
    if not names:
        raise ValueError(f"model ({type(model).__name__}) has no LoraLinear, QLoraLinear or LoraEmbedding layer "
                         "to save")
    if adapter_name is not None:
        if check_adapter_name(adapter_name) not in names:
            raise ValueError(f"adapter_name {adapter_name!r} is not on the model; its adapters: {names}")
        names = [adapter_name]
    folders = [(name, _adapter_folder(model, name)) for name in names]  # every check before any write
    if _distributed_rank() in (None, 0):  # in a process group, rank 0 writes
        for name, (config, tensors) in folders:
            write_folder(path if name == "default" else os.path.join(path, name), config, tensors)


def _adapter_folder(model: nn.Module, name: str) -> tuple[dict, dict]:
    """(adapter_config.json's dict, the tensors) of adapter `name`."""
    layers = [(n, layer, layer.adapter(name)) for n, layer in lora_layers(model) if name in layer.adapter_names]
    rslora = {a.use_rslora for _, _, a in layers}
    if len(rslora) > 1:
        raise ValueError(f"adapter {name!r}: some layers use rsLoRA and some do not: PEFT's config has one "
                         "use_rslora for all")
    dora = {a.use_dora for _, _, a in layers}
    if len(dora) > 1:
        raise ValueError(f"adapter {name!r}: some layers use DoRA and some do not: PEFT's config has one use_dora "
                         "for all")
    use_dora = dora.pop()
    extras = getattr(model, EXTRAS, None) or {"modules_to_save": None, "bias": "none"}
    r = _most_common(a.r for _, _, a in layers)
    alpha = _most_common(a.lora_alpha for _, _, a in layers)
    config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": _most_common(a.lora_dropout for _, _, a in layers),
        "use_rslora": rslora.pop(), "target_modules": sorted(n for n, _, _ in layers),
        "rank_pattern": {n: a.r for n, _, a in layers if a.r != r},
        "alpha_pattern": {n: a.lora_alpha for n, _, a in layers if a.lora_alpha != alpha},
        "bias": extras["bias"], "fan_in_fan_out": any(getattr(m, "fan_in_fan_out", False) for _, m, _ in layers),
        "use_dora": use_dora, "modules_to_save": extras["modules_to_save"],
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
        "base_model_name_or_path": base_model_name(model), "revision": None,
    }
    tensors = {}
    for n, layer, adapter in layers:
        if isinstance(layer, LoraEmbedding):  # PEFT's ParameterDict keys, the adapter name stripped
            tensors[f"{KEY_PREFIX}{n}.lora_embedding_A"] = _full(adapter.lora_embedding_A)
            tensors[f"{KEY_PREFIX}{n}.lora_embedding_B"] = _full(adapter.lora_embedding_B)
            continue
        tensors[f"{KEY_PREFIX}{n}.lora_A.weight"] = _full(adapter.lora_A)
        tensors[f"{KEY_PREFIX}{n}.lora_B.weight"] = _full(adapter.lora_B)
        if use_dora:  # PEFT's key: its ModuleDict's ".<adapter>.weight" stripped
            tensors[f"{KEY_PREFIX}{n}.lora_magnitude_vector"] = _full(adapter.lora_magnitude_vector)
    for key, (_, param) in extra_keys(model, extras, [n for n, _, _ in layers]).items():
        tensors[key] = _full(param)
    return config, tensors


def extra_keys(model: nn.Module, extras: dict, lora_names: list[str]) -> dict[str, tuple[str, nn.Parameter]]:
    """PEFT's keys of what trains beside the adapters → (parameter name in `model`, parameter):
    each parameter of a modules_to_save module (``<module>.<param>``), and the `bias` mode's
    biases — a LoRA layer's under ``<module>.base_layer.bias`` (PEFT's wrapper holds the base
    layer there), any other as named."""
    out = {}
    for module in saved_module_names(model, extras["modules_to_save"] or []):
        for name, param in model.get_submodule(module).named_parameters():
            out[f"{KEY_PREFIX}{module}.{name}"] = (f"{module}.{name}", param)
    lora = set(lora_names)
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if extras["bias"] == "all" and "bias" in name or extras["bias"] == "lora_only" and owner in lora \
                and leaf == "bias":
            out[f"{KEY_PREFIX}{owner}.base_layer.{leaf}" if owner in lora else f"{KEY_PREFIX}{name}"] = (name, param)
    return out


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded (DTensor) parameter — a collective: every rank must
    call save_peft_adapter — or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _distributed_rank() -> int | None:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


def load_peft_adapter(model: nn.Module, path: str | os.PathLike, quantize: str | None = None,
                      adapter_name: str = "default") -> nn.Module:
    """Read a PEFT LoRA folder into a plain `model`: put a ``LoraLinear`` (``QLoraLinear`` with
    ``quantize="nf4"``) on each linear layer the config's ``target_modules`` name (less
    ``exclude_modules``), with its ``r``, ``lora_alpha``, ``use_rslora``, ``use_dora`` (DoRA /
    QDoRA, the magnitude from ``lora_magnitude_vector``), ``rank_pattern`` and
    ``alpha_pattern``, load the adapter weights, freeze the rest, and return the model.

    ``adapter_name``: the adapter's name. On a model that has LoRA layers already it is added
    beside their adapters (PEFT's ``load_adapter``; a folder of PEFT's ``save_pretrained`` holds a
    non-default adapter in its sub-folder ``<name>``), not active, frozen until
    :func:`~peft_ops.set_adapter` picks it.

    Every field, key, shape, dtype and value is checked before the model changes: on any
    error (missing or extra keys, shapes that disagree with the config, a damaged file, an
    unsupported option, a .bin pickle) the model is exactly as before."""
    checks.module("model", model)
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    adapter_name = check_adapter_name(adapter_name)
    config, tensors = read_folder(path)
    where = os.path.join(path, CONFIG_NAME)
    cfg = lora_settings(config, where)
    others = [n for n in adapter_names(model) if n != adapter_name]
    if others and (cfg["modules_to_save"] or cfg["bias"] != "none"):
        raise ValueError(f"{where}: modules_to_save and trained biases with several adapters are not supported (the "
                         f"model has {others})")
    targets = find_targets(model, cfg["target_modules"], is_lora_target, exclude_modules=cfg["exclude_modules"],
                           layers_to_transform=cfg["layers_to_transform"], layers_pattern=cfg["layers_pattern"],
                           task_type=cfg["task_type"])
    extras = check_extras(model, cfg["modules_to_save"], cfg["bias"], cfg["task_type"],
                          [name for name, _ in targets])
    beside = extra_keys(model, extras, [name for name, _ in targets])  # modules_to_save, trained biases
    for key, (name, param) in beside.items():
        if key in tensors and tensors[key].shape != param.shape:
            raise ValueError(f"{key} has shape {tuple(tensors[key].shape)}, but the model's {name} is "
                             f"{tuple(param.shape)}")
    expected, plan = set(beside), []
    for name, linear in targets:
        r = checks.positive_int(f"rank_pattern for {name}", pattern_value(cfg["rank_pattern"], name, cfg["r"]))
        alpha = pattern_value(cfg["alpha_pattern"], name, cfg["lora_alpha"])
        if isinstance(linear, (nn.Embedding, LoraEmbedding)):  # PEFT's lora_embedding_A [r, V], _B [D, r]
            in_features, out_features = linear.num_embeddings, linear.embedding_dim
            key_a, key_b = f"{KEY_PREFIX}{name}.lora_embedding_A", f"{KEY_PREFIX}{name}.lora_embedding_B"
            key_m = None
            table = f"{KEY_PREFIX}{name}.base_layer.weight"  # PEFT saves a targeted embedding's table too
            if table in tensors:
                if tensors[table].shape != linear.weight.shape:
                    raise ValueError(f"{table} has shape {tuple(tensors[table].shape)}, but the model's {name} is "
                                     f"{tuple(linear.weight.shape)}")
                beside[table] = (f"{name}.weight", linear.weight)
                expected.add(table)
        else:
            in_features, out_features = (linear.in_features, linear.out_features) if isinstance(
                linear, (LoraLinear, QLoraLinear)) else linear_features(linear, name)[:2]
            key_a, key_b = f"{KEY_PREFIX}{name}.lora_A.weight", f"{KEY_PREFIX}{name}.lora_B.weight"
            key_m = f"{KEY_PREFIX}{name}.lora_magnitude_vector" if cfg["use_dora"] else None
        expected |= {key_a, key_b} | ({key_m} if key_m else set())
        shapes = [(key_a, (r, in_features)), (key_b, (out_features, r))]
        for key, shape in shapes + ([(key_m, (out_features,))] if key_m else []):
            if key in tensors and tuple(tensors[key].shape) != shape:
                raise ValueError(f"{key} has shape {tuple(tensors[key].shape)}, but the config (r={r}) and the "
                                 f"model's {name} ({in_features}→{out_features}) need {shape}")
        plan.append((name, linear, r, alpha, key_a, key_b, key_m))
    # PEFT's bias="all" also writes the biases its ModulesToSaveWrapper holds inside (the trained
    # copy, again, and the original): known, and not read
    wrapped = {f"{KEY_PREFIX}{module}.{level}.{name}" for module in extras["modules"]
               for level in ("modules_to_save", "original_module")
               for name, _ in model.get_submodule(module).named_parameters() if "bias" in name} \
        if cfg["bias"] == "all" else set()
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected - wrapped)
    if missing or extra:
        raise ValueError(f"{path}: the adapter weights do not fit the config on this model: "
                         f"missing {missing[:6]}{' …' if len(missing) > 6 else ''}, "
                         f"unexpected {extra[:6]}{' …' if len(extra) > 6 else ''}")
    layers = []
    for name, linear, r, alpha, key_a, key_b, key_m in plan:
        weights = (tensors[key_a], tensors[key_b]) + ((tensors[key_m],) if key_m else ())
        # PEFT's fp32 adapters stay fp32 on a half-precision base (our layers take them as they are)
        base_dtype = linear._base_dtype() if isinstance(linear, LORA_LAYERS) else linear.weight.dtype
        adapter_dtype = torch.float32 if weights[0].dtype == torch.float32 else base_dtype
        layers.append((name, dict(r=r, lora_alpha=alpha, lora_dropout=cfg["lora_dropout"],
                                  use_rslora=cfg["use_rslora"], adapter_dtype=adapter_dtype,
                                  use_dora=cfg["use_dora"], adapter_name=adapter_name), weights))
    replace_linears(model, layers, quantize)
    with torch.no_grad():  # (by name: a QLoraLinear holds a new bias Parameter)
        for key, (name, _) in beside.items():
            model.get_parameter(name).copy_(tensors[key])
    return mark_extras_trainable(model, extras)

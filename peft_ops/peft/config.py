"""PEFT's LoRA configuration read field by field, for its files (``load_peft_adapter``) and for
``apply_lora(model, peft.LoraConfig(...))``: each field is honoured, is metadata, or is refused
by name — never silently ignored where it would change what the model computes."""

from __future__ import annotations

from ..ops import checks
from .targets import check_patterns

# What these layers do with a config: the selection (targets.find_targets), the layer settings.
HONOURED = ("target_modules", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "rank_pattern",
            "alpha_pattern", "exclude_modules", "layers_to_transform", "layers_pattern", "task_type",
            "fan_in_fan_out", "modules_to_save", "bias")
# Fields that describe the adapter but change nothing the layers compute.
METADATA = ("peft_type", "inference_mode", "base_model_name_or_path", "revision", "auto_mapping", "peft_version")
# Fields whose non-default values ask for something these layers do not do (named in the error).
UNSUPPORTED = {
    "lora_bias": "lora_bias", "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable_token_indices", "use_qalora": "QALoRA",
    "alora_invocation_tokens": "aLoRA", "megatron_config": "Megatron layers",
    # variants that change what a trained adapter computes (a file of one must not load as LoRA)
    "use_bdlora": "BD-LoRA", "arrow_config": "Arrow routing", "kasa_config": "KaSA", "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA", "layer_replication": "layer_replication",
}


# PEFT's `bias`: which biases train beside the adapters (and are saved with them).
BIAS_MODES = ("none", "lora_only", "all")
# The heads PEFT's task models add to modules_to_save (PeftModelForSequenceClassification, …).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}


# PEFT's defaults that are not falsy, for a config dict read without peft installed.
_TRUTHY_DEFAULTS = {"init_lora_weights": True, "megatron_core": "megatron.core", "qalora_group_size": 16}


def _peft_defaults() -> dict:
    """peft.LoraConfig's defaults, field by field (without peft: its non-falsy ones)."""
    try:
        import peft
    except ImportError:
        return dict(_TRUTHY_DEFAULTS)
    return peft.LoraConfig().to_dict()


def is_config(value: object) -> bool:
    """A LoRA config (a PEFT config object, or a dict) rather than a target_modules value."""
    return isinstance(value, dict) or (callable(getattr(value, "to_dict", None)) and hasattr(value, "peft_type"))


def config_dict(config: object) -> dict:
    """A ``peft.LoraConfig`` (or any PEFT config object) or its dict, as a plain dict."""
    if not is_config(config):
        raise TypeError(f"config must be a peft.LoraConfig or its dict, got {type(config).__name__}")
    return dict(config) if isinstance(config, dict) else config.to_dict()


def lora_settings(config: dict, where: str, *, creating: bool = False) -> dict:
    """The settings of a PEFT LoRA config {target_modules, r, lora_alpha, lora_dropout, use_rslora,
    use_dora, rank_pattern, alpha_pattern, exclude_modules, layers_to_transform, layers_pattern,
    task_type, modules_to_save, bias}, every value checked; a ValueError naming `where` and the field for anything else.
    `creating` (new adapters from a config, not a file's trained weights): every other field must
    hold PEFT's default too (an initialization such as ``init_lora_weights="gaussian"`` included)."""
    peft_type = config.get("peft_type", "LORA" if creating else None)  # a hand-written dict may leave it out
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type is {peft_type!r}, not 'LORA' (prompt-learning folders "
                         "load with peft_ops.load_prompt_learning)")
    for field, what in UNSUPPORTED.items():
        if config.get(field):
            raise ValueError(f"{where}: {what} ({field}={config[field]!r}) is not supported")
    bias = config.get("bias", "none")
    if bias not in BIAS_MODES:
        raise ValueError(f"{where}: bias must be one of {BIAS_MODES}, got {bias!r}")
    modules_to_save = config.get("modules_to_save") or None
    if modules_to_save is not None:
        modules_to_save = [modules_to_save] if isinstance(modules_to_save, str) else modules_to_save
        if not isinstance(modules_to_save, (list, tuple, set)) or not all(isinstance(m, str) and m
                                                                          for m in modules_to_save):
            raise ValueError(f"{where}: modules_to_save must be a list of module names, got {modules_to_save!r}")
        modules_to_save = list(modules_to_save)
    if creating:
        defaults = _peft_defaults()
        for field, value in config.items():
            if field in HONOURED or field in METADATA:
                continue
            default = defaults.get(field)
            if value != default and not (default is None and not value):
                raise ValueError(f"{where}: {field}={value!r} is not supported (only PEFT's default, {default!r})")
    targets = config.get("target_modules")
    if not targets:
        raise ValueError(f"{where}: target_modules is missing (PEFT's per-architecture defaults are not guessed)")
    if isinstance(targets, (set, frozenset)):
        targets = sorted(targets)
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise ValueError(f"{where}: use_rslora must be true or false")
    use_dora = config.get("use_dora", False)
    if not isinstance(use_dora, bool):
        raise ValueError(f"{where}: use_dora must be true or false")
    # PEFT sets each layer's layout from its module (Conv1D: [in, out]; nn.Linear: [out, in]),
    # warning when the flag disagrees: the layers here do the same, the flag only checked
    if not isinstance(config.get("fan_in_fan_out", False), bool):
        raise ValueError(f"{where}: fan_in_fan_out must be true or false")
    task_type = config.get("task_type")
    task_type = getattr(task_type, "value", task_type)  # PEFT's TaskType enum or its string
    rank_pattern, alpha_pattern = check_patterns(config.get("rank_pattern") or None,
                                                 config.get("alpha_pattern") or None)
    return {"target_modules": targets, "r": checks.positive_int("r", config.get("r", 8)),
            "lora_alpha": checks.real_number("lora_alpha", config.get("lora_alpha", 8)),
            "lora_dropout": checks.probability("lora_dropout", config.get("lora_dropout", 0.0)),
            "use_rslora": use_rslora, "use_dora": use_dora, "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "exclude_modules": config.get("exclude_modules"),
            "layers_to_transform": config.get("layers_to_transform"), "layers_pattern": config.get("layers_pattern"),
            "task_type": task_type, "modules_to_save": modules_to_save, "bias": bias}

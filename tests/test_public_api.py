"""The public API keeps its names across the package's reorganization: everything
`peft_ops.__all__`, `peft_ops.nf4` and `peft_ops.reference` offered before is still there,
at the same import path, and the `peft-ops` commands still run."""

import pytest

import peft_ops
from peft_ops.tools import cli

# As released before the package was layered (commit 9116e05).
TOP_LEVEL = {
    "BottleneckAdapter", "BottleneckAdapterFunction", "FromPeftReport", "LoraLinear", "LoraLinearFunction",
    "NF4LinearFunction", "NF4Weight", "PrefixTuning", "PromptEncoder", "PromptLearningModel", "PromptTuning",
    "QLoraLinear", "QLoraLinearFunction", "WithAdapter", "apply_adapters", "apply_lora", "apply_prompt_learning",
    "bottleneck_adapter", "from_peft", "get_backend", "load_peft_adapter", "load_prompt_learning", "lora_linear",
    "merge_and_unload", "nf4", "nf4_linear", "qlora_linear", "reference", "save_peft_adapter",
    "save_prompt_learning", "set_backend", "trainable_parameters", "trainable_summary", "use_backend",
}
NF4 = {"ABSMAX_BLOCKSIZE", "BLOCKSIZES", "NF4Tensors", "NF4Weight", "NF4_CODE_VALUES", "NF4_ZERO_INDEX",
       "check_blocksize", "dequantize", "dynamic_map", "nf4_code", "quantize"}
REFERENCE = {"PHILOX_KEY_STEPS", "PHILOX_MULTIPLIERS", "bottleneck_adapter", "dropout_keep_mask", "lora_linear",
             "nf4_dequantize", "nf4_linear", "philox4x32_10", "philox_uniform", "qlora_linear"}


def test_top_level_names_are_kept():
    assert TOP_LEVEL <= set(peft_ops.__all__)
    assert all(hasattr(peft_ops, name) for name in peft_ops.__all__)


@pytest.mark.parametrize("module, names", [(peft_ops.nf4, NF4), (peft_ops.reference, REFERENCE)],
                         ids=["nf4", "reference"])
def test_public_module_names_are_kept(module, names):
    assert not {name for name in names if not hasattr(module, name)}


@pytest.mark.parametrize("command", ["check", "bench", "aot", "compile"])
def test_every_command_answers_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    assert "usage: peft-ops" in capsys.readouterr().out

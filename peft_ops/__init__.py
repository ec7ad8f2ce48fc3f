"""peft-ops: fused Triton kernels for parameter-efficient fine-tuning.

    import peft_ops
    y = peft_ops.lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout_p)
    y = peft_ops.dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, bias, dropout_p)  # DoRA
    layer = peft_ops.LoraLinear.from_linear(linear, r=16, lora_alpha=32)
    qlayer = peft_ops.QLoraLinear.from_linear(linear, r=16, lora_alpha=32)   # NF4 base (QLoRA)
    y = peft_ops.bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, "gelu", scaling)
    model = peft_ops.apply_adapters(model, ["self_attn", "mlp"], bottleneck_size=64)  # Houlsby
    peft_ops.prepare_fsdp(model)  # FSDP-QLoRA: fully_shard then shards the NF4 weights too
    wrapped = peft_ops.apply_prompt_learning(causal_lm, "prefix_tuning", num_virtual_tokens=20)

Kernels are imported lazily, on the first op that runs them: set TRITON_INTERPRET=1 before
that to run them on CPU tensors through the Triton interpreter.

Layers, each importing only those before it: ``peft_ops.kernels`` (Triton kernels and their
launchers) → ``peft_ops.ops`` (autograd Functions, the PyTorch path, custom ops; with
``backend``, ``nf4`` and ``reference`` beside them) → ``peft_ops.nn`` (layers) →
``peft_ops.peft`` (PEFT's rules and files) → ``peft_ops.tools`` (the ``peft-ops`` command).
"""

from . import nf4, reference
from .backend import get_backend, set_backend, use_backend
from .nf4 import NF4Weight
from .nn.bottleneck import BottleneckAdapter, WithAdapter
from .nn.lora import LoraEmbedding, LoraLinear, QLoraLinear
from .nn.prompt import PrefixTuning, PromptEncoder, PromptTuning
from .ops.bottleneck import BottleneckAdapterFunction, bottleneck_adapter
from .ops.dora import DoraLinearFunction, QDoraLinearFunction, dora_linear, qdora_linear, squared_row_norms
from .ops.embedding import LoraEmbeddingFunction, lora_embedding
from .ops.lora import LoraLinearFunction, lora_linear
from .ops.multi_lora import MultiLoraLinearFunction, multi_lora_linear
from .ops.qlora import NF4LinearFunction, QLoraLinearFunction, nf4_linear, qlora_linear
from .ops.workspace import free_workspaces, workspace_bytes
from .peft.files import load_peft_adapter, save_peft_adapter
from .peft.from_peft import FromPeftReport, from_peft
from .peft.fsdp import load_base_weights, load_sharded_checkpoint, prepare_fsdp, save_sharded_checkpoint
from .peft.model import (
    active_adapter,
    adapter_names,
    add_adapter,
    apply_adapters,
    apply_lora,
    delete_adapter,
    disable_adapters,
    merge_and_unload,
    mixed_adapter_batch,
    set_adapter,
    trainable_parameters,
    trainable_summary,
)
from .peft.prompt import PromptLearningModel, apply_prompt_learning, load_prompt_learning, save_prompt_learning

__all__ = [
    "BottleneckAdapter",
    "BottleneckAdapterFunction",
    "DoraLinearFunction",
    "FromPeftReport",
    "LoraEmbedding",
    "LoraEmbeddingFunction",
    "LoraLinear",
    "LoraLinearFunction",
    "MultiLoraLinearFunction",
    "NF4LinearFunction",
    "NF4Weight",
    "PrefixTuning",
    "PromptEncoder",
    "PromptLearningModel",
    "PromptTuning",
    "QLoraLinear",
    "QDoraLinearFunction",
    "QLoraLinearFunction",
    "WithAdapter",
    "active_adapter",
    "adapter_names",
    "add_adapter",
    "apply_adapters",
    "apply_lora",
    "apply_prompt_learning",
    "bottleneck_adapter",
    "delete_adapter",
    "disable_adapters",
    "dora_linear",
    "free_workspaces",
    "from_peft",
    "get_backend",
    "load_base_weights",
    "load_peft_adapter",
    "load_prompt_learning",
    "load_sharded_checkpoint",
    "lora_embedding",
    "lora_linear",
    "merge_and_unload",
    "mixed_adapter_batch",
    "multi_lora_linear",
    "nf4",
    "nf4_linear",
    "qdora_linear",
    "qlora_linear",
    "prepare_fsdp",
    "reference",
    "save_peft_adapter",
    "save_prompt_learning",
    "save_sharded_checkpoint",
    "set_adapter",
    "set_backend",
    "squared_row_norms",
    "trainable_parameters",
    "trainable_summary",
    "use_backend",
    "workspace_bytes",
]
__version__ = "0.1.0"

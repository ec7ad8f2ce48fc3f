"""``from_peft``: run the LoRA layers of an existing Hugging Face ``PeftModel`` on the fused
ops, in place, without changing the training script.

Each supported layer keeps its object, its submodules and its Parameters — so the optimizer,
``state_dict`` keys, ``save_pretrained``, ``merge_and_unload`` and ``disable_adapter`` keep
working — and only its class changes, to a subclass of PEFT's own whose ``forward`` calls
:func:`peft_ops.lora_linear` (or :func:`peft_ops.qlora_linear` over a bitsandbytes 4-bit
base). Any call the fused op does not cover (adapters disabled or merged, a dtype it does not
take, DoRA in a mixed-adapter batch) goes to PEFT's forward, so results never silently differ.
A mixed-adapter batch (``model(…, adapter_names=[…])``) runs :func:`peft_ops.multi_lora_linear`
in each layer, in training mode too (PEFT alone refuses it there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
import warnings

import torch
import torch.nn as nn

from ..nf4 import NF4Weight
from ..nn.lora import BASE_ADAPTER, is_conv1d
from ..ops import checks
from ..ops.dora import RowNormCache, dora_linear, qdora_linear
from ..ops.embedding import lora_embedding
from ..ops.lora import lora_linear
from ..ops.multi_lora import multi_lora_linear, sample_adapter_ids
from ..ops.qlora import qlora_linear


@dataclasses.dataclass
class FromPeftReport:
    swapped: list[str]  # module names now on the fused ops
    skipped: dict[str, str]  # module name → why it was left as PEFT's


class _FusedLoraForward:
    """Mixed in front of PEFT's LoRA layer class: the fused forward when it applies, else
    PEFT's (see ``_fused_plan``)."""

    def _fused_plan(self, x: torch.Tensor, args, kwargs):
        """(adapter name, dropout p, DoRA magnitude or None) when the fused op computes exactly
        PEFT's result, else None."""
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return None
        return self._adapter_plan(active[0], x)

    def _adapter_plan(self, adapter: str, x: torch.Tensor):
        """(adapter, dropout p, DoRA magnitude or None) when the fused op computes adapter's term
        exactly as PEFT does, else None."""
        magnitude = None
        variant = getattr(self, "lora_variant", {}).get(adapter)
        if variant is not None:
            if not _is_dora(variant):
                return None
            magnitude = self.lora_magnitude_vector[adapter].weight
        dropout = self.lora_dropout[adapter]
        if isinstance(dropout, nn.Identity) or not self.training:
            p = 0.0
        elif type(dropout) is nn.Dropout:
            p = dropout.p
        else:
            return None
        if self.lora_B[adapter].bias is not None or self.lora_A[adapter].bias is not None:
            return None
        a_dtype = self.lora_A[adapter].weight.dtype
        if a_dtype != self.lora_B[adapter].weight.dtype or a_dtype not in (x.dtype, torch.float32):
            return None
        if magnitude is not None and magnitude.dtype not in (x.dtype, torch.float32):
            return None
        return adapter, p, magnitude

    def _peft_forward(self, x, *args, **kwargs):
        return super(_FusedLoraForward, self).forward(x, *args, **kwargs)  # PEFT's own class, next in the MRO

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if not args and set(kwargs) == {"adapter_names"} and not self.disable_adapters and not self.merged:
            mixed = self._fused_mixed(x, kwargs["adapter_names"])
            if mixed is not None:
                return mixed
        plan = self._fused_plan(x, args, kwargs)
        if plan is None:
            return self._peft_forward(x, *args, **kwargs)
        adapter, p, magnitude = plan
        return self._fused_forward(x, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                   self.scaling[adapter], p, magnitude)

    def _fused_mixed(self, x: torch.Tensor, adapter_names):
        """PEFT's mixed batch (sample i runs ``adapter_names[i]``; "__base__" or an adapter this
        layer lacks: the base alone) as one :func:`peft_ops.multi_lora_linear` call, when every
        adapter in it is plain LoRA the fused op computes exactly; else None (PEFT's forward)."""
        if x.dim() < 2 or len(adapter_names) != x.shape[0]:
            return None
        present = [n for n in dict.fromkeys(adapter_names) if n in self.lora_A]
        plans = [self._adapter_plan(n, x) for n in present]
        if not present or any(plan is None or plan[2] is not None for plan in plans):
            return None
        base = self._mixed_base(x)
        if base is None:
            return None
        weight, bias = base
        adapter_ids = sample_adapter_ids(adapter_names, present, x)
        return multi_lora_linear(x, weight, [self.lora_A[n].weight for n in present],
                                 [self.lora_B[n].weight for n in present], [self.scaling[n] for n in present],
                                 adapter_ids, bias, [p for _, p, _ in plans])


class _FusedLinear(_FusedLoraForward):
    def _fused_forward(self, x, lora_A, lora_B, scaling, p, magnitude):
        base = self.base_layer
        if x.dtype != base.weight.dtype:  # lora_linear takes one dtype for x and W: let PEFT cast
            return self._peft_forward(x)
        weight = base.weight.t() if self.fan_in_fan_out else base.weight  # Conv1D's [in, out], read in place
        if magnitude is not None:
            return dora_linear(x, weight, lora_A, lora_B, magnitude, scaling, base.bias, p,
                               weight_sq_norm=self._peft_ops_sq_norms(weight, x.dtype))
        return lora_linear(x, weight, lora_A, lora_B, scaling, base.bias, p)


    def _mixed_base(self, x):
        """(weight [out, in], bias) for the grouped op, or None when x's dtype is not the weight's."""
        base = self.base_layer
        if x.dtype != base.weight.dtype:
            return None
        return (base.weight.t() if self.fan_in_fan_out else base.weight), base.bias

class _FusedLinear4bit(_FusedLoraForward):
    def _mixed_base(self, x):
        qweight = self._peft_ops_nf4
        if x.dtype != qweight.dtype:
            return None
        bias = self.get_base_layer().bias
        return qweight, (bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias)

    def _fused_forward(self, x, lora_A, lora_B, scaling, p, magnitude):
        qweight = self._peft_ops_nf4  # NF4Weight over the layer's own bitsandbytes tensors
        if x.dtype != qweight.dtype:
            return self._peft_forward(x)
        bias = self.get_base_layer().bias
        bias = bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias
        if magnitude is not None:
            return qdora_linear(x, qweight, lora_A, lora_B, magnitude, scaling, bias, p,
                                weight_sq_norm=self._peft_ops_sq_norms(qweight, x.dtype))
        return qlora_linear(x, qweight, lora_A, lora_B, scaling, bias, p)


class _FusedEmbedding:
    """Mixed in front of PEFT's ``lora.Embedding``: :func:`peft_ops.lora_embedding` when it
    computes exactly PEFT's result (one active plain adapter in the table's dtype — PEFT's
    result takes the wider dtype of fp32 adapters —, no embed_scale), else PEFT's forward."""

    def _fused_adapter(self, args, kwargs):
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        active = [a for a in self.active_adapters if a in self.lora_embedding_A]
        if len(active) != 1 or active[0] in getattr(self, "lora_variant", {}):
            return None
        embed_scale = getattr(self, "_get_embed_scale", lambda: None)()
        A = self.lora_embedding_A[active[0]]
        if embed_scale is not None or A.dtype != self.get_base_layer().weight.dtype:
            return None
        return active[0]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        adapter = self._fused_adapter(args, kwargs)
        if adapter is None:
            return super(_FusedEmbedding, self).forward(x, *args, **kwargs)  # PEFT's own class
        base = self.get_base_layer()
        return lora_embedding(x, base.weight, self.lora_embedding_A[adapter], self.lora_embedding_B[adapter],
                              self.scaling[adapter], base.padding_idx)


def _is_dora(variant) -> bool:
    """PEFT's DoRA variant (``peft.tuners.lora.variants.DoraLinearVariant``), by name: the
    variants module moved across PEFT versions."""
    return type(variant).__name__ == "DoraLinearVariant"


_FUSED_CLASSES: dict[tuple[type, type], type] = {}


def _fused_class(peft_class: type, mixin: type) -> type:
    """PEFT's class with the fused forward in front; one class per (PEFT class, base kind),
    since PEFT's plain Linear may sit over a dense or a bitsandbytes 4-bit base."""
    key = (peft_class, mixin)
    if key not in _FUSED_CLASSES:
        kind = "NF4" if mixin is _FusedLinear4bit else ""  # (Embedding: PEFT's class name says it)
        _FUSED_CLASSES[key] = type(f"Fused{kind}{peft_class.__name__}", (mixin, peft_class), {"__module__": __name__})
    return _FUSED_CLASSES[key]


def _why_not(layer) -> str | None:
    """Why `layer` (a PEFT LoRA layer) must stay PEFT's, or None."""
    if len(layer.active_adapters) > 1:
        return f"{len(layer.active_adapters)} active adapters (the fused layer runs one)"
    for adapter in list(layer.lora_A) + list(getattr(layer, "lora_embedding_A", {})):
        variant = getattr(layer, "lora_variant", {}).get(adapter)
        if variant is not None and not _is_dora(variant):
            return f"LoRA variant {type(variant).__name__} (adapter {adapter!r})"
        if getattr(layer, "lora_bias", {}).get(adapter, False):
            return f"lora_bias (adapter {adapter!r})"
    if bool(getattr(layer, "fan_in_fan_out", False)) != is_conv1d(layer.get_base_layer()):
        return (f"fan_in_fan_out={getattr(layer, 'fan_in_fan_out', False)} over a "
                f"{type(layer.get_base_layer()).__name__} (the flag must say the weight's layout)")
    return None


def from_peft(peft_model: nn.Module) -> FromPeftReport:
    """Swap, in place, the LoRA layers of a Hugging Face ``PeftModel`` — ``peft.tuners.lora.Linear``
    over an ``nn.Linear``, and PEFT's bitsandbytes ``Linear4bit`` (NF4) LoRA layers — for the
    fused ones, sharing every Parameter and buffer; DoRA layers (dense and 4-bit) run
    :func:`peft_ops.dora_linear` / :func:`peft_ops.qdora_linear`; PEFT's ``lora.Embedding`` runs
    :func:`peft_ops.lora_embedding`; over transformers' ``Conv1D``
    (GPT-2, PEFT's ``fan_in_fan_out``) the op reads its [in, out] weight in place. Layers it
    cannot handle (several adapters, a variant other than DoRA, lora_bias, other base layers)
    are left as they are and reported, in the returned report and as a warning."""
    try:
        from peft.tuners.lora import layer as lora_layers
    except ImportError as err:
        raise ImportError("from_peft needs the peft package (pip install 'peft-ops[interop]')") from err
    checks.module("peft_model", peft_model)
    try:
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    except ImportError:  # no bitsandbytes
        PeftLinear4bit = None

    report = FromPeftReport([], {})
    plans = []
    for name, module in peft_model.named_modules():
        if not isinstance(module, lora_layers.LoraLayer) or isinstance(module, _FusedLoraForward):
            continue
        reason = _why_not(module)
        linear_layer = isinstance(module, lora_layers.Linear) or \
            (PeftLinear4bit is not None and isinstance(module, PeftLinear4bit))
        base = module.get_base_layer()
        if reason is None and isinstance(module, lora_layers.Embedding):
            if type(base) is nn.Embedding and not (base.max_norm or base.scale_grad_by_freq or base.sparse):
                plans.append((name, module, _FusedEmbedding, None))
            else:
                reason = f"Embedding over {type(base).__name__} (max_norm, scale_grad_by_freq or sparse, or not a " \
                         "plain nn.Embedding)"
        elif reason is None and linear_layer and (type(base) is nn.Linear or is_conv1d(base)):
            plans.append((name, module, _FusedLinear, None))
        elif reason is None and linear_layer and hasattr(getattr(base, "weight", None), "quant_state"):
            # bitsandbytes 4-bit: PEFT's Linear4bit layer, or its plain Linear where PEFT's bnb
            # dispatch is off (bitsandbytes on a CPU-only machine)
            nf4, reason = _nf4_of(base)
            if nf4 is not None:
                plans.append((name, module, _FusedLinear4bit, nf4))
        elif reason is None:
            reason = f"{type(module).__name__} over {type(base).__name__} (no fused op)"
        if reason is not None:
            report.skipped[name] = reason
    for name, module, mixin, nf4 in plans:
        # not submodules: the state_dict must stay exactly PEFT's
        if nf4 is not None:
            object.__setattr__(module, "_peft_ops_nf4", nf4)
        object.__setattr__(module, "_peft_ops_sq_norms", RowNormCache())  # DoRA's ‖W‖², computed once
        module.__class__ = _fused_class(type(module), mixin)
        report.swapped.append(name)
    if not plans and not report.skipped:
        raise ValueError(f"{type(peft_model).__name__} has no PEFT LoRA layer")
    _allow_mixed_batches_in_training(peft_model)
    if report.skipped:
        warnings.warn("peft_ops.from_peft left these layers to PEFT: " +
                      "; ".join(f"{n}: {why}" for n, why in report.skipped.items()), stacklevel=2)
    return report


def _allow_mixed_batches_in_training(peft_model: nn.Module) -> None:
    """PEFT injects ``adapter_names=`` into its LoRA layers' forward in inference only; in
    training mode its ``LoraModel`` refuses it. Let the call through in training too: the names
    checked, then handed to every LoRA layer (the fused ones run the grouped op) and every
    ``modules_to_save`` wrapper, as PEFT's own hooks do in inference. Installed as a bound method
    of the ``LoraModel``, so a deep copy of the model binds its own."""
    lora_model = getattr(peft_model, "base_model", None)
    if lora_model is None or not hasattr(lora_model, "_enable_peft_forward_hooks") \
            or isinstance(lora_model.__dict__.get("_enable_peft_forward_hooks"), types.MethodType):
        return
    object.__setattr__(lora_model, "_enable_peft_forward_hooks", types.MethodType(_mixed_batch_hooks, lora_model))


@contextlib.contextmanager
def _mixed_batch_hooks(lora_model, *args, **kwargs):
    """The replacement of ``LoraModel._enable_peft_forward_hooks`` (see above)."""
    from peft.tuners.lora.layer import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    names = kwargs.get("adapter_names")
    if names is None or not lora_model.training:
        with type(lora_model)._enable_peft_forward_hooks(lora_model, *args, **kwargs):  # PEFT's own
            yield
        return
    if kwargs.get("alora_offsets") is not None:
        raise NotImplementedError("adapter_names with alora_offsets in training mode is not supported")
    checkpointed = [name for name, m in lora_model.named_modules() if getattr(m, "gradient_checkpointing", False)]
    if checkpointed:  # the recompute in backward would run outside these hooks, every sample on one adapter
        raise NotImplementedError("a mixed adapter batch in training under gradient checkpointing is not supported "
                                  f"(checkpointed: {checkpointed[:3]}…): disable it for mixed batches")
    layers = [m for m in lora_model.modules() if isinstance(m, LoraLayer)]
    known = {n for layer in layers for n in list(layer.lora_A) + list(getattr(layer, "lora_embedding_A", {}))}
    unknown = sorted({n for n in names if n != BASE_ADAPTER} - known)
    if unknown:
        raise ValueError(f"adapter_names names adapters the model does not hold: {unknown} (it holds "
                         f"{sorted(known)})")
    hooked = [m for m in lora_model.modules() if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))]
    handles = [m.register_forward_pre_hook(functools.partial(_inject_adapter_names, names=list(names)),
                                           with_kwargs=True) for m in hooked]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _inject_adapter_names(module, args, kwargs, names):
    kwargs["adapter_names"] = names
    return args, kwargs


def _nf4_of(base_layer):
    """(NF4Weight sharing the bitsandbytes layer's tensors, None) or (None, why not)."""
    weight = getattr(base_layer, "weight", None)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return None, "bitsandbytes 4-bit layer not quantized yet (no quant_state)"
    try:
        return NF4Weight.from_bnb(weight.data, quant_state), None
    except (TypeError, ValueError) as err:
        return None, f"bitsandbytes 4-bit layer not in NF4 as peft_ops reads it ({err})"

"""LoRA layers: ``LoraLinear`` (a drop-in for nn.Linear or transformers' Conv1D), ``QLoraLinear``
(an NF4 base) and ``LoraEmbedding`` (a drop-in for nn.Embedding)."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nf4 import NF4Weight, quantize
from ..ops import checks
from ..ops.dora import RowNormCache, dora_linear, dora_weight_norm, qdora_linear
from ..ops.embedding import lora_embedding
from ..ops.lora import lora_linear
from ..ops.multi_lora import multi_lora_linear, sample_adapter_ids
from ..ops.qlora import nf4_linear, qlora_linear

BASE_ADAPTER = "__base__"  # PEFT's name, in a mixed batch, for the rows that run the base layer alone


def is_conv1d(module: object) -> bool:
    """transformers' ``Conv1D`` (GPT-2's linear layers: weight stored [in, out], y = x·weight +
    bias), recognized without importing transformers."""
    return any(cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
               for cls in type(module).__mro__)


def linear_features(module: nn.Module, arg: str = "linear") -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of an ``nn.Linear`` (weight [out, in]) or a
    transformers ``Conv1D`` (weight [in, out]: fan_in_fan_out); TypeError naming `arg` for
    anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if is_conv1d(module) and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        in_features, out_features = module.weight.shape
        return in_features, out_features, True
    raise TypeError(f"{arg} must be a torch.nn.Linear or a transformers Conv1D, got {type(module).__name__}")


def _adapter_dtype(adapter_dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """The adapters' dtype: the base weight's (None), or float32 on any base."""
    if adapter_dtype is None:
        return weight_dtype
    if adapter_dtype not in (weight_dtype, torch.float32):
        raise TypeError(f"adapter_dtype must be the weight's dtype ({weight_dtype}) or torch.float32, "
                        f"got {adapter_dtype}")
    return adapter_dtype


ADAPTER_SETTINGS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "scaling")


def check_adapter_name(name: object, arg: str = "adapter_name") -> str:
    """An adapter's name: a non-empty str without "." (it becomes a module key)."""
    if not isinstance(name, str):
        raise TypeError(f"{arg} must be a str, got {type(name).__name__}")
    if not name or "." in name or not name.isprintable():
        raise ValueError(f"{arg} must be a non-empty name without '.', got {name!r}")
    if hasattr(nn.ModuleDict, name):  # a module key cannot shadow a method (e.g. "double", "train")
        raise ValueError(f"{arg} {name!r} is the name of an nn.Module attribute: choose another")
    return name


def checked_settings(r, lora_alpha, lora_dropout, use_rslora, use_dora) -> dict:
    """One adapter's validated settings, its scaling (lora_alpha/r, or /√r with rsLoRA) included."""
    r = checks.positive_int("r", r)
    lora_alpha = checks.real_number("lora_alpha", lora_alpha)
    lora_dropout = checks.probability("lora_dropout", lora_dropout)
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__}")
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be a bool, got {type(use_dora).__name__}")
    return dict(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora, use_dora=use_dora,
                scaling=lora_alpha / (math.sqrt(r) if use_rslora else r))


class AdapterWeights(nn.Module):
    """One named adapter of a layer beyond its first: its parameters under the layer's own
    names (``lora_A``, ``lora_B``, ``lora_magnitude_vector``; an embedding's
    ``lora_embedding_A`` / ``lora_embedding_B``) and its settings (``r``, ``lora_alpha``,
    ``lora_dropout``, ``use_rslora``, ``use_dora``, ``scaling``)."""

    def __init__(self, parameters: dict, settings: dict):
        super().__init__()
        for name, param in parameters.items():
            if param is None:
                self.register_parameter(name, None)
            else:
                setattr(self, name, param)
        for name in ADAPTER_SETTINGS:
            setattr(self, name, settings[name])

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, use_dora={self.use_dora}"


class _NamedAdapters:
    """Several named adapters on one layer, as PEFT's (``add_adapter``, ``set_adapter``,
    ``delete_adapter``). The layer's first adapter lives in its own attributes — ``lora_A`` …,
    ``r``, ``scaling`` …, so a one-adapter layer's state_dict keys stay plain — and any other in
    ``named_adapters[name]`` (an `AdapterWeights` with the same names). ``active_adapter``
    names the one the forward runs; a layer that does not hold it runs its base alone, as PEFT's
    does. Each class names its parameters (``PARAMETERS``) and builds a new adapter's
    (``_new_parameters``: PEFT's initialization)."""

    PARAMETERS: tuple = ()

    def _init_adapters(self, name: str = "default") -> None:
        self.adapter_name = check_adapter_name(name)  # the adapter in the layer's own attributes (None: none)
        self.active_adapter = self.adapter_name
        self.named_adapters = nn.ModuleDict()
        self._merged_name = None
        self.batch_adapters = None  # a mixed batch: one adapter name per sample (mixed_adapter_batch sets it)

    @property
    def adapter_names(self) -> list[str]:
        return ([self.adapter_name] if self.adapter_name is not None else []) + list(self.named_adapters)

    def adapter(self, name: str | None = None):
        """Adapter `name` (default: the active one) — the layer itself for its first, an
        `AdapterWeights` for another — or None where this layer does not hold it."""
        name = self.active_adapter if name is None else name
        if name is not None and name == self.adapter_name:
            return self
        return self.named_adapters[name] if name in self.named_adapters else None

    def _held(self, name: str | None):
        adapter = self.adapter(name)
        if adapter is None:
            raise ValueError(f"adapter {name or self.active_adapter!r} is not on this layer (it holds "
                             f"{self.adapter_names})")
        return adapter

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """The trained parameters of adapter `name` (default: the active one); none if absent."""
        adapter = self.adapter(name)
        return [] if adapter is None else [p for p in (getattr(adapter, n) for n in self.PARAMETERS) if p is not None]

    def set_adapter(self, name: str) -> None:
        """Run adapter `name` from now on (this layer's base alone if it does not hold it)."""
        name = check_adapter_name(name)
        if self.merged and name != self.active_adapter:
            raise RuntimeError("set_adapter on a merged layer: unmerge() first")
        self.active_adapter = name

    def add_adapter(self, name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False, adapter_dtype: torch.dtype | None = None) -> None:
        """Add adapter `name` beside the others, initialized as PEFT initializes a new one; the
        active adapter does not change."""
        name = check_adapter_name(name)
        if name in self.adapter_names:
            raise ValueError(f"adapter_name {name!r} is already on this layer")
        if self.merged:
            raise RuntimeError("add_adapter on a merged layer: unmerge() first")
        settings = checked_settings(r, lora_alpha, lora_dropout, use_rslora, use_dora)
        parameters = self._new_parameters(settings, _adapter_dtype(adapter_dtype, self._base_dtype()))
        if self.adapter_name is None:  # the layer's own attributes are free: it goes there
            self._hold(parameters, settings)
            self.adapter_name = name
        else:
            self.named_adapters[name] = AdapterWeights(parameters, settings)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` (the next one moves into the layer's own attributes if it was
        there); a layer left without adapters runs its base alone."""
        self._held(name)
        if self.merged:
            raise RuntimeError("delete_adapter on a merged layer: unmerge() first")
        if name != self.adapter_name:
            del self.named_adapters[name]
        elif self.named_adapters:
            following = next(iter(self.named_adapters))
            moved = self.named_adapters.pop(following)
            self._hold({n: getattr(moved, n) for n in self.PARAMETERS},
                       {setting: getattr(moved, setting) for setting in ADAPTER_SETTINGS})
            self.adapter_name = following
        else:
            self._hold({n: None for n in self.PARAMETERS}, {})
            self.adapter_name = None

    def _hold(self, parameters: dict, settings: dict) -> None:
        for name, param in parameters.items():
            if param is None:
                self.register_parameter(name, None)
            else:
                setattr(self, name, param)
        for name, value in settings.items():
            setattr(self, name, value)


def _adapters_repr(layer) -> str:
    """", adapters=[…], active='…'" for a layer with other than one adapter (else "")."""
    names = layer.adapter_names
    return "" if len(names) == 1 and names[0] == layer.active_adapter else \
        f", adapters={names}, active={layer.active_adapter!r}"


class _LoraAdapter(_NamedAdapters):
    """What LoraLinear and QLoraLinear share: configuration checks, the adapter parameters and
    their initialization, ΔW = scaling·B·A, and DoRA's magnitude (``use_dora``)."""

    PARAMETERS = ("lora_A", "lora_B", "lora_magnitude_vector")

    @staticmethod
    def _checked_config(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, use_dora=False) -> tuple:
        """The validated configuration (each error names its argument); sets nothing."""
        in_features = checks.positive_int("in_features", in_features)
        out_features = checks.positive_int("out_features", out_features)
        settings = checked_settings(r, lora_alpha, lora_dropout, use_rslora, use_dora)
        return in_features, out_features, *(settings[k] for k in ADAPTER_SETTINGS[:5])

    def _configure(self, *config, adapter_name: str = "default") -> None:
        # Every check runs before any attribute is set or any parameter is frozen.
        in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, use_dora = self._checked_config(*config)
        adapter_name = check_adapter_name(adapter_name)
        self.in_features, self.out_features = in_features, out_features
        self._hold({}, checked_settings(r, lora_alpha, lora_dropout, use_rslora, use_dora))
        self.merged = False
        self._adapter_disabled = False
        self._sq_norms = RowNormCache()  # DoRA: ‖W_n‖² of the frozen weight, per compute dtype
        self._init_adapters(adapter_name)

    def _create_adapter(self, device, dtype) -> None:
        self.lora_A = nn.Parameter(torch.empty((self.r, self.in_features), device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty((self.out_features, self.r), device=device, dtype=dtype))
        if self.use_dora:  # PEFT's name, so state_dict keys and adapter files match its own
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("lora_magnitude_vector", None)

    def reset_lora_parameters(self) -> None:
        """PEFT's default: A kaiming-uniform (a = √5), B zeros; with DoRA the magnitude is the
        column norm ‖W + s·B·A‖ (= ‖W‖ with B = 0: the layer starts as the base layer)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self, name: str | None = None) -> None:
        """DoRA: set adapter `name`'s magnitude (default: the active adapter's) to the current
        ‖W + s·B·A‖ per output row (PEFT does this when it adds a DoRA adapter). No-op without
        DoRA."""
        adapter = self._held(name)
        if adapter.use_dora:
            adapter.lora_magnitude_vector.copy_(self.weight_norm(name=name))

    def _new_parameters(self, settings: dict, dtype: torch.dtype) -> dict:
        """A new adapter's parameters, PEFT's initialization (A kaiming-uniform, B zeros, the
        magnitude ‖W‖)."""
        device = self._base_device()
        lora_A = nn.Parameter(torch.empty((settings["r"], self.in_features), device=device, dtype=dtype))
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        lora_B = nn.Parameter(torch.zeros((self.out_features, settings["r"]), device=device, dtype=dtype))
        magnitude = None
        if settings["use_dora"]:
            probe = AdapterWeights(dict(lora_A=lora_A, lora_B=lora_B, lora_magnitude_vector=None), settings)
            magnitude = nn.Parameter(self._norm(probe).to(dtype))
        return dict(lora_A=lora_A, lora_B=lora_B, lora_magnitude_vector=magnitude)

    def _mixed_forward(self, x: torch.Tensor, weight, bias) -> torch.Tensor:
        """A mixed batch: sample i (x's first dimension) runs adapter ``batch_adapters[i]`` — the
        base alone for ``"__base__"`` or an adapter this layer does not hold — through one
        :func:`peft_ops.multi_lora_linear` call over the adapters present in the batch."""
        names = self.batch_adapters
        if x.dim() < 2 or x.shape[0] != len(names):
            raise ValueError(f"a mixed batch names {len(names)} samples' adapters, but this layer's input has shape "
                             f"{tuple(x.shape)} (samples on its first dimension)")
        if getattr(self, "merged", False):
            raise RuntimeError("a mixed batch on a merged layer: unmerge() first")
        present = [n for n in dict.fromkeys(names) if n in self.adapter_names]  # batch order, each once
        adapters = [self.adapter(n) for n in present]
        dora = [n for n, a in zip(present, adapters) if a.use_dora]
        if dora:
            raise NotImplementedError(f"mixed batches of DoRA adapters are not supported (adapters {dora})")
        adapter_ids = sample_adapter_ids(names, present, x)
        if not adapters:
            return nf4_linear(x, weight, bias) if not isinstance(weight, torch.Tensor) else F.linear(x, weight, bias)
        return multi_lora_linear(x, weight, [a.lora_A for a in adapters], [a.lora_B for a in adapters],
                                 [a.scaling for a in adapters], adapter_ids, bias,
                                 [a.lora_dropout if self.training else 0.0 for a in adapters])

    def _delta_weight_fp32(self, name: str | None = None) -> torch.Tensor:
        adapter = self._held(name)
        return adapter.scaling * (adapter.lora_B.detach().float() @ adapter.lora_A.detach().float())


class _Unmergeable:
    """``disable_adapter`` for the layers that merge in place (LoraLinear, LoraEmbedding)."""

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base layer alone inside the block (unmerging for its duration if merged)."""
        was_merged = self.merged
        self.unmerge()
        self._adapter_disabled = True
        try:
            yield self
        finally:
            self._adapter_disabled = False
            if was_merged:
                self.merge()


class LoraLinear(_Unmergeable, _LoraAdapter, nn.Module):
    """``nn.Linear`` with a LoRA adapter: ``y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ``.

    ``weight`` [out, in] and ``bias`` [out] are frozen (``fan_in_fan_out=True``: ``weight`` is
    stored [in, out], as transformers' ``Conv1D`` — GPT-2 — holds it, and PEFT's flag of that
    name; the fused op reads it through its strides, never a transposed copy); ``lora_A`` [r, in] (kaiming-uniform,
    a = √5) and ``lora_B`` [out, r] (zeros, so the layer starts as the linear layer) train.
    ``scaling = lora_alpha / r``, or ``lora_alpha / √r`` with ``use_rslora`` (rsLoRA).
    Dropout applies to the adapter's input, in training mode only. The forward is one call to
    the fused :func:`peft_ops.lora_linear`.

    ``use_dora=True``: DoRA, as PEFT — a trained ``lora_magnitude_vector`` [out] m (starting at
    ‖W‖) and y = x·Wᵀ + b + (c − 1)·(xd·Wᵀ) + c·scaling·(xd·Aᵀ)·Bᵀ with c = m/‖W + s·B·A‖ per
    output row (the norm detached) and xd = dropout(x): one call to :func:`peft_ops.dora_linear`,
    with ‖W‖² computed once and cached.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 device=None, dtype=None, use_dora: bool = False, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        if not isinstance(fan_in_fan_out, bool):
            raise TypeError(f"fan_in_fan_out must be a bool, got {type(fan_in_fan_out).__name__}")
        self._configure(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, use_dora)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        self.fan_in_fan_out = fan_in_fan_out
        factory = {"device": device, "dtype": dtype}
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._create_adapter(self.weight.device, self.weight.dtype)
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, adapter_dtype: torch.dtype | None = None,
                    use_dora: bool = False, adapter_name: str = "default") -> "LoraLinear":
        """Wrap ``linear`` — an ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2; the layer then
        has ``fan_in_fan_out=True``): its weight and bias Parameters are shared (not copied) and
        frozen. ``adapter_dtype``: the adapters' dtype, the weight's (default) or float32 (PEFT's
        default on a half-precision base). ``adapter_name``: the first adapter's name (more with
        ``add_adapter``)."""
        in_features, out_features, fan_in_fan_out = linear_features(linear)
        adapter_dtype = _adapter_dtype(adapter_dtype, linear.weight.dtype)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._configure(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, use_dora,
                         adapter_name=adapter_name)
        layer.fan_in_fan_out = fan_in_fan_out
        layer.weight = linear.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias.requires_grad_(False)
        else:
            layer.register_parameter("bias", None)
        layer._create_adapter(linear.weight.device, adapter_dtype)
        layer.reset_lora_parameters()
        return layer

    def reset_parameters(self) -> None:
        """nn.Linear's initialization for the base (on W [out, in] in either layout), then the
        adapter's."""
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    @property
    def base_weight(self) -> torch.Tensor:
        """W [out, in]: ``weight`` itself, or with ``fan_in_fan_out`` its transposed view."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _base_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def _base_device(self) -> torch.device:
        return self.weight.device

    def _norm(self, adapter) -> torch.Tensor:
        return dora_weight_norm(self.base_weight, adapter.lora_A, adapter.lora_B, adapter.scaling,
                                weight_sq_norm=self._sq_norms(self.base_weight, self.weight.dtype))

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """``scaling·B·A`` of adapter `name` (default: the active one) computed in fp32, returned
        in the weight's dtype and layout ([out, in]; [in, out] with ``fan_in_fan_out``, as PEFT's
        ``get_delta_weight``)."""
        delta = self._delta_weight_fp32(name).to(self.weight.dtype)
        return delta.t() if self.fan_in_fan_out else delta

    def weight_norm(self, name: str | None = None) -> torch.Tensor:
        """‖W_n + scaling·B_n·A‖ per output row of adapter `name` (default: the active one), fp32
        [out] (of the unmerged weight), without building W + s·B·A."""
        if self.merged:
            raise RuntimeError("weight_norm() of a merged layer: unmerge() first (W holds the merged weight)")
        return self._norm(self._held(name))

    def merged_weight_fp32(self, name: str | None = None) -> torch.Tensor:
        """The weight a merge of adapter `name` (default: the active one) writes, in fp32,
        [out, in] in either layout: W + s·B·A, or with DoRA m/‖W + s·B·A‖ ⊙ (W + s·B·A) (per
        output row, as PEFT merges it)."""
        adapter = self._held(name)
        weight = self.base_weight.detach().float() + self._delta_weight_fp32(name)
        if adapter.use_dora:
            weight *= (adapter.lora_magnitude_vector.detach().float() / self.weight_norm(name))[:, None]
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into ``weight`` (in place; W + s·B·A, or with DoRA
        m/‖W + s·B·A‖ ⊙ (W + s·B·A), summed in fp32 and rounded once); the forward then runs the
        base alone. No-op when merged, or when this layer does not hold the active adapter."""
        adapter = self.adapter()
        if self.merged or adapter is None:
            return
        if adapter.use_dora:  # unmerge divides by it
            self._merge_scale = adapter.lora_magnitude_vector.float() / self.weight_norm()
        self.base_weight.copy_(self.merged_weight_fp32())
        self.merged, self._merged_name = True, self.active_adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged adapter out of ``weight`` again (exact in fp32, one rounding per element
        in half precision, as in PEFT; DoRA divides by the scale the merge applied)."""
        if not self.merged:
            return
        name, self.merged = self._merged_name, False
        if self._held(name).use_dora:
            weight = self.base_weight
            weight.copy_(weight.float() / self._merge_scale[:, None] - self._delta_weight_fp32(name))
            del self._merge_scale
        else:
            self.weight.sub_(self.delta_weight(name))
        self._merged_name = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base_weight  # [out, in]: a view of a Conv1D's [in, out] weight, read in place
        if self.batch_adapters is not None and not self._adapter_disabled:
            return self._mixed_forward(x, weight, self.bias)
        adapter = self.adapter()
        if self.merged or self._adapter_disabled or adapter is None:
            return F.linear(x, weight, self.bias)
        dropout_p = adapter.lora_dropout if self.training else 0.0
        if adapter.use_dora:
            return dora_linear(x, weight, adapter.lora_A, adapter.lora_B, adapter.lora_magnitude_vector,
                               adapter.scaling, self.bias, dropout_p, weight_sq_norm=self._sq_norms(weight, x.dtype))
        return lora_linear(x, weight, adapter.lora_A, adapter.lora_B, adapter.scaling, self.bias, dropout_p)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout:g}, "
                f"bias={self.bias is not None}, use_rslora={self.use_rslora}, use_dora={self.use_dora}, "
                f"merged={self.merged}" + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
                + _adapters_repr(self))


class QLoraLinear(_LoraAdapter, nn.Module):
    """QLoRA: a frozen NF4 base weight plus a LoRA adapter,
    ``y = x·dequant(W)ᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ``.

    ``qweight`` is an :class:`~peft_ops.nf4.NF4Weight` (bitsandbytes' format; buffers, or one
    frozen Parameter FSDP2 shards after :func:`peft_ops.prepare_fsdp`; part of ``state_dict``,
    never dequantized in place), ``bias`` a frozen Parameter; ``lora_A`` /
    ``lora_B`` train, initialized and scaled as in :class:`LoraLinear`. The forward is one call
    to :func:`peft_ops.qlora_linear` (or :func:`peft_ops.nf4_linear` with the adapter disabled).
    Merging into 4 bits would lose the adapter's precision, so there is no ``merge``:
    :meth:`merged_linear` returns a dense ``nn.Linear`` with dequant(W) + ΔW for export.
    ``use_dora=True``: QDoRA, DoRA (see :class:`LoraLinear`) on the NF4 base through
    :func:`peft_ops.qdora_linear`.
    """

    def __init__(self, qweight: NF4Weight, bias: torch.Tensor | None = None, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, use_rslora: bool = False, adapter_dtype: torch.dtype | None = None,
                 use_dora: bool = False, adapter_name: str = "default") -> None:
        if not isinstance(qweight, NF4Weight):
            raise TypeError(f"qweight must be a peft_ops.nf4.NF4Weight, got {type(qweight).__name__}")
        checks.optional_tensor("bias", bias, ndim=1)
        if bias is not None and bias.shape[0] != qweight.out_features:
            raise ValueError(f"bias must be [out_features] = [{qweight.out_features}], got {tuple(bias.shape)}")
        adapter_dtype = qweight.dtype if adapter_dtype is None else adapter_dtype
        if adapter_dtype not in checks.FLOAT_DTYPES:
            raise TypeError(f"adapter_dtype must be float32, float16 or bfloat16, got {adapter_dtype}")
        super().__init__()
        self._configure(qweight.in_features, qweight.out_features, r, lora_alpha, lora_dropout, use_rslora, use_dora,
                        adapter_name=adapter_name)
        self.qweight = qweight
        if bias is not None:
            self.bias = nn.Parameter(bias.detach(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._create_adapter(qweight.device, adapter_dtype)
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, blocksize: int = 64, double_quant: bool = True,
                    adapter_dtype: torch.dtype | None = None, use_dora: bool = False,
                    adapter_name: str = "default") -> "QLoraLinear":
        """Quantize ``linear.weight`` to NF4 (bitsandbytes' bytes) and add an adapter; the bias
        is kept as is (frozen). ``linear`` itself is left untouched. A transformers ``Conv1D``
        (weight [in, out]) is quantized as W [out, in], the layout bitsandbytes' ``Linear4bit``
        holds (as transformers quantizes GPT-2)."""
        in_features, out_features, fan_in_fan_out = linear_features(linear)
        # check the configuration before the (costly) quantization
        cls._checked_config(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, use_dora)
        adapter_dtype = _adapter_dtype(adapter_dtype, linear.weight.dtype)
        weight = linear.weight.detach()
        qweight = quantize(weight.t() if fan_in_fan_out else weight, blocksize=blocksize, double_quant=double_quant)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(qweight, bias, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, use_dora, adapter_name)

    @classmethod
    def from_bnb(cls, module: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, adapter_dtype: torch.dtype | None = None,
                 use_dora: bool = False) -> "QLoraLinear":
        """From a bitsandbytes ``Linear4bit`` (duck-typed: ``module.weight`` holds the packed
        bytes and ``module.weight.quant_state`` their QuantState). Its tensors are shared.
        Adapters default to the QuantState's dtype (bitsandbytes' compute dtype may differ)."""
        weight = getattr(module, "weight", None)
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None:
            raise TypeError(f"module must be a bitsandbytes Linear4bit with a quantized weight (weight.quant_state); "
                            f"got {type(module).__name__}")
        qweight = NF4Weight.from_bnb(weight.data, quant_state)
        bias = getattr(module, "bias", None)
        bias = bias.detach().to(qweight.dtype) if bias is not None else None
        return cls(qweight, bias, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, use_dora)

    def _base_dtype(self) -> torch.dtype:
        return self.qweight.dtype

    def _base_device(self) -> torch.device:
        return self.qweight.device

    def _norm(self, adapter, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.qweight.dtype
        return dora_weight_norm(self.qweight, adapter.lora_A, adapter.lora_B, adapter.scaling, dtype,
                                weight_sq_norm=self._sq_norms(self.qweight, dtype))

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """``scaling·B·A`` [out, in] of adapter `name` (default: the active one) in fp32."""
        return self._delta_weight_fp32(name)

    def weight_norm(self, dtype: torch.dtype | None = None, name: str | None = None) -> torch.Tensor:
        """‖W_n + scaling·B_n·A‖ per output row of adapter `name` (default: the active one), fp32
        [out], W decoded to `dtype` (default: the quantized weight's own; the compute dtype),
        without building W + s·B·A."""
        return self._norm(self._held(name), dtype)

    @torch.no_grad()
    def merged_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense ``nn.Linear`` with weight dequant(W) + scaling·B·A of the active adapter
        (summed in fp32, rounded once to `dtype`, default the quantized weight's dtype) and this
        layer's bias: for export. This layer is unchanged."""
        dtype = self.qweight.dtype if dtype is None else dtype
        weight = self.qweight.dequantize(torch.float32)
        adapter = self.adapter()
        if not self._adapter_disabled and adapter is not None:
            weight += self.delta_weight()
            if adapter.use_dora:
                weight *= (adapter.lora_magnitude_vector.float() / self.weight_norm())[:, None]
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=dtype)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator["QLoraLinear"]:
        """Run the NF4 base layer alone inside the block."""
        self._adapter_disabled = True
        try:
            yield self
        finally:
            self._adapter_disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None and self.bias.dtype != x.dtype else self.bias
        if self.batch_adapters is not None and not self._adapter_disabled:
            return self._mixed_forward(x, self.qweight, bias)
        adapter = self.adapter()
        if self._adapter_disabled or adapter is None:
            return nf4_linear(x, self.qweight, bias)
        dropout_p = adapter.lora_dropout if self.training else 0.0
        if adapter.use_dora:
            return qdora_linear(x, self.qweight, adapter.lora_A, adapter.lora_B, adapter.lora_magnitude_vector,
                                adapter.scaling, bias, dropout_p, weight_sq_norm=self._sq_norms(self.qweight, x.dtype))
        return qlora_linear(x, self.qweight, adapter.lora_A, adapter.lora_B, adapter.scaling, bias, dropout_p)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout:g}, "
                f"bias={self.bias is not None}, use_rslora={self.use_rslora}, use_dora={self.use_dora}"
                + _adapters_repr(self))


class LoraEmbedding(_Unmergeable, _NamedAdapters, nn.Module):
    """``nn.Embedding`` with a LoRA adapter, PEFT's ``lora.Embedding``:
    ``y = E[ids] + scaling·(A[:, ids])ᵀ·Bᵀ``.

    ``weight`` [V, D] is frozen (shared with the wrapped embedding); ``lora_embedding_A`` [r, V]
    (zeros) and ``lora_embedding_B`` [D, r] (normal) train — PEFT's names, shapes and
    initialization, the reverse of a linear layer's, so the layer starts as the embedding.
    ``scaling = lora_alpha / r`` (``/ √r`` with ``use_rslora``). No dropout: PEFT applies none
    to an embedding's adapter (``lora_dropout`` is kept for the config only). The forward is one
    call to the fused :func:`peft_ops.lora_embedding`; ``padding_idx`` as the embedding's.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, use_rslora: bool = False, padding_idx: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        self._configure(num_embeddings, embedding_dim, r, lora_alpha, lora_dropout, use_rslora, padding_idx)
        self.weight = nn.Parameter(torch.empty((num_embeddings, embedding_dim), device=device, dtype=dtype),
                                   requires_grad=False)
        self._create_adapter(self.weight.device, self.weight.dtype)
        nn.init.normal_(self.weight)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].zero_()
        self.reset_lora_parameters()

    @staticmethod
    def _checked_config(num_embeddings, embedding_dim, r, lora_alpha, lora_dropout, use_rslora, padding_idx):
        num_embeddings = checks.positive_int("num_embeddings", num_embeddings)
        embedding_dim = checks.positive_int("embedding_dim", embedding_dim)
        r = checks.positive_int("r", r)
        lora_alpha = checks.real_number("lora_alpha", lora_alpha)
        lora_dropout = checks.probability("lora_dropout", lora_dropout)
        if not isinstance(use_rslora, bool):
            raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__}")
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
                raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be in [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
            padding_idx %= num_embeddings
        return num_embeddings, embedding_dim, r, lora_alpha, lora_dropout, use_rslora, padding_idx

    PARAMETERS = ("lora_embedding_A", "lora_embedding_B")

    def _configure(self, *config, adapter_name: str = "default") -> None:
        num_embeddings, embedding_dim, r, lora_alpha, lora_dropout, use_rslora, padding_idx = \
            self._checked_config(*config)
        adapter_name = check_adapter_name(adapter_name)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._hold({}, checked_settings(r, lora_alpha, lora_dropout, use_rslora, False))
        self.merged = False
        self._adapter_disabled = False
        self._init_adapters(adapter_name)

    def _base_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def add_adapter(self, name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False, adapter_dtype: torch.dtype | None = None) -> None:
        if use_dora:
            raise ValueError("use_dora: DoRA here is for linear layers, not embeddings")
        super().add_adapter(name, r, lora_alpha, lora_dropout, use_rslora, False, adapter_dtype)

    def _new_parameters(self, settings: dict, dtype: torch.dtype) -> dict:
        """PEFT's initialization for an embedding: A zeros, B standard normal."""
        factory = dict(device=self.weight.device, dtype=dtype)
        return dict(lora_embedding_A=nn.Parameter(torch.zeros((settings["r"], self.num_embeddings), **factory)),
                    lora_embedding_B=nn.Parameter(torch.randn((self.embedding_dim, settings["r"]), **factory)))

    def _create_adapter(self, device, dtype) -> None:
        self.lora_embedding_A = nn.Parameter(torch.empty((self.r, self.num_embeddings), device=device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.empty((self.embedding_dim, self.r), device=device, dtype=dtype))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                       use_rslora: bool = False, adapter_dtype: torch.dtype | None = None,
                       adapter_name: str = "default") -> "LoraEmbedding":
        """Wrap ``embedding``: its weight Parameter is shared (not copied) and frozen. An
        embedding whose lookup changes its table or its gradient (``max_norm``,
        ``scale_grad_by_freq``, ``sparse``) is refused: the fused gather does neither."""
        checks.module("embedding", embedding, nn.Embedding)
        for option in ("max_norm", "scale_grad_by_freq", "sparse"):
            if getattr(embedding, option):
                raise ValueError(f"embedding has {option}={getattr(embedding, option)!r}: LoraEmbedding takes a "
                                 "plain lookup")
        adapter_dtype = _adapter_dtype(adapter_dtype, embedding.weight.dtype)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._configure(embedding.num_embeddings, embedding.embedding_dim, r, lora_alpha, lora_dropout, use_rslora,
                         embedding.padding_idx, adapter_name=adapter_name)
        layer.weight = embedding.weight.requires_grad_(False)
        layer._create_adapter(embedding.weight.device, adapter_dtype)
        layer.reset_lora_parameters()
        return layer

    def reset_lora_parameters(self) -> None:
        """PEFT's initialization for an embedding: A zeros, B standard normal."""
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """``scaling·(B·A)ᵀ`` [V, D] of adapter `name` (default: the active one) computed in fp32,
        returned in the table's dtype."""
        adapter = self._held(name)
        B, A = adapter.lora_embedding_B.detach().float(), adapter.lora_embedding_A.detach().float()
        delta = adapter.scaling * (B @ A)
        return delta.t().to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into ``weight`` (in place); the forward then runs the lookup
        alone. No-op when merged, or when this layer does not hold the active adapter."""
        if not self.merged and self.adapter() is not None:
            self.weight.copy_(self.weight.float() + self.delta_weight().float())
            self.merged, self._merged_name = True, self.active_adapter

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight(self._merged_name))
            self.merged, self._merged_name = False, None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        adapter = self.adapter()
        if self.merged or self._adapter_disabled or adapter is None:
            return F.embedding(ids, self.weight, self.padding_idx)
        return lora_embedding(ids, self.weight, adapter.lora_embedding_A, adapter.lora_embedding_B, adapter.scaling,
                              self.padding_idx)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, r={self.r}, "
                f"lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, padding_idx={self.padding_idx}, "
                f"use_rslora={self.use_rslora}, merged={self.merged}" + _adapters_repr(self))

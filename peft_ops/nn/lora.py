"""LoRA layers: ``LoraLinear`` (a drop-in for nn.Linear) and ``QLoraLinear`` (an NF4 base)."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nf4 import NF4Weight, quantize
from ..ops import checks
from ..ops.lora import lora_linear
from ..ops.qlora import nf4_linear, qlora_linear


def _adapter_dtype(adapter_dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """The adapters' dtype: the base weight's (None), or float32 on any base."""
    if adapter_dtype is None:
        return weight_dtype
    if adapter_dtype not in (weight_dtype, torch.float32):
        raise TypeError(f"adapter_dtype must be the weight's dtype ({weight_dtype}) or torch.float32, "
                        f"got {adapter_dtype}")
    return adapter_dtype


class _LoraAdapter:
    """What LoraLinear and QLoraLinear share: configuration checks, the adapter parameters and
    their initialization, and ΔW = scaling·B·A."""

    @staticmethod
    def _checked_config(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora) -> tuple:
        """The validated configuration (each error names its argument); sets nothing."""
        in_features = checks.positive_int("in_features", in_features)
        out_features = checks.positive_int("out_features", out_features)
        r = checks.positive_int("r", r)
        lora_alpha = checks.real_number("lora_alpha", lora_alpha)
        lora_dropout = checks.probability("lora_dropout", lora_dropout)
        if not isinstance(use_rslora, bool):
            raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__}")
        return in_features, out_features, r, lora_alpha, lora_dropout, use_rslora

    def _configure(self, *config) -> None:
        # Every check runs before any attribute is set or any parameter is frozen.
        in_features, out_features, r, lora_alpha, lora_dropout, use_rslora = self._checked_config(*config)
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_alpha, self.lora_dropout, self.use_rslora = lora_alpha, lora_dropout, use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False
        self._adapter_disabled = False

    def _create_adapter(self, device, dtype) -> None:
        self.lora_A = nn.Parameter(torch.empty((self.r, self.in_features), device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty((self.out_features, self.r), device=device, dtype=dtype))

    def reset_lora_parameters(self) -> None:
        """PEFT's default: A kaiming-uniform (a = √5), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _delta_weight_fp32(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())


class LoraLinear(_LoraAdapter, nn.Module):
    """``nn.Linear`` with a LoRA adapter: ``y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ``.

    ``weight`` [out, in] and ``bias`` [out] are frozen; ``lora_A`` [r, in] (kaiming-uniform,
    a = √5) and ``lora_B`` [out, r] (zeros, so the layer starts as the linear layer) train.
    ``scaling = lora_alpha / r``, or ``lora_alpha / √r`` with ``use_rslora`` (rsLoRA).
    Dropout applies to the adapter's input, in training mode only. The forward is one call to
    the fused :func:`peft_ops.lora_linear`.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self._configure(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._create_adapter(self.weight.device, self.weight.dtype)
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, adapter_dtype: torch.dtype | None = None) -> "LoraLinear":
        """Wrap ``linear``: its weight and bias Parameters are shared (not copied) and frozen.
        ``adapter_dtype``: the adapters' dtype, the weight's (default) or float32 (PEFT's
        default on a half-precision base)."""
        checks.module("linear", linear, nn.Linear)
        adapter_dtype = _adapter_dtype(adapter_dtype, linear.weight.dtype)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._configure(linear.in_features, linear.out_features, r, lora_alpha, lora_dropout, use_rslora)
        layer.weight = linear.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias.requires_grad_(False)
        else:
            layer.register_parameter("bias", None)
        layer._create_adapter(linear.weight.device, adapter_dtype)
        layer.reset_lora_parameters()
        return layer

    def reset_parameters(self) -> None:
        """nn.Linear's initialization for the base, then the adapter's."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def delta_weight(self) -> torch.Tensor:
        """``scaling·B·A`` [out, in], computed in fp32, returned in the weight's dtype."""
        return self._delta_weight_fp32().to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the adapter into ``weight`` (in place); the forward then runs the base alone."""
        if self.merged:
            return
        self.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter from ``weight`` again (exact in fp32, one rounding per element
        in half precision, as in PEFT)."""
        if not self.merged:
            return
        self.weight.sub_(self.delta_weight())
        self.merged = False

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator["LoraLinear"]:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self._adapter_disabled:
            return F.linear(x, self.weight, self.bias)
        dropout_p = self.lora_dropout if self.training else 0.0
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.scaling, self.bias, dropout_p)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout:g}, "
                f"bias={self.bias is not None}, use_rslora={self.use_rslora}, merged={self.merged}")


class QLoraLinear(_LoraAdapter, nn.Module):
    """QLoRA: a frozen NF4 base weight plus a LoRA adapter,
    ``y = x·dequant(W)ᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ``.

    ``qweight`` is an :class:`~peft_ops.nf4.NF4Weight` (bitsandbytes' format; buffers, part of
    ``state_dict``, never dequantized in place), ``bias`` a frozen Parameter; ``lora_A`` /
    ``lora_B`` train, initialized and scaled as in :class:`LoraLinear`. The forward is one call
    to :func:`peft_ops.qlora_linear` (or :func:`peft_ops.nf4_linear` with the adapter disabled).
    Merging into 4 bits would lose the adapter's precision, so there is no ``merge``:
    :meth:`merged_linear` returns a dense ``nn.Linear`` with dequant(W) + ΔW for export.
    """

    def __init__(self, qweight: NF4Weight, bias: torch.Tensor | None = None, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, use_rslora: bool = False, adapter_dtype: torch.dtype | None = None) -> None:
        if not isinstance(qweight, NF4Weight):
            raise TypeError(f"qweight must be a peft_ops.nf4.NF4Weight, got {type(qweight).__name__}")
        checks.optional_tensor("bias", bias, ndim=1)
        if bias is not None and bias.shape[0] != qweight.out_features:
            raise ValueError(f"bias must be [out_features] = [{qweight.out_features}], got {tuple(bias.shape)}")
        adapter_dtype = qweight.dtype if adapter_dtype is None else adapter_dtype
        if adapter_dtype not in checks.FLOAT_DTYPES:
            raise TypeError(f"adapter_dtype must be float32, float16 or bfloat16, got {adapter_dtype}")
        super().__init__()
        self._configure(qweight.in_features, qweight.out_features, r, lora_alpha, lora_dropout, use_rslora)
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
                    adapter_dtype: torch.dtype | None = None) -> "QLoraLinear":
        """Quantize ``linear.weight`` to NF4 (bitsandbytes' bytes) and add an adapter; the bias
        is kept as is (frozen). ``linear`` itself is left untouched."""
        checks.module("linear", linear, nn.Linear)
        # check the configuration before the (costly) quantization
        cls._checked_config(linear.in_features, linear.out_features, r, lora_alpha, lora_dropout, use_rslora)
        adapter_dtype = _adapter_dtype(adapter_dtype, linear.weight.dtype)
        qweight = quantize(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(qweight, bias, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype)

    @classmethod
    def from_bnb(cls, module: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, adapter_dtype: torch.dtype | None = None) -> "QLoraLinear":
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
        return cls(qweight, bias, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scaling·B·A`` [out, in] in fp32."""
        return self._delta_weight_fp32()

    @torch.no_grad()
    def merged_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense ``nn.Linear`` with weight dequant(W) + scaling·B·A (summed in fp32, rounded
        once to `dtype`, default the quantized weight's dtype) and this layer's bias: for
        export. This layer is unchanged."""
        dtype = self.qweight.dtype if dtype is None else dtype
        weight = self.qweight.dequantize(torch.float32)
        if not self._adapter_disabled:
            weight += self.delta_weight()
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
        if self._adapter_disabled:
            return nf4_linear(x, self.qweight, bias)
        dropout_p = self.lora_dropout if self.training else 0.0
        return qlora_linear(x, self.qweight, self.lora_A, self.lora_B, self.scaling, bias, dropout_p)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout:g}, "
                f"bias={self.bias is not None}, use_rslora={self.use_rslora}")

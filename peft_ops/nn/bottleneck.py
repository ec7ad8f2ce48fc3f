"""The bottleneck adapter layer (Houlsby et al. 2019) and the wrapper that puts it after a module."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops import checks
from ..ops.bottleneck import bottleneck_adapter, check_activation


class BottleneckAdapter(nn.Module):
    """A bottleneck adapter (Houlsby et al. 2019): ``y = x + scaling·dropout(act(x·W_downᵀ +
    b_down)·W_upᵀ + b_up)``, one call to the fused :func:`peft_ops.bottleneck_adapter`.

    ``down_weight`` [bottleneck_size, hidden_size] and ``down_bias`` start as ``nn.Linear``'s
    (kaiming-uniform, a = √5); ``up_weight`` [hidden_size, bottleneck_size] and ``up_bias``
    start at zero, so a fresh adapter is the identity and inserting it changes no output.
    Dropout applies to the adapter branch, in training mode only. The parameters' dtype must
    be the input's (see :func:`peft_ops.bottleneck_adapter`).
    """

    def __init__(self, hidden_size: int, bottleneck_size: int, activation: str = "relu", scaling: float = 1.0,
                 dropout: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        self.hidden_size = checks.positive_int("hidden_size", hidden_size)
        self.bottleneck_size = checks.positive_int("bottleneck_size", bottleneck_size)
        self.activation = check_activation(activation)
        self.scaling = checks.real_number("scaling", scaling)
        self.dropout = checks.probability("dropout", dropout)
        factory = {"device": device, "dtype": dtype}
        self.down_weight = nn.Parameter(torch.empty((self.bottleneck_size, self.hidden_size), **factory))
        self.down_bias = nn.Parameter(torch.empty(self.bottleneck_size, **factory))
        self.up_weight = nn.Parameter(torch.empty((self.hidden_size, self.bottleneck_size), **factory))
        self.up_bias = nn.Parameter(torch.empty(self.hidden_size, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.hidden_size)
        nn.init.uniform_(self.down_bias, -bound, bound)
        nn.init.zeros_(self.up_weight)
        nn.init.zeros_(self.up_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bottleneck_adapter(x, self.down_weight, self.down_bias, self.up_weight, self.up_bias, self.activation,
                                  self.scaling, self.dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, "
                f"activation={self.activation!r}, scaling={self.scaling:g}, dropout={self.dropout:g}")


class WithAdapter(nn.Module):
    """``adapter(base_layer(...))``: a module whose output passes through a bottleneck adapter
    (what :func:`peft_ops.apply_adapters` puts in place of each target). When the base layer
    returns a tuple or list (attention layers return (output, weights)), the adapter applies to
    its first element. ``base_layer`` keeps its own parameters and state-dict keys under
    ``base_layer.``, as in PEFT."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter) -> None:
        checks.module("base_layer", base_layer)
        checks.module("adapter", adapter, BottleneckAdapter)
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return self.adapter(out)
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            return type(out)([self.adapter(out[0]), *out[1:]])
        raise TypeError(f"{type(self.base_layer).__name__} returned {type(out).__name__}: an adapter needs a "
                        "tensor, or a tuple/list whose first element is one")

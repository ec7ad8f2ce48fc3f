"""The ops as ``torch.library`` custom ops, for ``torch.compile``.

Inside a compiled region the autograd Functions call their launchers through these custom
ops (each with a fake implementation that gives the output shapes), so Dynamo traces the
Functions' forward and backward without a graph break and never looks inside a kernel launch.
Eager calls go straight to the launchers (``ops_for_call``).

Differences under compile: the dropout seed is a 0-d int64 tensor drawn in the graph
(``torch.randint``, no ``.item()``); outputs a call does not need (and the keep mask of a call
without dropout) come back as empty tensors and are dropped by the wrappers.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from ..nf4 import NF4Tensors
from .paths import eager_ops

_EMPTY = (0,)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY) if t is None else t


# --------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------

@custom_op("peft_ops::lora_shrink", mutates_args=())
def lora_shrink(x: Tensor, lora_A: Tensor, dropout_p: float, seed: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    xa, keep = eager_ops("lora", impl).shrink(x, lora_A, dropout_p, int(seed))
    return xa, x.new_empty(_EMPTY, dtype=torch.int32) if keep is None else keep


@lora_shrink.register_fake
def _(x, lora_A, dropout_p, seed, impl):
    M, K = x.shape
    return (x.new_empty((M, lora_A.shape[0]), dtype=torch.float32),
            x.new_empty((M, -(-K // 32)) if dropout_p > 0 else _EMPTY, dtype=torch.int32))


@custom_op("peft_ops::lora_forward", mutates_args=())
def lora_forward(x: Tensor, weight: Tensor, xa: Tensor, lora_B: Tensor, scaling: float, bias: Tensor | None,
                 impl: str) -> Tensor:
    return eager_ops("lora", impl).forward(x, weight, xa, lora_B, scaling, bias)


@lora_forward.register_fake
def _(x, weight, xa, lora_B, scaling, bias, impl):
    return x.new_empty((x.shape[0], weight.shape[0]))


@custom_op("peft_ops::lora_backward", mutates_args=())
def lora_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor,
                  keep: Tensor | None, scaling: float, dropout_p: float, need_dx: bool, need_dA: bool, need_dB: bool,
                  need_db: bool, impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dA, dB, db = eager_ops("lora", impl).backward(dy, x, weight, lora_A, lora_B, xa, keep, scaling, dropout_p,
                                                      need_dx, need_dA, need_dB, need_db)
    return _or_empty(dx, x), _or_empty(dA, lora_A), _or_empty(dB, lora_B), _or_empty(db, dy)


def _adapter_grad_dtype(impl: str, adapter: Tensor) -> torch.dtype:
    """dA, dB come back in the adapters' dtype from the kernels (cast in the rank pass), in
    fp32 from the PyTorch path (the Function casts them)."""
    return adapter.dtype if impl == "triton" else torch.float32


@lora_backward.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, keep, scaling, dropout_p, need_dx, need_dA, need_dB, need_db, impl):
    M, K = x.shape
    r, N = lora_A.shape[0], weight.shape[0]
    return (x.new_empty((M, K) if need_dx else _EMPTY),
            xa.new_empty((r, K) if need_dA else _EMPTY, dtype=_adapter_grad_dtype(impl, lora_A)),
            xa.new_empty((N, r) if need_dB else _EMPTY, dtype=_adapter_grad_dtype(impl, lora_B)),
            dy.new_empty((N,) if need_db else _EMPTY))


class CompiledLoraOps:
    """The LoRA launchers' interface, through the custom ops."""

    def __init__(self, impl: str):
        self.impl = impl

    @staticmethod
    def draw_seed() -> Tensor:
        return torch.randint(2**31, 2**62, (), dtype=torch.int64)

    def shrink(self, x, lora_A, dropout_p, seed):
        xa, keep = lora_shrink(x, lora_A, dropout_p, _seed_tensor(seed), self.impl)
        return xa, (keep if dropout_p > 0 else None)

    def forward(self, x, weight, xa, lora_B, scaling, bias):
        return lora_forward(x, weight, xa, lora_B, scaling, bias, self.impl)

    def backward(self, dy, x, weight, lora_A, lora_B, xa, keep, scaling, dropout_p, need_dx, need_dA, need_dB,
                 need_db):
        grads = lora_backward(dy, x, weight, lora_A, lora_B, xa, keep, scaling, dropout_p, need_dx, need_dA, need_dB,
                              need_db, self.impl)
        return _needed(grads, (need_dx, need_dA, need_dB, need_db))


def _needed(grads: tuple, needs: tuple) -> tuple:
    return tuple(g if need else None for g, need in zip(grads, needs))


def _seed_tensor(seed) -> Tensor:
    return seed if isinstance(seed, Tensor) else torch.tensor(seed, dtype=torch.int64)


# --------------------------------------------------------------------------------------
# NF4 / QLoRA
# --------------------------------------------------------------------------------------

@custom_op("peft_ops::nf4_forward", mutates_args=())
def nf4_forward(x: Tensor, packed: Tensor, absmax: Tensor, absmax_scale: Tensor | None, absmax_offset: Tensor | None,
                out_features: int, in_features: int, blocksize: int, dtype: torch.dtype, xa: Tensor | None,
                lora_B: Tensor | None, scaling: float, bias: Tensor | None, impl: str) -> Tensor:
    qw = NF4Tensors(packed, absmax, absmax_scale, absmax_offset, out_features, in_features, blocksize, dtype)
    return eager_ops("nf4", impl).forward(x, qw, xa, lora_B, scaling, bias)


@nf4_forward.register_fake
def _(x, packed, absmax, absmax_scale, absmax_offset, out_features, in_features, blocksize, dtype, xa, lora_B, scaling,
      bias, impl):
    return x.new_empty((x.shape[0], out_features))


@custom_op("peft_ops::nf4_backward_dx", mutates_args=())
def nf4_backward_dx(dy: Tensor, packed: Tensor, absmax: Tensor, absmax_scale: Tensor | None,
                    absmax_offset: Tensor | None, out_features: int, in_features: int, blocksize: int,
                    dtype: torch.dtype, impl: str) -> Tensor:
    qw = NF4Tensors(packed, absmax, absmax_scale, absmax_offset, out_features, in_features, blocksize, dtype)
    return eager_ops("nf4", impl).backward_dx(dy, qw)


@nf4_backward_dx.register_fake
def _(dy, packed, absmax, absmax_scale, absmax_offset, out_features, in_features, blocksize, dtype, impl):
    return dy.new_empty((dy.shape[0], in_features))


@custom_op("peft_ops::qlora_backward", mutates_args=())
def qlora_backward(dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, absmax_scale: Tensor | None,
                   absmax_offset: Tensor | None, out_features: int, in_features: int, blocksize: int,
                   dtype: torch.dtype, lora_A: Tensor, lora_B: Tensor, xa: Tensor, keep: Tensor | None, scaling: float,
                   dropout_p: float, need_dx: bool, need_dA: bool, need_dB: bool, need_db: bool,
                   impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    qw = NF4Tensors(packed, absmax, absmax_scale, absmax_offset, out_features, in_features, blocksize, dtype)
    dx, dA, dB, db = eager_ops("nf4", impl).qlora_backward(dy, x, qw, lora_A, lora_B, xa, keep, scaling, dropout_p,
                                                           need_dx, need_dA, need_dB, need_db)
    return _or_empty(dx, x), _or_empty(dA, lora_A), _or_empty(dB, lora_B), _or_empty(db, dy)


@qlora_backward.register_fake
def _(dy, x, packed, absmax, absmax_scale, absmax_offset, out_features, in_features, blocksize, dtype, lora_A, lora_B,
      xa, keep, scaling, dropout_p, need_dx, need_dA, need_dB, need_db, impl):
    r = lora_A.shape[0]
    return (x.new_empty(tuple(x.shape) if need_dx else _EMPTY),
            xa.new_empty((r, in_features) if need_dA else _EMPTY, dtype=_adapter_grad_dtype(impl, lora_A)),
            xa.new_empty((out_features, r) if need_dB else _EMPTY, dtype=_adapter_grad_dtype(impl, lora_B)),
            dy.new_empty((out_features,) if need_db else _EMPTY))


class CompiledNF4Ops(CompiledLoraOps):
    """The NF4 ops' interface (TorchNF4Ops / KernelNF4Ops), through the custom ops."""

    def forward(self, x, qw, xa, lora_B, scaling, bias):
        return nf4_forward(x, *qw, xa, lora_B, scaling, bias, self.impl)

    def backward_dx(self, dy, qw):
        return nf4_backward_dx(dy, *qw, self.impl)

    def qlora_backward(self, dy, x, qw, lora_A, lora_B, xa, keep, scaling, dropout_p, need_dx, need_dA, need_dB,
                       need_db):
        grads = qlora_backward(dy, x, *qw, lora_A, lora_B, xa, keep, scaling, dropout_p, need_dx, need_dA, need_dB,
                               need_db, self.impl)
        return _needed(grads, (need_dx, need_dA, need_dB, need_db))


# --------------------------------------------------------------------------------------
# DoRA / QDoRA (the shrink is LoRA's)
# --------------------------------------------------------------------------------------

@custom_op("peft_ops::dora_norm", mutates_args=())
def dora_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float,
              weight_sq_norm: Tensor | None, impl: str) -> tuple[Tensor, Tensor]:
    return eager_ops("dora", impl).norm(weight, lora_A, lora_B, magnitude, scaling, weight_sq_norm)


@dora_norm.register_fake
def _(weight, lora_A, lora_B, magnitude, scaling, weight_sq_norm, impl):
    return tuple(magnitude.new_empty((lora_B.shape[0],), dtype=torch.float32) for _ in range(2))


@custom_op("peft_ops::dora_forward", mutates_args=())
def dora_forward(x: Tensor, weight: Tensor, xa: Tensor, keep: Tensor | None, lora_B: Tensor, scaling: float,
                 bias: Tensor | None, col_scale: Tensor, dropout_p: float, impl: str) -> tuple[Tensor, Tensor]:
    return eager_ops("dora", impl).forward(x, weight, xa, keep, lora_B, scaling, bias, col_scale, dropout_p)


@dora_forward.register_fake
def _(x, weight, xa, keep, lora_B, scaling, bias, col_scale, dropout_p, impl):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], weight.shape[0]))


def _dora_grads(grads: tuple, x: Tensor, lora_A: Tensor, lora_B: Tensor, dy: Tensor) -> tuple:
    dx, dA, dB, dmag, db = grads
    return _or_empty(dx, x), _or_empty(dA, lora_A), _or_empty(dB, lora_B), _or_empty(dmag, dy), _or_empty(db, dy)


def _dora_grads_fake(x_shape, K, N, r, needs, dy, xa, lora_A, lora_B, impl):
    need_dx, need_dA, need_dB, need_dmag, need_db = needs
    return (dy.new_empty(tuple(x_shape) if need_dx else _EMPTY),
            xa.new_empty((r, K) if need_dA else _EMPTY, dtype=_adapter_grad_dtype(impl, lora_A)),
            xa.new_empty((N, r) if need_dB else _EMPTY, dtype=_adapter_grad_dtype(impl, lora_B)),
            xa.new_empty((N,) if need_dmag else _EMPTY, dtype=torch.float32),
            dy.new_empty((N,) if need_db else _EMPTY))


@custom_op("peft_ops::dora_backward", mutates_args=())
def dora_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor,
                  keep: Tensor | None, pre: Tensor, col_scale: Tensor, norm: Tensor, scaling: float, dropout_p: float,
                  need_dx: bool, need_dA: bool, need_dB: bool, need_dmag: bool, need_db: bool,
                  impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = eager_ops("dora", impl).backward(dy, x, weight, lora_A, lora_B, xa, keep, pre, col_scale, norm, scaling,
                                             dropout_p, need_dx, need_dA, need_dB, need_dmag, need_db)
    return _dora_grads(grads, x, lora_A, lora_B, dy)


@dora_backward.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, keep, pre, col_scale, norm, scaling, dropout_p, need_dx, need_dA, need_dB,
      need_dmag, need_db, impl):
    return _dora_grads_fake(x.shape, x.shape[1], weight.shape[0], lora_A.shape[0],
                            (need_dx, need_dA, need_dB, need_dmag, need_db), dy, xa, lora_A, lora_B, impl)


@custom_op("peft_ops::qdora_norm", mutates_args=())
def qdora_norm(packed: Tensor, absmax: Tensor, absmax_scale: Tensor | None, absmax_offset: Tensor | None,
               out_features: int, in_features: int, blocksize: int, dtype: torch.dtype, lora_A: Tensor,
               lora_B: Tensor, magnitude: Tensor, scaling: float, weight_sq_norm: Tensor | None,
               compute_dtype: torch.dtype,
               impl: str) -> tuple[Tensor, Tensor]:
    qw = NF4Tensors(packed, absmax, absmax_scale, absmax_offset, out_features, in_features, blocksize, dtype)
    return eager_ops("qdora", impl).norm(qw, lora_A, lora_B, magnitude, scaling, weight_sq_norm, compute_dtype)


@qdora_norm.register_fake
def _(packed, absmax, absmax_scale, absmax_offset, out_features, in_features, blocksize, dtype, lora_A, lora_B,
      magnitude, scaling, weight_sq_norm, compute_dtype, impl):
    return tuple(magnitude.new_empty((out_features,), dtype=torch.float32) for _ in range(2))


@custom_op("peft_ops::qdora_forward", mutates_args=())
def qdora_forward(x: Tensor, packed: Tensor, absmax: Tensor, absmax_scale: Tensor | None, absmax_offset: Tensor | None,
                  out_features: int, in_features: int, blocksize: int, dtype: torch.dtype, xa: Tensor,
                  keep: Tensor | None, lora_B: Tensor, scaling: float, bias: Tensor | None, col_scale: Tensor,
                  dropout_p: float, impl: str) -> tuple[Tensor, Tensor]:
    qw = NF4Tensors(packed, absmax, absmax_scale, absmax_offset, out_features, in_features, blocksize, dtype)
    return eager_ops("qdora", impl).forward(x, qw, xa, keep, lora_B, scaling, bias, col_scale, dropout_p)


@qdora_forward.register_fake
def _(x, packed, absmax, absmax_scale, absmax_offset, out_features, in_features, blocksize, dtype, xa, keep, lora_B,
      scaling, bias, col_scale, dropout_p, impl):
    return x.new_empty((x.shape[0], out_features)), x.new_empty((x.shape[0], out_features))


@custom_op("peft_ops::qdora_backward", mutates_args=())
def qdora_backward(dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, absmax_scale: Tensor | None,
                   absmax_offset: Tensor | None, out_features: int, in_features: int, blocksize: int,
                   dtype: torch.dtype, lora_A: Tensor, lora_B: Tensor, xa: Tensor, keep: Tensor | None, pre: Tensor,
                   col_scale: Tensor, norm: Tensor, scaling: float, dropout_p: float, need_dx: bool, need_dA: bool,
                   need_dB: bool, need_dmag: bool, need_db: bool,
                   impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    qw = NF4Tensors(packed, absmax, absmax_scale, absmax_offset, out_features, in_features, blocksize, dtype)
    grads = eager_ops("qdora", impl).backward(dy, x, qw, lora_A, lora_B, xa, keep, pre, col_scale, norm, scaling,
                                              dropout_p, need_dx, need_dA, need_dB, need_dmag, need_db)
    return _dora_grads(grads, x, lora_A, lora_B, dy)


@qdora_backward.register_fake
def _(dy, x, packed, absmax, absmax_scale, absmax_offset, out_features, in_features, blocksize, dtype, lora_A, lora_B,
      xa, keep, pre, col_scale, norm, scaling, dropout_p, need_dx, need_dA, need_dB, need_dmag, need_db, impl):
    return _dora_grads_fake(x.shape, in_features, out_features, lora_A.shape[0],
                            (need_dx, need_dA, need_dB, need_dmag, need_db), dy, xa, lora_A, lora_B, impl)


class CompiledDoraOps(CompiledLoraOps):
    """The DoRA ops' interface (TorchDoraOps / KernelDoraOps), through the custom ops."""

    def norm(self, weight, lora_A, lora_B, magnitude, scaling, weight_sq_norm):
        return dora_norm(weight, lora_A, lora_B, magnitude, scaling, weight_sq_norm, self.impl)

    def forward(self, x, weight, xa, keep, lora_B, scaling, bias, col_scale, dropout_p):
        return dora_forward(x, weight, xa, keep, lora_B, scaling, bias, col_scale, dropout_p, self.impl)

    def backward(self, dy, x, weight, lora_A, lora_B, xa, keep, pre, col_scale, norm, scaling, dropout_p, need_dx,
                 need_dA, need_dB, need_dmag, need_db):
        grads = dora_backward(dy, x, weight, lora_A, lora_B, xa, keep, pre, col_scale, norm, scaling, dropout_p,
                              need_dx, need_dA, need_dB, need_dmag, need_db, self.impl)
        return _needed(grads, (need_dx, need_dA, need_dB, need_dmag, need_db))


class CompiledQDoraOps(CompiledLoraOps):
    """The QDoRA ops' interface (TorchQDoraOps / KernelQDoraOps), through the custom ops."""

    def norm(self, qw, lora_A, lora_B, magnitude, scaling, weight_sq_norm, dtype):
        return qdora_norm(*qw, lora_A, lora_B, magnitude, scaling, weight_sq_norm, dtype, self.impl)

    def forward(self, x, qw, xa, keep, lora_B, scaling, bias, col_scale, dropout_p):
        return qdora_forward(x, *qw, xa, keep, lora_B, scaling, bias, col_scale, dropout_p, self.impl)

    def backward(self, dy, x, qw, lora_A, lora_B, xa, keep, pre, col_scale, norm, scaling, dropout_p, need_dx,
                 need_dA, need_dB, need_dmag, need_db):
        grads = qdora_backward(dy, x, *qw, lora_A, lora_B, xa, keep, pre, col_scale, norm, scaling, dropout_p,
                               need_dx, need_dA, need_dB, need_dmag, need_db, self.impl)
        return _needed(grads, (need_dx, need_dA, need_dB, need_dmag, need_db))


# --------------------------------------------------------------------------------------
# Bottleneck
# --------------------------------------------------------------------------------------

@custom_op("peft_ops::bottleneck_forward", mutates_args=())
def bottleneck_forward(x: Tensor, down_weight: Tensor, down_bias: Tensor | None, up_weight: Tensor,
                    up_bias: Tensor | None, activation: str, scaling: float, dropout_p: float, seed: Tensor,
                    save_h: bool, impl: str) -> tuple[Tensor, Tensor]:
    y, h = eager_ops("bottleneck", impl).forward(x, down_weight, down_bias, up_weight, up_bias, activation, scaling,
                                                 dropout_p, int(seed), save_h)
    return y, _or_empty(h, y).float()


@bottleneck_forward.register_fake
def _(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, dropout_p, seed, save_h, impl):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], down_weight.shape[0]) if save_h else _EMPTY,
                                             dtype=torch.float32)


@custom_op("peft_ops::bottleneck_backward", mutates_args=())
def bottleneck_backward(dy: Tensor, x: Tensor, h: Tensor, down_weight: Tensor, up_weight: Tensor, activation: str,
                     scaling: float, dropout_p: float, seed: Tensor, need_dx: bool, need_dw: bool,
                     impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = eager_ops("bottleneck", impl).backward(dy, x, h, down_weight, up_weight, activation, scaling, dropout_p,
                                                   int(seed), need_dx, need_dw)
    return tuple(_or_empty(g, h) for g in grads)


@bottleneck_backward.register_fake
def _(dy, x, h, down_weight, up_weight, activation, scaling, dropout_p, seed, need_dx, need_dw, impl):
    m, d = down_weight.shape
    # the kernels' parameter gradients come in x's dtype (cast by their finishing kernel), the
    # PyTorch path's in fp32 (the Function casts them)
    dtype = x.dtype if impl == "triton" else torch.float32
    w = (lambda *shape: h.new_empty(shape, dtype=dtype) if need_dw else h.new_empty(_EMPTY))
    return x.new_empty(tuple(x.shape) if need_dx else _EMPTY), w(m, d), w(m), w(d, m), w(d)


class CompiledBottleneckOps(CompiledLoraOps):
    """The bottleneck launchers' interface, through the custom ops."""

    def forward(self, x, down_weight, down_bias, up_weight, up_bias, activation, scaling, dropout_p, seed, save_h):
        y, h = bottleneck_forward(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, dropout_p,
                               _seed_tensor(seed), save_h, self.impl)
        return y, (h if save_h else None)

    def backward(self, dy, x, h, down_weight, up_weight, activation, scaling, dropout_p, seed, need_dx, need_dw):
        dx, *dw = bottleneck_backward(dy, x, h, down_weight, up_weight, activation, scaling, dropout_p,
                                   _seed_tensor(seed), need_dx, need_dw, self.impl)
        return (dx if need_dx else None, *(dw if need_dw else (None,) * 4))


# --------------------------------------------------------------------------------------
# Embedding LoRA
# --------------------------------------------------------------------------------------

@custom_op("peft_ops::lora_embedding_forward", mutates_args=())
def lora_embedding_forward(ids: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                           impl: str) -> tuple[Tensor, Tensor]:
    return eager_ops("embedding", impl).forward(ids, weight, lora_A, lora_B, scaling)


@lora_embedding_forward.register_fake
def _(ids, weight, lora_A, lora_B, scaling, impl):
    M = ids.shape[0]
    return weight.new_empty((M, weight.shape[1])), weight.new_empty((M, lora_A.shape[0]), dtype=torch.float32)


@custom_op("peft_ops::lora_embedding_backward", mutates_args=())
def lora_embedding_backward(dy: Tensor, ids: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor, scaling: float,
                            padding_idx: int | None, need_dA: bool, need_dB: bool, impl: str) -> tuple[Tensor, Tensor]:
    dA, dB = eager_ops("embedding", impl).backward(dy, ids, lora_A, lora_B, xa, scaling, padding_idx, need_dA,
                                                   need_dB)
    return _or_empty(dA, xa), _or_empty(dB, xa)


@lora_embedding_backward.register_fake
def _(dy, ids, lora_A, lora_B, xa, scaling, padding_idx, need_dA, need_dB, impl):
    # the kernels return the adapters' dtype, the PyTorch path fp32 (the Function casts)
    dtype = (lambda t: t.dtype) if impl == "triton" else (lambda t: torch.float32)
    return (lora_A.new_empty(lora_A.shape, dtype=dtype(lora_A)) if need_dA else xa.new_empty(_EMPTY),
            lora_B.new_empty(lora_B.shape, dtype=dtype(lora_B)) if need_dB else xa.new_empty(_EMPTY))


class CompiledEmbeddingOps(CompiledLoraOps):
    """The embedding LoRA ops' interface, through the custom ops."""

    def forward(self, ids, weight, lora_A, lora_B, scaling):
        return lora_embedding_forward(ids, weight, lora_A, lora_B, scaling, self.impl)

    def backward(self, dy, ids, lora_A, lora_B, xa, scaling, padding_idx, need_dA, need_dB):
        grads = lora_embedding_backward(dy, ids, lora_A, lora_B, xa, scaling, padding_idx, need_dA, need_dB,
                                        self.impl)
        return _needed(grads, (need_dA, need_dB))


_COMPILED = {"lora": CompiledLoraOps, "nf4": CompiledNF4Ops, "dora": CompiledDoraOps, "qdora": CompiledQDoraOps,
             "embedding": CompiledEmbeddingOps, "bottleneck": CompiledBottleneckOps}


def ops_for_call(op: str, impl: str):
    """The implementation an autograd Function of `op` runs for `impl` ("triton", "torch"): the
    eager one, or inside torch.compile the same one through the custom ops above."""
    return _COMPILED[op](impl) if torch.compiler.is_compiling() else eager_ops(op, impl)

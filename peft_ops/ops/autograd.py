"""What the ops' autograd Functions share: autocast handling, the dropout seed (drawn, saved,
turned into the PyTorch path's mask) and fp32-accumulated products."""

from __future__ import annotations

from typing import Callable

import torch


def autocast_dtype(x: object) -> torch.dtype | None:
    """The autocast dtype when x is a tensor on a device where torch.autocast is on, else None."""
    # meta tensors (launch plans, byte counts) have no autocast state
    if not isinstance(x, torch.Tensor) or x.device.type == "meta" or not torch.is_autocast_enabled(x.device.type):
        return None
    return torch.get_autocast_dtype(x.device.type)


def call_without_autocast(op: Callable, dtype: torch.dtype, args: dict, keep: tuple[str, ...] = ()):
    """``op(**args)`` as F.linear runs under autocast: every floating tensor of `args` except
    those named in `keep` cast to `dtype` (autograd flows back through the cast), autocast off
    inside. Every op starts with::

        if (dtype := autocast_dtype(x)) is not None:
            return call_without_autocast(op, dtype, dict(x=x, ...))
    """
    device_type = args["x"].device.type
    cast = {k: v.to(dtype) if k not in keep and isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in args.items()}
    with torch.autocast(device_type, enabled=False):
        return op(**cast)


def eager_seed() -> int:
    """A dropout seed for one eager call, from PyTorch's default CPU generator: reproducible
    under torch.manual_seed, and no device sync."""
    # In [2³¹, 2⁶²): the kernels' seed argument is always a 64-bit integer (one compiled
    # variant), and two layer-steps sharing a mask is a 2⁻⁶² event, not a 2⁻³¹ one.
    return int(torch.randint(2**31, 2**62, (), dtype=torch.int64).item())


def draw_seed(ops, dropout_p: float):
    """The dropout seed of one call: an int in eager mode; inside torch.compile a 0-d int64
    tensor drawn in the graph (ops.draw_seed, no .item()). 0 without dropout."""
    if dropout_p <= 0:
        return 0
    return ops.draw_seed() if hasattr(ops, "draw_seed") else eager_seed()


def save_with_seed(ctx, tensors: tuple, seed) -> None:
    """save_for_backward, plus the seed: a tensor seed (compiled) is saved, an int kept on ctx."""
    saved = isinstance(seed, torch.Tensor)
    ctx.save_for_backward(*tensors, *((seed,) if saved else ()))
    ctx.seed = None if saved else seed  # None: the last saved tensor is the seed


def saved_with_seed(ctx) -> tuple[tuple, object]:
    """(the saved tensors, the seed) as save_with_seed stored them."""
    saved = ctx.saved_tensors
    return (saved[:-1], saved[-1]) if ctx.seed is None else (saved, ctx.seed)


def torch_keep_mask(seed: int, M: int, K: int, dropout_p: float, device) -> torch.Tensor:
    """The keep mask the PyTorch path uses for `seed` (a generator seeded per call). PyTorch's
    CPU generator (mt19937) keys on the low 32 bits of its seed alone, so there the seed's two
    halves are folded together first: every bit of the 64-bit seed changes the mask (the CUDA
    generator, Philox, takes all 64 bits as they are)."""
    device = torch.device(device)
    if device.type == "cpu":
        seed = (seed ^ (seed >> 32)) & 0xFFFFFFFF
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand((M, K), generator=gen, device=device) >= dropout_p


def pack_keep_bits(keep: torch.Tensor) -> torch.Tensor:
    """A bool keep mask [M, K] bit-packed as the kernels keep it between forward and backward:
    int32 [M, ⌈K/32⌉], bit b of word j = column 32·j + b (columns past K are 0)."""
    M, K = keep.shape
    words = -(-K // 32)
    padded = keep.new_zeros((M, words * 32))
    padded[:, :K] = keep
    shifts = torch.arange(32, device=keep.device, dtype=torch.int64)
    packed = (padded.view(M, words, 32).to(torch.int64) << shifts).sum(dim=-1)  # disjoint bits: sum = OR
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # bit 31 is the sign bit


def unpack_keep_bits(packed: torch.Tensor, K: int) -> torch.Tensor:
    """The bool keep mask [M, K] of a bit-packed one (pack_keep_bits)."""
    shifts = torch.arange(32, device=packed.device, dtype=torch.int32)
    bits = (packed[:, :, None] >> shifts) & 1  # arithmetic shift: the & keeps bit b alone
    return bits.reshape(packed.shape[0], packed.shape[1] * 32)[:, :K].bool()


def mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b accumulated in fp32, as the kernels do (widening half-precision operands is exact)."""
    return torch.mm(a.float(), b.float())

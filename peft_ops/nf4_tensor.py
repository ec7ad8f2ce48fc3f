"""`NF4Tensor`: an NF4 weight [rows, cols] held as one tensor, so that FSDP2 shards it by rows.

An :class:`~peft_ops.nf4.NF4Weight` keeps bitsandbytes' bytes in buffers, which FSDP2 leaves
replicated on every rank. With ``NF4Weight.to_parameter_storage()`` the same bytes live in one
frozen ``nn.Parameter`` of this class: a wrapper tensor of the weight's shape and original dtype
whose data are the format's own tensors (flat, as in the buffers):

- ``packed`` uint8 [rows·cols/2], ``absmax`` fp32 or uint8 [rows·cols/blocksize], and with double
  quantization ``absmax_scale`` fp32 [rows·cols/(256·blocksize)] and ``absmax_offset`` fp32 [].

Rows r0 … r1 of the weight are the byte range [r0·cols/2, r1·cols/2) of ``packed``, and the same
row range of blocks and scale groups, **if** r0·cols is a multiple of blocksize (× 256 with
double quantization, where 256 blocks share one scale): then a row slice is a slice of every
tensor and nothing is re-quantized. :func:`row_quantum` is that many rows; FSDP2's shards must
be whole multiples of it (``split`` refuses anything else with a ValueError). The offset (the
mean absmax) is one value for the whole weight: every shard holds a copy.

FSDP2 calls :meth:`NF4Tensor.fsdp_pre_all_gather` / :meth:`fsdp_post_all_gather` around its
all-gather: the bytes gathered are the 4-bit codes and the 8-bit/fp32 statistics (≈ 4.13 bits
per weight at blocksize 64), never a dequantized copy; the gathered tensors are the unsharded
weight's own data (views of FSDP's all-gather outputs, freed by FSDP after use). The kernels see
the unsharded tensors through ``NF4Weight.tensors()`` and run unchanged.

Only the ops FSDP2, ``nn.Parameter`` and device moves use are implemented (split / slice / narrow
by rows, new_zeros, copy_, view, as_strided to its own shape, detach, _to_copy to another
device, pinning); anything else raises NotImplementedError naming the op. It is frozen:
arithmetic on it is refused, dequantize through its ``NF4Weight``.
"""

from __future__ import annotations

import math

import torch

try:  # DTensor: how FSDP2 holds a shard (absent from builds without torch.distributed)
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = Shard = None

ABSMAX_BLOCKSIZE = 256  # double quantization: 256 absmax values share one fp32 scale
INNER_NAMES = ("packed", "absmax", "absmax_scale", "absmax_offset")

aten = torch.ops.aten


def row_quantum(cols: int, blocksize: int, double_quant: bool) -> int:
    """Fewest rows whose elements fill whole NF4 blocks (and whole 256-block scale groups with
    double quantization): a row slice of the weight is a byte slice of each of its tensors
    exactly when it starts and ends on a multiple of this."""
    unit = blocksize * (ABSMAX_BLOCKSIZE if double_quant else 1)
    return unit // math.gcd(cols, unit)


def shard_problem(rows: int, cols: int, blocksize: int, double_quant: bool, parts: int) -> str | None:
    """Why [rows, cols] cannot be cut into `parts` equal row shards on block boundaries, or None."""
    if parts == 1:
        return None
    quantum = row_quantum(cols, blocksize, double_quant)
    groups = rows // quantum if rows % quantum == 0 else None
    if groups is not None and groups % parts == 0:
        return None
    unit = f"blocks of {blocksize}" + (f" with {ABSMAX_BLOCKSIZE} blocks per scale" if double_quant else "")
    have = f"{rows} rows make {groups} such groups" if groups is not None else f"{rows} rows are not a multiple of it"
    return (f"an NF4 weight [{rows}, {cols}] ({unit}) splits by rows only in whole groups of {quantum} rows, and "
            f"{have}: {parts} equal shards are impossible. Use a world size that divides the groups, or quantize "
            f"this layer with another blocksize or without double quantization")


def shard_bytes(rows: int, cols: int, blocksize: int = 64, double_quant: bool = True, world_size: int = 1) -> int:
    """Bytes one rank holds of an NF4 weight [rows, cols] sharded by rows over `world_size` ranks
    (parameter storage): its 1/world of the codes, absmax and scales, plus what every rank keeps
    whole: the offset (4 bytes, with double quantization) and ``quant_meta`` (5 int64). At
    world_size 1, the whole weight's ``NF4Weight.nbytes``."""
    numel = rows * cols
    blocks = -(-numel // blocksize)
    sharded = (numel + 1) // 2 + blocks * (1 if double_quant else 4)
    sharded += -(-blocks // ABSMAX_BLOCKSIZE) * 4 if double_quant else 0
    return sharded // world_size + (4 if double_quant else 0) + 40


def flat_range(name: str, start: int, stop: int, rows: int, cols: int, blocksize: int) -> tuple[int, int]:
    """[begin, end) in the flat tensor `name` (``packed``, ``absmax`` or ``absmax_scale``) of rows
    [start, stop) of a [rows, cols] weight; `start` on a row_quantum boundary, `stop` too or the
    last row (then the range takes the partial last block / scale group and the padding byte)."""
    per = {"packed": 2, "absmax": blocksize, "absmax_scale": blocksize * ABSMAX_BLOCKSIZE}[name]
    end = -(-stop * cols // per) if stop == rows else stop * cols // per  # the tail's partial unit
    return start * cols // per, end


def is_sharded(weight: torch.Tensor) -> bool:
    """Whether `weight` is a DTensor: FSDP2's sharded parameter."""
    return DTensor is not None and isinstance(weight, DTensor)


def shard_dim(weight: torch.Tensor) -> int:
    """The mesh dimension over which a DTensor is sharded on its dim 0 (FSDP2: the last for HSDP)."""
    dims = [i for i, p in enumerate(weight.placements) if isinstance(p, Shard) and p.dim == 0]
    if len(dims) != 1:
        raise ValueError(f"an NF4 weight shards on dim 0 over one mesh dimension, got placements {weight.placements}")
    return dims[0]


def shard_start_row(weight: torch.Tensor) -> int:
    """First row of this rank's part of a tensor FSDP2 shards on dim 0 (``torch.chunk``: parts of
    ⌈rows/world⌉ rows, the last shorter or empty); 0 for a whole one."""
    if not is_sharded(weight):
        return 0
    dim = shard_dim(weight)
    part = -(-weight.shape[0] // weight.device_mesh.size(dim))
    return min(weight.shape[0], part * weight.device_mesh.get_coordinate()[dim])


def shard_group(weight: torch.Tensor):
    """The process group over which `weight` is sharded on dim 0, or None when it is whole."""
    return weight.device_mesh.get_group(shard_dim(weight)) if is_sharded(weight) else None


def sharded_flat(local: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """This rank's part of one flat NF4 tensor as a DTensor placed like `weight` (equal parts on
    its shard dimension, replicated on the others): what a distributed checkpoint saves and
    reshards."""
    parts = weight.device_mesh.size(shard_dim(weight))
    return DTensor.from_local(local, weight.device_mesh, weight.placements, run_check=False,
                              shape=torch.Size((local.numel() * parts,)), stride=(1,))


class NF4Tensor(torch.Tensor):
    """A frozen NF4 weight as one tensor (see the module docstring). ``shape`` and ``dtype`` are
    the weight's (the dtype it was quantized from); the data are :data:`INNER_NAMES`."""

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: torch.Tensor | None
    absmax_offset: torch.Tensor | None
    blocksize: int

    @staticmethod
    def __new__(cls, packed, absmax, absmax_scale, absmax_offset, shape, dtype, blocksize):
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(shape), dtype=dtype, device=packed.device,
                                                   requires_grad=False)

    def __init__(self, packed, absmax, absmax_scale, absmax_offset, shape, dtype, blocksize):
        self.packed, self.absmax = packed, absmax
        self.absmax_scale, self.absmax_offset = absmax_scale, absmax_offset
        self.blocksize = blocksize

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    def inner(self) -> dict[str, torch.Tensor]:
        """The format's tensors by name (without the absent double-quant ones)."""
        return {n: getattr(self, n) for n in INNER_NAMES if getattr(self, n) is not None}

    def __repr__(self) -> str:
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, device={self.device})")

    # ---- traceable-subclass protocol (torch.compile, DTensor, FSDP2) -------------------

    def __tensor_flatten__(self):
        return list(self.inner()), (self.blocksize, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        blocksize, dtype = meta
        return NF4Tensor(inner["packed"], inner["absmax"], inner.get("absmax_scale"), inner.get("absmax_offset"),
                         outer_size, dtype, blocksize)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None:
            raise NotImplementedError(f"NF4Tensor (a frozen 4-bit weight) does not implement {func}: dequantize it "
                                      "through its NF4Weight")
        return handler(*args, **kwargs)

    # ---- FSDP2 all-gather extension --------------------------------------------------

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """What FSDP2 all-gathers for this shard: its packed bytes and statistics (4-bit data, not
        a dequantized copy). The offset is the same on every rank: it travels as metadata."""
        gathered = tuple(t for t in (self.packed, self.absmax, self.absmax_scale) if t is not None)
        return gathered, (self.absmax_offset, tuple(outer_size), self.blocksize, self.dtype)

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        """The unsharded weight over FSDP2's all-gather outputs (its data are views of them: FSDP
        frees and refills them). On later gathers FSDP passes that weight back as ``out``: its
        tensors must still be views of the same outputs (checked), and it takes this shard's
        offset (which a device move may have replaced)."""
        offset, shape, blocksize, dtype = metadata
        packed, absmax, *scale = outputs
        if out is not None:
            for mine, gathered in zip((out.packed, out.absmax, out.absmax_scale), outputs):
                if mine.untyped_storage().data_ptr() != gathered.untyped_storage().data_ptr():
                    raise RuntimeError("FSDP2 re-gathered an NF4 weight into buffers its unsharded tensor does not "
                                       "view")
            out.absmax_offset = offset
            return None
        full = NF4Tensor(packed, absmax, scale[0] if scale else None, offset, shape, dtype, blocksize)
        return full, tuple(outputs)


# ---- op implementations ------------------------------------------------------------------


def _rows(t: NF4Tensor, start: int, stop: int) -> NF4Tensor:
    """Rows [start, stop) as views of the inner tensors (block-aligned, checked)."""
    rows, cols = t.shape
    if (start, stop) == (0, rows):
        return NF4Tensor(t.packed, t.absmax, t.absmax_scale, t.absmax_offset, t.shape, t.dtype, t.blocksize)
    quantum = row_quantum(cols, t.blocksize, t.double_quant)
    for edge in (start, stop):
        if edge % quantum and edge != rows:
            parts = -(-rows // max(1, stop - start))
            raise ValueError(shard_problem(rows, cols, t.blocksize, t.double_quant, parts)
                             or f"an NF4 weight [{rows}, {cols}] splits by rows only in whole groups of {quantum} "
                                f"rows: row {edge} is not on a group boundary")
    parts = {name: slice(*flat_range(name, start, stop, rows, cols, t.blocksize))
             for name in ("packed", "absmax", "absmax_scale")}
    scale = t.absmax_scale[parts["absmax_scale"]] if t.double_quant else None
    return NF4Tensor(t.packed[parts["packed"]], t.absmax[parts["absmax"]], scale, t.absmax_offset,
                     (stop - start, cols), t.dtype, t.blocksize)


def _check_dim0(dim: int, t: NF4Tensor) -> None:
    if dim not in (0, -t.dim()):
        raise ValueError(f"an NF4 weight splits by rows (dim 0) only, got dim {dim}")


def _split(t, split_size, dim=0):
    _check_dim0(dim, t)
    rows = t.shape[0]
    return [_rows(t, start, min(start + split_size, rows)) for start in range(0, rows, split_size)]


def _slice(t, dim=0, start=None, end=None, step=1):
    _check_dim0(dim, t)
    if step != 1:
        raise ValueError("an NF4 weight slices by contiguous rows only (step 1)")
    rows = t.shape[0]
    start, end = slice(start, end).indices(rows)[:2]
    return _rows(t, start, max(start, end))


def _new_zeros(t, size, **kwargs):
    rows, cols = size
    if cols != t.shape[1]:
        raise ValueError(f"an NF4 weight of {t.shape[1]} columns cannot make zeros of shape {tuple(size)}")
    numel = rows * cols
    device = kwargs.get("device") or t.device
    blocks = -(-numel // t.blocksize)
    scale = offset = None
    if t.double_quant:
        scale = t.absmax_scale.new_zeros(-(-blocks // ABSMAX_BLOCKSIZE), device=device)
        offset = t.absmax_offset.clone().to(device)
    return NF4Tensor(t.packed.new_zeros((numel + 1) // 2, device=device), t.absmax.new_zeros(blocks, device=device),
                     scale, offset, (rows, cols), t.dtype, t.blocksize)


def _copy_(dst, src, non_blocking=False):
    if not isinstance(src, NF4Tensor) or not isinstance(dst, NF4Tensor) or src.shape != dst.shape \
            or src.blocksize != dst.blocksize or src.double_quant != dst.double_quant:
        raise ValueError(f"an NF4 weight copies only from an NF4 weight of the same shape and format, got {src!r} "
                         f"into {dst!r}")
    for name, value in src.inner().items():
        getattr(dst, name).copy_(value, non_blocking=non_blocking)
    return dst


def _same(t, *args, **kwargs):
    return NF4Tensor(t.packed, t.absmax, t.absmax_scale, t.absmax_offset, t.shape, t.dtype, t.blocksize)


def _view(t, size):
    size = list(size)
    if size in ([-1], [t.numel()]):  # FSDP keeps a flat alias of its sharded data: same data, flat shape
        return NF4Tensor(t.packed, t.absmax, t.absmax_scale, t.absmax_offset, (t.numel(),), t.dtype, t.blocksize)
    if t.dim() == 1 and len(size) == 2 and math.prod(size) == t.numel():
        return NF4Tensor(t.packed, t.absmax, t.absmax_scale, t.absmax_offset, size, t.dtype, t.blocksize)
    if size == list(t.shape):
        return _same(t)
    raise ValueError(f"an NF4 weight {tuple(t.shape)} views only as itself or flat, got {tuple(size)}")


def _as_strided(t, size, stride, storage_offset=0):
    if list(size) != list(t.shape) or storage_offset:
        raise ValueError(f"an NF4 weight {tuple(t.shape)} is not a strided view of {tuple(size)}")
    return _same(t)


def _map_inner(t, fn) -> NF4Tensor:
    moved = {n: fn(v) for n, v in t.inner().items()}
    return NF4Tensor(moved["packed"], moved["absmax"], moved.get("absmax_scale"), moved.get("absmax_offset"),
                     t.shape, t.dtype, t.blocksize)


def _to_copy(t, *, dtype=None, device=None, non_blocking=False, **kwargs):
    if dtype is not None and dtype != t.dtype:
        raise TypeError(f"an NF4 weight keeps its format: it cannot be cast to {dtype} (dequantize it instead)")
    return _map_inner(t, lambda v: v.to(device=device, non_blocking=non_blocking, copy=True))


def _empty_like(t, **kwargs):
    return _map_inner(t, lambda v: torch.empty_like(v, device=kwargs.get("device") or v.device))


def _is_pinned(t, device=None):
    return all(v.is_pinned() for v in t.inner().values())


_HANDLERS = {
    aten.split.Tensor: _split,
    aten.slice.Tensor: _slice,
    aten.narrow.default: lambda t, dim, start, length: _slice(t, dim, start, start + length),
    aten.new_zeros.default: _new_zeros,
    aten.copy_.default: _copy_,
    aten.detach.default: _same,
    aten.alias.default: _same,
    aten.clone.default: lambda t, **kw: _map_inner(t, torch.clone),
    aten.view.default: _view,
    aten._unsafe_view.default: _view,
    aten.as_strided.default: _as_strided,
    aten._to_copy.default: _to_copy,
    aten.empty_like.default: _empty_like,
    aten.is_pinned.default: _is_pinned,
    aten._pin_memory.default: lambda t, device=None: _map_inner(t, lambda v: v.pin_memory()),
}

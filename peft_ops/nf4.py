"""NF4 (4-bit NormalFloat) weights in bitsandbytes' own format, to the bit.

Format (as bitsandbytes 0.50 writes it), for a weight W [out, in]:

- W is flattened row-major and cut into blocks of ``blocksize`` elements (32 … 4096, a power
  of two); the last block may be partial. Element (n, k) is flat index f = n·in + k, in
  block f // blocksize.
- Each element is the index (0 … 15) of the code in :data:`NF4_CODE` nearest to
  W / absmax[block]; two per byte, **even flat index in the high nibble**.
- With double quantization ("compress_statistics"), the fp32 absmax of every block is stored
  as one byte: ``offset = mean(absmax)``, and ``absmax - offset`` is quantized in blocks of
  256 with bitsandbytes' signed 8-bit dynamic map (:func:`dynamic_map`), keeping one fp32
  scale per 256 blocks. Decoding: ``absmax[i] = map[code8[i]] · scale[i // 256] + offset``,
  then ``w = NF4_CODE[nibble] · absmax[block]`` — each step one fp32 rounding (no fused
  multiply-add, as in bitsandbytes), then one cast to the output dtype.

Storage with double quant: 4 + 8/blocksize + 32/(256·blocksize) bits per weight (4.127 at
blocksize 64), plus a few bytes per matrix.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import torch
import torch.nn as nn

from .backend import kernel_modules, resolve
from .nf4_tensor import (
    INNER_NAMES,
    NF4Tensor,
    flat_range,
    is_sharded,
    row_quantum,
    shard_group,
    shard_problem,
    shard_start_row,
    sharded_flat,
)
from .ops import checks

# bitsandbytes' NF4 code table (quantiles of N(0, 1) normalized to [-1, 1]), index 0 … 15.
NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_ZERO_INDEX = 7  # NF4_CODE_VALUES[7] == 0.0
BLOCKSIZES = tuple(2**i for i in range(5, 13))  # 32 … 4096
ABSMAX_BLOCKSIZE = 256  # double quantization: blocks of 256 absmax values share one fp32 scale
# Codes for the dtype a weight had before quantization, stored in the state dict (`quant_meta`).
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


@functools.lru_cache(maxsize=None)
def _cached_table(name: str, device: torch.device) -> torch.Tensor:
    values = NF4_CODE_VALUES if name == "nf4" else _dynamic_map_values()
    return torch.tensor(values, dtype=torch.float32, device=device)


def nf4_code(device="cpu") -> torch.Tensor:
    """The 16 NF4 values (fp32) on `device` (cached, do not modify)."""
    return _cached_table("nf4", torch.device(device))


def dynamic_map(device="cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted fp32 values; cached, do not modify).

    For each exponent e = 0 … 6, 2^e fractions: the midpoints of 2^e + 1 evenly spaced fp32
    points on [0.1, 1], times 10^(e-6), with both signs; then 0 and 1. That is 254 + 2 = 256
    values. Every step rounds to fp32 where bitsandbytes' construction does, so the table
    matches ``bitsandbytes.functional.create_dynamic_map()`` bit for bit (tested)."""
    return _cached_table("dynamic", torch.device(device))


def code_tables(device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(NF4 code values, 8-bit dynamic map) on `device`: what every NF4 kernel decodes with."""
    return nf4_code(device), dynamic_map(device)


def _dynamic_map_values() -> list[float]:
    values = [0.0, 1.0]
    for exponent in range(7):
        points = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        midpoints = (points[:-1] + points[1:]) / 2.0
        magnitude = 10 ** (exponent - 6)  # a Python scalar: the product is formed in fp32
        values += (magnitude * midpoints).tolist() + (-magnitude * midpoints).tolist()
    return sorted(values)


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted `code` for each element of `scaled` (fp32): the
    midpoints between neighbours are the decision boundaries; a value on a midpoint goes to the
    lower code (bitsandbytes' CPU rule)."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)


def _blockwise_absmax_quantize(flat: torch.Tensor, blocksize: int, code: torch.Tensor):
    """(codes uint8 [n], absmax fp32 [blocks]) of fp32 `flat` in blocks of `blocksize`, the last
    block partial. Full blocks scale by a reciprocal, the partial one divides: the roundings
    of bitsandbytes' quantizer, so near-midpoint values land on the same side."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        scaled = torch.cat([scaled, (flat[full:] / tail_absmax).clamp(-1, 1)])
    return _nearest_code(scaled, code), absmax


class NF4Tensors(NamedTuple):
    """What the kernels and the autograd Functions see of an NF4 weight: its tensors and shape.
    ``absmax_scale`` / ``absmax_offset`` are None without double quantization."""

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: torch.Tensor | None
    absmax_offset: torch.Tensor | None
    out_features: int
    in_features: int
    blocksize: int
    dtype: torch.dtype


class NF4Weight(nn.Module):
    """A frozen weight [out_features, in_features] in bitsandbytes' NF4 format.

    Buffers (all in the module's ``state_dict``, so it saves and loads with safetensors):

    - ``packed`` uint8 [⌈numel/2⌉]: two 4-bit codes per byte, even element high.
    - ``absmax``: fp32 [blocks], or uint8 [blocks] with double quantization, then also
      ``absmax_scale`` fp32 [⌈blocks/256⌉] and ``absmax_offset`` fp32 [] (the mean).
    - ``quant_meta`` int64 [5]: (out_features, in_features, blocksize, double_quant, dtype
      code), checked when a state dict is loaded.

    It never holds a dequantized copy: :meth:`dequantize` returns a new tensor each time.
    ``.to(device)`` moves it; a dtype conversion of its module (``model.half()``) leaves its
    buffers as they are (an fp16 absmax would not be this format).

    **Parameter storage** (for FSDP2, :meth:`to_parameter_storage`): the same tensors move into
    one frozen ``nn.Parameter`` ``weight``, an :class:`~peft_ops.nf4_tensor.NF4Tensor` that
    FSDP2 shards by rows and all-gathers in 4 bits. ``packed``, ``absmax``… still read the
    tensors, and the state dict keeps the same keys (as DTensors sharded on dim 0 once FSDP2 has
    sharded the weight, so ``torch.distributed.checkpoint`` saves and reshards them).
    """

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape, dtype: torch.dtype = torch.float32,
                 blocksize: int = 64, absmax_scale: torch.Tensor | None = None,
                 absmax_offset: torch.Tensor | None = None) -> None:
        super().__init__()
        out_features, in_features = _check_shape(shape)
        blocksize = check_blocksize(blocksize)
        if dtype not in _DTYPE_CODES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        numel = out_features * in_features
        blocks = -(-numel // blocksize)
        checks.tensor("packed", packed)
        if packed.dtype != torch.uint8:
            raise TypeError(f"packed must be a uint8 tensor, got {packed.dtype}")
        if packed.numel() != (numel + 1) // 2:
            raise ValueError(f"packed has {packed.numel()} bytes, but a [{out_features}, {in_features}] weight "
                             f"needs {(numel + 1) // 2}")
        checks.tensor("absmax", absmax)
        double_quant = absmax_scale is not None or absmax_offset is not None
        if double_quant:
            checks.tensor("absmax_scale", absmax_scale)
            checks.tensor("absmax_offset", absmax_offset)
            if absmax.dtype != torch.uint8:
                raise TypeError(f"absmax must be uint8 with double quantization, got {absmax.dtype}")
            scale_blocks = -(-blocks // ABSMAX_BLOCKSIZE)
            if absmax_scale.dtype != torch.float32 or absmax_scale.numel() != scale_blocks:
                raise ValueError(f"absmax_scale must be float32 with {scale_blocks} values, got "
                                 f"{absmax_scale.dtype} with {absmax_scale.numel()}")
            if absmax_offset.dtype != torch.float32 or absmax_offset.numel() != 1:
                raise ValueError(f"absmax_offset must be one float32 value, got {absmax_offset.dtype} "
                                 f"with {absmax_offset.numel()}")
        elif absmax.dtype != torch.float32:
            raise TypeError(f"absmax must be float32 without double quantization, got {absmax.dtype}")
        if absmax.numel() != blocks:
            raise ValueError(f"absmax has {absmax.numel()} values, but {numel} weights in blocks of "
                             f"{blocksize} need {blocks}")
        tensors = {"packed": packed, "absmax": absmax, "absmax_scale": absmax_scale, "absmax_offset": absmax_offset}
        checks.same_device(tensors)

        self.register_buffer("packed", packed.detach().reshape(-1).contiguous())
        self.register_buffer("absmax", absmax.detach().reshape(-1).contiguous())
        if double_quant:
            self.register_buffer("absmax_scale", absmax_scale.detach().reshape(-1).contiguous())
            self.register_buffer("absmax_offset", absmax_offset.detach().reshape(()).contiguous())
        else:
            self.absmax_scale = self.absmax_offset = None
        self.out_features, self.in_features = out_features, in_features
        self.blocksize, self.double_quant, self.dtype = blocksize, double_quant, dtype
        self.register_buffer("quant_meta", torch.tensor(self._meta(), dtype=torch.int64, device=packed.device))

    def _meta(self) -> tuple:
        return (self.out_features, self.in_features, self.blocksize, int(self.double_quant), _DTYPE_CODES[self.dtype])

    # ---- properties ------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def nbytes(self) -> int:
        """Bytes this weight holds in this process (what it costs in memory and on disk); with
        parameter storage sharded by FSDP2, this rank's shard (plus ``quant_meta``)."""
        own = sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))
        if self.storage == "parameter":
            own += sum(t.numel() * t.element_size() for t in self._local_nf4().inner().values())
        return own

    # ---- parameter storage (FSDP2) -----------------------------------------------------

    @property
    def storage(self) -> str:
        """"buffers" (the default) or "parameter" (one NF4Tensor Parameter that FSDP2 shards)."""
        return "parameter" if "weight" in self._parameters else "buffers"

    def to_parameter_storage(self) -> "NF4Weight":
        """Move the tensors (not copied) into one frozen ``nn.Parameter`` ``weight`` holding an
        :class:`~peft_ops.nf4_tensor.NF4Tensor`, so that ``fully_shard`` shards it by rows. In
        place; returns self. A no-op when already done. Call it before ``fully_shard``."""
        if self.storage == "parameter":
            return self
        inner = {name: self._buffers.pop(name, None) for name in INNER_NAMES}
        for name in ("absmax_scale", "absmax_offset"):
            self.__dict__.pop(name, None)
        tensor = NF4Tensor(inner["packed"], inner["absmax"], inner["absmax_scale"], inner["absmax_offset"],
                           self.shape, self.dtype, self.blocksize)
        self.weight = nn.Parameter(tensor, requires_grad=False)
        return self

    def row_quantum(self) -> int:
        """Rows per shard unit: FSDP2's row shards must hold a whole multiple of this many rows
        (whole blocks, and whole 256-block scale groups with double quantization)."""
        return row_quantum(self.in_features, self.blocksize, self.double_quant)

    def shard_problem(self, world_size: int) -> str | None:
        """Why this weight cannot be sharded by rows over `world_size` ranks, or None."""
        return shard_problem(self.out_features, self.in_features, self.blocksize, self.double_quant, world_size)

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """The format's tensors this process holds, by name: the whole weight's, or with
        parameter storage sharded by FSDP2, this rank's rows of each (block-aligned slices)."""
        if self.storage == "buffers":
            return {n: b for n in INNER_NAMES if (b := self._buffers.get(n)) is not None}
        return self._local_nf4().inner()

    def whole_sizes(self) -> dict[str, int]:
        """Element count of each of the format's tensors for the whole weight (sharded or not)."""
        blocks = -(-self.numel() // self.blocksize)
        sizes = {"packed": (self.numel() + 1) // 2, "absmax": blocks}
        if self.double_quant:
            sizes.update(absmax_scale=-(-blocks // ABSMAX_BLOCKSIZE), absmax_offset=1)
        return sizes

    def local_view(self) -> NF4Tensors:
        """:meth:`tensors` over this rank's rows only (``out_features`` = the rows held)."""
        local = self.local_tensors()
        return NF4Tensors(local["packed"], local["absmax"], local.get("absmax_scale"), local.get("absmax_offset"),
                          self.shard_rows()[1], self.in_features, self.blocksize, self.dtype)

    def shard_rows(self) -> tuple[int, int]:
        """(first row, rows) this process holds: (0, out_features) unless sharded by FSDP2."""
        if self.storage == "buffers":
            return 0, self.out_features
        weight = self._parameters["weight"]
        return shard_start_row(weight), self._local_nf4().shape[0]

    def shard_group(self):
        """The process group over which FSDP2 shards this weight, or None when it is whole here."""
        weight = self._parameters.get("weight")
        return shard_group(weight) if weight is not None else None

    def _local_nf4(self) -> NF4Tensor:
        weight = self._parameters["weight"]
        return weight.to_local() if is_sharded(weight) else weight

    def _unsharded_nf4(self) -> NF4Tensor:
        weight = self._parameters["weight"]
        if is_sharded(weight) or tuple(weight.shape) != tuple(self.shape):
            raise RuntimeError(f"this NF4 weight {tuple(self.shape)} is sharded by FSDP2 ({self._local_nf4()!r} on "
                               "this rank): its whole value exists only inside the forward/backward of the module "
                               "that was fully_shard-ed (or after that module's unshard())")
        return weight

    def __getattr__(self, name: str):
        if name in INNER_NAMES and "weight" in self.__dict__.get("_parameters", {}):
            return getattr(self._unsharded_nf4(), name)
        return super().__getattr__(name)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel()

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.shape)}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"dtype={self.dtype}, bits_per_weight={self.bits_per_weight:.3f}")

    # ---- bitsandbytes interop ----------------------------------------------------------

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> "NF4Weight":
        """From bitsandbytes' packed tensor (uint8 [⌈numel/2⌉, 1]) and its ``QuantState``, read
        by attribute (bitsandbytes need not be importable). The tensors are shared, not copied."""
        checks.tensor("packed", packed)
        qs = quant_state
        for field in ("absmax", "shape", "blocksize", "quant_type", "dtype"):
            if not hasattr(qs, field):
                raise TypeError(f"quant_state has no attribute {field!r}: expected a bitsandbytes QuantState")
        if qs.quant_type != "nf4":
            raise ValueError(f"quant_state.quant_type is {qs.quant_type!r}: only 'nf4' is supported")
        code = getattr(qs, "code", None)
        if code is not None and not torch.equal(code.detach().float().cpu(), nf4_code()):
            raise ValueError("quant_state.code is not bitsandbytes' NF4 table")
        if packed.dtype != torch.uint8:  # bnb can store the bytes in another dtype (quant_storage)
            packed = packed.contiguous().view(torch.uint8)
        scale = offset = None
        if getattr(qs, "nested", False):
            state2 = qs.state2
            if state2.blocksize != ABSMAX_BLOCKSIZE:
                raise ValueError(f"quant_state.state2.blocksize is {state2.blocksize}; expected {ABSMAX_BLOCKSIZE}")
            if not torch.equal(state2.code.detach().float().cpu(), dynamic_map()):
                raise ValueError("quant_state.state2.code is not bitsandbytes' 8-bit dynamic map")
            scale = state2.absmax.float()
            offset = torch.as_tensor(qs.offset, dtype=torch.float32, device=qs.absmax.device)
        return cls(packed, qs.absmax, tuple(qs.shape), qs.dtype, qs.blocksize, scale, offset)

    def to_bnb(self) -> tuple[torch.Tensor, dict]:
        """(packed uint8 [⌈numel/2⌉, 1], fields) in bitsandbytes' layout: the fields are the
        keyword arguments of ``bitsandbytes.functional.QuantState`` (``state2`` as a dict of
        its own), so ``QuantState(**fields, state2=QuantState(**fields["state2"]))`` rebuilds it."""
        fields = dict(absmax=self.absmax, shape=self.shape, code=nf4_code(self.device), dtype=self.dtype,
                      blocksize=self.blocksize, quant_type="nf4")
        if self.double_quant:
            fields.update(offset=self.absmax_offset,
                          state2=dict(absmax=self.absmax_scale, code=dynamic_map(self.device), dtype=torch.float32,
                                      blocksize=ABSMAX_BLOCKSIZE))
        return self.packed.view(-1, 1), fields

    # ---- conversions -------------------------------------------------------------------

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] in `dtype` (default: the dtype it was quantized from)."""
        return dequantize(self, dtype)

    def tensors(self) -> NF4Tensors:
        return NF4Tensors(self.packed, self.absmax, self.absmax_scale, self.absmax_offset, self.out_features,
                          self.in_features, self.blocksize, self.dtype)

    def _apply(self, fn, recurse=True):
        # Module.to / .half / .cuda call this with a function that may also cast floating
        # tensors; the format needs its fp32 buffers fp32: keep each buffer's dtype, move only.
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            if moved.dtype != buf.dtype:
                moved = buf.to(moved.device)
            self._buffers[name] = moved
        # quant_meta always says what the attributes say (to_empty() would leave it unfilled)
        self._buffers["quant_meta"] = torch.tensor(self._meta(), dtype=torch.int64, device=self.quant_meta.device)
        if self.storage == "parameter":
            weight = self._parameters["weight"]
            moved = _apply_inner(weight, fn)
            if moved is not weight:  # replaced only when a tensor moved (FSDP2 then re-reads it)
                self._parameters["weight"] = nn.Parameter(moved, requires_grad=False)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.storage == "buffers":
            return
        destination.pop(prefix + "weight", None)
        weight = self._parameters["weight"]
        local = self._local_nf4()
        for name, value in local.inner().items():
            if is_sharded(weight) and name != "absmax_offset":  # FSDP2 shard: a dim-0 DTensor
                value = sharded_flat(value, weight)
            destination[prefix + name] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        meta = state_dict.get(prefix + "quant_meta")
        if meta is not None and not torch.equal(meta.cpu(), self.quant_meta.cpu()):
            error_msgs.append(f"{prefix}quant_meta: the state dict holds an NF4 weight with (out, in, blocksize, "
                              f"double_quant, dtype) = {meta.tolist()}, this module has {self.quant_meta.tolist()}")
            return
        if self.storage == "parameter":
            self._load_parameter_storage(state_dict, prefix, missing_keys, error_msgs)
            state_dict = {k: v for k, v in state_dict.items()
                          if not (k.startswith(prefix) and k[len(prefix):] in INNER_NAMES)}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.storage == "parameter" and prefix + "weight" in missing_keys:  # its tensors come by their own keys
            missing_keys.remove(prefix + "weight")

    def _load_parameter_storage(self, state_dict, prefix, missing_keys, error_msgs) -> None:
        """Copy the format's tensors into this rank's part: from DTensors sharded as ours, or from
        whole tensors (a single-process state dict), whose rows this shard holds are taken."""
        local = self._local_nf4()
        start, rows = self.shard_rows()
        for name, target in local.inner().items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if is_sharded(value):  # sharded as this weight is (what state_dict() gave)
                value = value.to_local()
            elif name != "absmax_offset" and value.numel() != target.numel():  # whole: this shard's range
                value = value.reshape(-1)[slice(*flat_range(name, start, start + rows, self.out_features,
                                                            self.in_features, self.blocksize))]
            if value.shape != target.shape:
                error_msgs.append(f"{key}: shape {tuple(value.shape)} in the state dict, {tuple(target.shape)} "
                                  "in this shard")
                continue
            with torch.no_grad():
                target.copy_(value)

    @classmethod
    def from_state_dict(cls, state_dict: dict, prefix: str = "") -> "NF4Weight":
        """Rebuild from the tensors of a state dict (e.g. one read with safetensors)."""
        try:
            meta = state_dict[prefix + "quant_meta"]
        except KeyError:
            raise KeyError(f"state dict has no {prefix}quant_meta: not an NF4Weight") from None
        out_features, in_features, blocksize, double_quant, dtype_code = (int(v) for v in meta.tolist())
        if dtype_code not in _CODE_DTYPES:
            raise ValueError(f"{prefix}quant_meta names an unknown dtype code {dtype_code}")
        extra = (state_dict[prefix + "absmax_scale"], state_dict[prefix + "absmax_offset"]) if double_quant \
            else (None, None)
        return cls(state_dict[prefix + "packed"], state_dict[prefix + "absmax"], (out_features, in_features),
                   _CODE_DTYPES[dtype_code], blocksize, *extra)


def _apply_inner(weight: torch.Tensor, fn) -> torch.Tensor:
    """`fn` (a Module._apply function: a move, maybe with a cast) on each of an NF4Tensor's own
    tensors, keeping their dtypes; a DTensor shard stays a DTensor of the same placement."""
    local = weight.to_local() if is_sharded(weight) else weight

    def move(t):
        moved = fn(t)
        return moved if moved.dtype == t.dtype else t.to(moved.device)

    inner = {name: move(value) for name, value in local.inner().items()}
    if all(inner[name] is value for name, value in local.inner().items()):
        return weight
    new = NF4Tensor(inner["packed"], inner["absmax"], inner.get("absmax_scale"), inner.get("absmax_offset"),
                    local.shape, local.dtype, local.blocksize)
    if not is_sharded(weight):
        return new
    return type(weight).from_local(new, weight.device_mesh, weight.placements, run_check=False, shape=weight.shape,
                                   stride=weight.stride())


def _check_shape(shape) -> tuple[int, int]:
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
        raise ValueError(f"shape must be (out_features, in_features), got {shape!r}")
    return tuple(checks.positive_int(name, int(v) if isinstance(v, torch.Tensor) else v)
                 for name, v in zip(("shape[0]", "shape[1]"), shape))


def check_blocksize(blocksize: object) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral):
        raise TypeError(f"blocksize must be an int, got {type(blocksize).__name__}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize}")
    return int(blocksize)


def quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a 2-D weight [out, in] to NF4, producing bitsandbytes' ``quantize_4bit`` bytes
    (``quant_type="nf4"``, ``compress_statistics=double_quant``). Runs in PyTorch on the
    weight's device, in fp32."""
    checks.tensor("weight", weight, ndim=2)
    checks.float_dtype("weight", weight)
    blocksize = check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if weight.numel() == 0:
        raise ValueError(f"weight has shape {tuple(weight.shape)}: it must have at least one element")
    if weight.is_meta:  # a model built on the meta device: the format's tensors, empty, to fill when loading
        return empty(tuple(weight.shape), weight.dtype, blocksize, double_quant, weight.device)
    if not torch.isfinite(weight).all():
        raise ValueError("weight has NaN or infinite values: they have no NF4 code")
    flat = weight.detach().reshape(-1).float()
    codes, absmax = _blockwise_absmax_quantize(flat, blocksize, nf4_code(weight.device))
    packed = _pack(codes)
    scale = offset = None
    if double_quant:
        offset = absmax.mean()
        absmax, scale = _blockwise_absmax_quantize(absmax - offset, ABSMAX_BLOCKSIZE, dynamic_map(weight.device))
    return NF4Weight(packed, absmax, tuple(weight.shape), weight.dtype, blocksize, scale, offset)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    if codes.numel() % 2:  # an odd count pads with the code of 0.0, as bitsandbytes does
        codes = torch.cat([codes, codes.new_full((1,), NF4_ZERO_INDEX)])
    return (codes[0::2] << 4) | codes[1::2]  # even element in the high nibble


def empty(shape, dtype: torch.dtype = torch.float32, blocksize: int = 64, double_quant: bool = True,
          device="cpu") -> NF4Weight:
    """An NF4Weight of `shape` whose tensors are zeros (on the meta device: not allocated): what a
    model built without its weights holds until they are loaded."""
    out_features, in_features = _check_shape(shape)
    numel = out_features * in_features
    blocks = -(-numel // check_blocksize(blocksize))
    packed = torch.zeros((numel + 1) // 2, dtype=torch.uint8, device=device)
    if not double_quant:
        return NF4Weight(packed, torch.zeros(blocks, device=device), shape, dtype, blocksize)
    return NF4Weight(packed, torch.zeros(blocks, dtype=torch.uint8, device=device), shape, dtype, blocksize,
                     torch.zeros(-(-blocks // ABSMAX_BLOCKSIZE), device=device), torch.zeros((), device=device))


def quantize_rows_into(target: NF4Tensors, first_row: int, read_rows, gather_absmax=None,
                       chunk_elements: int = 1 << 18) -> None:
    """Quantize rows [first_row, first_row + rows) of a weight into `target` (that row range's
    tensors: ``packed``/``absmax``/… of an FSDP2 shard), reading the dense rows in chunks through
    ``read_rows(start, stop) -> Tensor [stop - start, in]`` so that only a chunk of them (≈ 256K
    weights) exists at a time. The bytes equal those of :func:`quantize` on the whole weight,
    sliced: with double quantization the offset is the mean absmax of the **whole** weight,
    which ``gather_absmax(local_fp32_absmax) -> whole fp32 absmax`` provides (e.g. an all-gather
    over the ranks holding the other rows; None when this range is the whole weight).
    `first_row` and the range must sit on :func:`~peft_ops.nf4_tensor.row_quantum` boundaries."""
    rows, cols, blocksize = target.out_features, target.in_features, target.blocksize
    if first_row % row_quantum(cols, blocksize, target.absmax_scale is not None):
        raise ValueError(f"first_row {first_row} is not on a block (and scale-group) boundary of a weight of "
                         f"{cols} columns")
    step = blocksize // math.gcd(cols, blocksize)  # rows that fill whole blocks
    chunk = max(step, chunk_elements // cols // step * step)
    code = nf4_code(target.packed.device)
    absmax = torch.empty(target.absmax.numel(), dtype=torch.float32, device=target.packed.device)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        dense = read_rows(first_row + start, first_row + stop).to(target.packed.device)
        if tuple(dense.shape) != (stop - start, cols):
            raise ValueError(f"read_rows gave {tuple(dense.shape)} for rows {first_row + start}…{first_row + stop}, "
                             f"expected {(stop - start, cols)}")
        if not torch.isfinite(dense).all():
            raise ValueError(f"rows {first_row + start}…{first_row + stop} have NaN or infinite values")
        codes, chunk_absmax = _blockwise_absmax_quantize(dense.reshape(-1).float(), blocksize, code)
        # the range's last chunk may end in a partial block / padding byte (only the weight's last rows do)
        target.packed[slice(*flat_range("packed", start, stop, rows, cols, blocksize))] = _pack(codes)
        absmax[slice(*flat_range("absmax", start, stop, rows, cols, blocksize))] = chunk_absmax
    if target.absmax_scale is None:
        target.absmax.copy_(absmax)
        return
    offset = (absmax if gather_absmax is None else gather_absmax(absmax)).mean()
    codes8, scale = _blockwise_absmax_quantize(absmax - offset, ABSMAX_BLOCKSIZE, dynamic_map(absmax.device))
    target.absmax.copy_(codes8)
    target.absmax_scale.copy_(scale)
    target.absmax_offset.copy_(offset)


def dequantize(qweight: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight [out, in] in `dtype` (default: the original dtype): ``NF4_CODE[nibble] ·
    absmax[block]`` in fp32, cast once. Equal to bitsandbytes' ``dequantize_4bit`` bit for bit.
    Triton kernel (one launch, nested absmax included) where the backend runs kernels."""
    if not isinstance(qweight, NF4Weight):
        raise TypeError(f"qweight must be a peft_ops.nf4.NF4Weight, got {type(qweight).__name__}")
    dtype = qweight.dtype if dtype is None else dtype
    if dtype not in _DTYPE_CODES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if resolve(qweight.device) == "triton":
        return kernel_modules().nf4.dequantize(qweight.tensors(), dtype, tables=code_tables(qweight.device))
    return decode(qweight.tensors(), dtype)


def decode(q: NF4Tensors, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The format's decoding rule in plain PyTorch (what ``peft_ops.reference.nf4_dequantize``
    is): W [out, in] = NF4_CODE[nibble]·absmax[block] in fp32, cast to `dtype` (default: the
    weight's original dtype). Element f of the flattened weight is the high nibble of byte
    f // 2 when f is even, the low one when odd; its block is f // blocksize."""
    device = q.packed.device
    numel = q.out_features * q.in_features
    absmax = q.absmax
    if q.absmax_scale is not None:  # double quantization: map[code8]·scale + offset, two fp32 roundings
        scale = q.absmax_scale.repeat_interleave(ABSMAX_BLOCKSIZE)[: absmax.numel()]
        absmax = dynamic_map(device)[absmax.long()] * scale + q.absmax_offset
    nibbles = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).reshape(-1)[:numel]
    block = torch.arange(numel, device=device) // q.blocksize
    weight = nf4_code(device)[nibbles.long()] * absmax[block]
    return weight.view(q.out_features, q.in_features).to(q.dtype if dtype is None else dtype)

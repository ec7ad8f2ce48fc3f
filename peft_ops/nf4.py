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
import numbers
from typing import NamedTuple

import torch
import torch.nn as nn

from .backend import kernel_modules, resolve
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
        meta = (out_features, in_features, blocksize, int(double_quant), _DTYPE_CODES[dtype])
        self.register_buffer("quant_meta", torch.tensor(meta, dtype=torch.int64, device=packed.device))
        self.out_features, self.in_features = out_features, in_features
        self.blocksize, self.double_quant, self.dtype = blocksize, double_quant, dtype

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
        """Bytes of every buffer this weight holds (what it costs in memory and on disk)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

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
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        meta = state_dict.get(prefix + "quant_meta")
        if meta is not None and not torch.equal(meta.cpu(), self.quant_meta.cpu()):
            error_msgs.append(f"{prefix}quant_meta: the state dict holds an NF4 weight with (out, in, blocksize, "
                              f"double_quant, dtype) = {meta.tolist()}, this module has {self.quant_meta.tolist()}")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

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
    if not torch.isfinite(weight).all():
        raise ValueError("weight has NaN or infinite values: they have no NF4 code")
    flat = weight.detach().reshape(-1).float()
    codes, absmax = _blockwise_absmax_quantize(flat, blocksize, nf4_code(weight.device))
    if codes.numel() % 2:  # an odd count pads with the code of 0.0, as bitsandbytes does
        codes = torch.cat([codes, codes.new_full((1,), NF4_ZERO_INDEX)])
    packed = (codes[0::2] << 4) | codes[1::2]  # even element in the high nibble
    scale = offset = None
    if double_quant:
        offset = absmax.mean()
        absmax, scale = _blockwise_absmax_quantize(absmax - offset, ABSMAX_BLOCKSIZE, dynamic_map(weight.device))
    return NF4Weight(packed, absmax, tuple(weight.shape), weight.dtype, blocksize, scale, offset)


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

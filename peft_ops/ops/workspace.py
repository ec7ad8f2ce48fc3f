"""Reusable buffers: dequantized NF4 weights (the QLoRA ops' "dequant" path), and the decode
GEMVs' split-K scratch.

At training sizes the QLoRA ops can decode the frozen NF4 weight into a dense buffer and run
the dense LoRA kernels on it (``peft_ops.ops.gemm_choice`` decides per shape). The buffer is
scratch: written by the decode, read by the next GEMM on the same stream, then free for the
next layer. Nothing keeps its contents: the forward decodes, the backward decodes again (the
dequantized weight is never saved for backward), and no call reuses another's.

One buffer per (device, stream, dtype, shape): the layers of a model share a handful (one
per distinct weight shape), and two streams never write the same one. They stay allocated
for the next step until :func:`free_workspaces` releases them (to PyTorch's caching
allocator; ``torch.cuda.empty_cache()`` then returns them to the driver).

The split-K scratch (``peft_ops.kernels.nf4.split_k_scratch``) is one fp32 partials buffer and
one int32 counter array per (device, stream), grown to the largest request: the counters are
zeroed once, when allocated, and every launch leaves them zero (its last program per tile
resets its counter), so a decode call makes no memset.
"""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple, torch.Tensor] = {}


def _stream_key(device: torch.device) -> int | None:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None


def dequant_buffer(device: torch.device, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    """The buffer for one dequantized weight of `shape` and `dtype` on `device` (and the current
    stream there): contiguous, its contents undefined."""
    key = (str(device), _stream_key(device), dtype, tuple(shape))
    buffer = _BUFFERS.get(key)
    if buffer is None:
        buffer = _BUFFERS[key] = torch.empty(shape, device=device, dtype=dtype)
    return buffer


def split_k_scratch(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 partials of at least `floats`, zeroed int32 counters of at least `counters`) for a
    split-K decode GEMV on `device` and the current stream there; reused across calls."""
    stream = _stream_key(device)
    partials_key = (str(device), stream, torch.float32, "split-k partials")
    counters_key = (str(device), stream, torch.int32, "split-k counters")
    partials = _BUFFERS.get(partials_key)
    if partials is None or partials.numel() < floats:
        partials = _BUFFERS[partials_key] = torch.empty(floats, device=device, dtype=torch.float32)
    found = _BUFFERS.get(counters_key)
    if found is None or found.numel() < counters:
        found = _BUFFERS[counters_key] = torch.zeros(counters, device=device, dtype=torch.int32)
    return partials, found


def _device_name(device) -> str | None:
    """`device` (None, a torch.device, a name such as "cuda:0", or a CUDA index) as the buffers'
    key names it; None: every device."""
    if device is None:
        return None
    if not isinstance(device, (torch.device, str, int)) or isinstance(device, bool):
        raise TypeError(f"device must be a torch.device, a device name or index, or None; got {type(device).__name__}")
    try:
        return str(torch.device(device))
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a device: {error}") from None


def workspace_bytes(device: torch.device | str | int | None = None) -> int:
    """Bytes the dequantization buffers and split-K scratch hold (on `device`, or on every device)."""
    name = _device_name(device)
    return sum(b.numel() * b.element_size() for key, b in _BUFFERS.items() if name is None or key[0] == name)


def free_workspaces(device: torch.device | str | int | None = None) -> int:
    """Release the dequantization buffers and split-K scratch (on `device`, or on every device);
    the bytes freed. The next call that needs one allocates again."""
    name = _device_name(device)
    freed = workspace_bytes(device)
    for key in [k for k in _BUFFERS if name is None or k[0] == name]:
        del _BUFFERS[key]
    return freed

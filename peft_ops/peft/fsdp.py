"""FSDP-QLoRA: NF4 base weights sharded by FSDP2, and base checkpoints loaded shard by shard.

    model = peft_ops.apply_lora(model_on_meta, targets, r=16, quantize="nf4")   # nothing allocated
    peft_ops.prepare_fsdp(model)          # NF4 weights become FSDP2-shardable parameters
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device=device)         # this rank's shards only
    peft_ops.load_base_weights(model, "path/to/checkpoint")   # dense or bnb 4-bit safetensors
    # … then initialise or load the adapters (reset_lora_parameters / load_peft_adapter)

:func:`prepare_fsdp` turns every :class:`~peft_ops.nf4.NF4Weight` into parameter storage: FSDP2
then shards its packed codes and statistics by output rows and all-gathers them in 4 bits per
module (see :mod:`peft_ops.nf4_tensor`). :func:`load_base_weights` fills a (sharded) model from
safetensors files, reading only the rows each rank holds: dense weights of an NF4 layer are
quantized on the rank that holds them (the mean absmax of double quantization all-gathered, so
the bytes equal a single-process :func:`~peft_ops.nf4.quantize`), bitsandbytes 4-bit weights
are read as byte ranges.
"""

from __future__ import annotations

import glob
import json
import math
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from safetensors import safe_open
from torch.distributed.fsdp import FSDPModule

from ..nf4 import NF4Weight, quantize_rows_into
from ..nf4_tensor import INNER_NAMES, flat_range, is_sharded, shard_start_row
from ..ops import checks

BNB_META = ".quant_state.bitsandbytes__nf4"  # the key suffix bitsandbytes packs its QuantState's fields under


def nf4_weights(model: nn.Module) -> dict[str, NF4Weight]:
    """Every NF4Weight of `model` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NF4Weight)}


def prepare_fsdp(model: nn.Module, world_size: int | None = None) -> nn.Module:
    """Make every NF4 weight of `model` shardable by FSDP2 (call before ``fully_shard``).

    Each :class:`~peft_ops.nf4.NF4Weight` moves its tensors into one frozen Parameter (no copy).
    `world_size` (default: the initialized process group's, else 1) is checked first: every NF4
    weight must split by rows into that many equal shards of whole blocks (and whole 256-block
    scale groups with double quantization). If one cannot, a ValueError names each such layer
    and nothing is changed. `model` wrapped in DDP instead also works: DDP is told to leave the
    NF4 parameters alone (every rank holds the same bytes). Returns `model`."""
    checks.module("model", model)
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    world_size = checks.positive_int("world_size", world_size)
    weights = nf4_weights(model)
    problems = [f"{name}: {problem}" for name, w in weights.items() if (problem := w.shard_problem(world_size))]
    if problems:
        raise ValueError(f"model: {len(problems)} NF4 weight(s) cannot be sharded over world_size={world_size}:\n"
                         + "\n".join(problems))
    for weight in weights.values():
        weight.to_parameter_storage()
    # DDP broadcasts every parameter from rank 0 at wrap time, which a 4-bit NF4Tensor cannot
    # take part in; each rank quantized the same weights, so DDP may skip them (its own opt-out)
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    model._ddp_params_and_buffers_to_ignore = sorted(ignored | {f"{name}.weight" for name in weights})
    return model


# ---- base checkpoints ------------------------------------------------------------------


def checkpoint_index(checkpoint: str | os.PathLike) -> dict[str, str]:
    """{tensor name: file} of a safetensors checkpoint: one file, or a folder of them."""
    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"checkpoint {path!r} is neither a safetensors file nor a folder")
    if not files:
        raise FileNotFoundError(f"checkpoint folder {path!r} holds no *.safetensors file")
    index = {}
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():
                index[key] = file
    return index


class _Reader:
    """Reads row ranges of tensors from the checkpoint's files, one tensor at a time (each file is
    opened per read, so no mapping outlives the read)."""

    def __init__(self, index: dict[str, str]):
        self.index = index

    def shape(self, key: str) -> tuple[int, ...]:
        with safe_open(self.index[key], "pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        with safe_open(self.index[key], "pt") as f:
            return f.get_slice(key).get_dtype()

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        with safe_open(self.index[key], "pt") as f:
            return f.get_slice(key)[start:stop]

    def whole(self, key: str) -> torch.Tensor:
        with safe_open(self.index[key], "pt") as f:
            return f.get_tensor(key)


def _bnb_fields(reader: _Reader, base: str) -> dict:
    raw = reader.whole(base + BNB_META)
    return json.loads(bytes(raw.tolist()).decode("utf-8"))


def _stored_sources(name: str, weight: NF4Weight, base: str, kind: str) -> dict[str, str]:
    """{our tensor name: checkpoint key} of a stored (already quantized) NF4 weight."""
    if kind == "bnb":
        keys = {"packed": base, "absmax": base + ".absmax", "absmax_scale": base + ".nested_absmax"}
    else:
        keys = {n: f"{name}.{n}" for n in INNER_NAMES}
    return {n: k for n, k in keys.items() if n in weight.local_tensors() and (kind != "bnb" or n != "absmax_offset")}


_SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.float32: "F32"}


def _nf4_plan(name: str, weight: NF4Weight, base: str, reader: _Reader) -> tuple[str, list[str]]:
    """("dense" | "bnb" | "ours", the problems found) for one NF4 weight."""
    index = reader.index
    want = (weight.out_features, weight.in_features)
    if base + BNB_META in index:
        kind, fields = "bnb", _bnb_fields(reader, base)
        got = (tuple(fields.get("shape", ())), fields.get("blocksize"), fields.get("nested_blocksize") is not None,
               fields.get("quant_type"))
        expected = (want, weight.blocksize, weight.double_quant, "nf4")
        if got != expected:
            return kind, [f"{base}: the checkpoint holds a 4-bit weight with (shape, blocksize, double_quant, "
                          f"quant_type) = {got}, the model expects {expected}"]
        if weight.double_quant and "nested_offset" not in fields:
            return kind, [f"{base}{BNB_META}: no nested_offset"]
    elif name + ".quant_meta" in index:
        kind, meta = "ours", reader.whole(name + ".quant_meta")
        if not torch.equal(meta.cpu(), weight.quant_meta.cpu()):
            return kind, [f"{name}.quant_meta: the checkpoint holds an NF4 weight with (out, in, blocksize, "
                          f"double_quant, dtype) = {meta.tolist()}, the model has {weight.quant_meta.tolist()}"]
    elif base in index:
        shape = reader.shape(base)
        if shape != want:
            return "dense", [f"{base}: shape {shape} in the checkpoint, the model's NF4 weight is {want}"]
        return "dense", []
    else:
        return "dense", [f"{base}: not in the checkpoint (as a dense weight, bitsandbytes 4-bit or {name}.packed)"]
    # a stored weight: every tensor present, of its dtype and whole size (a wrong one must not broadcast)
    problems, whole = [], weight.whole_sizes()
    for inner, key in _stored_sources(name, weight, base, kind).items():
        if key not in index:
            problems.append(f"{key}: not in the checkpoint")
            continue
        numel = math.prod(reader.shape(key))
        dtype = _SAFETENSORS_DTYPES[weight.local_tensors()[inner].dtype]
        if (numel, reader.dtype(key)) != (whole[inner], dtype):
            problems.append(f"{key}: {numel} values of {reader.dtype(key)} in the checkpoint, the model's "
                            f"{inner} needs {whole[inner]} of {dtype}")
    return kind, problems


def _agree(failed: bool, device: torch.device, group) -> bool:
    """Whether any rank of `group` failed (a collective every rank calls once per weight, so that a
    rank that raises never leaves the others waiting in the all-gather)."""
    flag = torch.tensor([int(failed)], device=device)
    dist.all_reduce(flag, group=group)
    return bool(flag.item())


def _load_nf4(name: str, weight: NF4Weight, base: str, kind: str, reader: _Reader) -> None:
    local = weight.local_tensors()
    first_row, rows = weight.shard_rows()
    group = weight.shard_group()
    if kind == "dense":
        agreed = False

        def gather(part: torch.Tensor) -> torch.Tensor:
            nonlocal agreed
            agreed = True
            if _agree(False, part.device, group):
                raise RuntimeError(f"{base}: another rank failed to read or quantize its rows")
            parts = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, part.contiguous(), group=group)
            return torch.cat(parts)

        try:
            quantize_rows_into(weight.local_view(), first_row, lambda a, b: reader.rows(base, a, b),
                               gather if group is not None and weight.double_quant else None)
        except Exception:
            if group is not None and weight.double_quant and not agreed:
                _agree(True, weight.device, group)
            raise
        return
    for inner, key in _stored_sources(name, weight, base, kind).items():
        if inner == "absmax_offset":
            continue
        begin, end = flat_range(inner, first_row, first_row + rows, weight.out_features, weight.in_features,
                                weight.blocksize)
        local[inner].copy_(reader.rows(key, begin, end).reshape(-1))
    if weight.double_quant:
        offset = (torch.tensor(_bnb_fields(reader, base)["nested_offset"], dtype=torch.float32) if kind == "bnb"
                  else reader.whole(f"{name}.absmax_offset"))
        local["absmax_offset"].copy_(offset.reshape(()))


def load_base_weights(model: nn.Module, checkpoint: str | os.PathLike) -> dict[str, list[str]]:
    """Fill `model`'s frozen base weights from a safetensors checkpoint (a file or a folder of
    them, e.g. a Hugging Face model folder), reading only the rows this rank holds.

    - An NF4 layer (``….qweight``) reads ``<layer>.weight``: dense (quantized here, on the rows of
      this rank's shard; the bytes equal :func:`~peft_ops.nf4.quantize` of the whole weight), or
      bitsandbytes 4-bit as transformers saves it (``<layer>.weight`` uint8 with its
      ``.absmax`` / ``.nested_absmax`` / ``.quant_state.bitsandbytes__nf4``), or this package's
      own keys (``<layer>.qweight.packed`` …).
    - Every other frozen parameter and persistent buffer reads the key of its own name; one
      sharded by FSDP2 on dim 0 reads its rows only.
    - Trainable parameters (the adapters) are not read.

    Everything but the values is checked before anything is loaded: a missing key, another shape,
    size, dtype, blocksize or double-quantization setting raises ValueError listing each, and the
    model is unchanged. A NaN / infinite dense value is found while its rows are quantized: the
    ValueError then comes on every rank holding that weight, layers before it already loaded.
    Collective under FSDP2 (double quantization all-gathers the absmax): call on every rank.
    Returns {"loaded": [...keys], "skipped": [...trainable names]}."""
    checks.module("model", model)
    reader = _Reader(checkpoint_index(checkpoint))
    for module in model.modules():  # write into the shards themselves, not into gathered copies FSDP2 frees
        if isinstance(module, FSDPModule):
            module.reshard()
    weights = nf4_weights(model)
    problems, nf4_jobs = [], []
    for name, weight in weights.items():
        base = (name.rsplit(".", 1)[0] + "." if "." in name else "") + "weight"
        kind, found = _nf4_plan(name, weight, base, reader)
        problems += found
        nf4_jobs.append((name, weight, base, kind))
    dense_jobs, skipped, seen = [], [], set()
    nf4_prefixes = tuple(name + "." for name in weights)
    for key, tensor in _named_state(model):
        if key.startswith(nf4_prefixes) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if tensor.requires_grad:
            skipped.append(key)
            continue
        if key not in reader.index:
            problems.append(f"{key}: not in the checkpoint")
            continue
        if reader.shape(key) != tuple(tensor.shape):
            problems.append(f"{key}: shape {reader.shape(key)} in the checkpoint, {tuple(tensor.shape)} in the model")
            continue
        dense_jobs.append((key, tensor))
    if problems:
        raise ValueError(f"checkpoint {os.fspath(checkpoint)!r} does not fit the model ({len(problems)} problem(s); "
                         "nothing was loaded):\n" + "\n".join(problems))
    with torch.no_grad():
        for name, weight, base, kind in nf4_jobs:
            _load_nf4(name, weight, base, kind, reader)
        for key, tensor in dense_jobs:
            local = tensor.to_local() if is_sharded(tensor) else tensor
            start = shard_start_row(tensor)
            value = reader.rows(key, start, start + local.shape[0]) if local.dim() else reader.whole(key)
            local.copy_(value)
    return {"loaded": [job[2] for job in nf4_jobs] + [job[0] for job in dense_jobs], "skipped": skipped}


def _named_state(model: nn.Module):
    """(state-dict name, tensor) of every parameter and persistent buffer, tied ones once."""
    for module_name, module in model.named_modules():
        if isinstance(module, NF4Weight):
            continue
        prefix = module_name + "." if module_name else ""
        for name, param in module._parameters.items():
            if param is not None:
                yield prefix + name, param
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                yield prefix + name, buf


# ---- distributed checkpoints of the whole (sharded) model -------------------------------


def save_sharded_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """``torch.distributed.checkpoint.save`` of `model`'s state dict (each rank writes its shards,
    NF4 weights included as their packed / absmax / scale tensors). Collective under FSDP2."""
    checks.module("model", model)
    dcp.save(model.state_dict(), checkpoint_id=os.fspath(path))


def load_sharded_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint written by :func:`save_sharded_checkpoint` (or ``dcp.save`` of a state
    dict) into `model` in place, at any world size (the flat NF4 tensors reshard as any DTensor).

    Checked first, on the checkpoint's metadata and its ``quant_meta`` values: every key of the
    model present with the same size, and every NF4 weight of the same (out, in, blocksize,
    double quantization, dtype). A mismatch raises ValueError listing each, and nothing is loaded.
    Collective under FSDP2: call on every rank."""
    checks.module("model", model)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path {path!r} is not a distributed-checkpoint folder")
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    state = model.state_dict()
    problems = [f"{key}: not in the checkpoint" for key in state if key not in saved]
    problems += [f"{key}: size {tuple(saved[key].size)} in the checkpoint, {tuple(value.shape)} in the model"
                 for key, value in state.items() if key in saved and hasattr(saved[key], "size")
                 and tuple(saved[key].size) != tuple(value.shape)]
    metas = {key: torch.empty_like(value) for key, value in state.items()
             if key.endswith(".quant_meta") and key in saved and tuple(saved[key].size) == tuple(value.shape)}
    if metas:
        dcp.load(metas, checkpoint_id=path)
        problems += [f"{key}: (out, in, blocksize, double_quant, dtype) = {value.tolist()} in the checkpoint, "
                     f"{state[key].tolist()} in the model" for key, value in metas.items()
                     if not torch.equal(value.cpu(), state[key].cpu())]
    if problems:
        raise ValueError(f"checkpoint {path!r} does not fit the model ({len(problems)} problem(s); nothing was "
                         "loaded):\n" + "\n".join(problems))
    dcp.load(state, checkpoint_id=path)

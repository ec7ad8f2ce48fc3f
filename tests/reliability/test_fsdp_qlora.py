"""FSDP-QLoRA (gloo, 2 and 4 CPU processes on loopback; tests/helpers/fsdp_qlora_worker.py):

- after ``prepare_fsdp`` + ``fully_shard`` each rank holds 1/world of every NF4 weight's bytes,
  measured from its tensors;
- one step on each rank's share of the batch equals a single process on the whole batch
  (gradients and updated adapters, QLoRA and QDoRA layers; through our NF4 kernels on the
  gathered weight at 2 ranks, the PyTorch path at 4);
- a distributed checkpoint (``torch.distributed.checkpoint``) of the sharded model, NF4
  included, round-trips bit for bit;
- ``load_base_weights`` on a model built on the meta device fills each rank's shard from a
  dense checkpoint (quantized on the rank) and from bitsandbytes' serialized 4-bit layout, bytes
  equal to a single-process ``quantize``, with a peak below the dense model's size;
- bad input (a world size that does not split the rows into whole scale groups, a checkpoint of
  another shape / blocksize / format) raises before anything changes.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import peft_ops
from peft_ops.nf4_tensor import NF4Tensor, row_quantum, shard_bytes

WORKER = pathlib.Path(__file__).parents[1] / "helpers" / "fsdp_qlora_worker.py"
TOL = 1e-5  # fp32: the shares' mean gradients against the whole batch's, relative to the largest


def run(*args, kernels=True) -> None:
    env = {k: v for k, v in os.environ.items() if kernels or k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("fsdp_qlora")
    run("single", out)
    return out, load_file(out / "single.safetensors")


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_qlora(world, single):
    from safetensors.torch import load_file

    out, expected = single
    # our NF4 kernels (interpreted) run on the gathered weights at 2 ranks; at 4 the PyTorch path
    # reads the same gathered tensors, which keeps 4 interpreted processes on CI's 2 cores out
    run("fsdp", world, out, kernels=world == 2)
    got = load_file(out / f"fsdp{world}.safetensors")
    assert set(got) == set(expected)
    assert {"grad.q1.lora_A", "grad.q2.lora_magnitude_vector", "param.lora.lora_B",
            "nf4.q1.qweight.packed", "nf4.q2.qweight.absmax_scale"} <= set(expected)
    for key, value in expected.items():
        if key.startswith("nf4."):  # the NF4 tensors gathered from the shards are the whole weight's bytes
            assert torch.equal(got[key], value), key
            continue
        error = ((got[key] - value).abs().max() / value.abs().max()).item()
        assert error <= TOL, (world, key, error)
    if world == 2:
        resharded_checkpoint_loads_in_one_process(out, got)
    if world == 2:  # parameter storage under DDP too (its broadcast told to skip the NF4 weights)
        ddp = load_file(out / "ddp2.safetensors")
        for key in ddp:
            error = ((ddp[key] - expected[key]).abs().max() / expected[key].abs().max()).item()
            assert error <= TOL, ("ddp", key, error)
    for rank in range(world):
        report = json.loads((out / f"fsdp{world}.rank{rank}.json").read_text())
        if world == 2:  # from_peft over bitsandbytes' Linear4bit, then sharded: the same output
            assert report["from_peft_bnb_equal"], rank
        for name, sizes in report["nf4_bytes"].items():
            tensors = sizes["tensors"]
            whole = {k.removeprefix(f"nf4.{name}."): v.numel() * v.element_size()
                     for k, v in expected.items() if k.startswith(f"nf4.{name}.")}
            for inner in ("packed", "absmax", "absmax_scale"):  # exactly 1/world: the shards are block-aligned
                assert tensors[inner] * world == whole[inner], (rank, name, inner)
            assert tensors["absmax_offset"] == whole["absmax_offset"] == 4  # the one mean, on every rank
            shape = {"q1.qweight": (512, 256), "q2.qweight": (256, 512)}[name]
            assert sizes["whole"] == shard_bytes(*shape)  # the formula of the docs' memory table, measured
            assert sizes["here"] == shard_bytes(*shape, world_size=world)
        assert report["dcp_equal"] and report["dcp_forward_equal"], rank
        assert any(".qweight.packed" in k for k in report["dcp_keys"])
        for source in ("dense.safetensors", "bnb.safetensors"):
            assert report[source]["equal"], (rank, source)
            assert report[source]["dense_equal"], (rank, source)  # a frozen 3-row head, sharded unevenly
            assert report[source]["peak_growth_bytes"] < report["dense_model_bytes"], (rank, source, report[source])


def resharded_checkpoint_loads_in_one_process(out, got):
    """The 2-rank distributed checkpoint loads whole into one process (resharded 2 → 1): the NF4
    bytes and the trained adapters are the ranks'. A model of another blocksize is refused first."""
    sys.path.insert(0, str(WORKER.parent))
    import fsdp_qlora_worker as worker

    model = peft_ops.prepare_fsdp(worker.Model(), world_size=1)
    peft_ops.load_sharded_checkpoint(model, out / "dcp2")
    state, params = model.state_dict(), dict(model.named_parameters())
    for key, value in got.items():
        if key.startswith("nf4."):
            assert torch.equal(state[key.removeprefix("nf4.")], value), key
        elif key.startswith("param."):
            assert torch.equal(params[key.removeprefix("param.")], value), key
    other = worker.Model()
    other.q1 = peft_ops.QLoraLinear.from_linear(nn.Linear(256, 512), r=4, blocksize=128)
    peft_ops.prepare_fsdp(other, world_size=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="nothing was loaded") as raised:
        peft_ops.load_sharded_checkpoint(other, out / "dcp2")
    assert "q1.qweight.absmax: size (2048,) in the checkpoint, (1024,)" in str(raised.value)
    assert ("q1.qweight.quant_meta: (out, in, blocksize, double_quant, dtype) = [512, 256, 64, 1, 0] in the "
            "checkpoint, [512, 256, 128, 1, 0] in the model") in str(raised.value)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())


# ---- single process: the shard arithmetic and bad input ---------------------------------


def qlora_model(out_features=512, in_features=256, **kw):
    torch.manual_seed(0)
    return nn.Sequential(peft_ops.QLoraLinear.from_linear(nn.Linear(in_features, out_features), r=4, **kw))


def test_row_quantum_is_whole_scale_groups():
    assert row_quantum(4096, 64, True) == 4      # 4 rows · 4096 = 16384 = 256 blocks of 64
    assert row_quantum(11008, 64, True) == 64    # Llama-2 down_proj: gcd(11008, 16384) = 256
    assert row_quantum(14336, 64, False) == 1    # without double quant: whole 64-blocks per row
    assert row_quantum(100, 64, False) == 16     # 16 · 100 = 1600 = 25 blocks


def test_a_row_slice_is_a_byte_slice_of_every_tensor():
    model = qlora_model()
    weight = model[0].qweight
    dense = weight.dequantize()
    weight.to_parameter_storage()
    quantum = weight.row_quantum()
    assert quantum == 64
    for start, stop in ((0, 64), (128, 320), (448, 512)):
        part = weight.weight[start:stop]
        assert isinstance(part, NF4Tensor) and tuple(part.shape) == (stop - start, 256)
        assert part.packed.data_ptr() == weight.weight.packed.data_ptr() + start * 128  # a view, not a copy
        decoded = peft_ops.nf4.decode(peft_ops.nf4.NF4Tensors(part.packed, part.absmax, part.absmax_scale,
                                                              part.absmax_offset, stop - start, 256, 64, weight.dtype))
        assert torch.equal(decoded, dense[start:stop])
    # what FSDP2 all-gathers for a shard: its 4-bit codes, 8-bit absmax codes and fp32 scales, no dense copy
    shard = weight.weight[128:320]
    inputs, metadata = shard.fsdp_pre_all_gather(None, weight.weight.shape, (256, 1), None, None)
    assert [t.dtype for t in inputs] == [torch.uint8, torch.uint8, torch.float32]
    assert [t.data_ptr() for t in inputs] == [shard.packed.data_ptr(), shard.absmax.data_ptr(),
                                              shard.absmax_scale.data_ptr()]
    gathered_bits = 8 * sum(t.numel() * t.element_size() for t in inputs) / shard.numel()
    assert gathered_bits == 4 + 8 / 64 + 32 / (64 * 256)  # 4.127 bits per weight
    with pytest.raises(ValueError, match="whole groups of 64 rows"):
        weight.weight[32:96]
    with pytest.raises(ValueError, match="3 equal shards"):
        torch.chunk(weight.weight, 3)


def test_prepare_fsdp_refuses_a_world_size_that_does_not_divide_the_groups():
    model = qlora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as raised:
        peft_ops.prepare_fsdp(model, world_size=3)
    message = str(raised.value)
    assert "0.qweight" in message and "world_size=3" in message and "whole groups of 64 rows" in message
    assert model[0].qweight.storage == "buffers"  # nothing changed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert peft_ops.prepare_fsdp(model, world_size=8) is model  # 512 rows = 8 groups of 64
    assert model[0].qweight.storage == "parameter"


def test_parameter_storage_keeps_the_math_and_the_state_dict():
    model = qlora_model(use_dora=True)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3))
    expected = model(x).detach()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    nbytes = model[0].qweight.nbytes
    counts = peft_ops.trainable_parameters(model)
    peft_ops.prepare_fsdp(model, world_size=1)
    assert peft_ops.trainable_parameters(model) == counts  # the NF4 weight counts once, as out × in
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["0.bias", "0.qweight.weight"]
    assert torch.equal(model(x), expected)
    assert model[0].qweight.nbytes == nbytes
    assert model.state_dict().keys() == state.keys()  # the same keys as buffer storage
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    other = qlora_model(use_dora=True)
    with torch.no_grad():
        other[0].qweight.packed.zero_()
    peft_ops.prepare_fsdp(other, world_size=1)
    other.load_state_dict(state)  # a buffer-storage state dict loads into parameter storage
    assert torch.equal(other(x), expected)
    with pytest.raises(TypeError, match="cannot be cast"):
        model[0].qweight.weight.to(torch.float16)
    model.half()  # a module cast leaves the format's tensors as they are
    assert model[0].qweight.absmax_scale.dtype == torch.float32


def bnb_file(path, weight, **changes):
    """A bitsandbytes-layout checkpoint of one NF4 weight, with fields of its metadata changed."""
    from safetensors.torch import save_file

    q = peft_ops.nf4.quantize(weight)
    meta = dict(quant_type="nf4", blocksize=q.blocksize, dtype="float32", shape=list(q.shape), nested_blocksize=256,
                nested_dtype="float32", nested_offset=q.absmax_offset.item()) | changes
    meta = {k: v for k, v in meta.items() if v is not None}
    save_file({"0.weight": q.packed.view(-1, 1), "0.weight.absmax": q.absmax, "0.weight.nested_absmax": q.absmax_scale,
               "0.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(meta).encode()),
                                                                      dtype=torch.uint8),
               "0.bias": torch.zeros(weight.shape[0])}, path)
    return q


def assert_refused_unchanged(folder, cases: dict) -> nn.Module:
    """Each folder/<case>.safetensors is refused with "nothing was loaded" and its words, and the
    model stays as it was; returns the model."""
    model = qlora_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for case, words in cases.items():
        with pytest.raises(ValueError, match="nothing was loaded") as raised:
            peft_ops.load_base_weights(model, folder / f"{case}.safetensors")
        assert words in str(raised.value), (case, str(raised.value))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()), case  # unchanged
    return model


def test_load_base_weights_single_process_and_bad_checkpoints(tmp_path):
    from safetensors.torch import save_file

    weight = torch.randn(512, 256, generator=torch.Generator().manual_seed(4)) * 0.02
    bias = torch.randn(512, generator=torch.Generator().manual_seed(5))
    save_file({"0.weight": weight, "0.bias": bias}, tmp_path / "dense.safetensors")
    expected = peft_ops.nf4.quantize(weight)
    model = qlora_model()
    report = peft_ops.load_base_weights(model, tmp_path / "dense.safetensors")
    assert report["loaded"] == ["0.weight", "0.bias"] and set(report["skipped"]) == {"0.lora_A", "0.lora_B"}
    for name, value in expected.state_dict().items():
        assert torch.equal(getattr(model[0].qweight, name), value), name
    assert torch.equal(model[0].bias, bias)
    q = bnb_file(tmp_path / "bnb.safetensors", weight)
    model = qlora_model()
    peft_ops.load_base_weights(model, tmp_path / "bnb.safetensors")
    assert torch.equal(model[0].qweight.packed, q.packed) and torch.equal(model[0].qweight.absmax, q.absmax)

    bad = {
        "shape": ({"0.weight": torch.zeros(512, 128), "0.bias": bias}, "shape (512, 128)"),
        "missing": ({"0.weight": weight}, "0.bias: not in the checkpoint"),
        "bias shape": ({"0.weight": weight, "0.bias": torch.zeros(3)}, "0.bias: shape (3,)"),
    }
    for case, (tensors, words) in bad.items():
        save_file(tensors, tmp_path / f"{case}.safetensors")
    bnb_file(tmp_path / "blocksize.safetensors", weight, blocksize=128)
    bnb_file(tmp_path / "plain.safetensors", weight, nested_blocksize=None)
    files = {**{case: words for case, (_, words) in bad.items()}, "blocksize": "128", "plain": "double_quant"}
    assert_refused_unchanged(tmp_path, files)


def test_the_docs_memory_table_is_the_formulas():
    root = pathlib.Path(__file__).parents[2]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "fsdp_qlora_memory.py")], capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() in (root / "docs" / "distributed.md").read_text()
    assert "| Llama-3 70B | 131.42 GiB | 36.80 GiB | 18.40 GiB | 9.20 GiB | 4.60 GiB |" in done.stdout


@pytest.mark.parametrize("shape, double_quant", [((3, 100), False), ((3, 100), True), ((65, 33), True),
                                                 ((3, 1), False), ((20, 100), False), ((65, 32), False),
                                                 ((65, 33), False)])
def test_partial_last_blocks_quantize_and_slice_exactly(shape, double_quant):
    """Weights whose last block (and byte) is partial: quantizing a row range in chunks, and slicing
    the last rows, give the whole weight's bytes."""
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(6))
    expected = peft_ops.nf4.quantize(weight, double_quant=double_quant)
    target = peft_ops.nf4.empty(shape, double_quant=double_quant)
    peft_ops.nf4.quantize_rows_into(target.tensors(), 0, lambda a, b: weight[a:b], chunk_elements=64)
    for name, value in expected.local_tensors().items():
        assert torch.equal(target.local_tensors()[name], value), name
    model = peft_ops.apply_lora(nn.Sequential(nn.Linear(shape[1], shape[0])), ["0"], r=2, quantize="nf4")
    peft_ops.prepare_fsdp(model, world_size=1)  # one rank: any shape, nothing to split
    assert model[0].qweight.storage == "parameter"
    expected.to_parameter_storage()
    quantum = expected.row_quantum()
    start = (shape[0] - 1) // quantum * quantum  # the last group of rows, partial block and all
    tail = expected.weight[start:]
    decoded = peft_ops.nf4.decode(peft_ops.nf4.NF4Tensors(tail.packed, tail.absmax, tail.absmax_scale,
                                                          tail.absmax_offset, shape[0] - start, shape[1], 64,
                                                          torch.float32))
    assert torch.equal(decoded, expected.dequantize()[start:])  # the last rows: partial block, padding byte
    if quantum > 1:
        with pytest.raises(ValueError, match="first_row"):
            peft_ops.nf4.quantize_rows_into(target.tensors(), 1, lambda a, b: weight[a:b])


def test_stored_checkpoints_are_checked_whole_before_loading(tmp_path):
    from safetensors.torch import save_file

    weight = torch.randn(512, 256, generator=torch.Generator().manual_seed(7)) * 0.02
    q = peft_ops.nf4.quantize(weight)
    ours = {f"0.qweight.{k}": v for k, v in q.state_dict().items()} | {"0.bias": torch.zeros(512)}
    save_file(ours, tmp_path / "ours.safetensors")
    model = qlora_model()
    peft_ops.load_base_weights(model, tmp_path / "ours.safetensors")
    assert torch.equal(model[0].qweight.packed, q.packed) and torch.equal(model[0].qweight.absmax_offset,
                                                                          q.absmax_offset)
    save_file({k: v for k, v in ours.items() if not k.endswith("absmax_scale")}, tmp_path / "no_scale.safetensors")
    save_file(ours | {"0.qweight.absmax": q.absmax[:1].clone()}, tmp_path / "short.safetensors")
    save_file(ours | {"0.qweight.absmax": q.absmax.float()}, tmp_path / "float.safetensors")
    dense = {"0.weight": weight.clone(), "0.bias": torch.zeros(512)}
    dense["0.weight"][100, 3] = float("nan")
    save_file(dense, tmp_path / "nan.safetensors")
    cases = {"no_scale": "0.qweight.absmax_scale: not in the checkpoint",
             "short": "0.qweight.absmax: 1 values of U8 in the checkpoint, the model's absmax needs 2048 of U8",
             "float": "0.qweight.absmax: 2048 values of F32"}
    model = assert_refused_unchanged(tmp_path, cases)
    with pytest.raises(ValueError, match="NaN or infinite"):  # values are checked as their rows are read
        peft_ops.load_base_weights(model, tmp_path / "nan.safetensors")

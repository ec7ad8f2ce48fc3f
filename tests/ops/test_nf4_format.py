"""NF4 format: bitsandbytes' bytes and values, round-trip accuracy, storage, state_dict /
safetensors, bnb interop, the dequantize kernel (bit-exact), bad input."""

import copy
import importlib.util

import pytest
import torch
import torch.nn as nn

from peft_ops import nf4, reference
from peft_ops.nf4 import NF4Weight, quantize

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (optional test dependency)")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def test_code_table_is_the_normal_quantile_construction():
    """The 16 NF4 values derived independently (QLoRA, Dettmers et al. 2023, appendix E): the
    quantiles of N(0, 1) at 8 evenly spaced probabilities from 0.9677083 to ½ (positive side)
    and 7 (negative side), plus an exact zero, normalized to [-1, 1]. The table holds their
    float32 roundings."""
    offset = 0.9677083
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    positive = normal.icdf(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    values /= values.max()
    code = nf4.nf4_code()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert float((code.double() - values).abs().max()) < 2**-24  # within float32 rounding of each value
    assert code[nf4.NF4_ZERO_INDEX] == 0.0 and code[0] == -1.0 and code[15] == 1.0


@needs_bnb
def test_code_table_is_bitsandbytes_table():
    from bitsandbytes.functional import get_4bit_type

    assert torch.equal(nf4.nf4_code(), get_4bit_type("nf4", device="cpu").float())


def test_packing_example():
    # formats.md: (-1, 1, 0, 0.5) in one block with absmax 1 pack to bytes 15, 124
    q = quantize(torch.tensor([[-1.0, 1.0, 0.0, 0.5]]), blocksize=32, double_quant=False)
    assert q.packed.tolist() == [15, 124]
    assert q.absmax.tolist() == [1.0]


def test_round_trip_randn_1024_blocksize_64():
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    q = quantize(w, blocksize=64)
    out = q.dequantize()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    mae = (out - w).abs().mean().item()
    assert mae < 0.10, mae  # measured 0.0725


def test_bits_per_weight_with_double_quant():
    q = quantize(torch.randn(1024, 1024), blocksize=64, double_quant=True)
    # 4 + 8/64 + 32/(64·256) = 4.127, plus the 4-byte offset and the 40-byte quant_meta
    assert q.bits_per_weight <= 4.13, q.bits_per_weight
    assert q.nbytes == 1024 * 1024 // 2 + 1024 * 1024 // 64 + 4 * 64 + 4 + 5 * 8
    assert quantize(torch.randn(1024, 1024), double_quant=False).bits_per_weight == pytest.approx(4.5, abs=1e-3)


@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_blocksize_and_dtype_round_trips(blocksize, dtype):
    torch.manual_seed(blocksize)
    w = torch.randn(97, 100).to(dtype)  # 9700 elements: a partial last block for every blocksize
    q = quantize(w, blocksize=blocksize)
    out = q.dequantize()
    assert out.dtype == dtype and out.shape == w.shape
    # each element is within half a code gap of its block's absmax-scaled value: |w - ŵ| ≤ 0.161·absmax
    flat, err = w.float().reshape(-1), (out.float() - w.float()).reshape(-1)
    n, full = flat.numel(), flat.numel() // blocksize * blocksize
    absmax = torch.cat([flat[:full].view(-1, blocksize).abs().amax(1).repeat_interleave(blocksize),
                        flat[full:].abs().max().expand(n - full)])
    dq_slack = 0.02 if q.double_quant else 0.0  # absmax itself is 8-bit quantized with double quant
    assert (err.abs() <= (0.1609 + dq_slack) * absmax + torch.finfo(dtype).eps * flat.abs()).all()


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 33), (65, 31)])
def test_sizes_not_divisible_by_the_blocksize(shape):
    w = torch.randn(*shape)
    for dq in (True, False):
        q = quantize(w, blocksize=32, double_quant=dq)
        assert q.packed.numel() == (w.numel() + 1) // 2
        assert q.absmax.numel() == -(-w.numel() // 32)
        assert torch.equal(q.dequantize(), reference.nf4_dequantize(q))
        assert (q.dequantize() - w).abs().max() <= 0.17 * w.abs().max()


def test_dequantize_kernel_is_bit_exact_with_the_reference(device):
    torch.manual_seed(1)
    # several programs (2048 weights each), blocks shorter and longer than a program, an odd
    # byte count (the padded word copy), plain and double-quantized absmax
    for shape, bs, dq in [((33, 64), 32, True), ((17, 33), 64, False), ((40, 300), 256, True), ((5, 7), 32, True),
                          ((24, 512), 4096, True), ((13, 700), 1024, False), ((3, 1001), 64, True)]:
        q = quantize(torch.randn(*shape, device=device), bs, dq)
        from peft_ops.kernels import nf4 as nf4_kernels

        for dtype in DTYPES:
            # bf16 too in the interpreter (which truncates fp32 → bf16): the 16-bit outputs round
            # on the bits there (`half_bits`), except an odd weight count's select path
            if dtype == torch.bfloat16 and device.type == "cpu" and shape[0] * shape[1] % 2:
                continue
            got = nf4_kernels.dequantize(q.tensors(), dtype, tables=nf4.code_tables(device))
            expected = reference.nf4_dequantize(q, torch.float32).to(dtype)
            assert torch.equal(got, expected), (shape, bs, dq, dtype)


def test_kernel_code_constants_are_the_format_table():
    from peft_ops.kernels import nf4 as nf4_kernels

    constants = torch.tensor([getattr(nf4_kernels, f"NF4_C{i}").value for i in range(16)], dtype=torch.float32)
    assert torch.equal(constants, nf4.nf4_code())  # the fp32 values, bit for bit


def test_state_dict_and_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    q = quantize(torch.randn(40, 70, dtype=torch.bfloat16), blocksize=32)
    holder = nn.Module()
    holder.qweight = q
    sd = holder.state_dict()
    assert set(sd) == {f"qweight.{k}" for k in ("packed", "absmax", "absmax_scale", "absmax_offset", "quant_meta")}
    save_file(sd, tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")
    again = NF4Weight.from_state_dict(loaded, "qweight.")
    assert again.dtype == torch.bfloat16 and again.blocksize == 32 and again.double_quant
    assert torch.equal(again.dequantize(), q.dequantize())
    # load into a module built for the same weight (zeros first, so the copy is observable)
    other = nn.Module()
    other.qweight = quantize(torch.zeros(40, 70, dtype=torch.bfloat16), blocksize=32)
    other.load_state_dict(loaded)
    assert torch.equal(other.qweight.dequantize(), q.dequantize())


def test_loading_a_different_format_is_refused_and_changes_nothing():
    a = nn.Module()
    a.qweight = quantize(torch.randn(16, 64), blocksize=64)
    b = nn.Module()
    b.qweight = quantize(torch.randn(16, 64), blocksize=32)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    with pytest.raises(RuntimeError):
        a.load_state_dict(b.state_dict())
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())


def test_dtype_conversion_of_a_module_keeps_the_format():
    holder = nn.Module()
    holder.qweight = quantize(torch.randn(8, 64))
    before = holder.qweight.dequantize()
    holder.half()
    assert holder.qweight.absmax_scale.dtype == torch.float32 and holder.qweight.absmax.dtype == torch.uint8
    assert torch.equal(holder.qweight.dequantize(), before)
    holder.to("cpu")
    assert holder.qweight.device.type == "cpu"


def test_to_bnb_from_bnb_round_trip():
    q = quantize(torch.randn(24, 80), blocksize=64)
    packed, fields = q.to_bnb()
    assert packed.shape == (24 * 80 // 2, 1) and packed.dtype == torch.uint8
    assert fields["quant_type"] == "nf4" and fields["blocksize"] == 64 and fields["state2"]["blocksize"] == 256

    class State:  # duck-typed QuantState
        def __init__(self, **kw):
            self.__dict__.update(kw)

    state = State(**{k: v for k, v in fields.items() if k != "state2"}, nested=True, state2=State(**fields["state2"]))
    again = NF4Weight.from_bnb(packed, state)
    assert torch.equal(again.dequantize(), q.dequantize())


# ---- against bitsandbytes itself (CPU) ----------------------------------------------

@needs_bnb
def test_dynamic_map_matches_bitsandbytes():
    import bitsandbytes.functional as bnbf

    assert torch.equal(nf4.dynamic_map(), bnbf.create_dynamic_map(signed=True))


def _bnb_portable_dequantize(packed, state):
    """bitsandbytes' own portable (PyTorch) NF4 dequantization in fp32."""
    import bitsandbytes.functional as bnbf
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), state.code, state.blocksize,
                                    state.shape, torch.float32)


@needs_bnb
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_same_bytes_and_values_as_bitsandbytes(blocksize, dtype, double_quant):
    import bitsandbytes.functional as bnbf

    torch.manual_seed(blocksize)
    w = torch.randn(300, 301).to(dtype)  # odd element count: a padded last byte, a partial block
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    ours = quantize(w, blocksize=blocksize, double_quant=double_quant)
    # the 4-bit codes: byte for byte
    assert torch.equal(ours.to_bnb()[0], packed)
    if double_quant:
        assert torch.equal(ours.absmax_offset, state.offset) and torch.equal(ours.absmax_scale, state.state2.absmax)
        # The 8-bit absmax codes: ours is the nearest map value; bitsandbytes' native binary
        # search sometimes ends on the neighbour (not always near a tie). Both decode exactly.
        diff = ours.absmax.int() - state.absmax.int()
        assert diff.abs().max() <= 1
        table = nf4.dynamic_map()
        flat = w.float().reshape(-1)
        full = flat.numel() // blocksize * blocksize
        fp32_absmax = torch.cat([flat[:full].view(-1, blocksize).abs().amax(1), flat[full:].abs().max().view(1)])
        for i in diff.nonzero().flatten().tolist():
            a, b = table[ours.absmax[i].long()], table[state.absmax[i].long()]
            scaled = (fp32_absmax[i] - state.offset) / state.state2.absmax[i // 256]
            assert (scaled - a).abs() <= (scaled - b).abs()  # ours is the nearer code
        assert diff.count_nonzero() <= 0.01 * diff.numel()  # measured: 0.2-0.25 % of the blocks
    else:
        assert torch.equal(ours.absmax, state.absmax)
    # values: bnb's bytes dequantized here equal bitsandbytes' dequantization bit for bit
    from_bnb = NF4Weight.from_bnb(packed, state)
    assert torch.equal(from_bnb.dequantize(torch.float32), _bnb_portable_dequantize(packed, state))
    fp32_state = copy.copy(state)
    fp32_state.dtype = torch.float32  # dequantize_4bit's output dtype: compare the fp32 values
    native = bnbf.dequantize_4bit(packed, fp32_state)
    assert native.dtype == torch.float32
    if blocksize <= 64:
        # bitsandbytes 0.50.2's native AVX-512 CPU kernel decodes blocksizes ≥ 128 wrongly
        # (mean |error| 2× its portable path's on the same bytes); below that it is exact.
        assert torch.equal(from_bnb.dequantize(torch.float32), native)


@needs_bnb
def test_bitsandbytes_dequantizes_our_bytes_to_our_values():
    import bitsandbytes.functional as bnbf

    q = quantize(torch.randn(64, 128), blocksize=64)
    packed, fields = q.to_bnb()
    state = bnbf.QuantState(**{k: v for k, v in fields.items() if k != "state2"}, state2=bnbf.QuantState(
        **fields["state2"]))
    assert torch.equal(bnbf.dequantize_4bit(packed, state), q.dequantize())


# ---- bad input ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(blocksize=48), ValueError, "blocksize"),
    (dict(blocksize=8192), ValueError, "blocksize"),
    (dict(blocksize=16), ValueError, "blocksize"),
    (dict(blocksize=64.0), TypeError, "blocksize"),
    (dict(double_quant="yes"), TypeError, "double_quant"),
])
def test_quantize_rejects_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        quantize(torch.randn(4, 64), **kwargs)


@pytest.mark.parametrize("weight, exc, word", [
    (torch.randn(64), ValueError, "weight"),
    (torch.randn(2, 4, 8), ValueError, "weight"),
    (torch.ones(4, 64, dtype=torch.int32), TypeError, "weight"),
    (torch.tensor([[1.0, float("nan")]]), ValueError, "weight"),
    ([[1.0, 2.0]], TypeError, "weight"),
])
def test_quantize_rejects_bad_weights(weight, exc, word):
    with pytest.raises(exc, match=word):
        quantize(weight)


def test_constructor_rejects_inconsistent_tensors():
    q = quantize(torch.randn(8, 64), double_quant=False)
    with pytest.raises(TypeError, match="packed"):
        NF4Weight(q.packed.to(torch.int8), q.absmax, (8, 64))
    with pytest.raises(ValueError, match="packed"):
        NF4Weight(q.packed[:-1], q.absmax, (8, 64))
    with pytest.raises(ValueError, match="absmax"):
        NF4Weight(q.packed, q.absmax[:-1], (8, 64))
    with pytest.raises(TypeError, match="absmax"):
        NF4Weight(q.packed, q.absmax.half(), (8, 64))
    with pytest.raises(ValueError, match="shape"):
        NF4Weight(q.packed, q.absmax, (8, 64, 1))
    with pytest.raises(TypeError, match="qweight"):
        nf4.dequantize(q.packed)

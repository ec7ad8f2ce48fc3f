"""The dropout keep mask against an independent generator.

The kernels' mask is element (m, k) ↦ lane k mod 4 of Philox4x32-10 at counter
m·⌈K/4⌉ + ⌊k/4⌋ under the 64-bit seed (docs: ``peft_ops.reference.dropout_keep_mask``, plain
numpy, no Triton). Every kernel that drops — the LoRA shrink (forward), the LoRA and QLoRA dX
kernels (backward, also in row chunks), the adapter's forward and backward — must reproduce it
bit for bit; the gradient tests replay this reference mask, not the kernels' own. Statistics
are then properties of the generator, checked on the reference at sizes the interpreter could
not afford.
"""

import numpy as np
import pytest
import torch

from peft_ops import reference
from peft_ops.kernels import dropout as dropout_kernels
from peft_ops.kernels import lora as lora_kernels
from peft_ops.ops.autograd import pack_keep_bits, torch_keep_mask, unpack_keep_bits

from conftest import DEVICE

SEED = 0x2F3A_5C71_9D0E_4B86  # a 62-bit seed, as eager_seed draws: both key words busy


def reference_mask(seed, n_cols, p, rows, cols=None):
    return reference.dropout_keep_mask(seed, n_cols, p, rows, range(n_cols) if cols is None else cols)


# --------------------------------------------------------------------------------------
# The generator itself: the published Philox4x32-10 known-answer vectors (Random123's kat_vectors).
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("counter, key, expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    lanes = reference.philox4x32_10([np.array([c]) for c in counter], key)
    assert tuple(int(lane[0]) for lane in lanes) == expected


# --------------------------------------------------------------------------------------
# Kernels against the reference, bit for bit.
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("M, K, p", [(1, 1, 0.5), (7, 13, 0.3), (33, 130, 0.1), (5, 1027, 0.9), (19, 6, 0.5)])
def test_kernel_mask_is_the_reference_mask(M, K, p):
    kernel = dropout_kernels.keep_mask(SEED, M, K, p, DEVICE).cpu()
    assert torch.equal(kernel, reference_mask(SEED, K, p, range(M)))


@pytest.mark.parametrize("K", [13, 1027])
def test_kernel_mask_at_large_row_offsets(K):
    """Rows past 2³¹ elements and counters past 2³² (the high counter word in use), by row
    offset: no tensor of that size is needed."""
    quarter = -(-K // 4)
    for row0 in (2**31 // K + 1, 2**32 // quarter - 2, 3 * 2**32 // quarter + 5):
        kernel = dropout_kernels.keep_mask(SEED, 4, K, 0.5, DEVICE, row0=row0).cpu()
        assert torch.equal(kernel, reference_mask(SEED, K, 0.5, range(row0, row0 + 4))), row0
    assert (3 * 2**32 // quarter + 5) * quarter >= 3 * 2**32  # the last offset really reaches c1 = 3


def test_every_seed_bit_changes_the_mask():
    """Both key words matter: flipping any of the 64 seed bits redraws about half the mask."""
    M, K = 8, 16
    base = dropout_kernels.keep_mask(SEED, M, K, 0.5, DEVICE).cpu()
    for bit in range(64):
        seed = SEED ^ (1 << bit)
        flipped = dropout_kernels.keep_mask(seed, M, K, 0.5, DEVICE).cpu()
        assert torch.equal(flipped, reference_mask(seed, K, 0.5, range(M))), bit
        changed = float((flipped != base).float().mean())
        assert 0.3 < changed < 0.7, (bit, changed)


def test_pytorch_path_mask_depends_on_every_seed_bit():
    base = torch_keep_mask(SEED, 16, 32, 0.5, "cpu")
    for bit in range(64):
        changed = float((torch_keep_mask(SEED ^ (1 << bit), 16, 32, 0.5, "cpu") != base).float().mean())
        assert 0.3 < changed < 0.7, (bit, changed)


@pytest.mark.parametrize("M", [37, 5])
@pytest.mark.parametrize("K", [45, 64, 97])
def test_lora_shrink_kernel_draws_the_reference_mask(K, M):
    """x = 1 and A = I make xa = keep/(1 − p) exactly: the forward kernel's own mask, read out;
    and the bit-packed mask it keeps for the backward is that mask, packed (bit 31 included,
    columns past K zero). M = 5: the decode shrink, K split over programs, each slice's
    programs storing their own words of the mask."""
    p = 0.4
    # the interpreter's 32-column tiles: slices of whole tiles, a power of two of them
    assert lora_kernels.shrink_split_k(M, K) == (1 if M == 37 else {45: 2, 64: 2, 97: 4}[K])
    x = torch.ones(M, K, device=DEVICE)
    eye = torch.eye(K, device=DEVICE)
    xa, keep = lora_kernels.shrink(x, eye, p, SEED)
    expected = reference_mask(SEED, K, p, range(M))
    assert torch.equal(xa.cpu() != 0, expected)
    assert torch.allclose(xa.cpu()[xa.cpu() != 0], torch.tensor(1 / (1 - p)))
    assert keep.dtype == torch.int32 and keep.shape == (M, -(-K // 32))
    assert torch.equal(keep.cpu(), pack_keep_bits(expected))
    assert torch.equal(unpack_keep_bits(keep.cpu(), K), expected)
    assert (keep.cpu() < 0).any()  # some word has bit 31 set: the sign bit round-trips


def test_keep_bits_layout():
    """Bit b of word j of a row is column 32·j + b, whatever the column count."""
    keep = torch.zeros(3, 70, dtype=torch.bool)
    keep[0, 0] = keep[1, 31] = keep[2, 69] = True
    packed = pack_keep_bits(keep)
    assert packed.tolist() == [[1, 0, 0], [-2**31, 0, 0], [0, 0, 1 << 5]]
    assert torch.equal(unpack_keep_bits(packed, 70), keep)
    assert torch.equal(unpack_keep_bits(pack_keep_bits(keep[:0]), 70), keep[:0])


def test_adapter_forward_kernel_draws_the_reference_mask():
    """Where the adapter drops, y = x exactly (fp32): the kernel's mask, read out of y."""
    from peft_ops.kernels import bottleneck as bottleneck_kernels
    from peft_ops.ops.autograd import eager_seed
    from peft_ops.ops.bottleneck import BottleneckAdapterFunction
    from peft_ops.tools.accuracy import BottleneckCase, make_bottleneck_inputs

    case = BottleneckCase(M=29, d=50, m=12, dtype=torch.float32, activation="silu")
    inp = make_bottleneck_inputs(case, DEVICE)
    args = [inp[k] for k in ("x", "down_weight", "down_bias", "up_weight", "up_bias")]
    torch.manual_seed(5)
    seed = eager_seed()
    torch.manual_seed(5)
    y = BottleneckAdapterFunction.apply(*args, "silu", 0.75, 0.35, bottleneck_kernels)
    assert torch.equal((y != inp["x"]).cpu(), reference_mask(seed, case.d, 0.35, range(case.M)))


# --------------------------------------------------------------------------------------
# Statistics of the generator (on the reference, which the kernels equal bit for bit).
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction(p):
    M, K = 2000, 515
    keep = reference_mask(SEED, K, p, range(M)).double()
    sd = (p * (1 - p) / keep.numel()) ** 0.5
    assert abs(float(keep.mean()) - (1 - p)) < 5 * sd
    rows, cols = keep.mean(dim=1), keep.mean(dim=0)  # no row or column is special
    assert float(rows.std()) < 2 * (p * (1 - p) / K) ** 0.5
    assert float(cols.std()) < 2 * (p * (1 - p) / M) ** 0.5


def test_lanes_and_neighbours_are_independent():
    """The four lanes of one Philox call, and neighbouring calls, agree as often as independent
    coin flips would: 1/8 of 4-lane groups all equal at p = 1/2, 1/2 of neighbouring pairs."""
    M, K = 1024, 1024
    keep = reference_mask(SEED, K, 0.5, range(M)).numpy()
    groups = keep.reshape(M, K // 4, 4)
    all_equal = float((groups.min(axis=2) == groups.max(axis=2)).mean())
    n = M * K // 4
    assert abs(all_equal - 0.125) < 5 * (0.125 * 0.875 / n) ** 0.5, all_equal
    for a, b in ((keep[:, :-1], keep[:, 1:]), (keep[:-1], keep[1:]), (keep[:, :-4], keep[:, 4:])):
        same = float((a == b).mean())
        assert abs(same - 0.5) < 5 * (0.25 / a.size) ** 0.5, same
    other = reference_mask(SEED + 1, K, 0.5, range(M)).numpy()
    assert abs(float((keep == other).mean()) - 0.5) < 0.01  # neighbouring seeds: independent masks


@pytest.mark.parametrize("device_type", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_pytorch_path_keep_fraction(device_type):
    M, K, p = 512, 257, 0.3
    keep = torch_keep_mask(SEED, M, K, p, device_type).double()
    assert abs(float(keep.mean()) - (1 - p)) < 5 * (p * (1 - p) / keep.numel()) ** 0.5

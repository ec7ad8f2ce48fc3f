"""Index arithmetic that can pass 2³¹ elements is 64-bit: shown in the compiled TTIR of every
kernel (no GPU needed), and on a GPU by a launch over more than 2³¹ elements."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

# Pointers to tensors that grow with the token count M (activations, their gradients, the
# per-row fp32 tensors and the per-M-block partials), or with a weight's size (NF4 codes).
GROW_WITH_M_OR_WEIGHT = {"X", "Y", "DY", "DX", "XA", "G", "H", "DH", "OUT", "KEEP", "WORDS", "ABSMAX", "W",
                         "DA_PARTIAL", "DB_PARTIAL", "DW_DOWN_PARTIAL", "DW_UP_PARTIAL", "DB_UP_PARTIAL"}


@pytest.fixture(scope="module")
def offset_widths():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = pathlib.Path(__file__).parents[1] / "helpers" / "index_width_probe.py"
    out = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.aot
def test_every_large_offset_is_64_bit_in_the_ttir(offset_widths):
    assert len(offset_widths) >= 12  # every kernel of the three kernel files
    checked = 0
    for kernel, widths in offset_widths.items():
        for pointer, kinds in widths.items():
            if pointer in GROW_WITH_M_OR_WEIGHT:
                assert kinds == ["i64"], (kernel, pointer, kinds)
                checked += 1
    assert checked >= 40
    # the activations of the three main ops are among them
    assert offset_widths["lora_forward"]["X"] == ["i64"] and offset_widths["lora_forward"]["Y"] == ["i64"]
    assert offset_widths["nf4_backward_dx"]["DX"] == ["i64"]
    assert offset_widths["bottleneck_forward"]["Y"] == ["i64"]


def test_the_probe_tells_32_from_64_bit():
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from helpers.index_width_probe import first_offsets

    ttir = """
    %a = tt.splat %X : !tt.ptr<bf16> -> tensor<4x!tt.ptr<bf16>> loc(#l)
    %b = tt.addptr %a, %o : tensor<4x!tt.ptr<bf16>>, tensor<4xi32> loc(#l)
    %c = tt.addptr %b, %p : tensor<4x!tt.ptr<bf16>>, tensor<4xi64> loc(#l)
    %d = tt.addptr %Y, %q : !tt.ptr<f32>, i64 loc(#l)
    """
    assert first_offsets(ttir, {"X", "Y"}) == {"X": ["i32"], "Y": ["i64"]}


@pytest.mark.gpu
def test_lora_over_more_than_2_31_elements():
    free, _ = torch.cuda.mem_get_info()
    K, N, r = 4096, 256, 16
    M = 2**31 // K + 1024  # x has more than 2³¹ elements
    if free < 3 * M * K * 2 + (8 << 30):
        pytest.skip(f"needs ≈{3 * M * K * 2 / 2**30:.0f} GiB free on the GPU, has {free / 2**30:.0f}")
    import peft_ops

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen)
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=gen) / K**0.5
    A = torch.randn(r, K, device="cuda", dtype=torch.bfloat16, generator=gen) / K**0.5
    B = torch.randn(N, r, device="cuda", dtype=torch.bfloat16, generator=gen) / r**0.5
    y = peft_ops.lora_linear(x, W, A, B, 2.0)
    tail = slice(M - 64, M)  # rows past 2³¹ / K: wrong with 32-bit offsets
    expected = peft_ops.reference.lora_linear(x[tail].double(), W.double(), A.double(), B.double(), 2.0)
    from peft_ops.tools.accuracy import assert_close

    assert_close(y[tail], expected, torch.bfloat16, "rows beyond 2³¹ elements",
                 scale=peft_ops.reference.lora_linear(x[tail].double().abs(), W.double().abs(), A.double().abs(),
                                                      B.double().abs(), 2.0))

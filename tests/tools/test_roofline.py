"""The roofline model against hand-computed FLOPs and bytes."""

import pytest

from peft_ops.tools import roofline
from peft_ops.tools.roofline import OpShape


def test_lora_by_hand():
    s = OpShape("lora", M=2, K=3, N=5, r=1)  # bf16: 2 bytes
    assert roofline.flops(s, "forward") == 2 * 2 * 5 * 3 + 2 * 2 * 3 * 1 + 2 * 2 * 5 * 1 == 92
    assert roofline.flops(s, "backward") == 60 + 4 * 2 * 5 + 4 * 2 * 3 == 124
    # read x, W, A, B; write y
    assert roofline.min_bytes(s, "forward") == 2 * (6 + 15 + 3 + 5 + 10) == 78
    # + x read again by the GEMM, xa (fp32) written and read
    assert roofline.fused_bytes(s, "forward") == 78 + 2 * 6 + 2 * 4 * 2 == 106
    # read dY, W, x, A, B; write dX, dA, dB
    assert roofline.min_bytes(s, "backward") == 2 * (10 + 15 + 6 + 6) + 2 * 2 * 8 == 106
    # + dY read twice, xa read + g written and read (fp32), dA/dB partials written and read
    assert roofline.fused_bytes(s, "backward") == 106 + 2 * 10 + 3 * 4 * 2 + 2 * 4 * 1 * 1 * (5 + 3) == 214


def test_nf4_and_qlora_by_hand():
    assert roofline.nf4_weight_bytes(5, 3) == 8 + 1 + 4 + 4  # codes, absmax codes, one scale, offset
    assert roofline.nf4_weight_bytes(4096, 4096) == 4096 * 4096 // 2 + 262144 + 4 * 1024 + 4
    s = OpShape("nf4", M=1, K=4096, N=4096)
    assert roofline.flops(s, "forward") == 2 * 4096 * 4096
    assert roofline.min_bytes(s, "forward") == 2 * (4096 + 4096) + roofline.nf4_weight_bytes(4096, 4096)
    q = OpShape("qlora", M=2, K=3, N=5, r=1)
    dense = OpShape("lora", M=2, K=3, N=5, r=1)
    assert roofline.min_bytes(q, "forward") == roofline.min_bytes(dense, "forward") - 2 * 15 + 17
    # the base layer it is judged against is the dense bf16 one
    assert roofline.base_layer(q, "forward") == (2 * 2 * 5 * 3, 2 * (6 + 15 + 10))


def test_adapter_by_hand():
    s = OpShape("bottleneck", M=4, K=8, N=8, r=2)
    assert roofline.flops(s, "forward") == 4 * 4 * 8 * 2 == 256
    assert roofline.flops(s, "backward") == 512
    params = (2 * 8 * 2 + 2 + 8) * 2
    assert roofline.min_bytes(s, "forward") == 2 * 4 * 8 * 2 + params
    assert roofline.min_bytes(s, "backward") == 3 * 4 * 8 * 2 + 2 * params
    # forward: x read (second read from L2), y written, h [M, m] fp32 written, weights read
    assert roofline.fused_bytes(s, "forward") == 2 * 64 + 4 * 4 * 2 + params
    # backward (sm_90 m ≤ 64: one role, one row slice): dY twice, x, dX; per [M, m] element h
    # read, dh written and read (fp32), act(h) and the bf16 dh operand written and read; the
    # weights twice; the slice's fp32 partials of dW_down, dW_up, db_up written and read
    per_h = 3 * 4 + 2 * 2 + 2 * 2
    assert roofline.fused_bytes(s, "backward") == 4 * 64 + 4 * 2 * per_h + 2 * params + 2 * (2 * 2 * 8 + 8) * 4
    # m = 200 (sm_90a's two-pass forward): x twice, y, act(h) [M, m] written and read, h saved
    wide = OpShape("bottleneck", M=4, K=8, N=8, r=200)
    params = (2 * 8 * 200 + 200 + 8) * 2
    assert roofline.fused_bytes(wide, "forward") == 3 * 64 + 2 * 4 * 200 * 2 + 4 * 200 * 4 + params


def test_eager_bytes_are_counted_op_by_op():
    M, K, N, r = 8, 16, 12, 4
    counted = roofline.unfused_bytes(OpShape("lora", M, K, N, r))
    # linear (x, W → y); x·Aᵀ (x, A → xa); xa·Bᵀ (xa, B → z); s·z (z → z'); y + z' (y, z' → out)
    forward = (M * K + N * K + M * N) + (M * K + r * K + M * r) + (M * r + N * r + M * N) + 2 * M * N + 3 * M * N
    assert counted["forward"] == 2 * forward
    assert counted["backward"] > 2 * (M * N + N * K + M * K)


def test_roofline_time_and_device_names():
    gpu = roofline.GPUS["H100-SXM"]
    assert roofline.roofline_seconds(989e12, 1, gpu) == pytest.approx(1.0)  # compute-bound
    assert roofline.roofline_seconds(1, 3350e9, gpu) == pytest.approx(1.0)  # memory-bound
    assert roofline.gpu_for_device_name("NVIDIA H100 80GB HBM3") == "H100-SXM"
    assert roofline.gpu_for_device_name("NVIDIA H100 PCIe") == "H100-PCIe"
    assert roofline.gpu_for_device_name("NVIDIA H200") == "H200"
    assert roofline.gpu_for_device_name("NVIDIA A100-SXM4-80GB") == "A100-80GB"
    assert roofline.gpu_for_device_name("NVIDIA GeForce GTX 1080") is None


def test_a_7b_lora_layer_is_compute_bound_and_the_adapter_memory_bound():
    lora = OpShape("lora", M=8192, K=4096, N=4096, r=16)
    assert roofline.flops(lora, "forward") / roofline.min_bytes(lora, "forward") > 1000  # ≈ 1,650 FLOP/B
    adapter = OpShape("bottleneck", M=8192, K=4096, N=4096, r=64)
    assert 20 < roofline.flops(adapter, "forward") / roofline.min_bytes(adapter, "forward") < 64

"""NF4 (QLoRA base) matmul: both regimes of peft_ops.nf4_linear against dequantize +
torch.matmul (bitsandbytes' way) and the bf16 dense layer, side by side in one run; plus the
QLoRA layer fwd+bwd against bf16 LoRA. This is the measurement that decides the fused-GEMM vs
dequantize-then-GEMM crossover documented in kernels/nf4.py.

    python benchmarks/bench_nf4.py            # on a CUDA GPU: decode M ∈ {1, 16}, training M ∈ {512, 4096, 8192}
    python benchmarks/bench_nf4.py --smoke    # tiny shapes, any device (checks the script)
"""

from __future__ import annotations

import argparse
import pathlib

import torch
import torch.nn.functional as F

import peft_ops
from peft_ops.nf4 import quantize

from bench_lora import training_step, write_record

from peft_ops.bench import timer

GPU_SHAPES = [(1, 4096, 14336), (16, 4096, 14336), (1, 14336, 4096), (512, 4096, 14336), (4096, 4096, 14336),
              (8192, 4096, 4096)]
SMOKE_SHAPES = [(3, 64, 48), (40, 64, 48)]


def bench_shape(M, K, N, dtype, device, measure, r=16):
    gen = torch.Generator(device="cpu").manual_seed(0)
    W = (torch.randn(N, K, generator=gen) / K**0.5).to(device, dtype)
    q = quantize(W)
    x = torch.randn(M, K, generator=gen).to(device, dtype)
    A = (torch.randn(r, K, generator=gen) / K**0.5).to(device, dtype).requires_grad_()
    B = (torch.randn(N, r, generator=gen) / r**0.5).to(device, dtype).requires_grad_()
    xg = x.clone().requires_grad_()
    dy = torch.randn(M, N, generator=gen).to(device, dtype)

    def train_step(forward):
        return training_step(forward, dy, (xg, A, B))

    forward_ms = {
        "dense bf16 (cuBLAS)": measure(lambda: F.linear(x, W)),
        "dequantize + matmul": measure(lambda: F.linear(x, peft_ops.nf4.dequantize(q, dtype))),
        "nf4_linear (fused)": measure(lambda: peft_ops.nf4_linear(x, q)),
    }
    fwd_bwd_ms = {
        "LoRA on dense": measure(train_step(lambda: peft_ops.lora_linear(xg, W, A, B, 2.0))),
        "QLoRA (fused)": measure(train_step(lambda: peft_ops.qlora_linear(xg, q, A, B, 2.0))),
    }
    regime = "decode GEMV (split-K)" if M <= 16 else "dequant-GEMM"
    weight_bytes = q.nbytes
    return {"shape": {"M": M, "in": K, "out": N, "r": r}, "regime": regime, "forward_ms": forward_ms,
            "fwd_bwd_ms": fwd_bwd_ms, "nf4_weight_bytes": weight_bytes,
            "nf4_forward_GBps": weight_bytes / forward_ms["nf4_linear (fused)"] / 1e6}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA GPU here: timings would mean nothing (use --smoke to check the script)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    measure = timer(device)
    rows = []
    for M, K, N in SMOKE_SHAPES if args.smoke else GPU_SHAPES:
        row = bench_shape(M, K, N, dtype, device, measure)
        rows.append(row)
        f, t = row["forward_ms"], row["fwd_bwd_ms"]
        print(f"M={M:5d} {K}→{N} [{row['regime']}] fwd: nf4 {f['nf4_linear (fused)']:.3f} ms = "
              f"×{f['nf4_linear (fused)'] / f['dequantize + matmul']:.2f} dequant+matmul, "
              f"×{f['nf4_linear (fused)'] / f['dense bf16 (cuBLAS)']:.2f} dense ({row['nf4_forward_GBps']:.0f} GB/s "
              f"of NF4 weight) | fwd+bwd: QLoRA ×{t['QLoRA (fused)'] / t['LoRA on dense']:.2f} LoRA", flush=True)
    if not args.smoke:
        write_record("nf4", "python benchmarks/bench_nf4.py", rows, args.out)

if __name__ == "__main__":
    main()

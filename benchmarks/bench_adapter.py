"""Bottleneck adapter: HBM bytes per call of the fused kernels against eager PyTorch (exact on
any machine), and on a CUDA GPU the times side by side in one run.

    python benchmarks/bench_adapter.py            # bytes at 7–8B shapes; plus timings on a CUDA GPU
    python benchmarks/bench_adapter.py --smoke    # tiny shapes, any device (checks the script)

Eager bytes are measured, not modelled: every ATen op that eager PyTorch runs for the forward
and the backward (on meta tensors: no memory, any shape) is counted as reading its tensor
inputs and writing its outputs; views move nothing. The fused bytes come from the kernels'
traffic model, which assumes, as the forward kernel is built for, that its second read of a
row block of x is served by L2 (both in peft_ops.roofline; `peft-ops bench --ops adapter`
reports the same with the other ops).
"""

from __future__ import annotations

import argparse
import pathlib

import torch

from peft_ops import roofline
from peft_ops.bench import implementations
from peft_ops.roofline import OpShape

GPU_SHAPES = [(512, 4096, 64), (4096, 4096, 64), (8192, 4096, 64), (8192, 4096, 16), (8192, 4096, 256),
              (8192, 5120, 64)]
SMOKE_SHAPES = [(64, 64, 8)]


def eager_bytes(M: int, d: int, m: int, dtype=torch.bfloat16, dropout_p: float = 0.0) -> dict:
    """Measured bytes of the eager reference (forward, backward) at this shape."""
    return roofline.unfused_bytes(OpShape("adapter", M, d, d, m, dtype.itemsize), dropout_p)


def fused_bytes(M: int, d: int, m: int, element_bytes: int = 2, dropout_p: float = 0.0) -> dict:
    """HBM bytes of the fused kernels per call (peft_ops.roofline's traffic model; the dropout
    mask is regenerated from the seed, so dropout adds nothing)."""
    shape = OpShape("adapter", M, d, d, m, element_bytes)
    return {phase: roofline.fused_bytes(shape, phase) for phase in roofline.PHASES}


def bench_shape(M, d, m, dtype, device, measure):
    """Fused and eager forward and fwd+bwd times, on the inputs `peft-ops bench` uses."""
    from bench_lora import training_step

    impls, dy, leaves, _ = implementations(OpShape("adapter", M, d, d, m, dtype.itemsize), dtype, device)
    ms = {"forward": {name: measure(impls[name]) for name in ("fused", "eager")},
          "fwd_bwd": {name: measure(training_step(impls[name], dy, leaves)) for name in ("fused", "eager")}}
    nbytes = fused_bytes(M, d, m, dtype.itemsize)
    return ms, nbytes["forward"] / ms["forward"]["fused"] / 1e6, \
        (nbytes["forward"] + nbytes["backward"]) / ms["fwd_bwd"]["fused"] / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SMOKE_SHAPES if args.smoke else GPU_SHAPES
    rows = []
    print("HBM bytes per call, bf16 (eager: measured op by op; fused: the kernels' traffic model)")
    for M, d, m in shapes:
        row = {"shape": {"M": M, "d": d, "m": m}}
        for dropout_p in (0.0, 0.1):
            eager, fused = eager_bytes(M, d, m, dropout_p=dropout_p), fused_bytes(M, d, m, 2, dropout_p)
            row[f"bytes p={dropout_p}"] = {"eager": eager, "fused": fused}
            act = M * d * 2
            print(f"M={M:5d} d={d} m={m:3d} p={dropout_p}: forward eager {eager['forward'] / act:.2f}·x, fused "
                  f"{fused['forward'] / act:.2f}·x (÷{eager['forward'] / fused['forward']:.1f}); backward eager "
                  f"{eager['backward'] / act:.2f}·x, fused {fused['backward'] / act:.2f}·x "
                  f"(÷{eager['backward'] / fused['backward']:.1f})", flush=True)
        rows.append(row)

    if device.type == "cuda" or args.smoke:
        from peft_ops.bench import timer

        measure = timer(device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        for row in rows:
            s = row["shape"]
            ms, fwd_gbps, train_gbps = bench_shape(s["M"], s["d"], s["m"], dtype, device, measure)
            row.update(ms=ms, fused_forward_GBps=fwd_gbps, fused_fwd_bwd_GBps=train_gbps)
            fwd, train = ms["forward"], ms["fwd_bwd"]
            print(f"M={s['M']:5d} d={s['d']} m={s['m']:3d}: forward fused {fwd['fused']:.3f} ms "
                  f"(eager ÷ fused ×{fwd['eager'] / fwd['fused']:.2f}, {fwd_gbps:.0f} GB/s) | "
                  f"fwd+bwd fused {train['fused']:.3f} ms (eager ÷ fused ×{train['eager'] / train['fused']:.2f}, "
                  f"{train_gbps:.0f} GB/s)", flush=True)
    else:
        print("no CUDA GPU: timings need one (the byte counts above hold anywhere)")

    if device.type == "cuda" and not args.smoke:
        from bench_lora import write_record

        write_record("adapter", "python benchmarks/bench_adapter.py", rows, args.out)

if __name__ == "__main__":
    main()

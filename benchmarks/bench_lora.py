"""LoRA layer forward+backward: fused kernels vs the unfused chain (PEFT's way) vs the frozen
base layer alone (cuBLAS), side by side in one run; and the activation memory each keeps.

    python benchmarks/bench_lora.py                      # on a CUDA GPU, 7-8B model shapes
    python benchmarks/bench_lora.py --smoke              # tiny shapes, any device (checks the script)

Ratios are what to read (fused ÷ base, unfused ÷ base); absolute times only mean something
on a GPU, with its name. Results go to benchmarks/results/ as JSON with device and versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib

import torch
import torch.nn.functional as F

import peft_ops
from peft_ops import reference
from peft_ops.bench import timer
from peft_ops.testing import saved_activation_bytes

GPU_SHAPES = [  # (tokens M, in, out, r)
    (512, 4096, 4096, 16), (4096, 4096, 4096, 16), (8192, 4096, 4096, 16),
    (8192, 4096, 11008, 16), (8192, 4096, 14336, 64), (8192, 11008, 4096, 8),
]
SMOKE_SHAPES = [(64, 64, 48, 8)]


def write_record(name: str, command: str, rows: list, out_dir: pathlib.Path, **extra) -> dict:
    """Save a benchmark's rows with the command, date, device and versions to
    out_dir/<name>_<device>.json; returns the record."""
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    record = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device, "torch": torch.__version__, "triton": triton.__version__, **extra, "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{device.replace(' ', '_')}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    return record


def training_step(forward, dy, leaves):
    """A function that runs forward() and its backward with dy, clearing the leaves' grads."""
    def run():
        for t in leaves:
            t.grad = None
        forward().backward(dy)
    return run


def bench_shape(M, K, N, r, dtype, dropout_p, device, measure):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(M, K, generator=gen)).to(device, dtype).requires_grad_()
    W = (torch.randn(N, K, generator=gen) / K**0.5).to(device, dtype)
    A = (torch.randn(r, K, generator=gen) / K**0.5).to(device, dtype).requires_grad_()
    B = (torch.randn(N, r, generator=gen) / r**0.5).to(device, dtype).requires_grad_()
    dy = torch.randn(M, N, generator=gen).to(device, dtype)
    s = 2.0

    def step(forward):
        return training_step(forward, dy, (x, A, B))

    variants = {
        "base (frozen linear)": step(lambda: F.linear(x, W)),
        "unfused (PEFT-style)": step(lambda: reference.lora_linear(x, W, A, B, s, None, dropout_p)),
        "fused (peft_ops)": step(lambda: peft_ops.lora_linear(x, W, A, B, s, None, dropout_p)),
    }
    times = {name: measure(fn) for name, fn in variants.items()}
    memory = {
        "unfused (PEFT-style)": saved_activation_bytes(
            lambda: reference.lora_linear(x, W, A, B, s, None, dropout_p), [W, A, B])[0],
        "fused (peft_ops)": saved_activation_bytes(
            lambda: peft_ops.lora_linear(x, W, A, B, s, None, dropout_p), [W, A, B])[0],
    }
    base = times["base (frozen linear)"]
    return {
        "shape": {"M": M, "in": K, "out": N, "r": r}, "dropout_p": dropout_p,
        "ms": times, "ratio_to_base": {k: v / base for k, v in times.items()},
        "saved_bytes": memory, "x_bytes": x.numel() * x.element_size(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA GPU here: timings would mean nothing (use --smoke to check the script)")
    shapes = SMOKE_SHAPES if args.smoke else GPU_SHAPES
    measure = timer(device)
    rows = []
    for M, K, N, r in shapes:
        for p in (0.0, 0.05):
            row = bench_shape(M, K, N, r, dtype, p, device, measure)
            rows.append(row)
            ratio = row["ratio_to_base"]
            print(f"M={M:5d} {K}→{N} r={r:<3d} p={p:<4} base {row['ms']['base (frozen linear)']:8.3f} ms | "
                  f"fused ×{ratio['fused (peft_ops)']:.3f} | unfused ×{ratio['unfused (PEFT-style)']:.3f} | "
                  f"saved: fused {row['saved_bytes']['fused (peft_ops)'] / row['x_bytes']:.2f}·x, "
                  f"unfused {row['saved_bytes']['unfused (PEFT-style)'] / row['x_bytes']:.2f}·x", flush=True)
    if not args.smoke:
        write_record(f"lora_{args.dtype}", f"python benchmarks/bench_lora.py --dtype {args.dtype}", rows, args.out,
                     dtype=args.dtype)


if __name__ == "__main__":
    main()

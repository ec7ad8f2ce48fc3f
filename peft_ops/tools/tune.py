"""``peft-ops tune``: on this machine's GPU, time both implementations of the LoRA GEMMs (the
fused Triton kernels and cuBLAS with the LoRA pieces around it, see
``peft_ops.ops.gemm_choice``) and both paths of the QLoRA ones (the fused NF4 kernels, or W
decoded into a workspace and the dense path) per phase, dtype, shape bucket and rank, and
cache the winners for the ops to use. Needs a CUDA GPU; ``--dry-run`` lists the cases anywhere.

    peft-ops tune                          # the default preset's layers, ranks and token counts
    peft-ops tune --preset quick --dtype fp16
"""

from __future__ import annotations

import argparse

import torch

from ..backend import kernel_modules
from ..nf4 import quantize
from ..ops import gemm_choice
from ..ops.paths import KernelLoraOps, KernelNF4Ops
from .presets import PRESETS
from .records import text_table


def cases(preset: dict, dtype: torch.dtype) -> list[tuple]:
    """(phase, dtype, M, N, K, r) for every layer, rank and token count of the preset, one per
    shape bucket (M and r by powers of two, as the cache keys them)."""
    seen, out = set(), []
    for K, N in preset["layers"]:
        for r in preset["ranks"]:
            for M in preset["tokens"]:
                for phase in gemm_choice.PHASES + gemm_choice.NF4_PHASES:
                    key = gemm_choice.shape_key(phase, dtype, M, N, K, r)
                    if key not in seen:
                        seen.add(key)
                        out.append((phase, dtype, M, N, K, r))
    return out


def options(phase: str) -> tuple:
    """The implementations a phase chooses between, and the field its choice is cached under."""
    return (gemm_choice.NF4_PATHS, "path") if phase in gemm_choice.NF4_PHASES else (gemm_choice.GEMMS, "gemm")


def phase_call(phase: str, option: str, dtype: torch.dtype, M: int, N: int, K: int, r: int, device):
    """A no-argument function running one phase of lora_linear's kernels on implementation
    `option` ("triton" / "cublas"): the forward GEMM with its LoRA term, or the backward (g,
    the rank pass, dX); or of qlora_linear's ("nf4-…" phases, "fused" / "dequant")."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype) * shape[-1] ** -0.5

    x, weight, lora_A, lora_B = rand(M, K), rand(N, K), rand(r, K), rand(N, r)
    if phase in gemm_choice.NF4_PHASES:
        ops, weight = KernelNF4Ops(path=option), quantize(weight).tensors()
    else:
        ops = KernelLoraOps(option)
    xa, keep = ops.shrink(x, lora_A, 0.0, 0)
    if phase in ("forward", "nf4-forward"):
        return lambda: ops.forward(x, weight, xa, lora_B, 1.0, None)
    dy = rand(M, N)
    backward = ops.qlora_backward if phase == "nf4-dx" else ops.backward
    return lambda: backward(dy, x, weight, lora_A, lora_B, xa, keep, 1.0, 0.0, True, True, True, False)


def decide(timings: dict) -> dict:
    """{key: {"gemm" (or "path"): the faster, "ms": {option: ms}}} from {key: {option: ms}}
    (ties: the first option, "triton" / "fused": the fewer launches)."""
    decided = {}
    for key, ms in timings.items():
        choices, field = options(key.split("|")[0])
        decided[key] = {field: min(choices, key=lambda o: (ms[o], o != choices[0])), "ms": ms}
    return decided


def tune(preset: dict, dtype: torch.dtype, measure=None, progress=print) -> dict:
    """Time both implementations of every case on the current GPU; {key: {gemm: ms}}.
    `measure(fn) -> ms`: Triton's do_bench (median, L2 flushed) unless given."""
    measure = measure or kernel_modules().common.benchmark_ms
    device = torch.device("cuda", torch.cuda.current_device())
    timings = {}
    for phase, dt, M, N, K, r in cases(preset, dtype):
        key = gemm_choice.shape_key(phase, dt, M, N, K, r)
        timings[key] = {option: measure(phase_call(phase, option, dt, M, N, K, r, device))
                        for option in options(phase)[0]}
        progress(f"{key}: " + ", ".join(f"{g} {ms:.3f} ms" for g, ms in timings[key].items()))
    return timings


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="peft-ops tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--dry-run", action="store_true", help="list the cases and the cache file; time nothing")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    todo = cases(PRESETS[args.preset], dtype)
    if args.dry_run:
        print(text_table(("phase", "dtype", "M", "N", "K", "r", "key"),
                         [(*map(str, c), gemm_choice.shape_key(*c)) for c in todo]))
        if torch.cuda.is_available():
            print(f"cache: {gemm_choice.cache_file(torch.cuda.get_device_name(), gemm_choice.versions())}")
        return 0
    if not torch.cuda.is_available():
        print("peft-ops tune times kernels on a CUDA GPU, and this machine has none (--dry-run lists the cases)")
        return 2
    choices = decide(tune(PRESETS[args.preset], dtype))
    path = gemm_choice.write(torch.cuda.get_device_name(), gemm_choice.versions(), choices)
    print(text_table(("case", "times (ms)", "chosen"),
                     [(key, ", ".join(f"{o} {ms:.3f}" for o, ms in c["ms"].items()), c.get("gemm") or c.get("path"))
                      for key, c in choices.items()]))
    print(f"\nwritten: {path}")
    return 0

"""The benchmark script runs end to end (tiny shapes; timings on CPU mean nothing)."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_lora_smoke():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_lora.py"), "--smoke"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fused ×" in out.stdout and "unfused ×" in out.stdout
    # the fused layer saves x + xa only; the unfused chain more (with dropout: mask and dropped x)
    lines = [line for line in out.stdout.splitlines() if "p=0.05" in line]
    assert lines and "saved: fused 1.25·x" in lines[0], out.stdout


def test_bench_nf4_smoke():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_nf4.py"), "--smoke"], env=env,
                         capture_output=True, text=True, timeout=300, cwd=ROOT / "benchmarks")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "decode GEMV (split-K)" in out.stdout and "dequant-GEMM" in out.stdout

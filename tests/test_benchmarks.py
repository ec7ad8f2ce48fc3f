"""The benchmark script runs end to end (tiny shapes; timings on CPU mean nothing)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


SCRIPTS = ("bench_lora.py", "bench_nf4.py", "bench_adapter.py")
# Runs each script as `python <script> --smoke` would, one after the other in one process (the
# imports — torch, PEFT, bitsandbytes — are paid once), and prints {script: its stdout} as JSON.
RUNNER = """
import contextlib, io, json, runpy, sys
import pytest
out = {}
buf = io.StringIO()
with contextlib.redirect_stdout(buf):  # the pytest-benchmark suite, untimed, in this process
    out["pytest benchmarks/"] = pytest.main(["-q", "-p", "no:cacheprovider", "-n", "0", "--benchmark-disable",
                                             "-o", "addopts=", "."])
out["pytest benchmarks/ output"] = buf.getvalue()
for script in sys.argv[1:]:
    sys.argv = [script, "--smoke"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit:
            if exit.code not in (None, 0):
                raise
    out[script] = buf.getvalue()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def smoke_outputs():
    """Each benchmark script's --smoke stdout, run without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", RUNNER, *SCRIPTS], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT / "benchmarks")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_smoke(script: str, outputs: dict) -> str:
    return outputs[script]


def test_bench_lora_smoke(smoke_outputs):
    stdout = run_smoke("bench_lora.py", smoke_outputs)
    assert "fused ×" in stdout and "unfused ×" in stdout
    # the fused layer saves x + xa only; the unfused chain more (with dropout: mask and dropped x)
    lines = [line for line in stdout.splitlines() if "p=0.05" in line]
    assert lines and "saved: fused 1.25·x" in lines[0], stdout


def test_bench_nf4_smoke(smoke_outputs):
    stdout = run_smoke("bench_nf4.py", smoke_outputs)
    assert "decode GEMV (split-K)" in stdout and "dequant-GEMM" in stdout


def test_bench_adapter_smoke(smoke_outputs):
    stdout = run_smoke("bench_adapter.py", smoke_outputs)
    assert "forward fused" in stdout and "fwd+bwd fused" in stdout


def test_adapter_bytes_script_matches_the_roofline_model():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_adapter import eager_bytes, fused_bytes

    # The adapter's eager forward passes over M×d at least 7 times (x twice, z, s·z twice, y);
    # the fused one twice, plus h and the weights.
    M, d, m = 1024, 512, 16
    eager, fused = eager_bytes(M, d, m), fused_bytes(M, d, m)
    assert eager["forward"] >= 7 * M * d * 2
    assert fused["forward"] == 2 * M * d * 2 + M * m * 4 + (2 * m * d + m + d) * 2
    assert eager["backward"] > 2 * fused["backward"] > 8 * M * d * 2


def test_pytest_benchmark_suite_runs(smoke_outputs):
    """`pytest benchmarks/` (pytest-benchmark, untimed) passes."""
    assert smoke_outputs["pytest benchmarks/"] == 0, smoke_outputs["pytest benchmarks/ output"][-3000:]
    assert " passed" in smoke_outputs["pytest benchmarks/ output"]
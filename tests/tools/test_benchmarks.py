"""`pytest benchmarks/` and benchmarks/error_survey.py run end to end (tiny shapes; timings on
CPU mean nothing), on `peft-ops bench`'s shapes, implementations and record writer."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# `pytest benchmarks/` as a user runs it (pytest-benchmark timing each case once), in a fresh
# process without the interpreter; prints its exit code and output as JSON.
RUNNER = """
import contextlib, io, json, sys
import pytest
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-n", "0", "-o", "addopts=", "--benchmark-min-rounds=1",
                        "--benchmark-max-time=0", "--benchmark-warmup=off", "--bench-out", sys.argv[1], "."])
print(json.dumps({"code": int(code), "output": buf.getvalue()}))
"""


@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory):
    record = tmp_path_factory.mktemp("bench") / "record.json"
    # not under this run's xdist worker: pytest-benchmark disables timing inside one
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_XDIST")}
    out = subprocess.run([sys.executable, "-c", RUNNER, str(record)], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT / "benchmarks")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), record


def test_pytest_benchmark_suite_runs_on_the_bench_shapes(benchmark_run):
    from peft_ops.tools.bench import PRESETS, shapes_for
    from peft_ops.tools.roofline import OPS

    result, _ = benchmark_run
    assert result["code"] == 0, result["output"][-3000:]
    # one fused forward and one fused fwd+bwd per shape it takes from `peft-ops bench`'s smoke preset
    shapes = shapes_for(list(OPS), PRESETS["smoke"])[::2]
    assert {s.op for s in shapes} == set(OPS)
    passed = int(re.search(r"(\d+) passed", result["output"]).group(1))
    assert passed > 2 * len(shapes)  # the baselines ran too, not the fused op alone


def test_pytest_benchmark_suite_writes_a_record(benchmark_run):
    """The session's medians, with command, device and versions, through the bench's writer."""
    _, record_path = benchmark_run
    record = json.loads(record_path.read_text())
    assert {"command", "date", "device", "torch", "triton"} <= set(record)
    names = {row["name"] for row in record["rows"]}
    assert any(name.startswith("test_forward_backward[") and "fused" in name for name in names)
    assert all(row["median_ms"] > 0 and row["rounds"] >= 1 for row in record["rows"])


def test_error_survey_reports_every_path_dtype_and_tensor():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "error_survey.py"), "--cases", "1"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    assert {(r[0], r[1]) for r in rows} == {(p, d) for p in ("triton", "torch") for d in ("fp32", "fp16", "bf16")}
    assert all(float(r[3]) <= float(r[4]) for r in rows), out.stdout  # every max error within its tolerance

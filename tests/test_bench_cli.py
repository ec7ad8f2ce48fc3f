"""`peft-ops bench` on a CPU-only machine: the roofline model, saved activations and targets,
written to CSV, JSON and a plot; and its timing code path (run on CPU with tiny shapes)."""

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest


def run_bench(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "peft_ops.cli", "bench", "--out", str(tmp_path), *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout, json.loads((tmp_path / "bench.json").read_text())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU mode")
def test_quick_cpu_mode_writes_every_op(tmp_path):
    stdout, record = run_bench(tmp_path, "--quick", "--no-compile")
    assert "no CUDA GPU here" in stdout and "timings" in stdout
    rows = record["rows"]
    assert {r["op"] for r in rows} == {"lora", "qlora", "nf4", "adapter"}
    assert {r["phase"] for r in rows} == {"forward", "backward", "fwd+bwd"}
    for row in rows:
        for key in ("flops", "min_bytes", "fused_bytes", "eager_bytes", "bound_fused_ms", "bound_pct_roofline"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["min_bytes"] <= row["fused_bytes"] * (1 + 1e-12)
        assert row["bound_pct_roofline"] <= 100 + 1e-9
        assert "estimate_ms" not in row  # --no-compile: no static estimate
    assert record["device"] == "cpu" and record["torch"] and record["triton"] and record["command"].startswith(
        "peft-ops bench")
    with open(tmp_path / "bench.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert all(r["device"] == "cpu" and r["torch"] and r["date"] and r["command"] for r in csv_rows)
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    saved = {(r["layer"], r["dropout"]): r for r in record["saved_activations"]}
    for dropout in (0.0, 0.1):  # x + x·Aᵀ exactly, with and without dropout; PEFT more
        ours = saved[("peft_ops LoraLinear", dropout)]
        assert ours["saved_per_x"] == pytest.approx(ours["x_plus_xa_per_x"], rel=1e-12)
        assert saved[("peft_ops QLoraLinear", dropout)]["saved_per_x"] == pytest.approx(ours["x_plus_xa_per_x"])
        if ("PEFT LoRA (fp32 adapters)", dropout) in saved:  # with peft installed (CI)
            assert saved[("PEFT LoRA (fp32 adapters)", dropout)]["saved_per_x"] > 1.9
    targets = {t["target"]: t for t in record["targets"]}
    assert all(t["status"].startswith("not measured") for name, t in targets.items() if "saved" not in name)
    # a bytes-only figure is never shown as "% of roofline" without saying it is an upper bound
    text = (tmp_path / "bench.txt").read_text()
    assert "upper bound" in text and "pred." not in text
    assert targets["activation bytes saved per LoRA layer ÷ (x + x·Aᵀ)"]["status"] == "met"


@pytest.mark.compile
def test_the_static_estimate_sits_beside_the_bounds(tmp_path):
    stdout, record = run_bench(tmp_path, "--preset", "smoke", "--ops", "nf4")
    assert "static estimate" in stdout and record["roofline_gpu"]["name"] == "H200"
    for row in record["rows"]:
        assert row["estimate_ms"] > 0 and row["estimate_launches"] >= 1 and row["estimate_kernels"]
        # the estimate is never faster than the bytes-only bound
        assert row["estimate_ms"] >= row["bound_fused_ms"] * (1 - 1e-9)
        assert row["estimate_pct_roofline"] <= row["bound_pct_roofline"] * (1 + 1e-9)
    assert record["estimate_builds"] and all(b["facts"]["loops"] or b["facts"]["whole_kernel"]
                                             for b in record["estimate_builds"])
    assert all("estimate" in t and "estimate_status" in t for t in record["targets"])


def test_timing_code_path_on_tiny_shapes(tmp_path):
    # the GPU mode's code (every baseline, backward, fwd+bwd, saved bytes), timed on this CPU
    stdout, record = run_bench(tmp_path, "--preset", "smoke", "--time-anyway", "--no-compile")
    rows = [r for r in record["rows"] if r["phase"] == "fwd+bwd"]
    impls = {r["op"]: {k[3:] for k in r if k.startswith("ms_")} for r in rows}
    has_peft, has_bnb = (importlib.util.find_spec(p) is not None for p in ("peft", "bitsandbytes"))
    assert {"fused", "eager", "base", "lora (bf16 base)"} | ({"peft"} if has_peft and has_bnb else set()) \
        <= impls["qlora"]
    assert {"fused", "eager", "base"} | ({"peft"} if has_peft else set()) <= impls["lora"]
    assert {"fused", "eager", "base"} | ({"bitsandbytes"} if has_bnb else set()) <= impls["nf4"]
    assert {"fused", "eager"} <= impls["adapter"]
    assert all(math.isfinite(r["ms_fused"]) and r["ms_fused"] > 0 for r in rows)
    lora = next(r for r in record["rows"] if r["op"] == "lora" and r["phase"] == "forward")
    x_bytes = lora["M"] * lora["K"] * 2
    assert lora["saved_bytes_fused"] == x_bytes + lora["M"] * lora["r"] * 4


def test_unknown_op_is_an_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "peft_ops.cli", "bench", "--ops", "lora,dora", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "dora" in out.stderr

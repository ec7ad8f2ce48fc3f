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
    out = subprocess.run([sys.executable, "-m", "peft_ops.tools.cli", "bench", "--out", str(tmp_path), *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout, json.loads((tmp_path / "bench.json").read_text())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU mode")
def test_quick_cpu_mode_writes_every_op(tmp_path):
    """Also: --gpu names the roofline's GPU and --peak-bandwidth / --peak-tflops override its
    peaks; every bound follows them."""
    stdout, record = run_bench(tmp_path, "--quick", "--no-compile", "--gpu", "A100-80GB", "--peak-bandwidth", "1000",
                               "--peak-tflops", "100", "--tune")
    gpu = record["roofline_gpu"]
    assert (gpu["name"], gpu["bandwidth_GBps"], gpu["bf16_TFLOPs"]) == ("A100-80GB", 1000, 100)
    for row in record["rows"]:
        assert row["model_gpu"] == "A100-80GB"
        assert row["bound_fused_ms"] == pytest.approx(max(row["flops"] / 100e12, row["fused_bytes"] / 1000e9) * 1e3,
                                                      rel=1e-12)
    assert "no CUDA GPU here" in stdout and "timings" in stdout
    rows = record["rows"]
    assert {r["op"] for r in rows} == {"lora", "qlora", "dora", "qdora", "nf4", "bottleneck"}
    # lora's GEMM implementations per shape: no tuning off a GPU, so the default rule's
    assert {(r["M"], r["gemm"]) for r in rows if r["op"] == "lora"} == {(16, "cublas/cublas"), (8192, "triton/triton")}
    assert "GEMMs fwd/dX" in stdout
    assert "--tune: no CUDA GPU here" in stdout and record["gemm_tuning"] == {}
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
        mask = 1 / 16 if dropout else 0  # the bit-packed keep mask: 1 bit per bf16 element of x
        assert ours["budget_per_x"] == pytest.approx(ours["x_plus_xa_per_x"] + mask, rel=1e-12)
        assert ours["saved_per_x"] == pytest.approx(ours["budget_per_x"], rel=1e-12)
        assert saved[("peft_ops QLoraLinear", dropout)]["saved_per_x"] == pytest.approx(ours["budget_per_x"])
        if ("PEFT LoRA (fp32 adapters)", dropout) in saved:  # with peft installed (CI)
            assert saved[("PEFT LoRA (fp32 adapters)", dropout)]["saved_per_x"] > 1.9
    targets = {t["target"]: t for t in record["targets"]}
    assert all(t["status"].startswith("not measured") for name, t in targets.items() if "saved" not in name)
    # many adapters in one batch: its two target rows, neither timed nor estimated here
    from peft_ops.tools.estimate import MULTI_LORA_SCENARIOS

    assert [m["name"] for m in record["multi_adapter"]] == [s["name"] for s in MULTI_LORA_SCENARIOS]
    assert all(m["name"] in targets and "grouped_ms" not in m for m in record["multi_adapter"])
    # a bytes-only figure is never shown as "% of roofline" without saying it is an upper bound
    text = (tmp_path / "bench.txt").read_text()
    assert "upper bound" in text and "pred." not in text
    assert targets["activation bytes saved per LoRA layer ÷ (x + x·Aᵀ + mask bits)"]["status"] == "met"
    assert targets["activation bytes saved per DoRA layer ÷ (x + x·Aᵀ + one [M, out] + mask bits)"]["status"] == "met"
    for dropout in (0.0, 0.1):  # PEFT's DoRA layer keeps W + s·B·A and more
        if ("PEFT DoRA (fp32 adapters)", dropout) in saved:
            assert saved[("PEFT DoRA (fp32 adapters)", dropout)]["saved_per_x"] > \
                saved[("peft_ops LoraLinear (DoRA)", dropout)]["saved_per_x"]


def test_timing_code_path_on_tiny_shapes(tmp_path):
    # the GPU mode's code (every baseline, backward, fwd+bwd, saved bytes), timed on this CPU, in
    # fp16 (--dtype; bf16 is the default every other run takes)
    stdout, record = run_bench(tmp_path, "--preset", "smoke", "--time-anyway", "--no-compile", "--dtype", "fp16")
    assert record["dtype"] == "fp16"
    rows = [r for r in record["rows"] if r["phase"] == "fwd+bwd"]
    impls = {r["op"]: {k[3:] for k in r if k.startswith("ms_")} for r in rows}
    has_peft, has_bnb = (importlib.util.find_spec(p) is not None for p in ("peft", "bitsandbytes"))
    assert {"fused", "eager", "base", "lora (bf16 base)"} | ({"peft"} if has_peft and has_bnb else set()) \
        <= impls["qlora"]
    assert {"fused", "eager", "base"} | ({"peft"} if has_peft else set()) <= impls["lora"]
    assert {"fused", "eager", "base", "lora"} | ({"peft"} if has_peft else set()) <= impls["dora"]
    assert {"fused", "eager", "base", "qlora"} | ({"peft"} if has_peft and has_bnb else set()) <= impls["qdora"]
    assert {"fused", "eager", "base"} | ({"bitsandbytes"} if has_bnb else set()) <= impls["nf4"]
    assert {"fused", "eager"} <= impls["bottleneck"]
    assert all(math.isfinite(r["ms_fused"]) and r["ms_fused"] > 0 for r in rows)
    for m in record["multi_adapter"]:  # the grouped op's rows, timed on tiny shapes here
        assert all(math.isfinite(m[k]) and m[k] > 0 for k in ("grouped_ms", "one_adapter_ms", "sequential_ms"))
        assert m["measured_ratio"] > 0
    lora = next(r for r in record["rows"] if r["op"] == "lora" and r["phase"] == "forward")
    x_bytes = lora["M"] * lora["K"] * 2
    assert lora["saved_bytes_fused"] == x_bytes + lora["M"] * lora["r"] * 4


def test_unknown_op_is_an_error(tmp_path, capsys):
    from peft_ops.tools import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(["bench", "--ops", "lora,vera", "--out", str(tmp_path)])
    assert exited.value.code == 2 and "vera" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything ran


@pytest.mark.aot
def test_aot_jobs_and_only(tmp_path):
    """`peft-ops aot --jobs 1 --only …` builds just the named kernels, in one process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "peft_ops.tools.cli", "aot", "--jobs", "1", "--only", "dropout_mask",
                          "--no-cache", "--json", "--out", str(tmp_path / "c.json")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    builds = json.loads((tmp_path / "c.json").read_text())["builds"]
    assert {b["target"] for b in builds} == {"sm80", "sm90"}
    assert all(b["kernel"].startswith("dropout_mask") and b["spill_bytes"] == 0 for b in builds)


def test_compile_is_another_name_for_aot(capsys):
    """`peft-ops compile`, the command's earlier name, still runs `peft-ops aot`."""
    from peft_ops.tools import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(["compile", "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: peft-ops aot")


def test_nf4_rows_run_every_decode_batch():
    """The NF4 rows of the default preset: decode batches 1, 2, 4, 8, 16 (the GEMV must stay
    memory-bound up to 16 rows) and the training sizes, on every layer of the preset."""
    from peft_ops.tools.bench import shapes_for
    from peft_ops.tools.presets import PRESETS

    shapes = shapes_for(["nf4"], PRESETS["default"])
    assert {s.M for s in shapes} == {1, 2, 4, 8, 16, 512, 4096, 8192}
    assert len(shapes) == 8 * len(PRESETS["default"]["layers"])
